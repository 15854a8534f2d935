"""Galleries and their items: list them, create a live one, add, replace, read and delete its
items, find near-duplicates.

A live gallery changes while it is served (shared.live): an add is a job, embedded by a worker
with the searches and visible to every worker once its job succeeded; a delete is done when it
answers. Built galleries (Fashion-MNIST, ``lookalike index build --images``) are read-only
here: their items are their images, with ids ``0``, ``1``... and one attribute, ``class``.
With API keys on, a live gallery belongs to the key that created it: other keys get 404 for
it, its items and their images. Built galleries are public.
"""

from __future__ import annotations

import hashlib
import io
import time
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from api.deps import (
    Caller,
    EventsDep,
    FleetDep,
    GalleryImagesDep,
    ImageWorkDep,
    LiveDep,
    SettingsDep,
    State,
)
from api.grid import fit
from api.limits import TOO_LARGE, human_size
from api.multipart import read_multipart
from api.schemas import problem_responses
from api.submit import decode, live_gallery, refuse_if_full, submit
from api.uploads import DISCONNECTED, MALFORMED
from shared import items
from shared.errors import FieldRefused, FileTooLarge, ImageRejected, MultipartRefused
from shared.images import stored_image
from shared.jobs import NewJob, new_job_id
from shared.live import StoredItem
from shared.schemas import (
    Galleries,
    GallerySummary,
    Item,
    ItemPage,
    JobKind,
    gallery_image_url,
)
from shared.settings import GALLERY_NAME

router = APIRouter()

NO_GALLERY = "Gallery {name!r} not found."
NO_ITEM = "Gallery {name!r} has no item {item!r}."
BUILT = "Gallery {name!r} is built from files: rebuild it with 'lookalike index build'."
NAME_TAKEN = "A gallery named {name!r} is built from files: choose another name."
NO_ADD_FILE = "The request has no 'file' field: send the item's image as multipart/form-data."
BAD_NAME = "The gallery name must be lower-case letters, digits, '.', '_' and '-' (up to 64)."
LIVE = "live"
JSON = "application/json"
PAGE_MAX = 200
BAD_CURSOR = "after must be the 'next' of the previous page (a whole number)."

ItemId = Annotated[str, Path(description="1 to 128 letters, digits, '-', '_', '.' or ':'")]


def _name(name: str) -> str:
    if GALLERY_NAME.fullmatch(name) is None:
        raise HTTPException(422, BAD_NAME)
    return name


def _item_id(item_id: str) -> str:
    try:
        return items.item_id(item_id)
    except FieldRefused as refused:
        raise HTTPException(422, str(refused)) from None


def _item(name: str, stored: StoredItem | None, item_id: str, pending: str | None) -> Item:
    return Item(
        id=item_id,
        gallery=name,
        state="indexed" if stored is not None else "pending",
        attributes=stored.attributes if stored is not None else {},
        image_url=f"/galleries/{name}/items/{item_id}/image.png" if stored is not None else None,
        sha256=stored.sha256 if stored is not None else None,
        added_at=datetime.fromisoformat(stored.added_at) if stored and stored.added_at else None,
        pending_job=pending,
    )


async def _live_or_404(state: Any, name: str, owner: str | None) -> dict[str, str]:
    meta = await live_gallery(state, name, owner)
    if meta is None:
        raise HTTPException(404, NO_GALLERY.format(name=name))
    return meta


# --- the list, and creating a live gallery ------------------------------------------------


