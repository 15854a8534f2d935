"""How many jobs wait, as this API process last saw it: a cheap early refusal under overload.

The exact check is made where jobs are stored (shared.jobs.AsyncJobStore.submit, atomically
with the store); this one, read at most every ``FRESH_S``, lets a process that knows the queues
are full answer 429 before it decodes anything. (50 ms: a "full" seen longer ago would turn away
work the workers could take by now.) One read at a time: the requests that arrive meanwhile
use the last figure (before, every request in flight when it went stale read it too: 0.7 reads
per job at concurrency 32).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from shared.jobs import AsyncJobStore

FRESH_S = 0.05


class Backlog:
    def __init__(self, store: AsyncJobStore, queues: Sequence[str], *, limit: int) -> None:
        self.store = store
        self.queues = list(queues)
        self.limit = limit
        self._waiting = 0
        self._read_at = float("-inf")

    async def full(self, count: int) -> bool:
        """Whether ``count`` more jobs would pass the limit, as last seen."""
        if time.monotonic() - self._read_at > FRESH_S:
            self._read_at = time.monotonic()  # before the read: it is this request's alone
            try:
                self._waiting = await self.store.queue_length(*self.queues)
            except BaseException:
                self._read_at = float("-inf")  # the next request tries again
                raise
        return self._waiting + count > self.limit

    def saw_full(self) -> None:
        """The exact check refused: keep refusing early until the next read."""
        self._waiting = max(self._waiting, self.limit)
