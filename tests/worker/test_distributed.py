"""Distributed builds: what a chunk carries, when the builder gives up waiting for one, and a
chunk computed by the worker-side function, against a real Redis."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import redis

from shared.errors import BuildFailed
from shared.galleries import FashionMnistSource
from shared.settings import ModelSettings
from worker.distributed import (
    IN_FLIGHT_PER_WORKER,
    _Chunk,
    _Keys,
    _overdue,
    _unpack,
    chunk_spec,
    compute_chunk,
)
from worker.encoder import ClipImageEncoder, load_encoder
from worker.index import embed_chunk

PREFIX = "lookalike-test"


@pytest.fixture(scope="module")
def encoder(tiny_clip_dir: Path) -> ClipImageEncoder:
    return load_encoder(ModelSettings(name=str(tiny_clip_dir), device="cpu", fast_cpu="off"))


@pytest.fixture(scope="module")
def source(fake_data_dir: Path) -> FashionMnistSource:
    return FashionMnistSource.load(fake_data_dir, size=40)


def test_a_running_chunk_is_overdue_only_past_the_limit(redis_client: redis.Redis) -> None:
    keys = _Keys(PREFIX, "b1")
    chunk = _Chunk(0, 256, sent_at=time.monotonic())
    redis_client.set(keys.started(0), time.time() - 50)

    assert not _overdue(redis_client, keys, chunk, limit=60)
    assert _overdue(redis_client, keys, chunk, limit=40)


def test_a_waiting_chunk_gets_the_time_of_the_chunks_ahead_of_it(redis_client: redis.Redis) -> None:
    keys = _Keys(PREFIX, "b2")
    waited = 60 * IN_FLIGHT_PER_WORKER  # past one limit, within its turn behind the others
    chunk = _Chunk(0, 256, sent_at=time.monotonic() - waited)

    assert not _overdue(redis_client, keys, chunk, limit=60)
    chunk.sent_at = time.monotonic() - 60 * (IN_FLIGHT_PER_WORKER + 2)
    assert _overdue(redis_client, keys, chunk, limit=60)


def test_a_worker_computes_a_chunk_like_a_local_build(
    redis_client: redis.Redis,
    encoder: ClipImageEncoder,
    source: FashionMnistSource,
    fake_data_dir: Path,
) -> None:
    spec = chunk_spec(source, encoder, build_id="b3", start=8, stop=24, batch_size=5)

    compute_chunk(
        redis_client,
        PREFIX,
        spec,
        encoder,
        data_dir=fake_data_dir,
        max_pixels=10**6,
        worker_name="w",
    )

    keys = _Keys(PREFIX, "b3")
    assert redis_client.lpop(keys.done) == b"8"
    payload = redis_client.get(keys.result(8))
    assert isinstance(payload, bytes)
    embeddings, thumbnails, meta = _unpack(payload)
    expected, expected_thumbs = embed_chunk(encoder, source, 8, 24, batch_size=5)
    np.testing.assert_allclose(embeddings, expected, atol=2e-3)
    assert thumbnails == expected_thumbs
    assert meta["precision"] == encoder.precision
    assert int(redis_client.get(keys.progress) or 0) == 16


def test_a_worker_with_another_model_hands_back_a_sentence(
    redis_client: redis.Redis,
    encoder: ClipImageEncoder,
    source: FashionMnistSource,
    fake_data_dir: Path,
) -> None:
    spec = chunk_spec(source, encoder, build_id="b4", start=0, stop=8, batch_size=8)
    spec["model_id"] = "someone/else"

    compute_chunk(
        redis_client,
        PREFIX,
        spec,
        encoder,
        data_dir=fake_data_dir,
        max_pixels=10**6,
        worker_name="w",
    )

    payload = redis_client.get(_Keys(PREFIX, "b4").result(0))
    assert isinstance(payload, bytes)
    with pytest.raises(BuildFailed, match="someone/else"):
        _unpack(payload)


def test_an_unexpected_error_is_handed_back_too(
    redis_client: redis.Redis, encoder: ClipImageEncoder, source: FashionMnistSource
) -> None:
    spec = chunk_spec(source, encoder, build_id="b5", start=0, stop=8, batch_size=8)
    spec["kind"] = "folder"  # a folder spec without its paths: a KeyError in the worker

    compute_chunk(
        redis_client, PREFIX, spec, encoder, data_dir=None, max_pixels=10**6, worker_name="w"
    )

    payload = redis_client.get(_Keys(PREFIX, "b5").result(0))
    assert isinstance(payload, bytes)
    with pytest.raises(BuildFailed, match="KeyError"):
        _unpack(payload)
