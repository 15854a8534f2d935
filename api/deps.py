"""What a route needs, as typed dependencies (the full-stack template's ``deps.py``).

The lifespan (api.app) builds one :class:`AppState`; the providers below are the only code
that reads ``request.app.state``. They are ``async def`` on purpose: FastAPI runs a plain
``def`` dependency in its thread pool, a thread hand-off per dependency per request (it was a
fifth of the API's CPU per job). A route's signature says what it uses
(``store: StoreDep``, ``owner: Caller``, ``job: ReadableJob``), authentication is declared
rather than called, and a test can swap any of them with ``app.dependency_overrides``.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from api.backlog import Backlog
from api.enqueue import TaskMessages
from api.events import JobEvents
from api.fleet import Fleet
from api.image_work import ImageWork
from api.thumbnails import GalleryImages
from shared.jobs import AsyncJobStore, JobRecord, is_job_id
from shared.live import AsyncLiveStore
from shared.metrics import Metrics
from shared.settings import Settings

JOB_NOT_FOUND = "Job not found."
KEY_REQUIRED = "A valid API key is required."
STORE_DOWN = "The job store is unavailable; retry shortly."


@dataclass
class AppState:
    """Everything the routes share, built once per API process by the lifespan."""

    settings: Settings
    store: AsyncJobStore
    events: JobEvents
    fleet: Fleet
    metrics: Metrics
    gallery_images: GalleryImages
    messages: TaskMessages
    backlog: Backlog
    live: AsyncLiveStore
    image_work: ImageWork


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.lookalike
    return state


State = Annotated[AppState, Depends(get_state)]


async def get_settings(state: State) -> Settings:
    return state.settings


async def get_store(state: State) -> AsyncJobStore:
    return state.store


async def get_events(state: State) -> JobEvents:
    return state.events


async def get_fleet(state: State) -> Fleet:
    return state.fleet


async def get_metrics(state: State) -> Metrics:
    return state.metrics


async def get_gallery_images(state: State) -> GalleryImages:
    return state.gallery_images


async def get_live(state: State) -> AsyncLiveStore:
    return state.live


async def get_image_work(state: State) -> ImageWork:
    """Where images are decoded and drawn (uploads, pictures), a few at a time."""
    return state.image_work


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[AsyncJobStore, Depends(get_store)]
EventsDep = Annotated[JobEvents, Depends(get_events)]
FleetDep = Annotated[Fleet, Depends(get_fleet)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
GalleryImagesDep = Annotated[GalleryImages, Depends(get_gallery_images)]
LiveDep = Annotated[AsyncLiveStore, Depends(get_live)]
ImageWorkDep = Annotated[ImageWork, Depends(get_image_work)]


# --- the caller ----------------------------------------------------------------------------
#
# Optional API keys: off when LOOKALIKE_API_KEYS is empty (the default, for loopback use). When
# on, a request needs ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; keys are compared
# in constant time and never logged, and a job is visible only to the key that made it.


def owner_of(key: str) -> str:
    """A stable, non-reversible name for a key, stored in the jobs it creates."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key")


async def api_key(request: Request, settings: SettingsDep) -> str | None:
    """The owner id of the caller's key; None when keys are off; 401 when it is missing/wrong."""
    keys = settings.api.keys
    if not keys:
        return None
    presented = (presented_key(request) or "").encode()
    matched: str | None = None
    for key in keys:  # every key is compared, so timing does not tell which one matched
        if hmac.compare_digest(presented, key.encode()):
            matched = key
    if matched is None:
        raise HTTPException(401, KEY_REQUIRED, headers={"WWW-Authenticate": "Bearer"})
    return owner_of(matched)


Caller = Annotated[str | None, Depends(api_key)]


async def read_owned_job(store: AsyncJobStore, job_id: str, owner: str | None) -> JobRecord:
    """The job, if it exists and belongs to ``owner``; 404 otherwise (another key's job is as
    good as absent). For routes that validate other parameters first."""
    if not is_job_id(job_id):
        raise HTTPException(404, JOB_NOT_FOUND)
    return _owned(await store.get(job_id), owner)


async def watch_owned_job(
    events: JobEvents, job_id: str, owner: str | None, *, every_change: bool = False
) -> JobRecord:
    """:func:`read_owned_job`, read so that its end (``every_change``: each change) is pushed
    to this process's event hub (api.events.JobEvents.read)."""
    if not is_job_id(job_id):
        raise HTTPException(404, JOB_NOT_FOUND)
    return _owned(await events.read(job_id, every_change=every_change), owner)


def _owned(job: JobRecord | None, owner: str | None) -> JobRecord:
    if job is None or job.owner != owner:
        raise HTTPException(404, JOB_NOT_FOUND)
    return job


async def readable_job(job_id: str, owner: Caller, store: StoreDep) -> JobRecord:
    """The job of the path, if it exists and the caller may read it; 404 otherwise."""
    return await read_owned_job(store, job_id, owner)


ReadableJob = Annotated[JobRecord, Depends(readable_job)]
