"""run_search_job end to end in-process: a real JobStore on Redis and a real tiny engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from shared.fashion_mnist import CLASS_NAMES, load_gallery
from shared.images import NOT_AN_IMAGE, TOO_MANY_PIXELS
from shared.jobs import JobStore, new_job_id
from shared.schemas import Job, JobStatus
from shared.settings import GallerySettings, ModelSettings, Settings
from tests.support import gallery_png
from worker.engine import Engine, load_engine
from worker.search import TOO_MANY_ATTEMPTS, UPLOAD_GONE, run_search_job

SIZE = 100
MAX_PIXELS = 1_000_000
MAX_ATTEMPTS = 3
WORKER = "worker-test"


@pytest.fixture(scope="module")
def engine(
    tiny_clip_dir: Path, fake_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Engine:
    settings = Settings(
        model=ModelSettings(name=str(tiny_clip_dir), device="cpu", batch_size=32),
        gallery=GallerySettings(
            data_dir=fake_data_dir, size=SIZE, index_dir=tmp_path_factory.mktemp("index")
        ),
    )
    return load_engine(settings, build_missing=True)


@pytest.fixture
def store(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client, prefix="lookalike-test", ttl_s=600)


def submitted(store: JobStore, upload: bytes, *, k: int = 5) -> str:
    job_id = new_job_id()
    store.create(job_id, upload=upload, k=k)
    return job_id


def run(store: JobStore, engine: Engine, job_id: str, *, max_pixels: int = MAX_PIXELS) -> Job:
    run_search_job(
        store,
        engine,
        job_id,
        worker_name=WORKER,
        max_pixels=max_pixels,
        max_attempts=MAX_ATTEMPTS,
    )
    job = store.get(job_id)
    assert job is not None
    return job


def test_gallery_upload_finds_itself_first(
    store: JobStore, engine: Engine, fake_data_dir: Path
) -> None:
    labels = load_gallery(fake_data_dir, size=SIZE).labels
    job_id = submitted(store, gallery_png(fake_data_dir, 42), k=5)

    job = run(store, engine, job_id)

    assert job.status is JobStatus.SUCCEEDED, job.error
    assert job.error is None and job.result is not None
    matches = job.result.matches
    assert [m.rank for m in matches] == [1, 2, 3, 4, 5]
    assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)
    assert matches[0].index == 42
    assert matches[0].score >= 0.99
    assert len({m.index for m in matches}) == 5
    for match in matches:
        assert match.label == labels[match.index]
        assert match.label_name == CLASS_NAMES[match.label]


def test_successful_job_reports_model_gallery_worker_and_timings(
    store: JobStore, engine: Engine, fake_data_dir: Path
) -> None:
    job_id = submitted(store, gallery_png(fake_data_dir, 3), k=2)

    job = run(store, engine, job_id)

    assert job.result is not None
    result = job.result
    assert result.model == engine.encoder.model_id
    assert result.model_is_random is False
    assert (result.gallery.name, result.gallery.size) == ("fashion-mnist", SIZE)
    assert result.worker == WORKER
    assert result.device.startswith("cpu (")
    timings = result.timings
    for value in (timings.decode_ms, timings.embed_ms, timings.search_ms):
        assert 0 <= value <= timings.total_ms
    assert timings.queue_wait_ms >= 0
    assert (job.attempts, job.started_at is not None, job.finished_at is not None) == (
        1,
        True,
        True,
    )


def test_job_whose_upload_is_gone_fails(
    store: JobStore, engine: Engine, fake_data_dir: Path, redis_client: redis.Redis
) -> None:
    job_id = submitted(store, gallery_png(fake_data_dir, 0))
    redis_client.delete(store.keys.upload(job_id))

    job = run(store, engine, job_id)

    assert (job.status, job.error, job.result) == (JobStatus.FAILED, UPLOAD_GONE, None)


@pytest.mark.parametrize("final", [JobStatus.SUCCEEDED, JobStatus.FAILED])
def test_finished_job_is_left_alone(
    store: JobStore, engine: Engine, fake_data_dir: Path, final: JobStatus
) -> None:
    job_id = submitted(store, gallery_png(fake_data_dir, 0))
    if final is JobStatus.SUCCEEDED:
        run(store, engine, job_id)
    else:
        store.fail(job_id, "Stopped by a test.")
    before = store.get(job_id)

    after = run(store, engine, job_id)

    assert after == before
    assert after.status is final


def test_job_past_max_attempts_fails(store: JobStore, engine: Engine, fake_data_dir: Path) -> None:
    job_id = submitted(store, gallery_png(fake_data_dir, 0))
    for _ in range(MAX_ATTEMPTS):  # each worker died mid-job
        store.start(job_id)

    job = run(store, engine, job_id)

    assert job.status is JobStatus.FAILED
    assert job.error == TOO_MANY_ATTEMPTS.format(n=MAX_ATTEMPTS)
    assert job.attempts == MAX_ATTEMPTS + 1


def test_job_at_last_allowed_attempt_still_runs(
    store: JobStore, engine: Engine, fake_data_dir: Path
) -> None:
    job_id = submitted(store, gallery_png(fake_data_dir, 0))
    for _ in range(MAX_ATTEMPTS - 1):
        store.start(job_id)

    assert run(store, engine, job_id).status is JobStatus.SUCCEEDED


def test_upload_that_is_not_an_image_fails_with_the_rejection(
    store: JobStore, engine: Engine
) -> None:
    job_id = submitted(store, b"%PDF-1.7\nnot a picture\n")

    job = run(store, engine, job_id)

    assert (job.status, job.error) == (JobStatus.FAILED, NOT_AN_IMAGE)


def test_upload_over_max_pixels_fails_with_the_rejection(
    store: JobStore, engine: Engine, fake_data_dir: Path
) -> None:
    job_id = submitted(store, gallery_png(fake_data_dir, 0))

    job = run(store, engine, job_id, max_pixels=28 * 28 - 1)

    assert (job.status, job.error) == (JobStatus.FAILED, TOO_MANY_PIXELS)


def test_expired_job_is_skipped_without_a_record(
    store: JobStore, engine: Engine, redis_client: redis.Redis
) -> None:
    job_id = new_job_id()

    run_search_job(store, engine, job_id, worker_name=WORKER, max_pixels=MAX_PIXELS, max_attempts=3)

    assert store.get(job_id) is None
    assert not redis_client.exists(store.keys.job(job_id))


def test_unexpected_error_is_recorded_then_raised(
    store: JobStore, engine: Engine, fake_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_embed(images: object) -> np.ndarray:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine.encoder, "embed", broken_embed)
    job_id = submitted(store, gallery_png(fake_data_dir, 0))

    with pytest.raises(RuntimeError, match="illegal memory access"):
        run(store, engine, job_id)

    job = store.get(job_id)
    assert job is not None
    assert job.status is JobStatus.FAILED
    assert job.error == "The worker hit an internal error (RuntimeError)."
