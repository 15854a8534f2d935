"""Job routes: submit one job or a batch, read a job back (long poll), stream its events."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse

from api.deps import (
    JOB_NOT_FOUND,
    STORE_DOWN,
    AppState,
    Caller,
    EventsDep,
    SettingsDep,
    State,
    StoreDep,
    read_owned_job,
    watch_owned_job,
)
from api.events import Waiter
from api.schemas import BatchAccepted, problem_responses
from api.submit import check_item, decode, refuse_if_full, submit, target
from api.uploads import (
    BATCH_BODY,
    BATCH_FILES,
    BATCH_NO_TEXT,
    FILE_OR_TEXT,
    NO_FILE,
    ONE_QUERY,
    UPLOAD_BODY,
    Submission,
    read_submission,
)
from shared.jobs import JobRecord, NewJob, new_job_id
from shared.schemas import Job, JobKind, Problem
from shared.settings import GALLERY_NAME, MAX_K

log = logging.getLogger(__name__)
router = APIRouter()

KEEPALIVE_S = 15.0
JSON = "application/json"
STREAM_MAX_S = 600.0

# Read as text and parsed by api.uploads, like the same fields of a form or a JSON body.
K = Annotated[
    str | None,
    Query(
        description="How many matches (default 5)",
        json_schema_extra={"type": "integer", "minimum": 1, "maximum": MAX_K},
    ),
]
GalleryName = Annotated[
    str | None,
    Query(
        description="The gallery to search (default: the server's)",
        json_schema_extra={"pattern": f"^{GALLERY_NAME.pattern}$"},
    ),
]


Wait = Annotated[float, Query(ge=0, description="Long poll: seconds to wait for the end (capped)")]


@router.post(
    "/jobs",
    status_code=202,
    response_model=Job,
    responses={
        200: {"description": "The job ended within ?wait", "model": Job},
        **problem_responses(400, 401, 408, 413, 422, 429, 503),
    },
    openapi_extra=UPLOAD_BODY,
    summary="Submit an image (or a text query); with ?wait=N, wait up to N seconds for the end",
)
async def create_job(
    request: Request,
    state: State,
    owner: Caller,
    events: EventsDep,
    k: K = None,
    gallery: GalleryName = None,
    wait: Wait = 0.0,
) -> Response:
    submission = await read_submission(
        request,
        max_files=1,
        max_file_bytes=state.settings.storage.max_upload_bytes,
        query_k=k,
        query_gallery=gallery,
    )
    queries = sum((bool(submission.files), submission.text is not None, bool(submission.item)))
    if submission.files and submission.text is not None:
        raise HTTPException(400, FILE_OR_TEXT)
    if queries > 1:
        raise HTTPException(400, ONE_QUERY)
    if queries == 0:
        raise HTTPException(422, NO_FILE)  # (a second file was refused while reading)
    if wait <= 0:
        (job,) = await _accept(state, submission, max_files=1, owner=owner)
        return _accepted(job)
    deadline = time.monotonic() + min(wait, state.settings.api.max_wait_s)
    job_id = new_job_id()
    with events.watch(job_id) as waiter:  # before the job exists: its end cannot be missed
        (job,) = await _accept(
            state, submission, max_files=1, owner=owner, job_ids=[job_id], notify=events.channel
        )
        waiter.seed(job)
        watch = await waiter.until_end(deadline)
        if watch.job is not None and watch.job.status.is_final:
            return Response(watch.payload, media_type=JSON, headers=_location(job))
    return _accepted(job)


def _location(job: JobRecord) -> dict[str, str]:
    return {"Location": f"/jobs/{job.id}"}


def _accepted(job: JobRecord) -> Response:
    return Response(job.public_json(), status_code=202, media_type=JSON, headers=_location(job))


@router.post(
    "/jobs/batch",
    status_code=202,
    response_model=BatchAccepted,
    responses=problem_responses(400, 401, 408, 413, 422, 429, 503),
    openapi_extra=BATCH_BODY,
    summary="Submit several images at once: one job per file, in order",
)
async def create_batch(
    request: Request, state: State, owner: Caller, k: K = None, gallery: GalleryName = None
) -> Response:
    limit = state.settings.api.max_batch_files
    submission = await read_submission(
        request,
        max_files=limit,
        max_file_bytes=state.settings.storage.max_upload_bytes,
        query_k=k,
        query_gallery=gallery,
    )
    if submission.text is not None or submission.item is not None:
        raise HTTPException(400, BATCH_NO_TEXT)
    if not 1 <= len(submission.files) <= limit:
        raise HTTPException(400, BATCH_FILES.format(n=limit))
    jobs = await _accept(state, submission, max_files=limit, owner=owner)
    body = '{"jobs":[' + ",".join(job.public_json() for job in jobs) + "]}"
    return Response(body, status_code=202, media_type=JSON)


async def _accept(
    state: AppState,
    submission: Submission,
    *,
    max_files: int,
    owner: str | None,
    job_ids: Sequence[str] = (),
    notify: str | None = None,
) -> list[JobRecord]:
    """Validate, store and enqueue the jobs of a submission; all of them or none (with the
    ids ``job_ids``, if given, else new ones; their ends pushed to the channel ``notify``)."""
    settings = state.settings
    view = await state.fleet.view()
    top_k = submission.k or settings.gallery.top_k
    # The workers' default gallery, when they agree on one: it is theirs to choose.
    gallery_name = submission.gallery or view.default_gallery or settings.gallery.name
    gallery = await target(state, view, gallery_name, owner, text=submission.text is not None)
    if submission.item is not None:
        await check_item(state, gallery, submission.item)
    await refuse_if_full(state, max(1, len(submission.files)))
    pixels = await decode(state, submission.files, spec=view.input_spec, numbered=max_files > 1)
    if submission.text is not None:
        kind = JobKind.TEXT
    elif submission.item is not None:
        kind = JobKind.ITEM
    else:
        kind = JobKind.IMAGE
    uploads: list[bytes | None] = list(pixels) or [None]
    ids = list(job_ids) or [new_job_id() for _ in uploads]
    new = [
        NewJob(
            job_id,
            k=top_k,
            gallery=gallery_name,
            upload=upload,
            text=submission.text,
            owner=owner,
            kind=kind,
            options=submission.options,
        )
        for job_id, upload in zip(ids, uploads, strict=True)
    ]
    return await submit(state, new, kind=kind, notify=notify)


@router.get(
    "/jobs/{job_id}",
    response_model=Job,
    responses=problem_responses(401, 404, 422, 503),
    summary="Read a job; with ?wait=N, wait up to N seconds for it to end",
)
async def read_job(
    job_id: str,
    owner: Caller,
    store: StoreDep,
    events: EventsDep,
    settings: SettingsDep,
    wait: Wait = 0.0,
) -> Response:
    if wait <= 0:
        job = await read_owned_job(store, job_id, owner)  # after FastAPI checked ``wait``
        return Response(job.public_json(), media_type=JSON)
    deadline = time.monotonic() + min(wait, settings.api.max_wait_s)
    with events.watch(job_id) as waiter:  # shared with every other waiter of this job
        waiter.seed(await watch_owned_job(events, job_id, owner))
        watch = await waiter.until_end(deadline)
        if watch.gone:
            raise HTTPException(404, JOB_NOT_FOUND)
        return Response(watch.payload, media_type=JSON)


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
async def job_events(job_id: str, owner: Caller, events: EventsDep) -> StreamingResponse:
    watching = contextlib.ExitStack()  # left when the stream ends
    # before the read, as a long poll
    waiter = watching.enter_context(events.watch(job_id))
    try:
        waiter.seed(await watch_owned_job(events, job_id, owner, every_change=True))
    except BaseException:
        watching.close()
        raise
    return StreamingResponse(
        _event_stream(watching, waiter),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _sse(event: str, data: str) -> str:
    return f"event: {event}\ndata: {data}\n\n"


async def _event_stream(watching: contextlib.ExitStack, waiter: Waiter) -> AsyncIterator[str]:
    ends_at = time.monotonic() + STREAM_MAX_S
    last = ""
    with watching:  # shared with every other waiter of this job; left when the stream ends
        while True:
            watch = waiter.watch
            if watch.unreadable:
                yield _sse("error", Problem(detail=STORE_DOWN).model_dump_json())
                return
            if watch.gone or watch.job is None:
                yield _sse("error", Problem(detail=JOB_NOT_FOUND).model_dump_json())
                return
            if watch.payload != last:
                last = watch.payload
                yield _sse("job", last)
            if watch.job.status.is_final or time.monotonic() > ends_at:
                return
            if not await waiter.next(KEEPALIVE_S):
                yield ": keep-alive\n\n"  # also finds out when the client has gone
