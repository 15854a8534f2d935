"""Optional API keys, in process: who may submit and read jobs, and that keys stay secret."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from api.deps import KEY_REQUIRED
from shared.errors import ConfigError
from shared.settings import ApiSettings, BrokerSettings, Settings, load_settings

KEY_A = "key-aaaaaaaaaaaaaaaa"
KEY_B = "key-bbbbbbbbbbbbbbbb"
KEYS = f"{KEY_A},{KEY_B}"


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (28, 28), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def upload() -> dict[str, tuple[str, bytes, str]]:
    return {"file": ("a.png", png(), "image/png")}


@pytest.fixture
def keyed(redis_client: redis.Redis, make_client: Callable[..., TestClient]) -> TestClient:
    """An app that requires one of KEY_A, KEY_B."""
    return make_client(api_keys=KEYS)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_key_required(reply: Any) -> None:
    assert reply.status_code == 401, reply.text
    assert reply.json() == {"detail": KEY_REQUIRED}
    assert reply.headers["www-authenticate"] == "Bearer"


def test_submit_without_a_key_is_401(keyed: TestClient) -> None:
    assert_key_required(keyed.post("/jobs", files=upload()))


def test_read_without_a_key_is_401(keyed: TestClient) -> None:
    job_id = keyed.post("/jobs", files=upload(), headers=bearer(KEY_A)).json()["id"]
    assert_key_required(keyed.get(f"/jobs/{job_id}"))


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer key-cccccccccccccccc"},
        {"X-API-Key": "key-cccccccccccccccc"},
        {"Authorization": f"Bearer {KEY_A[:-1]}"},  # a prefix of a real key
        {"Authorization": f"Bearer {KEY_A}x"},  # a real key and more
        {"Authorization": f"Basic {KEY_A}"},  # the right key under the wrong scheme
        {"Authorization": "Bearer "},
        {"X-API-Key": ""},
    ],
    ids=["bearer", "x-api-key", "prefix", "suffix", "basic-scheme", "empty-bearer", "empty"],
)
def test_submit_with_a_wrong_key_is_401(keyed: TestClient, headers: dict[str, str]) -> None:
    assert_key_required(keyed.post("/jobs", files=upload(), headers=headers))


@pytest.mark.parametrize(
    "headers",
    [bearer(KEY_A), {"Authorization": f"bearer {KEY_B}"}, {"X-API-Key": KEY_A}],
    ids=["bearer", "lower-case-bearer", "x-api-key"],
)
def test_submit_with_a_valid_key_is_202(keyed: TestClient, headers: dict[str, str]) -> None:
    reply = keyed.post("/jobs", files=upload(), headers=headers)
    assert reply.status_code == 202, reply.text
    assert reply.json()["status"] == "queued"


def test_job_is_visible_only_to_the_key_that_made_it(keyed: TestClient) -> None:
    created = keyed.post("/jobs", files=upload(), headers=bearer(KEY_A))
    assert created.status_code == 202
    job_id = created.json()["id"]

    other = keyed.get(f"/jobs/{job_id}", headers=bearer(KEY_B))
    assert other.status_code == 404
    assert other.json() == {"detail": "Job not found."}

    mine = keyed.get(f"/jobs/{job_id}", headers={"X-API-Key": KEY_A})
    assert mine.status_code == 200
    assert mine.json()["id"] == job_id
    assert "owner" not in mine.json()


def test_keys_off_by_default_need_no_key(
    redis_client: redis.Redis, make_client: Callable[..., TestClient]
) -> None:
    client = make_client()
    created = client.post("/jobs", files=upload())
    assert created.status_code == 202
    assert client.get(f"/jobs/{created.json()['id']}").status_code == 200


def test_health_and_readiness_need_no_key(keyed: TestClient) -> None:
    assert keyed.get("/healthz").json() == {"status": "ok"}
    ready = keyed.get("/readyz")
    assert ready.status_code == 503  # no worker runs here; but not a 401
    assert ready.json() == {"detail": "No worker is running."}


def test_keys_never_appear_in_the_logs(keyed: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    created = keyed.post("/jobs", files=upload(), headers=bearer(KEY_A))
    keyed.get(f"/jobs/{created.json()['id']}", headers={"X-API-Key": KEY_A})
    keyed.get(f"/jobs/{created.json()['id']}", headers=bearer(KEY_B))
    keyed.post("/jobs", files=upload(), headers=bearer("key-cccccccccccccccc"))
    assert caplog.records, "expected some log records at DEBUG level"
    for secret in (KEY_A, KEY_B, "key-cccccccccccccccc"):
        assert secret not in caplog.text
        assert all(secret not in repr(record.__dict__) for record in caplog.records)


def test_keys_do_not_appear_in_the_settings_repr() -> None:
    settings = Settings(broker=BrokerSettings(), api=ApiSettings(api_keys=KEYS))
    assert settings.api.keys == (KEY_A, KEY_B)
    assert KEY_A not in repr(settings)
    assert KEY_A not in str(settings)


def test_short_key_is_refused_at_settings_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKALIKE_API_KEYS", f"{KEY_A},short-key")
    with pytest.raises(ConfigError) as refused:
        load_settings()
    message = str(refused.value)
    assert "LOOKALIKE_API_KEYS" in message
    assert "at least 16 characters" in message
    assert "short-key" not in message  # the message names the variable, not the secret
