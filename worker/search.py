"""Jobs, start to end, as plain functions: the Celery task only calls ``run_search_jobs``.

Several jobs taken together share one CLIP forward pass per kind (images, texts) and one
matrix product per gallery, and each still gets its own result: an image that cannot be
decoded (or embedded) fails only its job.
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
from shared.galleries import encode_thumbnail
from shared.images import stored_image
from shared.jobs import JobRecord, JobStore, Started, now
from shared.logs import job_fields
from shared.metrics import Metrics
from shared.schemas import (
    Embeddings,
    GalleryInfo,
    JobKind,
    JobResult,
    Match,
    Timings,
    gallery_image_url,
)
from worker.engine import TEXT_OFF, Engine

log = logging.getLogger(__name__)

UPLOAD_GONE = "The uploaded image is no longer stored (it expired or was removed)."
TOO_MANY_ATTEMPTS = "The job was abandoned after {n} attempts: its worker stopped each time."
INTERNAL = "The worker hit an internal error ({name})."
KEEP_UPLOADS_UP_TO = 64 * 1024  # bytes: smaller stored pixels stay as they are after the job


@dataclass
class _Ready:
    job: JobRecord
    image: Image.Image | None
    decode_ms: float
    began: float
    upload_size: int = 0
    query: Embeddings | None = None
    embed_ms: float = 0.0


@dataclass(frozen=True)
class Context:
    """What a worker tells every job it answers."""

    worker_name: str
    max_pixels: int
    max_attempts: int
    metrics: Metrics | None = None


def run_search_jobs(
    store: JobStore,
    engine: Engine,
    job_ids: Sequence[str],
    *,
    worker_name: str,
    max_pixels: int,
    max_attempts: int,
    metrics: Metrics | None = None,
) -> None:
    """Answer jobs: decode their uploads, embed them together, search, store each result.

    A job that already ended (a redelivered message) is left alone; a job that fails for a
    reason of its own gets ``failed`` and a sentence. Redis errors propagate (the task is
    retried, the attempt counter bounds it); other unexpected errors are recorded in the
    jobs they hit and then raised, so nothing is swallowed.
    """
    context = Context(worker_name, max_pixels, max_attempts, metrics)
    began = time.time()
    ready: list[_Ready] = []
    for started in store.start_many(job_ids, worker=worker_name):
        job = _started(store, started, context)
        if job is None:
            continue
        t0 = time.perf_counter()
        try:
            engine.gallery(job.gallery)  # an unknown gallery fails before any work
            image = _prepare(engine, job, started.upload, max_pixels=max_pixels)
        except JobFailed as error:
            _fail(store, job.id, error.reason, str(error), context)
            continue
        decode_ms = (time.perf_counter() - t0) * 1000
        ready.append(_Ready(job, image, decode_ms, began, len(started.upload or b"")))
        log.info("job %s: decoded", job.id, extra=job_fields(job.id, stage="decode", ms=decode_ms))
    if not ready:
        return
    try:
        ready = _embed(engine, ready, store, context)
        if not ready:
            return
        answered = _search(engine, ready)
    except redis.RedisError:
        raise
    except Exception as error:
        for item in ready:
            _fail(
                store, item.job.id, "internal", INTERNAL.format(name=type(error).__name__), context
            )
        raise
    if metrics is not None:
        for kind in JobKind:  # one forward pass per kind
            size = sum(1 for r in ready if r.job.kind == kind)
            if size:
                metrics.observe("lookalike_batch_size", size)
    results = [
        (
            item,
            _result(
                engine,
                item,
                scores,
                indices,
                worker_name=worker_name,
                batch_size=len(ready),
                search_ms=search_ms,
            ),
        )
        for item, scores, indices, search_ms in answered
    ]
    stored = store.succeed_many(
        [(item.job.id, result, _small_copy(item)) for item, result in results]
    )
    for (item, result), ended_it in zip(results, stored, strict=True):
        _succeeded(item.job.id, result, ended_it, context)


def _small_copy(item: _Ready) -> bytes | None:
    """What to keep of a large upload for the result picture: a copy of at most 256 px."""
    if item.image is None or item.upload_size <= KEEP_UPLOADS_UP_TO:
        return None
    return encode_thumbnail(item.image)


def _started(store: JobStore, started: Started, context: Context) -> JobRecord | None:
    job_id, attempt = started.job_id, started.attempt
    if attempt < 0 or started.job is None:
        log.info("job %s: already ended or expired, skipping", job_id, extra=job_fields(job_id))
        return None
    if attempt > context.max_attempts:
        _fail(store, job_id, "attempts", TOO_MANY_ATTEMPTS.format(n=attempt - 1), context)
        return None
    log.info(
        "job %s: started (attempt %d)",
        job_id,
        attempt,
        extra=job_fields(job_id, stage="start", attempt=attempt, worker=context.worker_name),
    )
    return started.job


def _prepare(
    engine: Engine, job: JobRecord, data: bytes | None, *, max_pixels: int
) -> Image.Image | None:
    """The job's decoded image, or None for a text job (checked answerable here)."""
    if job.kind == JobKind.TEXT:
        if engine.text_encoder is None:
            raise JobFailed(TEXT_OFF, reason="text_off")
        return None
    if data is None:
        raise JobFailed(UPLOAD_GONE, reason="upload_gone")
    try:
        return stored_image(data, max_pixels=max_pixels)
    except ImageRejected as error:
        raise JobFailed(str(error), reason="bad_image") from None


