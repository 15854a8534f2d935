"""run_search_job end to end in-process: a real JobStore on Redis and a real tiny engine."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch

import worker.search as search_module
from shared.fashion_mnist import CLASS_NAMES, load_gallery
from shared.images import NOT_AN_IMAGE, TOO_MANY_PIXELS
from shared.jobs import JobRecord, JobStore, new_job_id
from shared.metrics import Metrics, read_stored
from shared.schemas import Job, JobKind, JobStatus
from shared.settings import FASHION_MNIST
from tests.support import SEARCH_GALLERY, gallery_png
from worker.engine import TEXT_OFF, UNKNOWN_GALLERY, Engine
from worker.search import (
    KEEP_UPLOADS_UP_TO,
    TOO_MANY_ATTEMPTS,
    UPLOAD_GONE,
    run_search_job,
    run_search_jobs,
)
from worker.text_encoder import load_text_encoder

SIZE = SEARCH_GALLERY
MAX_PIXELS = 1_000_000
MAX_ATTEMPTS = 3
WORKER = "worker-test"


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


# --- text jobs, galleries, batches and metrics -------------------------------------------------

METRICS_PREFIX = "lookalike-test"


@pytest.fixture(scope="module")
def text_engine(engine: Engine) -> Engine:
    """The same model and galleries, with CLIP's text tower loaded too."""
    return Engine(
        encoder=engine.encoder,
        galleries=engine.galleries,
        default_gallery=engine.default_gallery,
        load_seconds=0.0,
        text_encoder=load_text_encoder(engine.encoder.model_id, device="cpu"),
    )


@pytest.fixture(scope="module")
def image_only_engine(engine: Engine) -> Engine:
    """The same model and galleries with text search off (LOOKALIKE_TEXT_SEARCH=off)."""
    return dataclasses.replace(engine, text_encoder=None)


def run_jobs(
    store: JobStore, engine: Engine, job_ids: list[str], *, metrics: Metrics | None = None
) -> list[JobRecord]:
    run_search_jobs(
        store,
        engine,
        job_ids,
        worker_name=WORKER,
        max_pixels=MAX_PIXELS,
        max_attempts=MAX_ATTEMPTS,
        metrics=metrics,
    )
    jobs = []
    for job_id in job_ids:
        job = store.get(job_id)
        assert job is not None
        jobs.append(job)
    return jobs


def text_job(store: JobStore, text: str, *, k: int = 3, gallery: str = FASHION_MNIST) -> str:
    job_id = new_job_id()
    store.create(job_id, text=text, k=k, gallery=gallery)
    return job_id


def test_text_job_succeeds_with_gallery_matches(store: JobStore, text_engine: Engine) -> None:
    job_id = text_job(store, "a shoe", k=3)

    [job] = run_jobs(store, text_engine, [job_id])

    assert job.status is JobStatus.SUCCEEDED, job.error
    assert (job.kind, job.text) == (JobKind.TEXT, "a shoe")
    assert job.result is not None
    matches = job.result.matches
    assert [m.rank for m in matches] == [1, 2, 3]
    assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)
    assert len({m.index for m in matches}) == 3
    for match in matches:
        assert 0 <= match.index < SIZE
        assert match.image_url == f"/gallery/{match.index}.png?gallery={FASHION_MNIST}"
        assert match.label_name == CLASS_NAMES[match.label]
    assert (job.result.gallery.name, job.result.gallery.size) == (FASHION_MNIST, SIZE)


def test_text_job_fails_when_text_search_is_off(store: JobStore, image_only_engine: Engine) -> None:
    job_id = text_job(store, "a shoe")

    [job] = run_jobs(store, image_only_engine, [job_id])

    assert (job.status, job.error, job.result) == (JobStatus.FAILED, TEXT_OFF, None)


@pytest.mark.parametrize("kind", [JobKind.IMAGE, JobKind.TEXT])
def test_job_naming_an_unknown_gallery_fails_naming_it(
    store: JobStore, text_engine: Engine, fake_data_dir: Path, kind: JobKind
) -> None:
    job_id = new_job_id()
    if kind is JobKind.IMAGE:
        store.create(job_id, upload=gallery_png(fake_data_dir, 0), k=3, gallery="holiday-snaps")
    else:
        store.create(job_id, text="a shoe", k=3, gallery="holiday-snaps")

    [job] = run_jobs(store, text_engine, [job_id])

    assert job.status is JobStatus.FAILED
    assert job.error == "The gallery 'holiday-snaps' is not served by this worker."
    assert job.error == UNKNOWN_GALLERY.format(name="holiday-snaps")


