"""Job events, pushed by Redis to the API processes that wait for them, shared by every waiter
of a job.

Each API process has a channel of its own (shared.watchers) and registers it on each job it
waits for, atomically with its read of the job (:meth:`JobEvents.read`) or with the job's
submission (``notify=`` :attr:`JobEvents.channel`). The script that changes a job then publishes
the whole record there: only this process hears of it, and nothing is read again. Everyone
waiting on one job (long polls, Server-Sent Events streams: a thousand clients on one job is
fine) shares one :class:`Watch`, which keeps the latest record (and its JSON, serialised once)
for all of them. A long poll registers for the job's end; a stream, for every change.

Nothing is missed: a change after the registering read is pushed; whenever the subscription is
(re)established every watched job is read again (pushes may have been lost meanwhile); and every
``RECHECK_S`` each watched job is read once more, a safety net for a connection that died
silently. A record never replaces a later one (a read that raced a push).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

from redis.exceptions import RedisError

from shared.jobs import AsyncJobStore, JobRecord, parse_record
from shared.schemas import JobStatus
from shared.watchers import pushed_fields

log = logging.getLogger(__name__)

RECHECK_S = 5.0
SHUTDOWN_S = 2.0
PING_AFTER_S = 10.0
PING_TIMEOUT_S = 5.0


class Watch:
    """One job as its waiters see it: the latest snapshot, and an event per waiter."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.job: JobRecord | None = None
        self.version = 0
        self.gone = False  # the job expired or was removed
        self.unreadable = False  # the last read failed: Redis is unavailable
        self._payload: str | None = None
        self._waiters: set[asyncio.Event] = set()
        self.reading: asyncio.Task[None] | None = None
        self.again = False  # a change arrived while a read was under way

    @property
    def payload(self) -> str:
        """The snapshot as the public job's JSON, made once per version."""
        if self._payload is None:
            assert self.job is not None
            self._payload = self.job.public_json()
        return self._payload

    def update(self, job: JobRecord | None) -> None:
        if job is None:
            if self.job is None:
                return  # not stored yet: a recheck read it while its submission was under way
            self.gone = True
        elif self.job is not None and _progress(job) < _progress(self.job):
            return  # older than what the watch has (a read that raced a push)
        else:
            self.job, self._payload = job, None
        self.version += 1
        self.unreadable = False
        self.wake()

    def wake(self) -> None:
        for event in self._waiters:
            event.set()

    def seed(self, job: JobRecord) -> None:
        """The record a request read itself, if the watch has nothing newer."""
        if self.job is None and not self.gone:
            self.job = job


class Waiter:
    """One request's view of a :class:`Watch`."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.seen = -1
        self.changed = asyncio.Event()

    def seed(self, job: JobRecord) -> None:
        """The record the request read after it started watching."""
        self.watch.seed(job)

    async def next(self, timeout: float) -> bool:
        """Wait until the watch has a version this waiter has not seen; False on time-out."""
        if self.watch.version == self.seen:
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):  # (wait_for: a task per call)
                    await self.changed.wait()
        if self.watch.version == self.seen:
            return False
        self.seen = self.watch.version
        return True

    async def until_end(self, deadline: float) -> Watch:
        """The watch once its job has ended, is gone, or ``deadline`` (monotonic) has passed."""
        while True:
            watch = self.watch
            if watch.gone or (watch.job is not None and watch.job.status.is_final):
                return watch
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return watch
            await self.next(remaining)


class JobEvents:
    def __init__(self, store: AsyncJobStore) -> None:
        self.store = store
        self.client = store.client
        self.channel = store.keys.channel(f"api-{uuid.uuid4().hex}")
        self._watches: dict[str, Watch] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        for coroutine in (self._listen(), self._recheck()):
            task = asyncio.create_task(coroutine, name="job-events")
            self._tasks.add(task)

    async def stop(self) -> None:
        """Stop listening; bounded, so a stuck connection cannot hold up shutdown."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=SHUTDOWN_S)

    @property
    def watched(self) -> int:
        return len(self._watches)

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[Waiter]:
        """Follow job ``job_id`` until the block ends. Watch first, then register and read the
        job (:meth:`read`, or submit it with ``notify=`` :attr:`channel`) and
        :meth:`Waiter.seed` the watch with it: what changes after is pushed."""
        watch = self._watches.get(job_id)
        if watch is None:
            watch = self._watches[job_id] = Watch(job_id)
        waiter = Waiter(watch)
        watch._waiters.add(waiter.changed)
        try:
            yield waiter
        finally:
            watch._waiters.discard(waiter.changed)
            if not watch._waiters and self._watches.get(watch.job_id) is watch:
                del self._watches[watch.job_id]
                if watch.reading is not None:
                    watch.reading.cancel()

    async def read(self, job_id: str, *, every_change: bool = False) -> JobRecord | None:
        """Read a job and have its end (a stream: ``every_change``) pushed to this process
        from then on, in one step; None when it is gone."""
        return await self.store.watch(job_id, self.channel, every_change=every_change)

    def refresh(self, watch: Watch) -> None:
        """Read the job once for all its waiters (again after the read under way, if one is)."""
        if watch.reading is not None:
            watch.again = True
            return
        watch.reading = asyncio.create_task(self._read(watch), name=f"job-{watch.job_id}")

    async def _read(self, watch: Watch) -> None:
        try:
            while True:
                watch.again = False
                try:
                    job = await self.store.get(watch.job_id)
                except RedisError as error:
                    log.warning(
                        "job %s: could not be read for its waiters (%s)", watch.job_id, error
                    )
                    watch.unreadable = True
                    watch.wake()
                    return
                watch.update(job)
                if not watch.again:
                    return
        finally:
            watch.reading = None

    def _refresh_all(self) -> None:
        for watch in list(self._watches.values()):
            self.refresh(watch)

    async def _recheck(self) -> None:
        while True:
            await asyncio.sleep(RECHECK_S)
            self._refresh_all()

    async def _listen(self) -> None:
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._refresh_all()  # whatever happened while we were not listening
                await self._receive(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Redis went away: resubscribe, then read everyone
                log.warning("job events lost (%s); resubscribing", error)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), SHUTDOWN_S)  # type: ignore[no-untyped-call]

    async def _receive(self, pubsub: Any) -> None:
        """Update the watch of each job pushed to this process. A connection quiet for
        ``PING_AFTER_S`` is pinged; if not even the PONG comes back, it died silently (a
        half-open TCP connection) and is replaced."""
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
            if message.get("type") == "message":
                self._pushed(message["data"])

    def _pushed(self, data: bytes | str) -> None:
        try:
            job = parse_record(pushed_fields(data))
        except ValueError as error:  # not a job as shared.watchers pushes it
            log.warning("an unreadable job event was ignored (%s)", error)
            return
        watch = self._watches.get(job.id) if job is not None else None
        if watch is not None:
            watch.update(job)


_STATUS_ORDER = {JobStatus.QUEUED: 0, JobStatus.RUNNING: 1}


def _progress(job: JobRecord) -> int:
    """How far a job has gone: queued, running, ended (2)."""
    return _STATUS_ORDER.get(job.status, 2)
