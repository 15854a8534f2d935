"""Every job ends: one running past the time limit is failed; a wedged worker exits.

The worker runs Celery's solo pool (one process holds the model; no fork after torch starts),
and the solo pool cannot enforce Celery's task time limits: this thread does. Celery's
``task_prerun``/``task_postrun`` signals (worker.celery_app) tell it what is running.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)

TIMED_OUT = "The job took longer than {limit:.0f} s."
EXIT_WEDGED = 70


class Watchdog:
    """Fails the jobs in hand past ``limit_s``; past twice that, exits the process (a
    supervisor or Docker restarts it, and the reconciler hands its jobs to another worker)."""

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
            self.exit(EXIT_WEDGED)
