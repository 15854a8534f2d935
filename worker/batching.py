"""celery-batches, made to survive a broker reconnection and to answer a lone job at once.

This subclass reaches into celery-batches' private attributes (``_tref``, ``_buffer``,
``_pending``, ``_do_flush``), so the package is pinned in pyproject.toml to the release it was
tested with; tests/worker/test_batching.py holds the behaviour it adds against that release.

What it adds:

* **A lone job is answered at once.** celery-batches flushes its buffer every
  ``flush_interval``, so even a job that arrives at an idle worker waits for the timer. Here a
  message that finds the queues empty (``queue_is_empty``) flushes the buffer at once: nothing
  more would join the batch. Under load the queues are not empty, and the timer gathers what
  arrives meanwhile, up to ``flush_every``.
* **Reconnections.** When the connection to Redis drops, Celery restarts its consumer (and its
  timers) and rebuilds each task's strategy. celery-batches would keep a reference to its old
  flush timer, never start a new one, and sit on its buffer; here the rebuilt strategy forgets
  the dead timer and restarts it if requests are waiting. (Their acknowledgements belong to the
  lost connection: answered now, the messages come back after the visibility timeout and are
  skipped as already answered.)
"""

from __future__ import annotations

from typing import Any

from celery_batches import Batches


class ReconnectingBatches(Batches):  # type: ignore[misc]
    """A celery-batches task base; a subclass says when nothing else is waiting."""

    def queue_is_empty(self) -> bool:
        """Whether no message waits for this worker (then a batch is as big as it gets)."""
        return False

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
            if self._buffer.qsize() and self.queue_is_empty():
                self._do_flush()

        return handle
