"""Sending job tasks by name, off the event loop, from a few dedicated threads.

Celery's ``send_task`` blocks (a Redis LPUSH, retried while Redis is away), so it cannot run
on the event loop. It runs on threads of its own rather than on the shared thread pool: the
Celery app keeps per-thread state (its result backend, resolved through package metadata the
first time) that is then built once per thread instead of once per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shared.celery_config import SEARCH_TASK

THREADS = 2


class Enqueuer:
    def __init__(self, celery: Any, *, threads: int = THREADS) -> None:
        self.celery = celery
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="enqueue")

    async def send(self, job_ids: Sequence[str], *, queue: str) -> None:
        """Enqueue one search task per job (task id = job id); kombu errors propagate."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._send, list(job_ids), queue)

    def _send(self, job_ids: list[str], queue: str) -> None:
        with self.celery.producer_or_acquire() as producer:
            for job_id in job_ids:
                self.celery.send_task(
                    SEARCH_TASK, args=[job_id], task_id=job_id, queue=queue, producer=producer
                )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.celery.close()  # its producer pool's connections
