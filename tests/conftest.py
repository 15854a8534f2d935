"""Session fixtures: a tiny saved CLIP, Fashion-MNIST-shaped IDX files, a real Redis; the
service stacks (tests.stacks) come in as a plugin."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from lookalike.checkpoint import save_random_clip
from lookalike.redis_server import RedisServer, start_redis
from tests.support import write_fake_fashion_mnist

pytest_plugins = ["tests.stacks"]


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP, saved with save_pretrained; loaded through from_pretrained."""
    return save_random_clip(tmp_path_factory.mktemp("tiny-clip"), shape="tiny")


@pytest.fixture(scope="session")
def fake_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four IDX files shaped like Fashion-MNIST's: 240 train + 60 test images."""
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fashion-mnist"))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free port, for the whole session."""
    server = start_redis(tmp_path_factory.mktemp("redis"), appendonly=False)
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client on a clean database: no test sees another's keys."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()
