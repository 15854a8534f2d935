"""Celery tasks: thin, like web views. Parse, call a plain function, done."""

from __future__ import annotations

import logging

import redis

from shared.celery_config import SEARCH_TASK
from worker.celery_app import app, settings, store
from worker.engine import get_engine
from worker.heartbeat import worker_name
from worker.search import run_search_job

log = logging.getLogger(__name__)


@app.task(  # type: ignore[untyped-decorator]
    name=SEARCH_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(redis.ConnectionError, redis.TimeoutError),
    retry_backoff=1,
    retry_backoff_max=10,
    max_retries=5,
)
def search(self: object, job_id: str) -> None:
    """Answer the job ``job_id`` (its record and upload are in Redis)."""
    run_search_job(
        store(),
        get_engine(settings),
        job_id,
        worker_name=worker_name(),
        max_pixels=settings.storage.max_image_pixels,
        max_attempts=settings.broker.max_attempts,
    )