def test_mixed_batch_answers_each_job_with_its_own_kind(
    store: JobStore, text_engine: Engine, fake_data_dir: Path
) -> None:
    alone = text_job(store, "a red sneaker", k=4)
    [expected] = run_jobs(store, text_engine, [alone])
    first = submitted(store, gallery_png(fake_data_dir, 42), k=2)
    text = text_job(store, "a red sneaker", k=4)
    second = submitted(store, gallery_png(fake_data_dir, 7), k=3)

    jobs = run_jobs(store, text_engine, [first, text, second])

    assert [job.status for job in jobs] == [JobStatus.SUCCEEDED] * 3, [j.error for j in jobs]
    image_a, by_text, image_b = (job.result for job in jobs)
    assert image_a is not None and by_text is not None and image_b is not None
    assert ([m.index for m in image_a.matches][0], len(image_a.matches)) == (42, 2)
    assert ([m.index for m in image_b.matches][0], len(image_b.matches)) == (7, 3)
    assert expected.result is not None
    assert [m.index for m in by_text.matches] == [m.index for m in expected.result.matches]
    assert [m.score for m in by_text.matches] == pytest.approx(
        [m.score for m in expected.result.matches], abs=1e-4
    )
    assert [job.kind for job in jobs] == [JobKind.IMAGE, JobKind.TEXT, JobKind.IMAGE]


