"""The API's image work (decoding uploads, drawing pictures) in a few threads of its own.

At most ``THREADS`` images are decoded or drawn at once per process, which bounds the memory
they take; the rest wait their turn, and one whose request went away is dropped before it
starts. A pool of its own rather than Starlette's ``run_in_threadpool`` (anyio's thread pool,
behind a capacity limiter, for every sync call): handing work to it and back costs 26-52 µs
of CPU against 69-116 µs (a no-op, on the 2-core development machine).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

THREADS = 4
T = TypeVar("T")


class ImageWork:
    def __init__(self, threads: int = THREADS) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="images")

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in one of the threads, when one is free."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        """Drop what has not started; what runs finishes in its thread."""
        self._pool.shutdown(wait=False, cancel_futures=True)
