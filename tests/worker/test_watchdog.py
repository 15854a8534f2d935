"""The watchdog that enforces the task time limit under the solo pool."""

from __future__ import annotations

import time

from worker.watchdog import TIMED_OUT, Watchdog


def make(limit_s: float) -> tuple[Watchdog, list[tuple[str, str]], list[int]]:
    failed: list[tuple[str, str]] = []
    exits: list[int] = []
    dog = Watchdog(
        limit_s, fail=lambda job, why: failed.append((job, why)), exit=exits.append, tick_s=3600
    )
    return dog, failed, exits


def test_a_job_within_its_limit_is_left_alone() -> None:
    dog, failed, exits = make(10)
    dog.current = (("a" * 32,), time.monotonic())
    dog.check()
    assert failed == [] and exits == []


def test_a_job_past_its_limit_is_failed_once() -> None:
    dog, failed, exits = make(10)
    dog.current = (("a" * 32,), time.monotonic() - 11)
    dog.check()
    dog.check()
    assert failed == [("a" * 32, TIMED_OUT.format(limit=10))]
    assert exits == []


def test_a_wedged_worker_exits_so_it_can_be_restarted() -> None:
    dog, failed, exits = make(10)
    dog.current = (("a" * 32,), time.monotonic() - 25)
    dog.check()
    assert exits == [70]
    assert len(failed) == 1


def test_no_job_no_action() -> None:
    dog, failed, exits = make(10)
    dog.check()
    assert failed == [] and exits == []