@router.get(
    "/galleries",
    response_model=Galleries,
    responses=problem_responses(401, 503),
    summary="The galleries jobs can name: size, model, kind, and when a live one last changed",
)
async def list_galleries(
    settings: SettingsDep, fleet: FleetDep, live: LiveDep, owner: Caller
) -> Galleries:
    view = await fleet.view()
    default = view.default_gallery or settings.gallery.name
    listed = [
        GallerySummary(
            name=str(g["name"]),
            size=int(g["size"]),
            model=str(g["model"]),
            kind=str(g.get("kind", "")),
            classes=[str(c) for c in g.get("classes", [])],
            default=g["name"] == default,
        )
        for g in view.galleries.values()
    ]
    names = [n for n in await live.names() if n not in view.galleries]
    metas = {n: await live.meta(n) for n in names}
    mine = [n for n, m in metas.items() if m is not None and (m.get("owner") or None) == owner]
    counts = await live.counts(mine)
    for name in mine:
        meta = metas[name] or {}
        listed.append(
            GallerySummary(
                name=name,
                size=counts[name],
                model=meta.get("model", ""),
                kind=LIVE,
                classes=[],
                default=name == default,
                updated_at=datetime.fromisoformat(meta["updated_at"])
                if meta.get("updated_at")
                else None,
            )
        )
    listed.sort(key=lambda g: (g.name != default, g.name))
    return Galleries(default=default, galleries=listed)


@router.put(
    "/galleries/{name}",
    response_model=GallerySummary,
    status_code=201,
    responses={200: {"model": GallerySummary}, **problem_responses(401, 404, 409, 422, 503)},
    summary="Create an empty live gallery for the workers' model (again: 200, unchanged)",
)
async def create_gallery(
    name: str, response: Response, state: State, fleet: FleetDep, owner: Caller
) -> GallerySummary:
    _name(name)
    view = await fleet.view()
    if name in view.galleries or name == state.settings.gallery.name:
        raise HTTPException(409, NAME_TAKEN.format(name=name))
    models = {str(w.get("model")) for w in view.ready}
    model = models.pop() if len(models) == 1 else state.settings.model.name
    created = await state.live.create(name, owner=owner, model=model)
    if created < 0:  # another key's: as good as absent, and its name is not free
        raise HTTPException(404, NO_GALLERY.format(name=name))
    if created == 0:
        response.status_code = 200
    meta = await state.live.meta(name) or {}
    (count,) = (await state.live.counts([name])).values()
    return GallerySummary(
        name=name,
        size=count,
        model=meta.get("model", model),
        kind=LIVE,
        classes=[],
        default=False,
        updated_at=datetime.fromisoformat(meta["updated_at"]) if meta.get("updated_at") else None,
    )


# --- items -----------------------------------------------------------------------------------


@router.put(
    "/galleries/{name}/items/{item_id}",
    status_code=202,
    responses={
        202: {"description": "The add's job, to poll; the item is indexed when it succeeds"},
        **problem_responses(400, 401, 404, 408, 409, 413, 422, 429, 503),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "attributes": {
                                "type": "string",
                                "description": "A JSON object of strings, numbers, booleans",
                            },
                        },
                    }
                }
            },
        }
    },
    summary="Add (or replace) an item of a live gallery: its image and attributes",
)
async def add_item(
    name: str, item_id: ItemId, request: Request, state: State, fleet: FleetDep, owner: Caller
) -> Response:
    _name(name)
    _item_id(item_id)
    view = await fleet.view()
    if name in view.galleries:
        raise HTTPException(409, BUILT.format(name=name))
    await _live_or_404(state, name, owner)
    upload, raw_attributes = await _read_add(request, state.settings.storage.max_upload_bytes)
    try:
        attributes = items.attributes(raw_attributes)
    except FieldRefused as refused:
        raise HTTPException(422, str(refused)) from None
    await refuse_if_full(state, 1)
    (pixels,) = await decode(state, [upload], spec=view.input_spec, numbered=False)
    job = NewJob(
        new_job_id(),
        k=1,
        gallery=name,
        upload=pixels,
        owner=owner,
        kind=JobKind.ADD,
        options={
            "item_id": item_id,
            "attributes": attributes,
            "sha256": hashlib.sha256(upload).hexdigest(),
        },
    )
    (record,) = await submit(state, [job], kind=JobKind.ADD)
    return Response(
        record.public_json(),
        status_code=202,
        media_type=JSON,
        headers={"Location": f"/jobs/{record.id}"},
    )


