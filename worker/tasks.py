"""Celery tasks: thin, like web views. Parse, call a plain function, done.

With ``LOOKALIKE_WORKER_BATCH`` > 1 (the default) the task is a celery-batches task: messages
that arrive while the worker is busy are handed over together, up to the batch size, and
embedded in one forward pass. An idle worker flushes after ``LOOKALIKE_BATCH_WAIT_MS``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis
from celery_batches import Batches

from shared.celery_config import INDEX_CHUNK_TASK, SEARCH_TASK, search_queues
from worker.celery_app import app, metrics, settings, store
from worker.distributed import compute_chunk
from worker.engine import get_engine
from worker.heartbeat import worker_name
from worker.search import run_search_jobs

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
    )


def queue_is_empty() -> bool:
    """Nothing more is waiting for this worker: a batch of what it holds is as big as it gets."""
    try:
        with store().client.pipeline(transaction=False) as pipe:
            for queue in search_queues(settings):
                pipe.llen(queue)
            return sum(int(n) for n in pipe.execute()) == 0
    except redis.RedisError:
        return False  # let the flush timer decide


class ReconnectingBatches(Batches):  # type: ignore[misc]
    """celery-batches, made to survive a broker reconnection, and to answer a lone job at once.

    celery-batches flushes its buffer every ``flush_interval``, so even a job that arrives at
    an idle worker waits for the timer. Here a message that finds the queue empty flushes the
    buffer at once (nothing more would join the batch); under load the queue is not empty,
    and the timer gathers what arrives meanwhile, up to ``flush_every``.

    When the connection to Redis drops, Celery restarts its consumer (and its timers) and
    rebuilds each task's strategy. celery-batches would keep a reference to its old flush
    timer, never start a new one, and sit on its buffer; here the rebuilt strategy forgets the
    dead timer and restarts it if requests are waiting. (Their acknowledgements belong to the
    lost connection: answered now, the messages come back after the visibility timeout and
    are skipped as already answered.)
    """

    def Strategy(self, task: Any, app: Any, consumer: Any) -> Any:  # noqa: N802 (Celery's name)
        old_timer: Any = getattr(self, "_tref", None)
        if old_timer is not None:
            old_timer.cancel()
            self._tref = None
        strategy = super().Strategy(task, app, consumer)
        if self._buffer.qsize() or self._pending.qsize():
            self._tref = consumer.timer.call_repeatedly(self.flush_interval, self._do_flush)

        def handle(*args: Any, **kwargs: Any) -> None:
            strategy(*args, **kwargs)
            if self._buffer.qsize() and queue_is_empty():
                self._do_flush()

        return handle


def job_ids_of(args: Sequence[Any]) -> list[str]:
    """The job ids a task call carries: ``(job_id,)``, or ``([request, ...],)`` for a batch."""
    if args and isinstance(args[0], list):
        return [str(request.args[0]) for request in args[0]]
    return [str(args[0])] if args else []


if settings.worker.batch > 1:

    @app.task(  # type: ignore[untyped-decorator]
        name=SEARCH_TASK,
        base=ReconnectingBatches,
        flush_every=settings.worker.batch,
        flush_interval=settings.worker.batch_wait_ms / 1000,
        acks_late=True,
        reject_on_worker_lost=True,
    )
    def search(requests: list[Any]) -> None:
        """Answer a batch of jobs (each request carries one job id)."""
        answer(job_ids_of([requests]))

else:

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
        answer([job_id])


@app.task(  # type: ignore[untyped-decorator]
    name=INDEX_CHUNK_TASK, acks_late=True, reject_on_worker_lost=True
)
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
