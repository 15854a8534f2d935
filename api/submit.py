"""Accepting jobs, for every route that makes them: searches, adds, duplicates.

Which gallery a job may name (built ones the workers serve, live ones the caller may read),
the early refusal of an overloaded queue, decoding uploads a few at a time, and the one atomic
step that stores the jobs and queues their task messages (shared.jobs.AsyncJobStore.submit).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import HTTPException

from api.deps import AppState
from api.fleet import FleetView
from shared.celery_config import job_queue, search_queues
from shared.errors import ImageRejected
from shared.images import InputSpec, upload_pixels
from shared.jobs import JobRecord, NewJob
from shared.logs import job_fields
from shared.schemas import JobKind
from shared.settings import Settings

log = logging.getLogger(__name__)

QUEUE_FULL = "Too many jobs are waiting; retry shortly."
UNKNOWN_GALLERY = "Unknown gallery {name!r}: GET /galleries lists them."
TEXT_OFF = "Text search is off on every worker (LOOKALIKE_TEXT_SEARCH=off)."
NO_SUCH_ITEM = "Gallery {gallery!r} has no item {item!r}."


@dataclass(frozen=True)
class Target:
    """A gallery a job may name: built (served by the ready workers) or live."""

    name: str
    live: dict[str, str] | None  # a live gallery's record (shared.live)
    size: int | None  # a built gallery's items, as the workers announce it


async def live_gallery(state: AppState, name: str, owner: str | None) -> dict[str, str] | None:
    """The live gallery ``name`` if there is one the caller may read (another key's gallery
    is as good as absent)."""
    meta: dict[str, str] | None = await state.live.meta(name)
    if meta is None or (meta.get("owner") or None) != owner:
        return None
    return meta


async def target(
    state: AppState, view: FleetView, name: str, owner: str | None, *, text: bool = False
) -> Target:
    """The gallery a job names, or the refusal: one no ready worker serves and no live one
    (with no worker ready, a built gallery is trusted: the queue waits for the workers)."""
    if text and view.ready and not view.modes["text"]:
        raise HTTPException(422, TEXT_OFF)
    built = view.galleries.get(name)
    if built is not None:
        return Target(name, None, int(built.get("size", 0)))
    meta = await state.live.meta(name)
    if meta is not None:  # live: the caller's, or as good as absent
        if (meta.get("owner") or None) != owner:
            raise HTTPException(422, UNKNOWN_GALLERY.format(name=name))
        return Target(name, meta, None)
    if view.ready:
        raise HTTPException(422, UNKNOWN_GALLERY.format(name=name))
    return Target(name, None, None)


async def check_item(state: AppState, gallery: Target, item_id: str) -> None:
    """Refuse a search like an item the gallery does not have."""
    if gallery.live is not None:
        if await state.live.client.zscore(state.live.keys.items(gallery.name), item_id) is None:
            raise HTTPException(422, NO_SUCH_ITEM.format(gallery=gallery.name, item=item_id))
    elif gallery.size is not None and not (
        item_id.isdecimal() and len(item_id) < 10 and int(item_id) < gallery.size
    ):
        raise HTTPException(422, NO_SUCH_ITEM.format(gallery=gallery.name, item=item_id))


async def decode(
    state: AppState, files: Sequence[bytes], *, spec: InputSpec | None, numbered: bool
) -> list[bytes]:
    """Each file's pixels (decoding is the costly check: a few at a time, after the cheap
    ones); what is kept is what the model takes, so the worker decodes nothing."""
    if not files:
        return []
    return await state.image_work.run(
        _decode_images, list(files), settings=state.settings, spec=spec, numbered=numbered
    )


def _decode_images(
    files: list[bytes], *, settings: Settings, spec: InputSpec | None, numbered: bool
) -> list[bytes]:
    """Each file's pixels (shared.images.upload_pixels), or a refusal of the submission if any
    file is not an image we accept; a batch's refusals say which file (``File 2: ...``).
    (Sizes were checked while the files arrived.)"""
    pixels = []
    for number, data in enumerate(files, start=1):
        try:
            max_pixels = settings.storage.max_image_pixels
            pixels.append(upload_pixels(data, max_pixels=max_pixels, spec=spec))
        except ImageRejected as error:
            raise HTTPException(
                400, f"File {number}: {error}" if numbered else str(error)
            ) from None
    return pixels


async def refuse_if_full(state: AppState, count: int) -> None:
    """429 early, before decoding, when this process last saw the queues full."""
    if await state.backlog.full(count):
        raise HTTPException(429, QUEUE_FULL, headers={"Retry-After": "2"})


async def submit(
    state: AppState, jobs: Sequence[NewJob], *, kind: JobKind, notify: str | None = None
) -> list[JobRecord]:
    """Store the jobs and queue their messages, all or none (429 past the queue cap); their
    ends are pushed to the channel ``notify`` (api.events) if given."""
    settings = state.settings
    queue = job_queue(settings, kind)
    records = await state.store.submit(
        jobs,
        queue=queue,
        messages=[state.messages.search(job.job_id, queue=queue) for job in jobs],
        waiting=search_queues(settings),
        max_waiting=settings.broker.max_queued,
        notify=notify,
    )
    if records is None:
        state.backlog.saw_full()
        raise HTTPException(429, QUEUE_FULL, headers={"Retry-After": "2"})
    for record in records:
        state.metrics.inc("lookalike_jobs_submitted_total", {"kind": record.kind.value})
        log.info(
            "job %s: accepted (%s, k=%d, gallery %s)",
            record.id,
            record.kind.value,
            record.k,
            record.gallery,
            extra=job_fields(record.id, stage="accept", kind=record.kind.value),
        )
    return records
