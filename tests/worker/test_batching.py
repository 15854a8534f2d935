"""What worker.batching adds to celery-batches, held against the pinned release.

The strategy is celery-batches' own, fed real task messages (Celery's protocol 2) by a
stand-in consumer whose timer records what is scheduled: the behaviour under test is ours, the
rest is the library's, unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery
from kombu import Message

from worker.batching import ReconnectingBatches


class Scheduled:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Timer:
    def __init__(self) -> None:
        self.started: list[Scheduled] = []

    def call_repeatedly(self, interval: float, fn: Callable[[], None]) -> Scheduled:
        self.started.append(Scheduled())
        return self.started[-1]


class Pool:
    def apply_async(self, *args: Any, **kwargs: Any) -> None:
        return None


class Consumer:
    """What a Celery consumer hands a task's strategy: a pool, a hostname, a timer."""

    def __init__(self) -> None:
        self.pool = Pool()
        self.hostname = "test"
        self.connection_errors = ()
        self.event_dispatcher = None
        self.timer = Timer()


class Harness:
    def __init__(self) -> None:
        self.flushed: list[list[Any]] = []
        self.queue_empty = True
        harness = self

        class Batches(ReconnectingBatches):
            def queue_is_empty(self) -> bool:
                return harness.queue_empty

            def flush(self, requests: Any) -> None:
                harness.flushed.append([request.args[0] for request in requests])

        app = Celery("test", set_as_current=False)

        @app.task(name="t", base=Batches, flush_every=10, flush_interval=1.0, shared=False)
        def task(requests: Any) -> None:  # the body runs in flush, replaced above
            pass

        self.app, self.task = app, task
        self.consumer = Consumer()
        self.handle = task.Strategy(task, app, self.consumer)

    def deliver(self, number: int) -> None:
        headers = {
            "lang": "py",
            "task": "t",
            "id": f"job{number}",
            "root_id": f"job{number}",
            "parent_id": None,
            "group": None,
            "retries": 0,
            "eta": None,
            "expires": None,
            "timelimit": (None, None),
            "origin": "test",
        }
        body = json.dumps([[number], {}, {"callbacks": None, "errbacks": None, "chain": None}])
        message = Message(
            body=body,
            headers=headers,
            content_type="application/json",
            content_encoding="utf-8",
            delivery_info={"exchange": "", "routing_key": "t"},
        )
        self.handle(message, None, lambda: None, lambda *a: None, set())

    def reconnect(self) -> None:
        """What Celery does when the broker connection comes back: a new consumer, a new
        strategy for each task."""
        self.consumer = Consumer()
        self.handle = self.task.Strategy(self.task, self.app, self.consumer)


@pytest.fixture
def harness() -> Harness:
    return Harness()


def test_a_message_that_finds_the_queue_empty_is_flushed_at_once(harness: Harness) -> None:
    harness.deliver(1)
    assert harness.flushed == [[1]]


def test_messages_gather_while_the_queue_still_holds_more(harness: Harness) -> None:
    harness.queue_empty = False
    harness.deliver(1)
    harness.deliver(2)
    assert harness.flushed == []
    assert len(harness.consumer.timer.started) == 1  # celery-batches' own flush timer
    harness.queue_empty = True
    harness.deliver(3)
    assert harness.flushed == [[1, 2, 3]]


def test_a_full_batch_is_flushed_without_waiting_for_the_queue(harness: Harness) -> None:
    harness.queue_empty = False
    for number in range(10):
        harness.deliver(number)
    assert harness.flushed == [list(range(10))]


def test_a_reconnection_restarts_the_timer_of_waiting_requests(harness: Harness) -> None:
    harness.queue_empty = False
    harness.deliver(1)
    old_timer = harness.consumer.timer.started[0]
    harness.reconnect()
    assert old_timer.cancelled
    assert len(harness.consumer.timer.started) == 1  # a live timer for the waiting request


def test_a_reconnection_with_nothing_waiting_starts_no_timer(harness: Harness) -> None:
    harness.deliver(1)  # flushed at once
    harness.reconnect()
    assert harness.consumer.timer.started == []