def test_a_batch_matches_come_back_from_the_device_in_one_copy(
    store: JobStore, engine: Engine, fake_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU each copy back waits for the device: a batch makes two (its jobs' scores and
    rows, together), not two per job."""
    copies: list[tuple[int, ...]] = []
    searching = False
    real_search, real_cpu = search_module._search, torch.Tensor.cpu

    def counted_cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if searching:
            copies.append(tuple(self.shape))
        return real_cpu(self, *args, **kwargs)

    def counted_search(*args: Any, **kwargs: Any) -> None:
        nonlocal searching
        searching = True
        try:
            real_search(*args, **kwargs)
        finally:
            searching = False

    monkeypatch.setattr(torch.Tensor, "cpu", counted_cpu)
    monkeypatch.setattr(search_module, "_search", counted_search)
    wanted = ((42, 2), (7, 3), (9, 5))
    ids = [submitted(store, gallery_png(fake_data_dir, row), k=k) for row, k in wanted]

    jobs = run_jobs(store, engine, ids)

    results = [job.result for job in jobs]
    assert all(result is not None for result in results), [job.error for job in jobs]
    assert [(r.matches[0].index, len(r.matches)) for r in results] == list(wanted)  # type: ignore[union-attr]
    assert copies == [(10,), (10,)]


def test_failing_image_in_a_mixed_batch_fails_alone(
    store: JobStore, text_engine: Engine, fake_data_dir: Path
) -> None:
    bad = submitted(store, b"%PDF-1.7\nnot a picture\n")
    good = submitted(store, gallery_png(fake_data_dir, 5), k=1)
    text = text_job(store, "a bag", k=1)

    jobs = run_jobs(store, text_engine, [bad, good, text])

    assert [job.status for job in jobs] == [
        JobStatus.FAILED,
        JobStatus.SUCCEEDED,
        JobStatus.SUCCEEDED,
    ]
    assert jobs[0].error == NOT_AN_IMAGE


def test_job_stage_is_cleared_after_the_end(
    store: JobStore, text_engine: Engine, fake_data_dir: Path
) -> None:
    ids = [
        submitted(store, gallery_png(fake_data_dir, 1), k=2),
        text_job(store, "a coat", k=2),
        submitted(store, b"not an image at all"),
        text_job(store, "a coat", gallery="nowhere"),
    ]

    jobs = run_jobs(store, text_engine, ids)

    assert [job.status.is_final for job in jobs] == [True] * 4
    assert [job.stage for job in jobs] == [None] * 4


def finished(values: dict[str, float], *, status: str, reason: str = "") -> float:
    return values.get(f'lookalike_jobs_finished_total{{reason="{reason}",status="{status}"}}', 0)


def test_metrics_count_finished_jobs_by_status_and_reason(
    store: JobStore,
    image_only_engine: Engine,
    text_engine: Engine,
    fake_data_dir: Path,
    redis_client: redis.Redis,
) -> None:
    metrics = Metrics(redis_client, prefix=METRICS_PREFIX)
    gone = submitted(store, gallery_png(fake_data_dir, 0))
    redis_client.delete(store.keys.upload(gone))
    batch = [
        submitted(store, gallery_png(fake_data_dir, 3), k=2),
        text_job(store, "a dress", k=2),
        submitted(store, b"%PDF-1.7\nnot a picture\n"),
        gone,
    ]
    run_jobs(store, text_engine, batch, metrics=metrics)
    run_jobs(store, image_only_engine, [text_job(store, "a dress")], metrics=metrics)

    metrics.flush()

    values = read_stored(redis_client.hgetall(f"{METRICS_PREFIX}:metrics"))
    assert finished(values, status="succeeded") == 2
    assert finished(values, status="failed", reason="bad_image") == 1
    assert finished(values, status="failed", reason="upload_gone") == 1
    assert finished(values, status="failed", reason="text_off") == 1
    assert values["lookalike_job_latency_seconds_count"] == 2
    assert values['lookalike_job_stage_seconds_count{stage="embed"}'] == 2
    assert "lookalike_jobs_duplicate_total" not in values


def test_metrics_observe_one_batch_size_per_forward_pass(
    store: JobStore, text_engine: Engine, fake_data_dir: Path, redis_client: redis.Redis
) -> None:
    metrics = Metrics(redis_client, prefix=METRICS_PREFIX)
    batch = [
        submitted(store, gallery_png(fake_data_dir, 3), k=1),
        text_job(store, "a dress", k=1),
        submitted(store, gallery_png(fake_data_dir, 4), k=1),
    ]

    run_jobs(store, text_engine, batch, metrics=metrics)
    metrics.flush()

    values = read_stored(redis_client.hgetall(f"{METRICS_PREFIX}:metrics"))
    assert values["lookalike_batch_size_count"] == 2  # images, then texts
    assert values["lookalike_batch_size_sum"] == 3
    assert values["lookalike_batch_size_bucket|1"] == 1
    assert values["lookalike_batch_size_bucket|2"] == 1


def test_metrics_observe_two_forward_passes_of_the_same_size(
    store: JobStore, text_engine: Engine, fake_data_dir: Path, redis_client: redis.Redis
) -> None:
    metrics = Metrics(redis_client, prefix=METRICS_PREFIX)
    batch = [submitted(store, gallery_png(fake_data_dir, 3), k=1), text_job(store, "a dress", k=1)]

    run_jobs(store, text_engine, batch, metrics=metrics)
    metrics.flush()

    values = read_stored(redis_client.hgetall(f"{METRICS_PREFIX}:metrics"))
    assert values["lookalike_batch_size_count"] == 2
    assert values["lookalike_batch_size_bucket|1"] == 2


def test_metrics_count_a_recomputed_job_as_a_duplicate(
    store: JobStore, engine: Engine, fake_data_dir: Path, redis_client: redis.Redis
) -> None:
    metrics = Metrics(redis_client, prefix=METRICS_PREFIX)
    job_id = submitted(store, gallery_png(fake_data_dir, 0), k=1)

    job, _ = run_jobs(store, engine, [job_id, job_id], metrics=metrics)  # delivered twice
    metrics.flush()

    values = read_stored(redis_client.hgetall(f"{METRICS_PREFIX}:metrics"))
    assert finished(values, status="succeeded") == 1
    assert values["lookalike_jobs_duplicate_total"] == 1
    assert job.status is JobStatus.SUCCEEDED


def test_metrics_label_an_unknown_gallery_as_unknown_gallery(
    store: JobStore, engine: Engine, fake_data_dir: Path, redis_client: redis.Redis
) -> None:
    metrics = Metrics(redis_client, prefix=METRICS_PREFIX)
    job_id = new_job_id()
    store.create(job_id, upload=gallery_png(fake_data_dir, 0), k=1, gallery="holiday-snaps")

    run_jobs(store, engine, [job_id], metrics=metrics)
    metrics.flush()

    values = read_stored(redis_client.hgetall(f"{METRICS_PREFIX}:metrics"))
    assert finished(values, status="failed", reason="unknown_gallery") == 1


# --- what is kept of an upload after its job --------------------------------------------------


def test_a_large_upload_is_replaced_by_a_small_copy_for_the_picture(
    store: JobStore, engine: Engine, redis_client: redis.Redis
) -> None:
    import io

    from PIL import Image

    photo = Image.fromarray(np.random.default_rng(3).integers(0, 255, (900, 1000, 3), np.uint8))
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    job_id = submitted(store, buffer.getvalue())
    assert len(buffer.getvalue()) > KEEP_UPLOADS_UP_TO

    assert run(store, engine, job_id).status == JobStatus.SUCCEEDED

    kept = redis_client.get(store.keys.upload(job_id))
    assert kept is not None and len(kept) < KEEP_UPLOADS_UP_TO
    assert max(Image.open(io.BytesIO(kept)).size) <= 256


def test_a_small_upload_is_kept_as_it_is(
    store: JobStore, engine: Engine, fake_data_dir: Path, redis_client: redis.Redis
) -> None:
    upload = gallery_png(fake_data_dir, 4)
    job_id = submitted(store, upload)

    run(store, engine, job_id)

    assert redis_client.get(store.keys.upload(job_id)) == upload


def test_a_failed_job_keeps_no_upload(
    store: JobStore, engine: Engine, redis_client: redis.Redis
) -> None:
    job_id = submitted(store, b"not an image at all")

    assert run(store, engine, job_id).status == JobStatus.FAILED
    assert not redis_client.exists(store.keys.upload(job_id))


def test_a_job_writes_two_info_lines_and_its_stages_at_debug(
    store: JobStore, engine: Engine, fake_data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = submitted(store, gallery_png(fake_data_dir, 5))

    with caplog.at_level(logging.DEBUG, logger="worker.search"):
        run(store, engine, job_id)

    mine = [r for r in caplog.records if r.name == "worker.search" and job_id in r.getMessage()]
    by_level = {
        level: [r.getMessage().split(": ", 1)[1].split(" ")[0] for r in mine if r.levelno == level]
        for level in (logging.INFO, logging.DEBUG)
    }
    assert by_level == {
        logging.INFO: ["started", "succeeded"],
        logging.DEBUG: ["decoded", "embedded", "searched"],
    }
