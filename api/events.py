"""Job events, pushed by the workers through Redis pub/sub: one subscription per API process,
many waiters (long polls and Server-Sent Events streams).

Workers publish on ``<prefix>:events:<id>`` when a job starts, changes stage or ends. This hub
listens with one pattern subscription and wakes the requests watching that job. Whenever the
subscription is (re)established, every waiter is woken once, so nothing published while Redis
was away is missed; waiters also re-read the job after ``RECHECK_S`` without news, a safety net
for a connection that died silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import redis.asyncio as aioredis

from shared.jobs import Keys
from shared.schemas import JobStatus

log = logging.getLogger(__name__)

RECHECK_S = 5.0
SHUTDOWN_S = 2.0
PING_AFTER_S = 10.0
PING_TIMEOUT_S = 5.0
FINAL = frozenset({JobStatus.SUCCEEDED.value, JobStatus.FAILED.value})


class Waiter:
    """One request's interest in one job."""

    def __init__(self, *, finals_only: bool) -> None:
        self.finals_only = finals_only
        self.changed = asyncio.Event()

    def notify(self, payload: str | None) -> None:
        """``payload`` None means "anything may have changed" (a resubscription)."""
        if payload is None or not self.finals_only or payload in FINAL:
            self.changed.set()


class JobEvents:
    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._waiters: dict[str, set[Waiter]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="job-events")

    async def stop(self) -> None:
        """Stop listening; bounded, so a stuck connection cannot hold up shutdown."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=SHUTDOWN_S)

    @contextlib.contextmanager
    def watch(self, job_id: str, *, finals_only: bool = False) -> Iterator[asyncio.Event]:
        """An event set when job ``job_id`` changes (only when it ends, with ``finals_only``)."""
        waiter = Waiter(finals_only=finals_only)
        self._waiters[job_id].add(waiter)
        try:
            yield waiter.changed
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[job_id]

    def _wake_all(self) -> None:
        for waiters in list(self._waiters.values()):
            for waiter in list(waiters):
                waiter.notify(None)

    async def _listen(self) -> None:
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(self.keys.events_pattern)
                self._wake_all()  # whatever happened while we were not listening
                await self._receive(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Redis went away: resubscribe, then wake everyone
                log.warning("job events lost (%s); resubscribing", error)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), SHUTDOWN_S)  # type: ignore[no-untyped-call]

    async def _receive(self, pubsub: Any) -> None:
        """Hand messages to the waiters. A connection quiet for ``PING_AFTER_S`` is pinged; if
        not even the PONG comes back, it died silently (a half-open TCP connection) and is
        replaced."""
        heard = time.monotonic()
        pinged: float | None = None
        while True:
            message = await pubsub.get_message(timeout=1.0)
            now = time.monotonic()
            if message is None:
                if pinged is not None and now - pinged > PING_TIMEOUT_S:
                    raise ConnectionError("no answer to PING on the events subscription")
                if pinged is None and now - heard > PING_AFTER_S:
                    await pubsub.ping()
                    pinged = now
                continue
            heard, pinged = now, None
            if message.get("type") != "pmessage":
                continue
            channel, data = message["channel"], message.get("data")
            if isinstance(channel, bytes):
                channel = channel.decode()
            payload = data.decode() if isinstance(data, bytes) else str(data)
            for waiter in list(self._waiters.get(self.keys.job_id_of_channel(channel), ())):
                waiter.notify(payload)
