"""Jobs, start to end, as plain functions: the Celery task only calls ``run_search_jobs``.

Several jobs taken together share one CLIP forward pass and one matrix product, and each
still gets its own result: an image that cannot be decoded (or embedded) fails only its job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import redis
from PIL import Image

from shared.errors import ImageRejected, JobFailed
from shared.images import decode_upload
from shared.jobs import JobRecord, JobStore, now
from shared.schemas import Embeddings, GalleryInfo, JobResult, Match, Timings
from worker.engine import Engine

log = logging.getLogger(__name__)

UPLOAD_GONE = "The uploaded image is no longer stored (it expired or was removed)."
TOO_MANY_ATTEMPTS = "The job was abandoned after {n} attempts: its worker stopped each time."
INTERNAL = "The worker hit an internal error ({name})."


@dataclass
class _Ready:
    job: JobRecord
    image: Image.Image
    decode_ms: float
    began: float


def run_search_job(
    store: JobStore,
    engine: Engine,
    job_id: str,
    *,
    worker_name: str,
    max_pixels: int,
    max_attempts: int,
) -> None:
    """Answer one job (see :func:`run_search_jobs`)."""
    run_search_jobs(
        store,
        engine,
        [job_id],
        worker_name=worker_name,
        max_pixels=max_pixels,
        max_attempts=max_attempts,
    )


def run_search_jobs(
    store: JobStore,
    engine: Engine,
    job_ids: Sequence[str],
    *,
    worker_name: str,
    max_pixels: int,
    max_attempts: int,
) -> None:
    """Answer jobs: decode their uploads, embed them together, search, store each result.

    A job that already ended (a redelivered message) is left alone; a job that fails for a
    reason of its own gets ``failed`` and a sentence. Redis errors propagate (the task is
    retried, the attempt counter bounds it); other unexpected errors are recorded in the
    jobs they hit and then raised, so nothing is swallowed.
    """
    ready: list[_Ready] = []
    for job_id in job_ids:
        began = time.time()
        job = _start(store, job_id, worker_name=worker_name, max_attempts=max_attempts)
        if job is None:
            continue
        t0 = time.perf_counter()
        try:
            image = _decode(store.upload(job_id), max_pixels=max_pixels)
        except JobFailed as error:
            store.fail(job_id, str(error))
            log.info("job %s: failed: %s", job_id, error)
            continue
        ready.append(_Ready(job, image, (time.perf_counter() - t0) * 1000, began))
    if not ready:
        return
    try:
        t1 = time.perf_counter()
        queries, ready = _embed(engine, ready, store)
        t2 = time.perf_counter()
        if not ready:
            return
        scores, indices = engine.index.search(queries, k=max(r.job.k for r in ready))
        t3 = time.perf_counter()
    except redis.RedisError:
        raise
    except Exception as error:
        for item in ready:
            store.fail(item.job.id, INTERNAL.format(name=type(error).__name__))
        raise
    for row, item in enumerate(ready):
        k = item.job.k
        result = _result(
            engine,
            item,
            scores[row, :k],
            indices[row, :k],
            worker_name=worker_name,
            batch_size=len(ready),
            embed_ms=(t2 - t1) * 1000,
            search_ms=(t3 - t2) * 1000,
        )
        if store.succeed(item.job.id, result):
            log.info(
                "job %s: succeeded in %.1f ms (batch of %d)",
                item.job.id,
                result.timings.total_ms,
                len(ready),
            )


def _start(
    store: JobStore, job_id: str, *, worker_name: str, max_attempts: int
) -> JobRecord | None:
    attempt = store.start(job_id, worker=worker_name)
    if attempt < 0:
        log.info("job %s: already ended or expired, skipping", job_id)
        return None
    if attempt > max_attempts:
        store.fail(job_id, TOO_MANY_ATTEMPTS.format(n=attempt - 1))
        return None
    return store.get(job_id)


def _decode(data: bytes | None, *, max_pixels: int) -> Image.Image:
    if data is None:
        raise JobFailed(UPLOAD_GONE)
    try:
        return decode_upload(data, max_pixels=max_pixels).image
    except ImageRejected as error:
        raise JobFailed(str(error)) from None


def _embed(engine: Engine, ready: list[_Ready], store: JobStore) -> tuple[Embeddings, list[_Ready]]:
    """One forward pass for all; if it fails, one per image, so a bad one fails alone."""
    try:
        return engine.encoder.embed([r.image for r in ready]), ready
    except Exception:
        if len(ready) == 1:
            raise
    rows, kept = [], []
    for item in ready:
        try:
            rows.append(engine.encoder.embed([item.image]))
            kept.append(item)
        except Exception as error:
            store.fail(item.job.id, INTERNAL.format(name=type(error).__name__))
            log.exception("job %s: embedding failed", item.job.id)
    dim = engine.encoder.dim
    return (np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)), kept


def _result(
    engine: Engine,
    item: _Ready,
    scores: np.ndarray,
    indices: np.ndarray,
    *,
    worker_name: str,
    batch_size: int,
    embed_ms: float,
    search_ms: float,
) -> JobResult:
    labels = engine.index.labels
    created_at = item.job.created_at.timestamp()
    matches = [
        Match(
            rank=rank,
            index=int(index),
            label=int(labels[index]),
            label_name=engine.class_names[int(labels[index])],
            score=round(float(score), 6),
        )
        for rank, (score, index) in enumerate(zip(scores, indices, strict=True), start=1)
    ]
    return JobResult(
        matches=matches,
        model=engine.encoder.model_id,
        model_is_random=engine.encoder.is_random,
        gallery=GalleryInfo(name=engine.gallery, size=len(engine.index)),
        device=f"{engine.encoder.device} ({engine.encoder.precision})",
        worker=worker_name,
        batch_size=batch_size,
        timings=Timings(
            queue_wait_ms=round(max(0.0, item.began - created_at) * 1000, 2),
            decode_ms=round(item.decode_ms, 2),
            embed_ms=round(embed_ms, 2),
            search_ms=round(search_ms, 2),
            total_ms=round(max(0.0, now().timestamp() - created_at) * 1000, 2),
        ),
    )
