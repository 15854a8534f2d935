"""Jobs, start to end, as plain functions: the Celery task only calls ``run_search_jobs``.

Several jobs taken together share one CLIP forward pass per kind of input (images: searches
and adds alike; texts) and one matrix product per gallery, and each still gets its own result:
an image that cannot be decoded (or embedded) fails only its job. A search keeps only the rows
its options allow (attribute filter, excluded items, its own item) before the top-k, so it
gets k matches whenever k items qualify; ``min_score`` then drops the weaker ones. An add is
committed to its live gallery (shared.live) in the step that ends its job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import redis
import torch
from PIL import Image

from shared.errors import ImageRejected, JobFailed
from shared.galleries import encode_thumbnail
from shared.images import encode_pixels, stored_pixels
from shared.jobs import JobRecord, JobStore, Started, now
from shared.live import LiveStore
from shared.logs import job_fields
from shared.metrics import Metrics
from shared.schemas import (
    DuplicatePair,
    Duplicates,
    Embeddings,
    GalleryInfo,
    ItemAdded,
    JobKind,
    JobResult,
    Match,
    Timings,
)
from worker.engine import TEXT_OFF, Engine, Searchable
from worker.live import LiveGallery

log = logging.getLogger(__name__)

UPLOAD_GONE = "The uploaded image is no longer stored (it expired or was removed)."
TOO_MANY_ATTEMPTS = "The job was abandoned after {n} attempts: its worker stopped each time."
INTERNAL = "The worker hit an internal error ({name})."
NO_SUCH_ITEM = "Gallery {gallery!r} has no item {item!r}."
NOT_LIVE = "Gallery {gallery!r} is built from files: items are added to live galleries only."
KEEP_UPLOADS_UP_TO = 64 * 1024  # bytes: smaller stored pixels stay as they are after the job
MAX_PAIRS = 10_000  # a duplicates job lists at most this many pairs (the best)
# A duplicates job compares every item with every other (rows^2 x dim multiply-adds): the most
# items one may compare, so that it ends well within the task time limit (about 5 s of a CPU
# core at 10,000 items of 512 dimensions; 200,000 is a fraction of a second on a GPU).
MAX_DUPLICATE_ROWS = {"cpu": 10_000, "accelerator": 200_000}
TOO_MANY_TO_COMPARE = (
    "Gallery {gallery!r} has {rows:,} items: near-duplicates are found among at most {most:,} "
    "on this worker's {device}."
)
PAIR_BLOCK = 1024  # rows compared at once by a duplicates job


@dataclass
class _Ready:
    job: JobRecord
    image: npt.NDArray[np.uint8] | None  # HxWx3, read in place from the stored frame
    decode_ms: float
    began: float
    upload_size: int = 0
    query: Embeddings | None = None
    embed_ms: float = 0.0
    skip_row: int | None = None  # an item search leaves its own item out
    matches: list[Match] = field(default_factory=list)
    search_ms: float = 0.0


@dataclass(frozen=True)
class Context:
    """What a worker tells every job it answers."""

    worker_name: str
    max_pixels: int
    max_attempts: int
    metrics: Metrics | None = None
    live: LiveStore | None = None


def run_search_jobs(
    store: JobStore,
    engine: Engine,
    job_ids: Sequence[str],
    *,
    worker_name: str,
    max_pixels: int,
    max_attempts: int,
    metrics: Metrics | None = None,
    live: LiveStore | None = None,
) -> None:
    """Answer jobs: embed their images (or texts) together, search or add, store each result.

    A job that already ended (a redelivered message) is left alone; a job that fails for a
    reason of its own gets ``failed`` and a sentence. Redis errors propagate (the task is
    retried, the attempt counter bounds it); other unexpected errors are recorded in the
    jobs they hit and then raised, so nothing is swallowed.
    """
    context = Context(worker_name, max_pixels, max_attempts, metrics, live)
    began = time.time()
    ready: list[_Ready] = []
    for started in store.start_many(job_ids, worker=worker_name):
        job = _started(store, started, context)
        if job is None:
            continue
        t0 = time.perf_counter()
        try:
            gallery = engine.searchable(job.gallery, version=job.gallery_version)
            image = _prepare(engine, job, started.upload, max_pixels=max_pixels)
            item = _Ready(job, image, 0.0, began, len(started.upload or b""))
            if job.kind == JobKind.ITEM:
                item.skip_row = _row_of(gallery, job)
                item.query = gallery.embedding_of(item.skip_row)
            elif job.kind == JobKind.ADD and not isinstance(gallery, LiveGallery):
                raise JobFailed(NOT_LIVE.format(gallery=job.gallery), reason="not_live")
        except JobFailed as error:
            _fail(store, job.id, error.reason, str(error), context)
            continue
        item.decode_ms = (time.perf_counter() - t0) * 1000
        ready.append(item)
        log.debug(  # stages in between at DEBUG: a busy worker writes two lines a job
            "job %s: decoded", job.id, extra=job_fields(job.id, stage="decode", ms=item.decode_ms)
        )
    if not ready:
        return
    try:
        ready = _embed(engine, ready, store, context)
        for item in [r for r in ready if r.job.kind == JobKind.DUPLICATES]:
            _duplicates(engine, item, store, context)
        searches = [r for r in ready if r.job.kind.searches]
        _search(engine, searches)
        adds = [r for r in ready if r.job.kind == JobKind.ADD]
    except redis.RedisError:
        raise
    except Exception as error:
        for item in ready:
            _fail(
                store, item.job.id, "internal", INTERNAL.format(name=type(error).__name__), context
            )
        raise
    if metrics is not None:
        for images in (True, False):  # one forward pass for the images, one for the texts
            size = sum(1 for r in ready if (r.image is not None) == images and r.embed_ms)
            if size:
                metrics.observe("lookalike_batch_size", size)
    batch = len(ready)
    results = [
        (item, _base_result(engine, item, worker_name=worker_name, batch_size=batch))
        for item in searches
    ]
    stored = store.succeed_many(
        [(item.job.id, result, _small_copy(item)) for item, result in results]
    )
    for (item, result), ended_it in zip(results, stored, strict=True):
        _succeeded(item.job.id, result, ended_it, context)
    for item in adds:
        _commit_add(engine, item, store, context, batch_size=batch)


def _row_of(gallery: Searchable, job: JobRecord) -> int:
    row = gallery.row_of(job.item_id or "")
    if row is None:
        sentence = NO_SUCH_ITEM.format(gallery=job.gallery, item=job.item_id)
        raise JobFailed(sentence, reason="unknown_item")
    return row


def _small_copy(item: _Ready) -> bytes | None:
    """What to keep of a large upload for the result picture: a copy of at most 256 px."""
    if item.image is None or item.upload_size <= KEEP_UPLOADS_UP_TO:
        return None
    return encode_thumbnail(Image.fromarray(item.image), quick=True)


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
) -> npt.NDArray[np.uint8] | None:
    """The job's image (a search by image, an add), or None (checked answerable here)."""
    if job.kind == JobKind.TEXT:
        if engine.text_encoder is None:
            raise JobFailed(TEXT_OFF, reason="text_off")
        return None
    if job.kind not in (JobKind.IMAGE, JobKind.ADD):
        return None
    if data is None:
        raise JobFailed(UPLOAD_GONE, reason="upload_gone")
    try:
        return stored_pixels(data, max_pixels=max_pixels)
    except ImageRejected as error:
        raise JobFailed(str(error), reason="bad_image") from None


