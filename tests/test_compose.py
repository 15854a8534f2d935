"""The deployment files, checked without a Docker engine.

Where a Compose tool is installed, Compose itself validates docker-compose.yml (and, with
Compose v2, the CPU override). Everything else is read with PyYAML and held against what the
files must agree with: the CLI's parser, the LOOKALIKE_* settings, the API's routes and each
other (the indexer and the workers must see the same index). Building the images needs a Docker
engine and the network, so no test here does it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from lookalike.cli import build_parser
from shared.settings import FASHION_MNIST_SIZE, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "docker-compose.cpu.yml"
API_DOCKERFILE = ROOT / "docker" / "api.Dockerfile"
WORKER_DOCKERFILE = ROOT / "docker" / "worker.Dockerfile"
INDEX_DIR = "/var/lib/lookalike/index"
HF_HOME = "/var/cache/huggingface"
NVIDIA_GPUS = {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
USER_ID = "10001"


# --- reading the files ---------------------------------------------------------------------


class Reset:
    """Compose v2's ``!reset`` tag: the merged configuration drops the key it marks."""

    def __repr__(self) -> str:
        return "!reset"


RESET = Reset()


class _ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus Compose's ``!reset`` tag."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)


def load_compose(path: Path) -> dict[str, Any]:
    with path.open() as handle:
        document = yaml.load(handle, Loader=_ComposeLoader)
    assert isinstance(document, dict), f"{path.name} is not a YAML mapping"
    return document


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    # Plain YAML, no Compose v2 tags: docker-compose 1.x reads it too.
    with COMPOSE_FILE.open() as handle:
        return yaml.safe_load(handle)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]  # type: ignore[no-any-return]


def interpolate(value: Any) -> str:
    """A Compose value with each ``${NAME:-default}`` replaced by its default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Short-syntax volumes as ``{target: source}``."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target, *_ = entry.split(":")
        mounts[target] = source
    return mounts


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """``(KEYWORD, arguments)`` for each instruction, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    assert not pending, f"{path.name} ends inside a continued line"
    return instructions


def runs(path: Path) -> list[str]:
    return [arguments for keyword, arguments in dockerfile_instructions(path) if keyword == "RUN"]


def last(path: Path, keyword: str) -> str:
    found = [arguments for kw, arguments in dockerfile_instructions(path) if kw == keyword]
    assert found, f"{path.name} has no {keyword} instruction"
    return found[-1]


# --- Compose itself, where it is installed ---------------------------------------------------


@dataclass(frozen=True)
class ComposeTool:
    argv: tuple[str, ...]
    major: int
    version: str