def _embed(engine: Engine, ready: list[_Ready], store: JobStore, context: Context) -> list[_Ready]:
    """One forward pass per kind; if a pass fails, one per job, so a bad one fails alone."""
    kept: list[_Ready] = []
    for kind in JobKind:
        group = [r for r in ready if r.job.kind == kind]
        if not group:
            continue
        t0 = time.perf_counter()
        try:
            rows = _embed_many(engine, group)
        except Exception:
            if len(group) == 1 and len(ready) == 1:
                raise
            kept.extend(_embed_one_by_one(engine, group, store, context))
            continue
        embed_ms = (time.perf_counter() - t0) * 1000
        for row, item in zip(rows, group, strict=True):
            item.query, item.embed_ms = row, embed_ms
            kept.append(item)
    for item in kept:
        log.info(
            "job %s: embedded",
            item.job.id,
            extra=job_fields(item.job.id, stage="embed", ms=item.embed_ms),
        )
    return kept


def _embed_many(engine: Engine, group: Sequence[_Ready]) -> Embeddings:
    if group[0].job.kind == JobKind.TEXT:
        assert engine.text_encoder is not None
        return engine.text_encoder.embed([r.job.text or "" for r in group])
    return engine.encoder.embed([r.image for r in group if r.image is not None])


def _embed_one_by_one(
    engine: Engine, group: Sequence[_Ready], store: JobStore, context: Context
) -> list[_Ready]:
    kept = []
    for item in group:
        t0 = time.perf_counter()
        try:
            item.query = _embed_many(engine, [item])[0]
        except Exception as error:
            _fail(
                store, item.job.id, "internal", INTERNAL.format(name=type(error).__name__), context
            )
            log.exception("job %s: embedding failed", item.job.id, extra=job_fields(item.job.id))
            continue
        item.embed_ms = (time.perf_counter() - t0) * 1000
        kept.append(item)
    return kept


def _search(
    engine: Engine, ready: list[_Ready]
) -> list[tuple[_Ready, np.ndarray, np.ndarray, float]]:
    """One matrix product per gallery for all its queries."""
    answered = []
    for name in dict.fromkeys(r.job.gallery for r in ready):
        group = [r for r in ready if r.job.gallery == name]
        queries = np.stack([r.query for r in group if r.query is not None])
        t0 = time.perf_counter()
        scores, indices = engine.gallery(name).search(queries, k=max(r.job.k for r in group))
        search_ms = (time.perf_counter() - t0) * 1000
        for row, item in enumerate(group):
            k = item.job.k
            answered.append((item, scores[row, :k], indices[row, :k], search_ms))
            log.info(
                "job %s: searched",
                item.job.id,
                extra=job_fields(item.job.id, stage="search", ms=search_ms, gallery=name),
            )
    return answered


def _succeeded(job_id: str, result: JobResult, stored: bool, context: Context) -> None:
    metrics = context.metrics
    if metrics is not None:
        if not stored:
            metrics.inc("lookalike_jobs_duplicate_total")
        else:
            timings = result.timings
            metrics.inc("lookalike_jobs_finished_total", {"status": "succeeded", "reason": ""})
            metrics.observe("lookalike_job_latency_seconds", timings.total_ms / 1000)
            metrics.observe("lookalike_job_queue_wait_seconds", timings.queue_wait_ms / 1000)
            for stage, ms in (
                ("decode", timings.decode_ms),
                ("embed", timings.embed_ms),
                ("search", timings.search_ms),
            ):
                metrics.observe("lookalike_job_stage_seconds", ms / 1000, {"stage": stage})
    if stored:
        log.info(
            "job %s: succeeded in %.1f ms (batch of %d)",
            job_id,
            result.timings.total_ms,
            result.batch_size,
            extra=job_fields(job_id, stage="end", status="succeeded", ms=result.timings.total_ms),
        )


def _fail(store: JobStore, job_id: str, reason: str, sentence: str, context: Context) -> None:
    stored = store.fail(job_id, sentence)
    if context.metrics is not None and stored:
        context.metrics.inc("lookalike_jobs_finished_total", {"status": "failed", "reason": reason})
    log.info(
        "job %s: failed: %s",
        job_id,
        sentence,
        extra=job_fields(job_id, stage="end", status="failed", reason=reason),
    )


def _result(
    engine: Engine,
    item: _Ready,
    scores: np.ndarray,
    indices: np.ndarray,
    *,
    worker_name: str,
    batch_size: int,
    search_ms: float,
) -> JobResult:
    index = engine.gallery(item.job.gallery)
    labels, names, paths = index.labels, index.class_names, index.paths
    created_at = item.job.created_at.timestamp()
    matches = [
        Match(
            rank=rank,
            index=int(position),
            label=int(labels[position]),
            label_name=names[int(labels[position])],
            score=round(float(score), 6),
            image_url=gallery_image_url(index.name, int(position)),
            path=paths[int(position)] if paths is not None else None,
        )
        for rank, (score, position) in enumerate(zip(scores, indices, strict=True), start=1)
    ]
    encoder = engine.encoder
    return JobResult(
        matches=matches,
        model=encoder.model_id,
        model_is_random=encoder.is_random,
        gallery=GalleryInfo(name=index.name, size=len(index)),
        device=f"{encoder.device} ({encoder.precision})",
        worker=worker_name,
        batch_size=batch_size,
        timings=Timings(
            queue_wait_ms=round(max(0.0, item.began - created_at) * 1000, 2),
            decode_ms=round(item.decode_ms, 2),
            embed_ms=round(item.embed_ms, 2),
            search_ms=round(search_ms, 2),
            total_ms=round(max(0.0, now().timestamp() - created_at) * 1000, 2),
        ),
    )


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