async def _read_add(request: Request, max_file_bytes: int) -> tuple[bytes, str | None]:
    """The image and the attributes field of an add (multipart)."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "multipart/form-data":
        raise HTTPException(422, NO_ADD_FILE)
    try:
        form = await read_multipart(
            content_type,
            request.stream(),
            max_files=1,
            max_fields=4,
            max_field_bytes=items.MAX_ATTRIBUTES_JSON,
            max_file_bytes=max_file_bytes,
        )
    except ClientDisconnect:
        raise HTTPException(400, DISCONNECTED) from None
    except FileTooLarge:
        raise HTTPException(413, TOO_LARGE.format(limit=human_size(max_file_bytes))) from None
    except MultipartRefused as refused:
        detail = items.BAD_ATTRIBUTES if refused.kind == "field_too_large" else MALFORMED
        raise HTTPException(422 if refused.kind == "field_too_large" else 400, detail) from None
    try:
        files = [part.read() for part in form.files if part.field == "file"]
    finally:
        form.close()
    if len(files) != 1:
        raise HTTPException(422, NO_ADD_FILE)
    values = form.values("attributes")
    if len(values) > 1:
        raise HTTPException(422, items.BAD_ATTRIBUTES)
    return files[0], values[0] if values else None


@router.delete(
    "/galleries/{name}/items/{item_id}",
    status_code=204,
    responses=problem_responses(401, 404, 409, 422, 503),
    summary="Delete an item: no search accepted after this answers will return it",
)
async def delete_item(
    name: str, item_id: ItemId, state: State, fleet: FleetDep, owner: Caller
) -> Response:
    _name(name)
    _item_id(item_id)
    if name in (await fleet.view()).galleries:
        raise HTTPException(409, BUILT.format(name=name))
    await _live_or_404(state, name, owner)
    if not await state.live.delete(name, item_id):
        raise HTTPException(404, NO_ITEM.format(name=name, item=item_id))
    state.metrics.inc("lookalike_items_deleted_total", {"gallery": name})
    return Response(status_code=204)


@router.get(
    "/galleries/{name}/items/{item_id}",
    response_model=Item,
    responses=problem_responses(401, 404, 422, 503),
    summary="One item: its state, attributes and image",
)
async def read_item(
    name: str,
    item_id: ItemId,
    state: State,
    fleet: FleetDep,
    images: GalleryImagesDep,
    owner: Caller,
) -> Item:
    _name(name)
    _item_id(item_id)
    view = await fleet.view()
    if name in view.galleries:
        return (await _built_items(images, name, view.galleries[name], [item_id]))[0]
    await _live_or_404(state, name, owner)
    stored, pending = await state.live.item(name, item_id)
    if stored is None and pending is None:
        raise HTTPException(404, NO_ITEM.format(name=name, item=item_id))
    return _item(name, stored, item_id, pending)


@router.get(
    "/galleries/{name}/items",
    response_model=ItemPage,
    responses=problem_responses(401, 404, 422, 503),
    summary="The items of a gallery, a page at a time (live: in the order they were added)",
)
async def list_items(
    name: str,
    state: State,
    fleet: FleetDep,
    images: GalleryImagesDep,
    owner: Caller,
    after: Annotated[
        str | None, Query(description="The previous page's 'next' (none: the first page)")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX)] = 50,
) -> ItemPage:
    _name(name)
    if after is not None and not (after.isdecimal() and len(after) <= 18):
        raise HTTPException(422, BAD_CURSOR)
    view = await fleet.view()
    if name in view.galleries:
        size = int(view.galleries[name].get("size", 0))
        start = int(after) + 1 if after is not None and after.isdecimal() else 0
        ids = [str(i) for i in range(start, min(size, start + limit))]
        page = await _built_items(images, name, view.galleries[name], ids)
        last = str(start + limit - 1) if start + limit < size else None
        return ItemPage(items=page, total=size, next=last)
    await _live_or_404(state, name, owner)
    stored, total, cursor = await state.live.page(name, after=int(after or 0), limit=limit)
    listed = [_item(name, s, s.id, None) for s in stored]
    return ItemPage(items=listed, total=total, next=None if cursor is None else str(cursor))


async def _built_items(
    images: Any, name: str, summary: dict[str, Any], ids: list[str]
) -> list[Item]:
    """Items of a built gallery: its rows, with their class."""
    size = int(summary.get("size", 0))
    advertised = str(summary["dir"]) if summary.get("dir") else None
    for item_id in ids:
        if not item_id.isdecimal() or len(item_id) > 9 or int(item_id) >= size:
            raise HTTPException(404, NO_ITEM.format(name=name, item=item_id))
    labels, classes = await run_in_threadpool(images.labels, name, advertised_dir=advertised)
    return [
        Item(
            id=item_id,
            gallery=name,
            state="indexed",
            attributes={"class": classes[int(labels[int(item_id)])]} if classes else {},
            image_url=gallery_image_url(name, int(item_id)),
        )
        for item_id in ids
    ]


@router.get(
    "/galleries/{name}/items/{item_id}/image.png",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "A PNG image"},
        **problem_responses(401, 404, 422, 503),
    },
    summary="A live item's image, scaled for display",
)
async def item_image(
    name: str,
    item_id: ItemId,
    state: State,
    work: ImageWorkDep,
    owner: Caller,
    size: Annotated[int | None, Query(ge=16, le=1024)] = None,
) -> Response:
    _name(name)
    _item_id(item_id)
    await _live_or_404(state, name, owner)
    data = await state.live.image(name, item_id)
    if data is None:
        raise HTTPException(404, NO_ITEM.format(name=name, item=item_id))
    max_pixels = state.settings.storage.max_image_pixels

    def render() -> bytes:
        try:  # what the item keeps: pixels or a small JPEG of them, never a large original
            image = stored_image(data, max_pixels=max_pixels)
        except ImageRejected:
            raise HTTPException(404, NO_ITEM.format(name=name, item=item_id)) from None
        target = size or (224 if max(image.size) <= 64 else max(image.size))
        buffer = io.BytesIO()
        fit(image, target).save(buffer, format="PNG")
        return buffer.getvalue()

    png = await work.run(render)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


# --- near-duplicates -------------------------------------------------------------------------


@router.get(
    "/galleries/{name}/duplicates",
    responses={
        200: {"description": "The pairs at least min_score alike, and the groups they link"},
        202: {"description": "Not done within ?wait: the job to poll"},
        **problem_responses(401, 404, 422, 429, 503),
    },
    summary="Near-duplicate items of a gallery (a worker compares them all)",
)
async def duplicates(
    name: str,
    state: State,
    fleet: FleetDep,
    events: EventsDep,
    owner: Caller,
    min_score: Annotated[float, Query(ge=-1, le=1)] = 0.97,
    wait: Annotated[float, Query(ge=0, description="Seconds to wait for the answer")] = 20.0,
) -> Response:
    _name(name)
    view = await fleet.view()
    if name not in view.galleries:
        await _live_or_404(state, name, owner)
    await refuse_if_full(state, 1)
    job = NewJob(
        new_job_id(),
        k=1,
        gallery=name,
        owner=owner,
        kind=JobKind.DUPLICATES,
        options={"min_score": min_score},
    )
    deadline = time.monotonic() + min(wait, state.settings.api.max_wait_s)
    with events.watch(job.job_id) as waiter:  # before the job exists: its end cannot be missed
        (record,) = await submit(state, [job], kind=JobKind.DUPLICATES, notify=events.channel)
        waiter.seed(record)
        watch = await waiter.until_end(deadline)
    ended = watch.job if watch.job is not None and watch.job.status.is_final else None
    if ended is not None and ended.result is not None and ended.result.duplicates is not None:
        return Response(ended.result.duplicates.model_dump_json(), media_type=JSON)
    if ended is not None and ended.error:
        raise HTTPException(422, ended.error)
    return Response(
        record.public_json(),
        status_code=202,
        media_type=JSON,
        headers={"Location": f"/jobs/{record.id}"},
    )