def find_compose_tools() -> list[ComposeTool]:
    """``docker compose`` (the v2 plugin) and ``docker-compose`` (1.x or 2.x), if they run."""
    candidates: list[tuple[str, ...]] = []
    if shutil.which("docker"):
        candidates.append(("docker", "compose"))
    standalone = shutil.which("docker-compose")
    if standalone:
        candidates.append((standalone,))
    tools = []
    for argv in candidates:
        try:
            done = subprocess.run(
                [*argv, "version"], capture_output=True, text=True, timeout=60, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        match = re.search(r"version v?((\d+)\.\d+\.\d+)", done.stdout)
        if done.returncode == 0 and match:
            tools.append(ComposeTool(argv=argv, major=int(match[2]), version=match[1]))
    return tools


@pytest.fixture(scope="module")
def compose_tools() -> list[ComposeTool]:
    tools = find_compose_tools()
    if not tools:
        pytest.skip("no Compose tool here: neither `docker compose` nor `docker-compose` runs")
    return tools


def run_compose(tool: ComposeTool, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "LOOKALIKE_"))}
    return subprocess.run(
        [*tool.argv, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_compose_accepts_the_compose_file(compose_tools: list[ComposeTool]) -> None:
    for tool in compose_tools:
        done = run_compose(tool, "-f", "docker-compose.yml", "--profile", "setup", "config", "-q")
        assert done.returncode == 0, f"Compose {tool.version}: {done.stderr}"


def compose_v2(tools: list[ComposeTool]) -> ComposeTool:
    for tool in tools:
        if tool.major >= 2:
            return tool
    pytest.skip(
        "only docker-compose 1.x here; it cannot read the CPU override's !reset tag, which "
        "needs Compose v2 (`docker compose`)"
    )


def test_compose_v2_accepts_the_cpu_override(compose_tools: list[ComposeTool]) -> None:
    tool = compose_v2(compose_tools)
    files = ("-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml", "--profile", "setup")
    done = run_compose(tool, *files, "config", "-q")
    assert done.returncode == 0, f"Compose {tool.version}: {done.stderr}"


def test_compose_v2_cpu_override_drops_the_gpu_reservation(
    compose_tools: list[ComposeTool],
) -> None:
    tool = compose_v2(compose_tools)
    files = ("-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml", "--profile", "setup")
    done = run_compose(tool, *files, "config", "--format", "json")
    assert done.returncode == 0, f"Compose {tool.version}: {done.stderr}"
    merged = json.loads(done.stdout)["services"]
    for name in ("worker", "indexer"):
        reservations = merged[name].get("deploy", {}).get("resources", {}).get("reservations", {})
        assert not reservations.get("devices"), f"{name} still reserves {reservations}"
        assert merged[name]["build"]["args"]["TORCH_INDEX_URL"]


# --- the services ----------------------------------------------------------------------------


def test_redis_persists_with_appendonly_and_is_not_published(services: dict[str, Any]) -> None:
    redis = services["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert "ports" not in redis
    assert volume_mounts(redis)["/data"] == "redis-data"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


@pytest.mark.parametrize("name", ["api", "worker"])
def test_services_wait_for_healthy_redis_and_restart(services: dict[str, Any], name: str) -> None:
    service = services[name]
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert service["environment"]["LOOKALIKE_REDIS_URL"] == "redis://redis:6379/0"
    assert service["restart"] == "unless-stopped"


def test_api_publishes_its_port_and_probes_healthz(services: dict[str, Any]) -> None:
    from api.health import router

    api = services["api"]
    args = build_parser().parse_args(api["command"][1:])
    assert api["ports"] == [f"{args.port}:{args.port}"]
    assert args.host == "0.0.0.0"
    test = api["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], "the slim image has no curl"
    compile(test[3], "<healthcheck>", "exec")
    assert f"http://127.0.0.1:{args.port}/healthz" in test[3]
    assert "/healthz" in {route.path for route in router.routes}  # type: ignore[attr-defined]


def test_worker_can_be_scaled(services: dict[str, Any]) -> None:
    worker = services["worker"]
    for key in ("container_name", "ports", "hostname", "profiles"):
        assert key not in worker, f"the worker has {key}: --scale worker=N needs it gone"


def test_worker_has_time_to_finish_its_job_on_stop(services: dict[str, Any]) -> None:
    grace = re.fullmatch(r"(\d+)(s|m)", services["worker"]["stop_grace_period"])
    assert grace, services["worker"]["stop_grace_period"]
    assert int(grace[1]) * (60 if grace[2] == "m" else 1) >= 30


@pytest.mark.parametrize("name", ["worker", "indexer"])
def test_worker_images_reserve_the_nvidia_gpus(services: dict[str, Any], name: str) -> None:
    devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [NVIDIA_GPUS]


@pytest.mark.parametrize("name", ["worker", "indexer"])
def test_index_and_model_cache_are_named_volumes(
    compose: dict[str, Any], services: dict[str, Any], name: str
) -> None:
    service = services[name]
    mounts = volume_mounts(service)
    assert service["environment"]["LOOKALIKE_INDEX_DIR"] == INDEX_DIR
    assert service["environment"]["HF_HOME"] == HF_HOME
    assert {mounts[INDEX_DIR], mounts[HF_HOME]} <= set(compose["volumes"])


def test_api_reads_the_workers_index_read_only(
    services: dict[str, Any], compose: dict[str, Any]
) -> None:
    # The API shows gallery images from the index's thumbnails: same volume, never written.
    api, worker = services["api"], services["worker"]
    assert api["environment"]["LOOKALIKE_INDEX_DIR"] == INDEX_DIR
    assert f"{volume_mounts(worker)[INDEX_DIR]}:{INDEX_DIR}:ro" in api["volumes"]


def test_indexer_is_a_setup_step_sharing_the_workers_index(services: dict[str, Any]) -> None:
    # The index folder is named by model and gallery size: the two must read the same settings.
    worker, indexer = services["worker"], services["indexer"]
    assert indexer["profiles"] == ["setup"]
    assert indexer["restart"] == "no"
    for key in ("build", "image", "environment", "volumes", "deploy"):
        assert indexer[key] == worker[key], key


@pytest.mark.parametrize(
    ("name", "command"),
    [("api", "cmd_api"), ("worker", "cmd_worker"), ("indexer", "cmd_index_build")],
)
def test_service_commands_are_lookalike_commands(
    services: dict[str, Any], name: str, command: str
) -> None:
    argv = services[name]["command"]
    assert argv[0] == "lookalike"
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{name}: `{' '.join(argv)}` is not a lookalike command")
    assert args.func.__name__ == command


def test_workers_do_not_build_the_index_themselves(services: dict[str, Any]) -> None:
    # N workers building one index at once would race; the indexer builds it once.
    assert not build_parser().parse_args(services["worker"]["command"][1:]).build_index


def known_variables() -> set[str]:
    names = set()
    for group in Settings.model_fields.values():
        for field in group.annotation.model_fields.values():  # type: ignore[union-attr]
            names.add(field.validation_alias)
    return names


@pytest.mark.parametrize("name", ["api", "worker"])
def test_service_environment_is_valid_settings(
    services: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    environment = {k: interpolate(v) for k, v in services[name]["environment"].items()}
    ours = {k for k in environment if k.startswith("LOOKALIKE_")}
    assert ours <= known_variables(), f"unknown variables: {ours - known_variables()}"
    for key in list(os.environ):
        if key.startswith("LOOKALIKE_"):
            monkeypatch.delenv(key)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    if name == "worker":
        assert settings.model.name == "openai/clip-vit-base-patch32"
        assert settings.gallery.size == FASHION_MNIST_SIZE
        assert str(settings.gallery.index_dir) == INDEX_DIR


def test_cpu_override_resets_the_gpu_reservation() -> None:
    override = load_compose(CPU_OVERRIDE)["services"]
    assert set(override) == {"worker", "indexer"}
    for name, service in override.items():
        assert service["deploy"]["resources"]["reservations"]["devices"] is RESET, name
        assert service["build"]["args"]["TORCH_INDEX_URL"].startswith("https://"), name


def test_compose_file_says_how_to_run_on_cpu() -> None:
    text = COMPOSE_FILE.read_text()
    assert "-f docker-compose.yml -f docker-compose.cpu.yml up" in text
    assert "--profile setup run --rm indexer" in text


# --- the images ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [API_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.name)
def test_images_run_as_an_unprivileged_user(path: Path) -> None:
    user = last(path, "USER")
    assert user.split(":")[0] not in ("root", "0"), user
    assert user.split(":")[0] in (USER_ID, "lookalike")
    assert any(f"useradd --uid {USER_ID}" in run for run in runs(path))
    assert last(path, "FROM").startswith("python:3.11-slim")


@pytest.mark.parametrize(
    ("path", "service"),
    [(API_DOCKERFILE, "api"), (WORKER_DOCKERFILE, "worker")],
    ids=["api", "worker"],
)
def test_image_commands_match_the_services(
    services: dict[str, Any], path: Path, service: str
) -> None:
    command = json.loads(last(path, "CMD"))
    assert command == services[service]["command"]
    build = services[service]["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).resolve() == path


def test_api_image_has_no_torch() -> None:
    for run in runs(API_DOCKERFILE):
        assert "torch" not in run and "[worker]" not in run, run
    assert "pip install --no-cache-dir ." in runs(API_DOCKERFILE)


def test_worker_image_installs_torch_before_the_project() -> None:
    commands = runs(WORKER_DOCKERFILE)
    torch = next(i for i, run in enumerate(commands) if "torch==" in run)
    project = next(i for i, run in enumerate(commands) if '".[worker]"' in run)
    assert torch < project
    assert '--index-url "$TORCH_INDEX_URL"' in commands[torch]
    assert len(set(re.findall(r"torch==[\w.]+", commands[torch]))) == 1, "one torch version"
    assert "TORCH_INDEX_URL=" in [
        a for kw, a in dockerfile_instructions(WORKER_DOCKERFILE) if kw == "ARG"
    ]


def test_worker_image_ships_the_gallery_and_owns_its_volumes() -> None:
    commands = runs(WORKER_DOCKERFILE)
    assert any("apt-get install" in run and "dataset-fashion-mnist" in run for run in commands)
    chown = next(run for run in commands if "chown" in run)
    assert f"chown -R {USER_ID}:{USER_ID}" in chown
    assert "/var/lib/lookalike" in chown and HF_HOME in chown


@pytest.mark.parametrize("path", [API_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.name)
def test_images_copy_sources_that_exist_and_are_not_ignored(path: Path) -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for keyword, arguments in dockerfile_instructions(path):
        if keyword != "COPY":
            continue
        for source in arguments.split()[:-1]:
            assert (ROOT / source).exists(), f"{path.name} copies {source}, which is missing"
            name = source.rstrip("/")
            hits = [p for p in ignored if fnmatch.fnmatch(name, p.removeprefix("**/"))]
            assert not hits, f"{source} is excluded by .dockerignore {hits}"


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "**/__pycache__", "**/*.egg-info", ".pytest_cache"} <= ignored
