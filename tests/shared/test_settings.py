"""Settings: defaults, the LOOKALIKE_* variables, and validators that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import ConfigError
from shared.settings import (
    DEFAULT_GALLERY_SIZE,
    DEFAULT_MODEL,
    ApiSettings,
    BrokerSettings,
    GallerySettings,
    LogSettings,
    ModelSettings,
    StorageSettings,
    load_settings,
)

GROUPS = (
    ModelSettings,
    GallerySettings,
    StorageSettings,
    BrokerSettings,
    ApiSettings,
    LogSettings,
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No LOOKALIKE_* variable, nor a bare field name (NAME, SIZE...), from the outer shell."""
    for group in GROUPS:
        for field_name, info in group.model_fields.items():
            monkeypatch.delenv(str(info.validation_alias), raising=False)
            monkeypatch.delenv(field_name.upper(), raising=False)
            monkeypatch.delenv(field_name, raising=False)
    monkeypatch.setenv("LOOKALIKE_HOME", str(tmp_path / "home"))


def test_defaults_without_environment() -> None:
    settings = load_settings()

    assert settings.model.name == DEFAULT_MODEL
    assert settings.model.device == "auto"
    assert settings.model.fast_cpu == "auto"
    assert settings.model.is_random is False
    assert settings.gallery.name == "fashion-mnist"
    assert settings.gallery.size == DEFAULT_GALLERY_SIZE
    assert settings.gallery.data_dir is None
    assert settings.gallery.top_k == 5
    assert settings.broker.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.broker.visibility_timeout_s > settings.broker.task_time_limit_s


def test_default_index_dir_is_under_lookalike_home(tmp_path: Path) -> None:
    assert load_settings().gallery.index_dir == tmp_path / "home" / "index"


@pytest.mark.parametrize(
    ("variable", "value", "read", "expected"),
    [
        ("LOOKALIKE_MODEL", "my-org/my-clip", lambda s: s.model.name, "my-org/my-clip"),
        (
            "LOOKALIKE_REDIS_URL",
            "redis://cache.internal:6380/2",
            lambda s: s.broker.redis_url,
            "redis://cache.internal:6380/2",
        ),
        ("LOOKALIKE_DATA_DIR", "/srv/fashion", lambda s: s.gallery.data_dir, Path("/srv/fashion")),
        ("LOOKALIKE_GALLERY_SIZE", "1234", lambda s: s.gallery.size, 1234),
    ],
    ids=["model", "redis-url", "data-dir", "gallery-size"],
)
def test_environment_variable_is_read(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, read: object, expected: object
) -> None:
    monkeypatch.setenv(variable, value)

    assert read(load_settings()) == expected  # type: ignore[operator]


def test_text_search_is_on_and_logs_are_text_by_default() -> None:
    settings = load_settings()

    assert settings.model.text_search == "on"
    assert (settings.log.level, settings.log.format) == ("INFO", "text")
    assert settings.api.max_batch_files == 16


def test_log_settings_accept_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKALIKE_LOG_FORMAT", "JSON")
    monkeypatch.setenv("LOOKALIKE_LOG_LEVEL", "debug")

    settings = load_settings()

    assert (settings.log.level, settings.log.format) == ("DEBUG", "json")


def test_own_gallery_name_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKALIKE_GALLERY", "shop-2026.spring")

    assert load_settings().gallery.name == "shop-2026.spring"


def test_random_model_name_is_flagged_random(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKALIKE_MODEL", "random:vit-b-32")

    assert load_settings().model.is_random is True


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LOOKALIKE_TOP_K", "0"),
        ("LOOKALIKE_TOP_K", "51"),
        ("LOOKALIKE_DEVICE", "gpu9"),
        ("LOOKALIKE_GALLERY_SIZE", "0"),
        ("LOOKALIKE_GALLERY_SIZE", "70001"),
        ("LOOKALIKE_REDIS_URL", "http://x"),
        ("LOOKALIKE_MODEL", "   "),
        ("LOOKALIKE_GALLERY", "My Photos!"),
        ("LOOKALIKE_GALLERY", "../etc"),
        ("LOOKALIKE_TEXT_SEARCH", "maybe"),
        ("LOOKALIKE_MAX_BATCH_FILES", "0"),
        ("LOOKALIKE_LOG_FORMAT", "xml"),
    ],
)
def test_nonsense_value_raises_config_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigError, match=variable):
        load_settings()


@pytest.mark.parametrize(("visibility", "limit"), [("120", "120"), ("60", "120")])
def test_visibility_timeout_not_above_task_time_limit_is_refused(
    monkeypatch: pytest.MonkeyPatch, visibility: str, limit: str
) -> None:
    monkeypatch.setenv("LOOKALIKE_VISIBILITY_TIMEOUT", visibility)
    monkeypatch.setenv("LOOKALIKE_TASK_TIME_LIMIT", limit)

    with pytest.raises(ConfigError) as caught:
        load_settings()

    assert "LOOKALIKE_VISIBILITY_TIMEOUT" in str(caught.value)
    assert "LOOKALIKE_TASK_TIME_LIMIT" in str(caught.value)


def test_visibility_timeout_above_task_time_limit_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LOOKALIKE_VISIBILITY_TIMEOUT", "121")
    monkeypatch.setenv("LOOKALIKE_TASK_TIME_LIMIT", "120")

    broker = load_settings().broker

    assert (broker.visibility_timeout_s, broker.task_time_limit_s) == (121, 120)


def test_groups_can_be_built_with_field_names() -> None:
    model = ModelSettings(name="some/clip", fast_cpu="off")
    gallery = GallerySettings(size=10, top_k=3)

    assert (model.name, model.fast_cpu) == ("some/clip", "off")
    assert (gallery.size, gallery.top_k) == (10, 3)


def test_bare_name_variable_does_not_leak_into_model_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NAME", "laptop")  # WSL and some shells set NAME to the host name

    settings = load_settings()

    assert settings.model.name == DEFAULT_MODEL
    assert settings.gallery.name == "fashion-mnist"


@pytest.mark.parametrize(
    ("variable", "value", "read", "default"),
    [
        ("DEVICE", "cuda", lambda s: s.model.device, "auto"),
        ("SIZE", "7", lambda s: s.gallery.size, DEFAULT_GALLERY_SIZE),
        ("TOP_K", "9", lambda s: s.gallery.top_k, 5),
        ("QUEUE", "other", lambda s: s.broker.queue, "lookalike"),
        (
            "REDIS_URL",
            "redis://elsewhere:1/0",
            lambda s: s.broker.redis_url,
            "redis://127.0.0.1:6379/0",
        ),
    ],
    ids=["DEVICE", "SIZE", "TOP_K", "QUEUE", "REDIS_URL"],
)
def test_bare_field_name_variable_is_ignored(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, read: object, default: object
) -> None:
    monkeypatch.setenv(variable, value)

    found = read(load_settings())  # type: ignore[operator]

    assert found == default
