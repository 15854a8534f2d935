"""Job events for long polls: one pub/sub subscription per API process, many waiters.

Workers publish on ``<prefix>:events:<id>`` when a job starts or ends. This hub listens with
one pattern subscription and wakes the requests waiting on that job. Waiters re-read the job
record at least every second, so a lost subscription (Redis restarting) only slows them down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict

import redis.asyncio as aioredis

from shared.jobs import Keys

log = logging.getLogger(__name__)

RECHECK_S = 1.0
SHUTDOWN_S = 2.0


class JobEvents:
    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="job-events")

    async def stop(self) -> None:
        """Stop listening; bounded, so a stuck connection cannot hold up shutdown."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=SHUTDOWN_S)

    @contextlib.contextmanager
    def watch(self, job_id: str):  # type: ignore[no-untyped-def]
        event = asyncio.Event()
        self._waiters[job_id].add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[job_id]

    async def _listen(self) -> None:
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(self.keys.events_pattern)
                async for message in pubsub.listen():
                    if message.get("type") != "pmessage":
                        continue
                    channel = message["channel"]
                    if isinstance(channel, bytes):
                        channel = channel.decode()
                    for event in self._waiters.get(self.keys.job_id_of_channel(channel), ()):
                        event.set()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Redis went away: waiters fall back to re-reading
                log.warning("job events lost (%s); resubscribing", error)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), SHUTDOWN_S)  # type: ignore[no-untyped-call]
