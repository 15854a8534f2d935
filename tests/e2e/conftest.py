from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Stack, base_env

GALLERY_SIZE = 120


def make_stack(workdir: Path, model_dir: Path, data_dir: Path) -> Stack:
    env = base_env(
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
    stack.start_redis()
    for _ in range(workers):
        stack.start_worker()
    stack.start_api()
    try:
        stack.wait_ready(workers=workers)
    except Exception:
        stack.stop()
        raise
    return stack


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
