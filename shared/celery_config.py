"""The Celery configuration both sides share: the API sends tasks by name with it,
the worker consumes with it. Nothing here imports torch."""

from __future__ import annotations

from typing import Any

from celery import Celery

from shared.schemas import JobKind
from shared.settings import Settings

SEARCH_TASK = "lookalike.search"
INDEX_CHUNK_TASK = "lookalike.index_chunk"


def text_queue(settings: Settings) -> str:
    """Text jobs wait apart: only workers with text search on consume this queue, so a fleet
    can mix text and image-only workers."""
    return f"{settings.broker.queue}.text"


def job_queue(settings: Settings, kind: JobKind) -> str:
    return text_queue(settings) if kind == JobKind.TEXT else settings.broker.queue


def search_queues(settings: Settings) -> list[str]:
    """Every queue where jobs wait."""
    return [settings.broker.queue, text_queue(settings)]


def build_queue(settings: Settings) -> str:
    """The queue of distributed index builds: apart, so it never counts as waiting jobs."""
    return f"{settings.broker.queue}.build"


def celery_config(settings: Settings) -> dict[str, Any]:
    broker = settings.broker
    return {
        "broker_url": broker.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_transport_options": {
            # An unacknowledged message (its worker died) is handed out again after this.
            "visibility_timeout": broker.visibility_timeout_s,
            # ...and the sweep that gives such messages back runs every 10 s (default ~100 s).
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 3,
            "socket_timeout": 10,
            "retry_on_timeout": True,
            "health_check_interval": 10,
        },
        "broker_pool_limit": 16,
        # Results live in our own job records, not in Celery's result backend.
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": broker.queue,
        "task_routes": {
            SEARCH_TASK: {"queue": broker.queue},
            INDEX_CHUNK_TASK: {"queue": build_queue(settings)},
        },
        # Nothing lost: a message is acknowledged after its job is stored, and a worker that
        # dies mid-job gives it back. (Every task; no task repeats it.)
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One message at a time without batching; with it, as many as a batch holds.
        "worker_prefetch_multiplier": settings.worker.batch,
        # No task_time_limit: the solo pool ignores it; worker.watchdog enforces
        # LOOKALIKE_TASK_TIME_LIMIT instead.
        # Publishing from the API must fail fast (and become a 503) when Redis is down.
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "enable_utc": True,
    }


def make_celery(settings: Settings, *, name: str) -> Celery:
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app
