"""The reconciler: every accepted job ends, even when its message was lost.

Messages go missing in ways Celery cannot see: the API dies between storing a job and
enqueueing it, Redis restarts and loses the last second of its queue, a worker is killed and
its unacknowledged message waits out the visibility timeout. Every unfinished job id sits in
the ``pending`` sorted set, scored by when it last moved. One worker at a time (a Redis lock)
looks at the jobs that have not moved for ``stuck_after_s`` and re-enqueues those that are
neither waiting in the queue nor held by a live worker. Attempts are counted when a job
starts, so a job that keeps killing its workers fails after ``max_attempts`` instead of looping.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import redis
from redis.exceptions import LockError
from redis.lock import Lock

from shared.jobs import JobStore, as_text
from shared.schemas import JobKind, JobStatus

log = logging.getLogger(__name__)

UNACKED_KEY = "unacked"  # kombu's Redis transport keeps delivered, unacknowledged messages here
BATCH = 500
NO_TEXT_WORKER = "No worker takes text queries (LOOKALIKE_TEXT_SEARCH=off on every worker)."


@dataclass
class Report:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    still_moving: int = 0
    dropped: int = 0


def message_ids(raw_messages: Iterable[bytes | str], *, unacked: bool = False) -> set[str]:
    """Task ids (our job ids) of kombu's JSON messages; unacked entries wrap the message."""
    ids = set()
    for raw in raw_messages:
        try:
            payload = json.loads(raw)
            message = payload[0] if unacked else payload
            ids.add(str(message["headers"]["id"]))
        except (ValueError, KeyError, IndexError, TypeError):
            continue
    return ids


class Reconciler:
    def __init__(
        self,
        store: JobStore,
        enqueue: Callable[[str, JobKind], None],
        *,
        queues: Sequence[str],
        text_queue: str | None = None,
        stuck_after_s: float,
        time_limit_s: float,
        name: str,
        live_window_s: float = 15.0,
    ) -> None:
        self.store = store
        self.client = store.client
        self.keys = store.keys
        self.enqueue = enqueue
        self.queues = list(queues)
        self.text_queue = text_queue or f"{self.queues[0]}.text"
        self.stuck_after_s = stuck_after_s
        self.time_limit_s = time_limit_s
        self.name = name
        self.live_window_s = live_window_s
        self._lock: Lock | None = None

    def lead(self, ttl_s: float) -> bool:
        """Take or keep the reconciler lock (redis-py's Lock: atomic, token-checked); only
        its holder acts. A leader that stops renewing loses it after ``ttl_s``."""
        if self._lock is None or self._lock.timeout != ttl_s:
            self._lock = Lock(
                self.client, self.keys.reconciler_lock, timeout=ttl_s, thread_local=False
            )
        lock = self._lock
        if lock.local.token is not None:  # it was ours: renew it, if it still is
            try:
                return bool(lock.reacquire())
            except LockError:  # expired (and maybe taken by another worker) meanwhile
                lock.local.token = None
        return bool(lock.acquire(blocking=False))

    def in_flight(self) -> set[str]:
        """Job ids whose message is waiting in a queue or held, unacknowledged, by a worker."""
        waiting: set[str] = set()
        for queue in self.queues:
            waiting |= message_ids(self.client.lrange(queue, 0, -1))
        held = message_ids(self.client.hvals(UNACKED_KEY), unacked=True)
        return waiting | held

    def text_served(self) -> bool | None:
        """Whether a live, ready worker takes text jobs; None when no worker is ready."""
        workers = self.store.ready_workers(within_s=self.live_window_s)
        ready = [w for w in workers if isinstance(w, dict) and w.get("state") == "ready"]
        if not ready:
            return None
        return any((w.get("modes") or {}).get("text") for w in ready)

    def drop_text_messages(self, job_id: str) -> None:
        """Remove a job's messages from the text queue (no worker would ever take them)."""
        for raw in self.client.lrange(self.text_queue, 0, -1):
            if job_id in message_ids([raw]):
                self.client.lrem(self.text_queue, 0, raw)  # type: ignore[arg-type]

    def live_workers(self) -> set[str]:
        cutoff = time.time() - self.live_window_s
        names = self.client.zrangebyscore(self.keys.workers, cutoff, "+inf")
        return {as_text(n) for n in names}

    def run_once(self) -> Report:
        """One sweep over the jobs that have not moved for ``stuck_after_s``."""
        report = Report()
        now = time.time()
        stuck = self.client.zrangebyscore(
            self.keys.pending, "-inf", now - self.stuck_after_s, start=0, num=BATCH
        )
        if not stuck:
            return report
        flying = self.in_flight()
        alive = self.live_workers()
        text_served = self.text_served()
        for raw_id in stuck:
            job_id = as_text(raw_id)
            try:
                job = self.store.get(job_id)
            except ValueError:  # a record this version cannot read: leave it, look at the rest
                log.exception("job %s: unreadable record, skipped", job_id)
                self.client.zadd(self.keys.pending, {job_id: now})
                continue
            if job is None or job.status.is_final:
                self.client.zrem(self.keys.pending, job_id)
                report.dropped += 1
                continue
            if job.kind == JobKind.TEXT and job.status == JobStatus.QUEUED and text_served is False:
                # Ready workers, none with text search: the job would wait for its TTL.
                self.store.fail(job_id, NO_TEXT_WORKER)
                self.drop_text_messages(job_id)
                report.failed.append(job_id)
                log.warning("job %s: no worker serves text search, failed", job_id)
                continue
            if job.status == JobStatus.RUNNING:
                # Its worker lives and the job is within its time limit: it is computing. A
                # live worker can also have lost it (its result could not be stored while
                # Redis was away): past the time limit it is not moving any more.
                started = job.started_at.timestamp() if job.started_at else 0.0
                within_limit = now - started < self.time_limit_s + self.stuck_after_s
                moving = job.worker in alive and within_limit
            else:
                moving = job_id in flying  # still waiting its turn in the queue
            if moving:
                report.still_moving += 1
            else:
                self.enqueue(job_id, job.kind)
                report.requeued.append(job_id)
                log.warning("job %s: %s and stuck, re-enqueued", job_id, job.status.value)
            self.client.zadd(self.keys.pending, {job_id: now})
        return report

    def run_forever(self, *, interval_s: float, stop: threading.Event) -> None:
        while not stop.wait(interval_s):
            try:
                if self.lead(ttl_s=interval_s * 3):
                    self.run_once()
            except redis.RedisError as error:  # Redis down: try again next round
                log.warning("reconciler: %s", error)
            except Exception:
                log.exception("reconciler sweep failed")
