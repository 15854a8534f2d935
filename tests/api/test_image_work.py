"""The API's image threads: a few images at a time, the rest wait; dropped work never runs."""

from __future__ import annotations

import asyncio
import threading
import time

from api.image_work import ImageWork


def test_at_most_threads_images_are_worked_on_at_once() -> None:
    work = ImageWork(threads=2)
    lock = threading.Lock()
    running = peak = 0

    def decode(n: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return n * n

    async def main() -> list[int]:
        return await asyncio.gather(*(work.run(decode, n) for n in range(8)))

    try:
        assert asyncio.run(main()) == [n * n for n in range(8)]
    finally:
        work.close()
    assert peak == 2


def test_work_whose_request_went_away_is_dropped_before_it_starts() -> None:
    work = ImageWork(threads=1)
    started: list[str] = []
    gate = threading.Event()

    def slow() -> None:
        started.append("slow")
        gate.wait(5)

    def dropped() -> None:
        started.append("dropped")

    async def main() -> None:
        first = asyncio.ensure_future(work.run(slow))
        second = asyncio.ensure_future(work.run(dropped))
        await asyncio.sleep(0.05)  # the first runs; the second waits for the thread
        second.cancel()  # its client went away
        await asyncio.sleep(0.05)  # the cancellation reaches the pool
        gate.set()
        await first

    try:
        asyncio.run(main())
        time.sleep(0.05)
    finally:
        work.close()
    assert started == ["slow"]
