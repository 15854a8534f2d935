"""Pictures: gallery images, the result picture of a job, and the list of galleries.

Gallery images come from the thumbnail pack of each index folder (api.thumbnails), found
under ``LOOKALIKE_INDEX_DIR``: the API host needs that folder (the same volume as the
workers', mounted read-only in docker-compose.yml), not the model.
"""

from __future__ import annotations

import io
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Response
from PIL import Image

from api.deps import (
    JOB_NOT_FOUND,
    FleetDep,
    GalleryImagesDep,
    ImageWorkDep,
    LiveDep,
    ReadableJob,
    SettingsDep,
    StoreDep,
)
from api.fleet import Fleet
from api.grid import Tile, blank_tile, fit, render_grid, text_tile
from api.schemas import problem_responses
from api.thumbnails import NO_GALLERY_IMAGES, GalleryImages
from shared.errors import ImageRejected
from shared.images import stored_image
from shared.jobs import JobRecord
from shared.schemas import JobKind, JobStatus
from shared.settings import GALLERY_NAME

router = APIRouter()

NOT_DONE = "The job has not succeeded, so it has no picture."
NOT_A_SEARCH = "Only a search has a result picture."
BAD_INDEX = "The image index must be a whole number, 0 or more."
BAD_SIZE = "size must be a whole number of pixels from 16 to 1024."
CACHE = "public, max-age=3600"
PNG = {"content": {"image/png": {}}, "description": "A PNG image"}

Size = Annotated[
    int | None,
    Query(ge=16, le=1024, description="Longest side in pixels (default: 224, or the original)"),
]


async def _default_gallery(fleet: Fleet) -> str | None:
    try:
        view = await fleet.view()
    except Exception:  # without Redis, the API's own setting
        return None
    default: str | None = view.default_gallery
    return default


async def _advertised_dir(fleet: Fleet, name: str) -> str | None:
    try:
        gallery = (await fleet.view()).galleries.get(name)
    except Exception:  # the picture can still be found on disk without Redis
        return None
    return str(gallery["dir"]) if gallery and gallery.get("dir") else None


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@router.get(
    "/gallery/{index}.png",
    response_class=Response,
    responses={200: PNG, **problem_responses(404, 422)},
    summary="One gallery image, scaled for display (small images crisply, pixel by pixel)",
)
async def gallery_image(
    index: Annotated[int, Path(ge=0)],
    settings: SettingsDep,
    fleet: FleetDep,
    images: GalleryImagesDep,
    work: ImageWorkDep,
    gallery: Annotated[str | None, Query(description="The gallery (default: the server's)")] = None,
    size: Size = None,
) -> Response:
    name = gallery or await _default_gallery(fleet) or settings.gallery.name
    if GALLERY_NAME.fullmatch(name) is None:
        raise HTTPException(404, NO_GALLERY_IMAGES.format(name=name))
    advertised = await _advertised_dir(fleet, name)

    def render() -> bytes:
        image = images.image(name, index, advertised_dir=advertised)
        target = size or (224 if max(image.size) <= 64 else max(image.size))
        return _png(fit(image, target))

    data = await work.run(render)
    return Response(data, media_type="image/png", headers={"Cache-Control": CACHE})


@router.get(
    "/jobs/{job_id}/grid.png",
    response_class=Response,
    responses={200: PNG, **problem_responses(401, 404, 409, 503)},
    summary="The result picture: the query beside its matches, with class names and scores",
)
async def job_grid(
    job: ReadableJob,
    store: StoreDep,
    fleet: FleetDep,
    images: GalleryImagesDep,
    settings: SettingsDep,
    work: ImageWorkDep,
    live: LiveDep,
) -> Response:
    if not job.kind.searches:
        raise HTTPException(409, NOT_A_SEARCH)
    if job.status != JobStatus.SUCCEEDED or job.result is None:
        raise HTTPException(409, NOT_DONE)
    upload = await store.upload(job.id) if job.kind == JobKind.IMAGE else None
    if job.kind == JobKind.IMAGE and upload is None:
        raise HTTPException(404, JOB_NOT_FOUND)
    gallery = job.result.gallery.name
    advertised = await _advertised_dir(fleet, gallery)
    # A live gallery's item images are in Redis: fetched here, drawn in the thread below.
    wanted = [m.item_id for m in job.result.matches if m.index is None]
    if job.kind == JobKind.ITEM and job.item_id is not None and not job.item_id.isdecimal():
        wanted.append(job.item_id)
    stored = {item_id: await live.image(gallery, item_id) for item_id in wanted}
    if job.kind == JobKind.ITEM:
        upload = stored.get(job.item_id or "")
    data = await work.run(  # drawn a few at a time, like uploads are decoded
        _grid,
        job,
        upload,
        images,
        stored,
        advertised=advertised,
        max_pixels=settings.storage.max_image_pixels,
    )
    return Response(
        data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
    )


def _grid(
    job: JobRecord,
    upload: bytes | None,
    images: GalleryImages,
    stored: dict[str, bytes | None],
    *,
    advertised: str | None,
    max_pixels: int,
) -> bytes:
    result = job.result
    assert result is not None
    gallery = result.gallery.name

    def picture(item_id: str, index: int | None) -> Image.Image:
        if index is not None:
            return images.image(gallery, index, advertised_dir=advertised)
        data = stored.get(item_id)
        try:  # what the item keeps: its pixels or a small JPEG of them
            return stored_image(data, max_pixels=max_pixels) if data else blank_tile()
        except ImageRejected:
            return blank_tile()

    if job.kind == JobKind.ITEM and job.item_id is not None:
        built = job.item_id.isdecimal() and upload is None
        index = int(job.item_id) if built else None
        query = Tile(picture(job.item_id, index), "query", f"item {job.item_id}"[:22])
    elif upload is not None:
        try:  # the job's pixels (or their small copy): never a large original
            query_image = stored_image(upload, max_pixels=max_pixels)
        except ImageRejected:  # it was checked at upload: only a changed store gets here
            raise HTTPException(404, JOB_NOT_FOUND) from None
        query = Tile(query_image, "query", "your image")
    else:
        query = Tile(text_tile(job.text or ""), "query", "text")
    tiles = [
        Tile(
            picture(m.item_id, m.index),
            f"#{m.rank} {m.label_name or m.item_id}"[:22],
            f"score {m.score:.4f}",
        )
        for m in result.matches
    ]
    footer = (
        f"{result.model} on {result.device} - gallery {result.gallery.name} "
        f"({result.gallery.size} images)"
    )
    warning = "Random weights: these matches are meaningless." if result.model_is_random else None
    return render_grid(query, tiles, footer=footer, warning=warning)
