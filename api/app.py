"""The FastAPI application: validate and store uploads, enqueue jobs, read them back.

It never imports torch or transformers; tasks are sent by name through the shared Celery
configuration. Run it with ``lookalike api`` (uvicorn).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import openapi
from api.backlog import Backlog
from api.deps import STORE_DOWN, AppState
from api.enqueue import TaskMessages
from api.events import SHUTDOWN_S, JobEvents
from api.fleet import Fleet
from api.galleries import router as galleries_router
from api.health import router as health_router
from api.image_work import ImageWork
from api.limits import BodySizeLimit
from api.pages import router as pages_router
from api.pictures import BAD_INDEX, BAD_SIZE
from api.pictures import router as pictures_router
from api.routes import router
from api.thumbnails import GalleryImages
from api.uploads import BAD_GALLERY, BAD_K, BAD_WAIT
from shared.allocator import keep_freed_memory
from shared.celery_config import make_celery, search_queues
from shared.jobs import AsyncJobStore
from shared.live import AsyncLiveStore
from shared.metrics import Metrics
from shared.redis_clients import async_client, sync_client
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)

RETRY_AFTER_S = "5"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    keep_freed_memory()  # each upload's buffers reuse the last one's memory

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = async_client(settings.broker.redis_url)
        store = AsyncJobStore(
            client, prefix=settings.storage.key_prefix, ttl_s=settings.storage.job_ttl_s
        )
        events = JobEvents(store)
        events.start()
        metrics = Metrics(
            sync_client(settings.broker.redis_url, max_connections=2, socket_timeout=5),
            prefix=settings.storage.key_prefix,
        )
        metrics.start()
        celery = make_celery(settings, name="lookalike-api")
        image_work = ImageWork()
        app.state.lookalike = AppState(
            settings=settings,
            store=store,
            events=events,
            fleet=Fleet(store),
            metrics=metrics,
            gallery_images=GalleryImages(settings.gallery.index_dir),
            messages=TaskMessages(celery),
            backlog=Backlog(store, search_queues(settings), limit=settings.broker.max_queued),
            image_work=image_work,
            live=AsyncLiveStore(client, prefix=settings.storage.key_prefix),
        )
        try:
            yield
        finally:
            image_work.close()
            celery.close()
            await events.stop()
            await asyncio.to_thread(metrics.stop)
            metrics.client.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), SHUTDOWN_S)

    app = FastAPI(
        title="lookalike",
        summary="Upload a picture, get the most similar images of a gallery.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.storage.max_upload_bytes,
        max_files={"/jobs/batch": settings.api.max_batch_files},
        timeout_s=settings.api.body_timeout_s,
        on_refuse=lambda status: _count(app, status),
    )
    app.include_router(router)
    app.include_router(pictures_router)
    app.include_router(galleries_router)
    app.include_router(health_router)
    app.include_router(pages_router)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _counted_refusal)
    # Down, timed out, read-only after a failover, out of memory: for clients, unavailable.
    app.add_exception_handler(RedisError, _store_down)
    openapi.install(app)
    return app


def _count(app: FastAPI, status: int) -> None:
    state: AppState | None = getattr(app.state, "lookalike", None)
    if state is not None:
        state.metrics.inc("lookalike_requests_refused_total", {"status": str(status)})


def _count_refusal(request: Request, status: int) -> None:
    if request.url.path.startswith("/jobs"):
        _count(request.app, status)


async def _counted_refusal(request: Request, exc: Exception) -> Any:
    assert isinstance(exc, StarletteHTTPException)
    _count_refusal(request, exc.status_code)
    return await http_exception_handler(request, exc)


async def _store_down(request: Request, exc: Exception) -> JSONResponse:
    _count_refusal(request, 503)
    log.warning("redis unavailable during %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse(
        {"detail": STORE_DOWN}, status_code=503, headers={"Retry-After": RETRY_AFTER_S}
    )


# FastAPI's validation errors are lists; lookalike answers one short sentence per field.
_FIELD_DETAILS = {
    "k": BAD_K,
    "wait": BAD_WAIT,
    "gallery": BAD_GALLERY,
    "index": BAD_INDEX,
    "size": BAD_SIZE,
}


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    _count_refusal(request, 422)
    detail = "The request is not valid."
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ())]
        field = loc[-1] if loc else ""
        if field in _FIELD_DETAILS:
            detail = _FIELD_DETAILS[field]
            break
    return JSONResponse({"detail": detail}, status_code=422)
