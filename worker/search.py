"""One job, start to end, as a plain function: the Celery task only calls this."""

from __future__ import annotations

import logging
import time

import redis

from shared.errors import ImageRejected, JobFailed
from shared.images import decode_upload
from shared.jobs import JobStore, now
from shared.schemas import GalleryInfo, JobResult, Match, Timings
from worker.engine import Engine

log = logging.getLogger(__name__)

UPLOAD_GONE = "The uploaded image is no longer stored (it expired or was removed)."
TOO_MANY_ATTEMPTS = "The job was abandoned after {n} attempts: its worker stopped each time."


def run_search_job(
    store: JobStore,
    engine: Engine,
    job_id: str,
    *,
    worker_name: str,
    max_pixels: int,
    max_attempts: int,
) -> None:
    """Answer one job: decode its upload, embed it, search the gallery, store the result.

    A job that already ended (a redelivered message) is left alone; a job that failed for a
    reason of its own gets ``failed`` and a sentence. Unexpected errors propagate to Celery
    after the job records them, so nothing is swallowed.
    """
    attempt = store.start(job_id, worker=worker_name)
    if attempt < 0:
        log.info("job %s: already ended or expired, skipping", job_id)
        return
    if attempt > max_attempts:
        store.fail(job_id, TOO_MANY_ATTEMPTS.format(n=attempt - 1))
        return
    job = store.get(job_id)
    assert job is not None
    try:
        result = answer(
            store,
            engine,
            job_id,
            k=job.k,
            worker_name=worker_name,
            max_pixels=max_pixels,
            created_at=job.created_at.timestamp(),
        )
    except JobFailed as error:
        store.fail(job_id, str(error))
        log.info("job %s: failed: %s", job_id, error)
        return
    except redis.RedisError:
        raise  # transient: Celery retries the task, the attempt counter bounds it
    except Exception as error:
        store.fail(job_id, f"The worker hit an internal error ({type(error).__name__}).")
        raise
    if store.succeed(job_id, result):
        log.info("job %s: succeeded in %.1f ms", job_id, result.timings.total_ms)


def answer(
    store: JobStore,
    engine: Engine,
    job_id: str,
    *,
    k: int,
    worker_name: str,
    max_pixels: int,
    created_at: float,
) -> JobResult:
    began = time.time()
    data = store.upload(job_id)
    if data is None:
        raise JobFailed(UPLOAD_GONE)
    t0 = time.perf_counter()
    try:
        image = decode_upload(data, max_pixels=max_pixels).image
    except ImageRejected as error:
        raise JobFailed(str(error)) from None
    t1 = time.perf_counter()
    query = engine.encoder.embed([image])
    t2 = time.perf_counter()
    scores, indices = engine.index.search(query, k=k)
    t3 = time.perf_counter()
    labels = engine.index.labels
    matches = [
        Match(
            rank=rank,
            index=int(index),
            label=int(labels[index]),
            label_name=engine.class_names[int(labels[index])],
            score=round(float(score), 6),
        )
        for rank, (score, index) in enumerate(zip(scores[0], indices[0], strict=True), start=1)
    ]
    return JobResult(
        matches=matches,
        model=engine.encoder.model_id,
        model_is_random=engine.encoder.is_random,
        gallery=GalleryInfo(name=engine.gallery, size=len(engine.index)),
        device=f"{engine.encoder.device} ({engine.encoder.precision})",
        worker=worker_name,
        timings=Timings(
            queue_wait_ms=round(max(0.0, began - created_at) * 1000, 2),
            decode_ms=round((t1 - t0) * 1000, 2),
            embed_ms=round((t2 - t1) * 1000, 2),
            search_ms=round((t3 - t2) * 1000, 2),
            total_ms=round(max(0.0, now().timestamp() - created_at) * 1000, 2),
        ),
    )
