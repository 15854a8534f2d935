"""The worker's Celery app. ``lookalike worker`` loads the engine, then starts consuming.

One worker process holds one CLIP and its indexes and runs one task at a time in Celery's solo
pool (no IPC between a pool parent and a child, no fork after torch started); a task answers
a batch of jobs (worker.batching), embedded in one forward pass. Scale by running more
processes, on this host or others, against the same Redis.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from celery import Celery
from celery.signals import task_postrun, task_prerun

from shared.celery_config import SEARCH_TASK, make_celery, search_queues
from shared.jobs import JobStore
from shared.live import LiveStore
from shared.metrics import Metrics
from shared.redis_clients import sync_client
from shared.settings import Settings, get_settings
from worker.transport import bulk_transport
from worker.watchdog import Watchdog

log = logging.getLogger(__name__)


def redis_client(settings: Settings) -> redis.Redis:
    return sync_client(settings.broker.redis_url)


settings = get_settings()
app: Celery = make_celery(settings, name="lookalike-worker")
app.conf.include = ["worker.tasks"]
# Job messages taken many per Redis round trip (worker.transport); other queues as kombu does.
if transport := bulk_transport(settings.broker.redis_url):
    app.conf.broker_transport = transport
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "bulk_queues": tuple(search_queues(settings)),
    }

_store: JobStore | None = None


def store() -> JobStore:
    global _store
    if _store is None:
        _store = JobStore(
            redis_client(settings),
            prefix=settings.storage.key_prefix,
            ttl_s=settings.storage.job_ttl_s,
        )
    return _store


_live: LiveStore | None = None


def live_store() -> LiveStore:
    """Live galleries (shared.live), on this process's Redis client."""
    global _live
    if _live is None:
        _live = LiveStore(store().client, prefix=settings.storage.key_prefix)
    return _live


_metrics: Metrics | None = None


def metrics() -> Metrics:
    """This process's metrics, flushed to Redis every second once started (worker.main)."""
    global _metrics
    if _metrics is None:
        _metrics = Metrics(redis_client(settings), prefix=settings.storage.key_prefix)
    return _metrics


watchdog: Watchdog | None = None


@task_prerun.connect  # type: ignore[untyped-decorator]
def _job_began(sender: Any = None, task_id: str | None = None, args: Any = (), **_: object) -> None:
    if watchdog is not None:
        from worker.tasks import job_ids_of

        # Only search tasks carry job ids; any task that wedges the worker makes it exit.
        jobs = job_ids_of(args) if getattr(sender, "name", None) == SEARCH_TASK else []
        watchdog.current = (tuple(jobs), time.monotonic())


@task_postrun.connect  # type: ignore[untyped-decorator]
def _job_ended(**_: object) -> None:
    if watchdog is not None:
        watchdog.current = None
