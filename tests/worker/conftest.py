"""Fixtures of the worker tests that run jobs as a worker does: a tiny engine over a built
gallery of ``SEARCH_GALLERY`` Fashion-MNIST-shaped images, and a job store on the test Redis."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from shared.jobs import JobStore
from shared.settings import GallerySettings, ModelSettings, Settings
from tests.support import SEARCH_GALLERY
from worker.engine import Engine, load_engine


@pytest.fixture(scope="module")
def engine(
    tiny_clip_dir: Path, fake_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Engine:
    settings = Settings(
        model=ModelSettings(name=str(tiny_clip_dir), device="cpu", batch_size=32),
        gallery=GallerySettings(
            data_dir=fake_data_dir, size=SEARCH_GALLERY, index_dir=tmp_path_factory.mktemp("index")
        ),
    )
    return load_engine(settings, build_missing=True)


@pytest.fixture
def store(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client, prefix="lookalike-test", ttl_s=600)
