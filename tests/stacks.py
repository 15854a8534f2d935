"""Real service stacks for the end-to-end and API tests, and their session fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lookalike.stack import Stack, stack_env

GALLERY_SIZE = 120


def make_stack(workdir: Path, model_dir: Path, data_dir: Path) -> Stack:
    env = stack_env(
        model_dir=model_dir, data_dir=data_dir, workdir=workdir, gallery_size=GALLERY_SIZE
    )
    return Stack(env=env, workdir=workdir)


@pytest.fixture(scope="session")
def built_index(
    tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path, fake_data_dir: Path
) -> Path:
    """One index for the e2e tests, built with the real CLI command."""
    workdir = tmp_path_factory.mktemp("index-build")
    stack = make_stack(workdir, tiny_clip_dir, fake_data_dir)
    done = stack.run_cli("index", "build", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "index built" in done.stdout
    return workdir / "index"


def started_stack(
    workdir: Path, model_dir: Path, data_dir: Path, index: Path, *, workers: int = 1
) -> Stack:
    stack = make_stack(workdir, model_dir, data_dir)
    stack.env["LOOKALIKE_INDEX_DIR"] = str(index)
    return stack.start(workers=workers)


@pytest.fixture(scope="session")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_clip_dir: Path,
    fake_data_dir: Path,
    built_index: Path,
) -> Iterator[Stack]:
    """Redis + one worker process + the API process, shared by the read-only e2e tests."""
    stack = started_stack(
        tmp_path_factory.mktemp("service"), tiny_clip_dir, fake_data_dir, built_index
    )
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def live_service(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_clip_dir: Path,
    fake_data_dir: Path,
    built_index: Path,
) -> Iterator[Stack]:
    """Redis + two worker processes + the API, for the tests that change live galleries (each
    test makes galleries of its own names)."""
    stack = started_stack(
        tmp_path_factory.mktemp("live-service"),
        tiny_clip_dir,
        fake_data_dir,
        built_index,
        workers=2,
    )
    yield stack
    stack.stop()


FAULT_GALLERY = 200
FAST_FAULTS = {
    "LOOKALIKE_MODEL": "random:vit-b-32",
    "LOOKALIKE_TASK_TIME_LIMIT": "10",
    "LOOKALIKE_VISIBILITY_TIMEOUT": "20",
    "LOOKALIKE_STUCK_AFTER": "3",
}


def fault_stack(workdir: Path, data_dir: Path, index: Path, **extra: str) -> Stack:
    env = stack_env(
        model_dir=Path("unused"), data_dir=data_dir, workdir=workdir, gallery_size=FAULT_GALLERY
    )
    env.update(FAST_FAULTS, LOOKALIKE_INDEX_DIR=str(index), **extra)
    return Stack(env=env, workdir=workdir)


@pytest.fixture(scope="session")
def fault_index(tmp_path_factory: pytest.TempPathFactory, fake_data_dir: Path) -> Path:
    workdir = tmp_path_factory.mktemp("fault-index")
    stack = fault_stack(workdir, fake_data_dir, workdir / "index")
    done = stack.run_cli("index", "build", "--no-progress")
    assert done.returncode == 0, done.stderr
    return workdir / "index"
