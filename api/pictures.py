"""Pictures: gallery images, the result picture of a job, and the list of galleries.

Gallery images come from the thumbnail pack of each index folder (shared.galleries), found
under ``LOOKALIKE_INDEX_DIR``: the API host needs that folder (the same volume as the
workers', mounted read-only in docker-compose.yml), not the model.
"""

from __future__ import annotations

import io
import pathlib
import threading
import time
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from PIL import Image

from api.fleet import Fleet
from api.routes import JOB_NOT_FOUND, problem_responses, readable_job
from shared.errors import ImageRejected
from shared.galleries import THUMBS, ThumbnailPack, find_gallery_dirs, pack_stamp
from shared.grid import Tile, fit, render_grid, text_tile
from shared.images import decode_upload
from shared.jobs import AsyncJobStore, JobRecord
from shared.schemas import Galleries, GallerySummary, JobKind, JobStatus
from shared.settings import GALLERY_NAME, Settings

router = APIRouter()

NO_GALLERY_IMAGES = "The images of gallery {name!r} are not available on this API host."
NO_SUCH_IMAGE = "Gallery {name!r} has no image {index}."
NOT_DONE = "The job has not succeeded, so it has no picture."
BAD_INDEX = "The image index must be a whole number, 0 or more."
BAD_SIZE = "size must be a whole number of pixels from 16 to 1024."
CACHE = "public, max-age=3600"
MISSING_CACHE_S = 5.0
PNG = {"content": {"image/png": {}}, "description": "A PNG image"}

Size = Annotated[
    int | None,
    Query(ge=16, le=1024, description="Longest side in pixels (default: 224, or the original)"),
]


class GalleryImages:
    """Thumbnail packs by gallery name, opened once per API process and reopened when the
    gallery is rebuilt (or its workers now advertise another index folder)."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self._packs: dict[str, ThumbnailPack] = {}
        self._missing: dict[str, float] = {}  # not found, and when: asked again only later
        self._lock = threading.Lock()

    def pack(self, name: str, *, advertised_dir: str | None = None) -> ThumbnailPack:
        with self._lock:
            cached = self._packs.get(name)
            missing_since = self._missing.get(name)
        if cached is not None and self._current(cached, advertised_dir):
            return cached
        if missing_since is not None and time.monotonic() - missing_since < MISSING_CACHE_S:
            raise HTTPException(404, NO_GALLERY_IMAGES.format(name=name))
        # Looked for outside the lock: a scan of the index folder must not hold up the rest.
        candidates = [self.root / advertised_dir] if advertised_dir else []
        candidates += list(find_gallery_dirs(self.root, name))
        for directory in candidates:
            if ThumbnailPack.exists(directory / THUMBS):
                pack = ThumbnailPack(directory / THUMBS)
                with self._lock:
                    self._packs[name] = pack
                    self._missing.pop(name, None)
                return pack
        with self._lock:
            self._packs.pop(name, None)
            self._missing[name] = time.monotonic()
        raise HTTPException(404, NO_GALLERY_IMAGES.format(name=name))

    def _current(self, pack: ThumbnailPack, advertised_dir: str | None) -> bool:
        stem = pack.path.with_suffix("")
        if advertised_dir and stem.parent != self.root / advertised_dir:
            return False
        try:
            return pack_stamp(stem) == pack.stamp
        except OSError:  # removed
            return False

    def image(self, name: str, index: int, *, advertised_dir: str | None = None) -> Image.Image:
        pack = self.pack(name, advertised_dir=advertised_dir)
        if not 0 <= index < len(pack):
            raise HTTPException(404, NO_SUCH_IMAGE.format(name=name, index=index))
        return pack.image(index)


async def _default_gallery(request: Request) -> str | None:
    try:
        view = await request.app.state.fleet.view()
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
    request: Request,
    index: Annotated[int, Path(ge=0)],
    gallery: Annotated[str | None, Query(description="The gallery (default: the server's)")] = None,
    size: Size = None,
) -> Response:
    settings: Settings = request.app.state.settings
    name = gallery or await _default_gallery(request) or settings.gallery.name
    if GALLERY_NAME.fullmatch(name) is None:
        raise HTTPException(404, NO_GALLERY_IMAGES.format(name=name))
    images: GalleryImages = request.app.state.gallery_images
    advertised = await _advertised_dir(request.app.state.fleet, name)

    def render() -> bytes:
        image = images.image(name, index, advertised_dir=advertised)
        target = size or (224 if max(image.size) <= 64 else max(image.size))
        return _png(fit(image, target))

    data = await run_in_threadpool(render)
    return Response(data, media_type="image/png", headers={"Cache-Control": CACHE})


@router.get(
    "/jobs/{job_id}/grid.png",
    response_class=Response,
    responses={200: PNG, **problem_responses(401, 404, 409, 503)},
    summary="The result picture: the query beside its matches, with class names and scores",
)
async def job_grid(request: Request, job_id: str) -> Response:
    job = await readable_job(request, job_id)
    if job.status != JobStatus.SUCCEEDED or job.result is None:
        raise HTTPException(409, NOT_DONE)
    store: AsyncJobStore = request.app.state.store
    upload = await store.upload(job_id) if job.kind == JobKind.IMAGE else None
    if job.kind == JobKind.IMAGE and upload is None:
        raise HTTPException(404, JOB_NOT_FOUND)
    advertised = await _advertised_dir(request.app.state.fleet, job.result.gallery.name)
    images: GalleryImages = request.app.state.gallery_images
    settings: Settings = request.app.state.settings
    data = await run_in_threadpool(
        _grid,
        job,
        upload,
        images,
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
    *,
    advertised: str | None,
    max_pixels: int,
) -> bytes:
    result = job.result
    assert result is not None
    if upload is not None:
        try:
            query_image = decode_upload(upload, max_pixels=max_pixels).image
        except ImageRejected:  # it was checked at upload: only a changed store gets here
            raise HTTPException(404, JOB_NOT_FOUND) from None
        query = Tile(query_image, "query", "your image")
    else:
        query = Tile(text_tile(job.text or ""), "query", "text")
    tiles = [
        Tile(
            images.image(result.gallery.name, m.index, advertised_dir=advertised),
            f"#{m.rank} {m.label_name}"[:22],
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


@router.get(
    "/galleries",
    response_model=Galleries,
    responses=problem_responses(503),
    summary="The galleries jobs can name, with size and model",
)
async def galleries(request: Request) -> Galleries:
    settings: Settings = request.app.state.settings
    view = await request.app.state.fleet.view()
    default = view.default_gallery or settings.gallery.name
    summaries: list[dict[str, Any]] = list(view.galleries.values())
    listed = [
        GallerySummary(
            name=str(g["name"]),
            size=int(g["size"]),
            model=str(g["model"]),
            kind=str(g.get("kind", "")),
            classes=[str(c) for c in g.get("classes", [])],
            default=g["name"] == default,
        )
        for g in sorted(summaries, key=lambda g: (g["name"] != default, g["name"]))
    ]
    return Galleries(default=default, galleries=listed)