def _embed(engine: Engine, ready: list[_Ready], store: JobStore, context: Context) -> list[_Ready]:
    """One forward pass for the images, one for the texts; if a pass fails, one per job, so a
    bad one fails alone. Jobs with nothing to embed (item searches, duplicates) pass through."""
    kept: list[_Ready] = [r for r in ready if r.image is None and r.job.kind != JobKind.TEXT]
    for group in (
        [r for r in ready if r.image is not None],
        [r for r in ready if r.job.kind == JobKind.TEXT],
    ):
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
        log.debug(
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


def _search(engine: Engine, ready: list[_Ready]) -> None:
    """One matrix product per gallery for all its queries; then each job's rows and top-k,
    brought back from the device in one copy for the group (on a GPU, a copy is a wait)."""
    for name in dict.fromkeys(r.job.gallery for r in ready):
        group = [r for r in ready if r.job.gallery == name]
        gallery = engine.searchable(name, version=max(r.job.gallery_version for r in group))
        t0 = time.perf_counter()
        with _locked(gallery):
            matrix = gallery.matrix
            rows = int(matrix.shape[0])
            queries = np.stack([r.query for r in group if r.query is not None])
            with torch.inference_mode():
                q = torch.from_numpy(np.ascontiguousarray(queries)).to(matrix.device, matrix.dtype)
                scores = (q @ matrix.T).float().clamp_(-1.0, 1.0)
            base = gallery.candidates()
            tops = [_top(gallery, r, scores[at], base, rows) for at, r in enumerate(group)]
            best = torch.cat([score for score, _ in tops]).cpu().tolist()
            where = torch.cat([row for _, row in tops]).cpu().tolist()
            start = 0
            for item, (score, _) in zip(group, tops, strict=True):
                end = start + len(score)
                item.matches = _matches(gallery, item.job, best[start:end], where[start:end])
                start = end
        search_ms = (time.perf_counter() - t0) * 1000
        for item in group:
            item.search_ms = search_ms
            log.debug(
                "job %s: searched",
                item.job.id,
                extra=job_fields(item.job.id, stage="search", ms=search_ms, gallery=name),
            )


def _locked(gallery: Searchable) -> contextlib.AbstractContextManager[Any]:
    """A live gallery's lock (its rows change under the follower thread); built ones never
    change."""
    lock = getattr(gallery, "lock", None)
    return lock if lock is not None else contextlib.nullcontext()


def _top(
    gallery: Searchable,
    item: _Ready,
    scores: torch.Tensor,
    base: np.ndarray | None,
    rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores and rows of the job's best rows among those its options allow, best first,
    at most k (on the scores' device)."""
    job = item.job
    allowed = base.copy() if base is not None else None
    if job.filter:
        mask = gallery.filter_mask(job.filter, rows)
        allowed = mask if allowed is None else allowed & mask
    excluded = [gallery.row_of(item_id) for item_id in job.exclude]
    if item.skip_row is not None:
        excluded.append(item.skip_row)
    if any(row is not None for row in excluded):
        allowed = np.ones(rows, dtype=bool) if allowed is None else allowed
        allowed[[row for row in excluded if row is not None]] = False
    if allowed is not None:
        scores = scores.masked_fill(~torch.from_numpy(allowed).to(scores.device), float("-inf"))
    best, where = torch.topk(scores, min(job.k, rows), largest=True, sorted=True)
    return best, where


def _matches(
    gallery: Searchable, job: JobRecord, best: list[float], where: list[int]
) -> list[Match]:
    """The matches of a job's top rows: up to the first excluded one, or the first under its
    ``min_score``."""
    matches: list[Match] = []
    for score, row in zip(best, where, strict=True):
        if score == float("-inf") or (job.min_score is not None and score < job.min_score):
            break
        matches.append(gallery.match(int(row), rank=len(matches) + 1, score=round(score, 6)))
    return matches


def _duplicates(engine: Engine, item: _Ready, store: JobStore, context: Context) -> None:
    """The pairs of a gallery's items at least ``min_score`` alike (blocks of rows against
    all later rows), and the groups they link."""
    job = item.job
    gallery = engine.searchable(job.gallery, version=job.gallery_version)
    threshold = job.min_score if job.min_score is not None else 0.97
    t0 = time.perf_counter()
    pairs: list[tuple[float, int, int]] = []
    truncated = False
    device = engine.encoder.device
    most = MAX_DUPLICATE_ROWS["cpu" if device == "cpu" else "accelerator"]
    if len(gallery) > most:
        sentence = TOO_MANY_TO_COMPARE.format(
            gallery=job.gallery, rows=len(gallery), most=most, device=device
        )
        _fail(store, job.id, "too_large", sentence, context)
        return
    with _locked(gallery):
        matrix = gallery.matrix
        rows = int(matrix.shape[0])
        base = gallery.candidates()
        alive = torch.from_numpy(base).to(matrix.device) if base is not None else None
        with torch.inference_mode():
            for low in range(0, rows, PAIR_BLOCK):
                block = (matrix[low : low + PAIR_BLOCK] @ matrix.T).float()
                upper = torch.ones_like(block, dtype=torch.bool).triu_(low + 1)
                keep = upper & (block >= threshold)
                if alive is not None:
                    keep &= alive[low : low + PAIR_BLOCK, None] & alive[None, :rows]
                found = keep.nonzero().cpu().tolist()
                values = block[keep].cpu().tolist()
                pairs += [(v, low + i, j) for (i, j), v in zip(found, values, strict=True)]
                if len(pairs) > MAX_PAIRS * 2:
                    pairs = sorted(pairs, reverse=True)[:MAX_PAIRS]
                    truncated = True
        pairs = sorted(pairs, reverse=True)
        truncated = truncated or len(pairs) > MAX_PAIRS
        pairs = pairs[:MAX_PAIRS]
        ids = {row: gallery.item_id(row) for _, a, b in pairs for row in (a, b)}
    item.search_ms = (time.perf_counter() - t0) * 1000
    item.matches = []
    result = _base_result(engine, item, worker_name=context.worker_name, batch_size=1)
    result.duplicates = Duplicates(
        min_score=threshold,
        pairs=[DuplicatePair(a=ids[a], b=ids[b], score=round(s, 6)) for s, a, b in pairs],
        groups=_groups([(ids[a], ids[b]) for _, a, b in pairs]),
        truncated=truncated,
    )
    (stored,) = store.succeed_many([(job.id, result, None)])
    _succeeded(job.id, result, stored, context)


def _groups(pairs: Sequence[tuple[str, str]]) -> list[list[str]]:
    """The connected groups of items that pairs link, largest first."""
    parent: dict[str, str] = {}

    def root(node: str) -> str:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for a, b in pairs:
        parent[root(a)] = root(b)
    groups: dict[str, list[str]] = {}
    for node in parent:
        groups.setdefault(root(node), []).append(node)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: (-len(g), g))


def _commit_add(
    engine: Engine, item: _Ready, store: JobStore, context: Context, *, batch_size: int
) -> None:
    """Commit an embedded add to its live gallery, ending its job (shared.live._COMMIT)."""
    job = item.job
    assert context.live is not None and item.query is not None and item.image is not None
    result = _base_result(engine, item, worker_name=context.worker_name, batch_size=batch_size)
    image = _kept_image(item)
    outcome = context.live.commit(
        gallery=job.gallery,
        item_id=job.item_id or "",
        job_id=job.id,
        accepted=job.gallery_version,
        add_seq=job.add_seq,
        embedding_field=engine.embedding_field,
        embedding=item.query.astype(np.float16).tobytes(),
        attributes=json.dumps(job.attributes or {}),
        sha256=job.sha256 or "",
        image=image,
        result=result.model_dump_json(),  # its item is filled in by the commit
        job_keys=store.finish_keys(job.id),
    )
    result.item = ItemAdded(id=job.item_id or "", gallery=job.gallery, state="indexed")
    _succeeded(job.id, result, outcome > 0, context)
    if outcome > 0 and context.metrics is not None:
        context.metrics.inc("lookalike_items_added_total", {"gallery": job.gallery})


def _kept_image(item: _Ready) -> bytes:
    """What an item keeps of its image: its pixels when small, else a JPEG of them (shown by
    the API, and embedded again by workers of another model)."""
    assert item.image is not None
    if item.upload_size <= KEEP_UPLOADS_UP_TO:
        return encode_pixels(item.image)
    return encode_thumbnail(Image.fromarray(item.image))


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


def _base_result(engine: Engine, item: _Ready, *, worker_name: str, batch_size: int) -> JobResult:
    size = len(engine.searchable(item.job.gallery))
    created_at = item.job.created_at.timestamp()
    encoder = engine.encoder
    return JobResult(
        matches=item.matches,
        model=encoder.model_id,
        model_is_random=encoder.is_random,
        gallery=GalleryInfo(name=item.job.gallery, size=size),
        device=f"{encoder.device} ({encoder.precision})",
        worker=worker_name,
        batch_size=batch_size,
        timings=Timings(
            queue_wait_ms=round(max(0.0, item.began - created_at) * 1000, 2),
            decode_ms=round(item.decode_ms, 2),
            embed_ms=round(item.embed_ms, 2),
            search_ms=round(item.search_ms, 2),
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
