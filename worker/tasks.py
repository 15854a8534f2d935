"""Celery tasks: thin, like web views. Parse, call a plain function, done.

With ``LOOKALIKE_WORKER_BATCH`` > 1 (the default) the search task is a celery-batches task
(worker.batching): messages that arrive while the worker is busy are handed over together, up
to the batch size, and embedded in one forward pass; a message that finds the queues empty is
answered at once. Acknowledgement after the job is stored (``task_acks_late``) and redelivery
when a worker dies are set once, for every task, in shared.celery_config.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis

from shared.celery_config import INDEX_CHUNK_TASK, SEARCH_TASK, search_queues
from worker.batching import ReconnectingBatches
from worker.celery_app import app, live_store, metrics, settings, store
from worker.distributed import compute_chunk
from worker.engine import get_engine
from worker.heartbeat import worker_name
from worker.search import run_search_jobs
from worker.transport import more_waiting

log = logging.getLogger(__name__)


def answer(job_ids: Sequence[str]) -> None:
    run_search_jobs(
        store(),
        get_engine(settings),
        job_ids,
        worker_name=worker_name(),
        max_pixels=settings.storage.max_image_pixels,
        max_attempts=settings.broker.max_attempts,
        metrics=metrics(),
        live=live_store(),
    )


def queue_is_empty() -> bool:
    """Nothing more is waiting for this worker: a batch of what it holds is as big as it gets.
    The transport knows when it took the message with others (worker.transport); else Redis
    is asked."""
    waiting = more_waiting()
    if waiting is not None:
        return not waiting
    try:
        with store().client.pipeline(transaction=False) as pipe:
            for queue in search_queues(settings):
                pipe.llen(queue)
            return sum(int(n) for n in pipe.execute()) == 0
    except redis.RedisError:
        return False  # let the flush timer decide


def job_ids_of(args: Sequence[Any]) -> list[str]:
    """The job ids a task call carries: ``(job_id,)``, or ``([request, ...],)`` for a batch."""
    if args and isinstance(args[0], list):
        return [str(request.args[0]) for request in args[0]]
    return [str(args[0])] if args else []


if settings.worker.batch > 1:

    class SearchBatches(ReconnectingBatches):
        def queue_is_empty(self) -> bool:
            return queue_is_empty()

    @app.task(  # type: ignore[untyped-decorator]
        name=SEARCH_TASK,
        base=SearchBatches,
        flush_every=settings.worker.batch,
        flush_interval=settings.worker.batch_wait_ms / 1000,
    )
    def search(requests: list[Any]) -> None:
        """Answer a batch of jobs (each request carries one job id)."""
        answer(job_ids_of([requests]))

else:

    @app.task(  # type: ignore[untyped-decorator]
        name=SEARCH_TASK,
        bind=True,
        autoretry_for=(redis.ConnectionError, redis.TimeoutError),
        retry_backoff=1,
        retry_backoff_max=10,
        max_retries=5,
    )
    def search(self: object, job_id: str) -> None:
        """Answer the job ``job_id`` (its record and upload are in Redis)."""
        answer([job_id])


@app.task(name=INDEX_CHUNK_TASK)  # type: ignore[untyped-decorator]
def index_chunk(spec: dict[str, Any]) -> None:
    """Embed one chunk of a distributed index build (see worker.distributed)."""
    compute_chunk(
        store().client,
        settings.storage.key_prefix,
        spec,
        get_engine(settings).encoder,
        data_dir=settings.gallery.data_dir,
        max_pixels=settings.storage.max_image_pixels,
        worker_name=worker_name(),
    )
