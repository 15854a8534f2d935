"""HTTP routes: submit a job, read it back (with long polling), health and readiness."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from pydantic import BaseModel

from api.events import RECHECK_S, JobEvents
from api.limits import TOO_LARGE, human_size
from api.security import authorise
from api.uploads import UPLOAD_BODY, read_upload
from shared.celery_config import SEARCH_TASK
from shared.errors import ImageRejected
from shared.images import decode_upload
from shared.jobs import AsyncJobStore, is_job_id, new_job_id
from shared.schemas import Job, Problem
from shared.settings import Settings

log = logging.getLogger(__name__)
router = APIRouter()

JOB_NOT_FOUND = "Job not found."
QUEUE_FULL = "Too many jobs are waiting; retry shortly."
QUEUE_DOWN = "The job queue is unavailable; retry shortly."
HEARTBEAT_WINDOW_S = 15.0

K = Annotated[int | None, Query(ge=1, le=50, description="How many matches (default 5)")]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": Problem} for code in codes}


@router.post(
    "/jobs",
    status_code=202,
    response_model=Job,
    responses=_errors(400, 401, 413, 422, 429, 503),
    openapi_extra=UPLOAD_BODY,
    summary="Submit an image; answers at once with the job to poll",
)
async def create_job(request: Request, response: Response, k: K = None) -> Job:
    settings: Settings = request.app.state.settings
    store: AsyncJobStore = request.app.state.store
    owner = authorise(request)
    upload = await read_upload(request)
    limit = settings.storage.max_upload_bytes
    if len(upload.data) > limit:
        raise HTTPException(413, TOO_LARGE.format(limit=human_size(limit)))
    try:
        await run_in_threadpool(
            decode_upload, upload.data, max_pixels=settings.storage.max_image_pixels
        )
    except ImageRejected as error:
        raise HTTPException(400, str(error)) from None
    if await store.queue_length(settings.broker.queue) >= settings.broker.max_queued:
        raise HTTPException(429, QUEUE_FULL, headers={"Retry-After": "2"})
    top_k = k if k is not None else (upload.k if upload.k is not None else settings.gallery.top_k)
    job_id = new_job_id()
    job = await store.create(job_id, upload=upload.data, k=top_k, owner=owner)
    try:
        await run_in_threadpool(
            request.app.state.celery.send_task, SEARCH_TASK, args=[job_id], task_id=job_id
        )
    except OperationalError:
        await store.discard(job_id)
        log.warning("job %s: could not enqueue, Redis unavailable", job_id)
        raise HTTPException(503, QUEUE_DOWN, headers={"Retry-After": "5"}) from None
    response.headers["Location"] = f"/jobs/{job_id}"
    return job.public()


@router.get(
    "/jobs/{job_id}",
    response_model=Job,
    responses=_errors(401, 404, 422, 503),
    summary="Read a job; with ?wait=N, wait up to N seconds for it to end",
)
async def read_job(
    request: Request,
    job_id: str,
    wait: Annotated[
        float, Query(ge=0, description="Long poll: seconds to wait for the end (capped)")
    ] = 0.0,
) -> Job:
    owner = authorise(request)
    if not is_job_id(job_id):
        raise HTTPException(404, JOB_NOT_FOUND)
    store: AsyncJobStore = request.app.state.store
    events: JobEvents = request.app.state.events
    deadline = time.monotonic() + min(wait, request.app.state.settings.api.max_wait_s)
    with events.watch(job_id) as changed:
        while True:
            changed.clear()  # before the read: an end published during the read still wakes us
            job = await store.get(job_id)
            if job is None or job.owner != owner:  # another key's job: as good as absent
                raise HTTPException(404, JOB_NOT_FOUND)
            remaining = deadline - time.monotonic()
            if job.status.is_final or remaining <= 0:
                return job.public()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=min(remaining, RECHECK_S))


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    workers: list[dict[str, Any]]


@router.get("/healthz", response_model=Health, summary="The API process is alive")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses=_errors(503),
    summary="Redis is reachable and at least one worker has its model and index loaded",
)
async def readyz(request: Request) -> Any:
    store: AsyncJobStore = request.app.state.store
    try:
        await store.client.ping()
        workers = await store.ready_workers(within_s=HEARTBEAT_WINDOW_S)
    except Exception as error:
        return _not_ready(f"Redis is unreachable ({type(error).__name__}).")
    # A failed worker's record outlives its process for a while, so its reason can be read.
    ready = [w for w in workers if w.get("state") == "ready"]
    if not ready:
        if workers:
            states = "; ".join(
                f"{w.get('name')}: {w.get('reason') or w.get('state')}" for w in workers
            )
            return _not_ready(f"No worker is ready yet ({states}).")
        return _not_ready("No worker is running.")
    return Readiness(status="ready", workers=ready)


def _not_ready(reason: str) -> JSONResponse:
    return JSONResponse({"detail": reason}, status_code=503, headers={"Retry-After": "5"})
