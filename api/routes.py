"""Job routes: submit one job or a batch, read a job back (long poll), stream its events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from kombu.exceptions import OperationalError
from pydantic import BaseModel
from redis.exceptions import RedisError

from api.events import RECHECK_S, JobEvents
from api.fleet import FleetView
from api.limits import TOO_LARGE, human_size
from api.security import authorise
from api.uploads import (
    BATCH_BODY,
    BATCH_FILES,
    BATCH_NO_TEXT,
    FILE_OR_TEXT,
    NO_FILE,
    UPLOAD_BODY,
    Submission,
    read_submission,
)
from shared.celery_config import job_queue, search_queues
from shared.errors import ImageRejected
from shared.images import decode_upload
from shared.jobs import AsyncJobStore, JobRecord, NewJob, is_job_id, new_job_id
from shared.logs import job_fields
from shared.metrics import Metrics
from shared.schemas import Job, Problem
from shared.settings import GALLERY_NAME, Settings

log = logging.getLogger(__name__)
router = APIRouter()

JOB_NOT_FOUND = "Job not found."
QUEUE_FULL = "Too many jobs are waiting; retry shortly."
QUEUE_DOWN = "The job queue is unavailable; retry shortly."
UNKNOWN_GALLERY = "Unknown gallery {name!r}: GET /galleries lists them."
DECODE_SLOTS = 4  # uploads decoded at once per API process: bounds memory under load
TEXT_OFF = "Text search is off on every worker (LOOKALIKE_TEXT_SEARCH=off)."
STORE_DOWN = "The job store is unavailable; retry shortly."
KEEPALIVE_S = 15.0
STREAM_MAX_S = 600.0

K = Annotated[int | None, Query(ge=1, le=50, description="How many matches (default 5)")]
GalleryName = Annotated[
    str | None,
    Query(
        pattern=f"^{GALLERY_NAME.pattern}$",
        description="The gallery to search (default: the server's)",
    ),
]


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": Problem} for code in codes}


class BatchAccepted(BaseModel):
    jobs: list[Job]


@router.post(
    "/jobs",
    status_code=202,
    response_model=Job,
    responses=problem_responses(400, 401, 413, 422, 429, 503),
    openapi_extra=UPLOAD_BODY,
    summary="Submit an image (or a text query); answers at once with the job to poll",
)
async def create_job(
    request: Request, response: Response, k: K = None, gallery: GalleryName = None
) -> Job:
    owner = authorise(request)
    submission = await read_submission(request, max_files=1)
    if submission.files and submission.text is not None:
        raise HTTPException(400, FILE_OR_TEXT)
    if not submission.files and submission.text is None:
        raise HTTPException(422, NO_FILE)  # (a second file was refused while reading)
    jobs = await _accept(request, submission, max_files=1, k=k, gallery=gallery, owner=owner)
    response.headers["Location"] = f"/jobs/{jobs[0].id}"
    return jobs[0]


@router.post(
    "/jobs/batch",
    status_code=202,
    response_model=BatchAccepted,
    responses=problem_responses(400, 401, 413, 422, 429, 503),
    openapi_extra=BATCH_BODY,
    summary="Submit several images at once: one job per file, in order",
)
async def create_batch(request: Request, k: K = None, gallery: GalleryName = None) -> BatchAccepted:
    owner = authorise(request)
    limit = request.app.state.settings.api.max_batch_files
    submission = await read_submission(request, max_files=limit)
    if submission.text is not None:
        raise HTTPException(400, BATCH_NO_TEXT)
    if not 1 <= len(submission.files) <= limit:
        raise HTTPException(400, BATCH_FILES.format(n=limit))
    jobs = await _accept(request, submission, max_files=limit, k=k, gallery=gallery, owner=owner)
    return BatchAccepted(jobs=jobs)


async def _accept(
    request: Request,
    submission: Submission,
    *,
    max_files: int,
    k: int | None,
    gallery: str | None,
    owner: str | None,
) -> list[Job]:
    """Validate, store and enqueue the jobs of a submission; all of them or none."""
    settings: Settings = request.app.state.settings
    store: AsyncJobStore = request.app.state.store
    view = await request.app.state.fleet.view()
    top_k = k if k is not None else (submission.k or settings.gallery.top_k)
    # The workers' default gallery, when they agree on one: it is theirs to choose.
    gallery_name = gallery or submission.gallery or view.default_gallery or settings.gallery.name
    _check_servable(view, gallery_name, text=submission.text is not None)
    count = max(1, len(submission.files))
    queued = await store.queue_length(*search_queues(settings))
    if queued + count > settings.broker.max_queued:
        raise HTTPException(429, QUEUE_FULL, headers={"Retry-After": "2"})
    # Decoding is the costly check (memory and CPU): last, and a few at a time.
    async with request.app.state.decode_slots:
        await run_in_threadpool(
            _check_images, submission.files, settings=settings, numbered=max_files > 1
        )
    uploads: list[bytes | None] = list(submission.files) or [None]
    new = [
        NewJob(
            new_job_id(),
            k=top_k,
            gallery=gallery_name,
            upload=upload,
            text=submission.text,
            owner=owner,
        )
        for upload in uploads
    ]
    records = await store.create(new)
    try:
        queue = job_queue(settings, records[0].kind)
        await request.app.state.enqueuer.send([job.job_id for job in new], queue=queue)
    except OperationalError:
        await store.discard([job.job_id for job in new])
        log.warning("could not enqueue %d job(s): Redis unavailable", len(new))
        raise HTTPException(503, QUEUE_DOWN, headers={"Retry-After": "5"}) from None
    metrics: Metrics = request.app.state.metrics
    for record in records:
        metrics.inc("lookalike_jobs_submitted_total", {"kind": record.kind.value})
        log.info(
            "job %s: accepted (%s, k=%d, gallery %s)",
            record.id,
            record.kind.value,
            record.k,
            record.gallery,
            extra=job_fields(record.id, stage="accept", kind=record.kind.value),
        )
    return [record.public() for record in records]


def _check_images(files: list[bytes], *, settings: Settings, numbered: bool) -> None:
    """Refuse the submission if any file is too large or not an image we accept; a batch's
    refusals say which file (``File 2: ...``)."""
    limit = settings.storage.max_upload_bytes
    several = numbered
    for number, data in enumerate(files, start=1):
        if len(data) > limit:
            detail = TOO_LARGE.format(limit=human_size(limit))
            raise HTTPException(413, f"File {number}: {detail}" if several else detail)
        try:
            decode_upload(data, max_pixels=settings.storage.max_image_pixels)
        except ImageRejected as error:
            raise HTTPException(400, f"File {number}: {error}" if several else str(error)) from None


def _check_servable(view: FleetView, gallery: str, *, text: bool) -> None:
    """Refuse what the ready workers cannot answer; with no ready worker, the queue waits."""
    if not view.ready:
        return
    if gallery not in view.galleries:
        raise HTTPException(422, UNKNOWN_GALLERY.format(name=gallery))
    if text and not view.modes["text"]:
        raise HTTPException(422, TEXT_OFF)


async def readable_job(request: Request, job_id: str) -> JobRecord:
    """The job, if it exists and the caller may read it; 404 otherwise."""
    owner = authorise(request)
    if not is_job_id(job_id):
        raise HTTPException(404, JOB_NOT_FOUND)
    job = await request.app.state.store.get(job_id)
    if job is None or job.owner != owner:  # another key's job: as good as absent
        raise HTTPException(404, JOB_NOT_FOUND)
    assert isinstance(job, JobRecord)
    return job


@router.get(
    "/jobs/{job_id}",
    response_model=Job,
    responses=problem_responses(401, 404, 422, 503),
    summary="Read a job; with ?wait=N, wait up to N seconds for it to end",
)
async def read_job(
    request: Request,
    job_id: str,
    wait: Annotated[
        float, Query(ge=0, description="Long poll: seconds to wait for the end (capped)")
    ] = 0.0,
) -> Job:
    job = await readable_job(request, job_id)
    if job.status.is_final or wait <= 0:
        return job.public()
    store: AsyncJobStore = request.app.state.store
    events: JobEvents = request.app.state.events
    deadline = time.monotonic() + min(wait, request.app.state.settings.api.max_wait_s)
    with events.watch(job_id, finals_only=True) as changed:
        while True:
            changed.clear()  # before the read: an end published during the read still wakes us
            found = await store.get(job_id)
            if found is None:
                raise HTTPException(404, JOB_NOT_FOUND)
            remaining = deadline - time.monotonic()
            if found.status.is_final or remaining <= 0:
                return found.public()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=min(remaining, RECHECK_S))


@router.get(
    "/jobs/{job_id}/events",
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "Server-Sent Events: `event: job` with the job as JSON, at once and "
            "on every change; the stream ends after the job does.",
        },
        **problem_responses(401, 404, 503),
    },
    response_class=StreamingResponse,
    summary="Follow a job as Server-Sent Events until it ends",
)
async def job_events(request: Request, job_id: str) -> StreamingResponse:
    await readable_job(request, job_id)
    return StreamingResponse(
        _event_stream(request, job_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _sse(event: str, data: str) -> str:
    return f"event: {event}\ndata: {data}\n\n"


async def _event_stream(request: Request, job_id: str) -> AsyncIterator[str]:
    store: AsyncJobStore = request.app.state.store
    events: JobEvents = request.app.state.events
    ends_at = time.monotonic() + STREAM_MAX_S
    last = ""
    with events.watch(job_id) as changed:
        while True:
            changed.clear()  # before the read: a change during the read still wakes us
            try:
                job = await store.get(job_id)
            except RedisError:
                yield _sse("error", Problem(detail=STORE_DOWN).model_dump_json())
                return
            if job is None:
                yield _sse("error", Problem(detail=JOB_NOT_FOUND).model_dump_json())
                return
            payload = job.public().model_dump_json()
            if payload != last:
                yield _sse("job", payload)
                last = payload
            if job.status.is_final or time.monotonic() > ends_at:
                return
            try:
                await asyncio.wait_for(changed.wait(), timeout=KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"  # also finds out when the client has gone
