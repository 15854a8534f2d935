"""The worker's Celery app. ``lookalike worker`` loads the engine, then starts consuming.

One worker process holds one CLIP and one index and runs one job at a time (solo pool: no
IPC between a pool parent and a child, no forking after torch started). Scale by running
more processes, on this host or others, against the same Redis.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery
from celery.signals import task_postrun, task_prerun

from shared.celery_config import SEARCH_TASK, make_celery
from shared.jobs import JobStore
from shared.metrics import Metrics
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.broker.redis_url,
        socket_connect_timeout=3,
        socket_timeout=10,
        health_check_interval=10,
        retry_on_timeout=True,
    )


settings = get_settings()
app: Celery = make_celery(settings, name="lookalike-worker")
app.conf.include = ["worker.tasks"]

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


_metrics: Metrics | None = None


def metrics() -> Metrics:
    """This process's metrics, flushed to Redis every second once started (worker.main)."""
    global _metrics
    if _metrics is None:
        _metrics = Metrics(redis_client(settings), prefix=settings.storage.key_prefix)
    return _metrics


TIMED_OUT = "The job took longer than {limit:.0f} s."


class Watchdog:
    """Every job ends: one running past the time limit is failed; a wedged worker exits.

    The solo pool cannot enforce Celery's time limits, so this thread does.
    """

    def __init__(
        self,
        limit_s: float,
        *,
        fail: Callable[[str, str], object],
        exit: Callable[[int], object] = os._exit,
        tick_s: float = 1.0,
    ) -> None:
        self.limit_s = limit_s
        self.fail = fail
        self.exit = exit
        self.tick_s = tick_s
        self.current: tuple[tuple[str, ...], float] | None = None
        self._failed: set[str] = set()
        threading.Thread(target=self._run, name="watchdog", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(self.tick_s)
            self.check()

    def check(self) -> None:
        current = self.current
        if current is None:
            return
        job_ids, began = current
        elapsed = time.monotonic() - began
        if elapsed > self.limit_s:
            for job_id in job_ids:
                if job_id in self._failed:
                    continue
                self._failed.add(job_id)
                log.error("job %s: over the %ss time limit, failing it", job_id, self.limit_s)
                try:
                    self.fail(job_id, TIMED_OUT.format(limit=self.limit_s))
                except redis.RedisError:
                    log.exception("job %s: could not record the time-out", job_id)
        if elapsed > 2 * self.limit_s:
            log.critical("jobs %s: worker is wedged, exiting to be restarted", ",".join(job_ids))
            self.exit(70)


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
