"""Job records and uploads in Redis: the one place both sides read and write jobs.

A job is a Redis hash ``<prefix>:job:<id>``; its upload bytes live at ``<prefix>:upload:<id>``;
both expire after the job TTL. Status changes are atomic Lua scripts, so a job computed twice
(after a redelivery) is still answered once, and each change is pushed, record and all, to
the processes that wait for the job (shared.watchers).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from shared.live import LiveKeys
from shared.schemas import Job, JobKind, JobResult, JobStage, JobStatus
from shared.settings import FASHION_MNIST
from shared.watchers import NOTIFY, as_fields

JOB_ID = re.compile(r"[0-9a-f]{32}")

# KEYS: the job hash, its watchers, the pending set. ARGV[1] is the job id.
# Start a job: only from queued/running; counts the attempt and notes the worker; returns
# the attempt, or -1 when final (a redelivered message for an answered job), -2 when gone.
_START = (
    NOTIFY
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return -2
end
if status == 'succeeded' or status == 'failed' then return -1 end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[2], 'worker', ARGV[3],
  'stage', ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
notify(KEYS[1], KEYS[2], false)
return attempts
"""
)

# Note a running job's stage (and push it); a job that ended or expired is left alone, so
# a late stage can neither reopen a job nor recreate an expired record without its TTL.
_STAGE = (
    NOTIFY
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'stage', ARGV[1])
notify(KEYS[1], KEYS[2], false)
return 1
"""
)

# Finish a job once: the first final status wins, later ones are ignored (returns 0).
# Every computation is counted, so duplicates (a job computed twice) can be reported.
# KEYS[4] is the upload: a failed job's is deleted (a succeeded one's is replaced by a small
# copy for its result picture, see succeed_many), so Redis holds no uploads it no longer needs.
_FINISH = (
    NOTIFY
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -2 end
redis.call('HINCRBY', KEYS[1], 'computed', 1)
if status == 'succeeded' or status == 'failed' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[3], ARGV[4], ARGV[5])
redis.call('HDEL', KEYS[1], 'stage')
if ARGV[2] == 'failed' then redis.call('DEL', KEYS[4]) end
redis.call('ZREM', KEYS[3], ARGV[1])
notify(KEYS[1], KEYS[2], true)
return 1
"""
)


# Accept jobs, all of them or none: refuse (0) if the waiting queues would pass the cap, else
# store each record (a JSON object of strings) and its pending entry, and push its task message
# on the queue. It runs in one transaction after the SETs of the jobs' pixels (which never go
# through Lua: an argument of 350 KB cost a script 400 µs of Redis's CPU, a plain SET 4), and
# deletes them when it refuses. A job on a live gallery records the gallery's version (what it
# must see); an add notes itself as the item's pending add.
# A job submitted by a process that waits for its end has that process's channel registered as
# its watcher, in the same step: the end cannot come first.
# KEYS: the pending set, the queue, the W queues that count as waiting, then per job its hash,
# its upload key, its live gallery's hash and pending adds (shared.live; absent for a built
# gallery), its watchers. ARGV: the cap, the TTL, W, then per job: id, creation time (score),
# record, task message, the item id of an add ('' otherwise), the channel that waits ('': none).
_SUBMIT = """
local w = tonumber(ARGV[3])
local n = (#KEYS - 2 - w) / 5
local waiting = 0
for i = 3, 2 + w do waiting = waiting + redis.call('LLEN', KEYS[i]) end
if waiting + n > tonumber(ARGV[1]) then
  for j = 0, n - 1 do redis.call('DEL', KEYS[4 + w + 5 * j]) end
  return 0
end
local ttl = tonumber(ARGV[2])
for j = 0, n - 1 do
  local k, a = 3 + w + 5 * j, 4 + 6 * j
  local job, gallery, adds, watchers = KEYS[k], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
  local fields = {}
  for field, value in pairs(cjson.decode(ARGV[a + 2])) do
    fields[#fields + 1] = field
    fields[#fields + 1] = value
  end
  local version = redis.call('HGET', gallery, 'version')
  if version then
    fields[#fields + 1] = 'gallery_version'
    fields[#fields + 1] = version
  end
  if ARGV[a + 4] ~= '' then  -- an add: pending, and numbered (the later add of an item wins)
    redis.call('HSET', adds, ARGV[a + 4], ARGV[a])
    fields[#fields + 1] = 'add_seq'
    fields[#fields + 1] = redis.call('HINCRBY', gallery, 'adds', 1)
  end
  redis.call('HSET', job, unpack(fields))
  redis.call('EXPIRE', job, ttl)
  if ARGV[a + 5] ~= '' then
    redis.call('HSET', watchers, ARGV[a + 5], 'end')
    redis.call('EXPIRE', watchers, ttl)
  end
  redis.call('ZADD', KEYS[1], ARGV[a + 1], ARGV[a])
  redis.call('LPUSH', KEYS[2], ARGV[a + 3])
end
return 1
"""

# Register a channel as a watcher of an unfinished job (``all`` changes, or its ``end``: an
# ``all`` is never lowered to ``end``), expiring with the job, and return the job as it is:
# every change after this read is pushed to the channel. KEYS: the job hash, its watchers.
# ARGV: the channel, ``end`` or ``all``.
_WATCH = """
local record = redis.call('HGETALL', KEYS[1])
local status = redis.call('HGET', KEYS[1], 'status')
if status and status ~= 'succeeded' and status ~= 'failed' then
  if ARGV[2] == 'all' then
    redis.call('HSET', KEYS[2], ARGV[1], 'all')
  else
    redis.call('HSETNX', KEYS[2], ARGV[1], 'end')
  end
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
end
return record
"""


def new_job_id() -> str:
    """128 random bits, as 32 hex characters: unguessable."""
    return secrets.token_hex(16)


def is_job_id(value: str) -> bool:
    return JOB_ID.fullmatch(value) is not None


def now() -> datetime:
    return datetime.now(UTC)


class Keys:
    """The Redis key layout, in one place."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def upload(self, job_id: str) -> str:
        return f"{self.prefix}:upload:{job_id}"

    def watchers(self, job_id: str) -> str:
        """Hash of the channels that wait for this job's changes: channel -> end | all."""
        return f"{self.prefix}:watchers:{job_id}"

    def channel(self, name: str) -> str:
        """The pub/sub channel on which a process (an API's, named ``name``) hears of the
        jobs it watches."""
        return f"{self.prefix}:channel:{name}"

    @property
    def pending(self) -> str:
        """Sorted set of unfinished job ids, scored by when they were last seen moving."""
        return f"{self.prefix}:pending"

    @property
    def reconciler_lock(self) -> str:
        return f"{self.prefix}:reconciler"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"


# Fields kept in a job's hash as JSON text.
JSON_FIELDS = ("filter", "exclude", "attributes")


def new_record(
    job_id: str,
    *,
    k: int,
    created_at: datetime,
    gallery: str,
    text: str | None = None,
    owner: str | None = None,
    kind: JobKind | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """A new job's hash (all text). ``options``: the search's ``item_id``, ``filter``,
    ``min_score`` and ``exclude``, or an add's ``item_id``, ``attributes`` and ``sha256``."""
    record = {
        "id": job_id,
        "status": JobStatus.QUEUED.value,
        "kind": (kind or (JobKind.TEXT if text is not None else JobKind.IMAGE)).value,
        "gallery": gallery,
        "k": str(k),
        "created_at": created_at.isoformat(),
        "attempts": "0",
    }
    if text is not None:
        record["text"] = text
    if owner:
        record["owner"] = owner
    for name, value in (options or {}).items():
        if value is None or value == []:
            continue
        record[name] = json.dumps(value) if name in JSON_FIELDS else str(value)
    return record


@dataclass(frozen=True)
class NewJob:
    """What the API accepted: a search (an upload, a text or an item of the gallery), an add
    of an item, or a duplicates job; where, and with which options (see :func:`new_record`)."""

    job_id: str
    k: int
    gallery: str
    upload: bytes | None = None
    text: str | None = None
    owner: str | None = None
    kind: JobKind | None = None
    options: Mapping[str, Any] | None = None

    def record(self, created_at: datetime) -> dict[str, str]:
        """The job's hash as stored (:func:`new_record`)."""
        return new_record(
            self.job_id,
            k=self.k,
            created_at=created_at,
            gallery=self.gallery,
            text=self.text,
            owner=self.owner,
            kind=self.kind,
            options=self.options,
        )


class JobRecord(Job):
    """A job as stored: the public :class:`Job` plus bookkeeping never shown to clients."""

    owner: str | None = None
    worker: str | None = None
    computed: int = 0
    gallery_version: int = 0  # a live gallery's version when the job was accepted
    add_seq: int = 0  # an add's number among its gallery's accepted adds
    attributes: dict[str, Any] | None = None  # an add's
    sha256: str | None = None  # an add's: of the uploaded bytes

    def public(self) -> Job:
        return Job.model_validate(self.model_dump(include=_PUBLIC))

    def public_json(self) -> str:
        """The public job as JSON, as ``GET /jobs/<id>`` answers it (no round trip through
        a second model: this is on every read of every job)."""
        return self.model_dump_json(include=_PUBLIC)


_PUBLIC = set(Job.model_fields)


def parse_record(raw: Mapping[Any, Any]) -> JobRecord | None:
    """Turn a Redis hash (bytes or str) into a :class:`JobRecord`; None when it is gone."""
    if not raw:
        return None
    fields: dict[str, Any] = {as_text(k): as_text(v) for k, v in raw.items()}
    result = fields.pop("result", None)
    for name in JSON_FIELDS:
        if name in fields:
            fields[name] = json.loads(fields[name])
    return JobRecord.model_validate(
        {
            **fields,
            "result": JobResult.model_validate_json(result) if result else None,
        }
    )


def _stage_create(pipe: Any, keys: Keys, new: NewJob, *, ttl_s: int) -> JobRecord:
    """Queue the commands that store a new job on ``pipe`` (sync or async pipeline alike)."""
    created = now()
    record = new.record(created)
    if new.upload is not None:
        pipe.set(keys.upload(new.job_id), new.upload, ex=ttl_s)
    pipe.hset(keys.job(new.job_id), mapping=record)
    pipe.expire(keys.job(new.job_id), ttl_s)
    pipe.zadd(keys.pending, {new.job_id: created.timestamp()})
    job = parse_record(record)
    assert job is not None
    return job


@dataclass(frozen=True)
class Started:
    """A job a worker just started: ``attempt`` is -1 when it had already ended, -2 when it
    is gone (expired); ``job`` and ``upload`` as read right after starting it."""

    job_id: str
    attempt: int
    job: JobRecord | None
    upload: bytes | None


class JobStore:
    """Synchronous access for the worker and the CLI."""

    def __init__(self, client: redis.Redis, *, prefix: str, ttl_s: int) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self.ttl_s = ttl_s
        self._start = client.register_script(_START)
        self._stage = client.register_script(_STAGE)
        self._finish = client.register_script(_FINISH)

    def create(
        self,
        job_id: str,
        *,
        k: int,
        upload: bytes | None = None,
        text: str | None = None,
        gallery: str = FASHION_MNIST,
        owner: str | None = None,
        kind: JobKind | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> JobRecord:
        new = NewJob(
            job_id,
            k=k,
            gallery=gallery,
            upload=upload,
            text=text,
            owner=owner,
            kind=kind,
            options=options,
        )
        with self.client.pipeline(transaction=True) as pipe:
            job = _stage_create(pipe, self.keys, new, ttl_s=self.ttl_s)
            pipe.execute()
        return job

    def get(self, job_id: str) -> JobRecord | None:
        return parse_record(self.client.hgetall(self.keys.job(job_id)))

    def upload(self, job_id: str) -> bytes | None:
        data = self.client.get(self.keys.upload(job_id))
        return data if isinstance(data, bytes) else None

    def _pipelined(self, build: Callable[[Any], object]) -> list[Any]:
        """Queue commands with ``build(pipe)`` and run them in one round trip.

        Scripts go in by their SHA (EVALSHA), without redis-py's check that they are loaded,
        which costs a round trip of its own on every pipeline; when Redis does not know them
        (it restarted), they are loaded and the pipeline runs once more (a script that is
        refused did not run)."""
        for attempt in (1, 2):
            with self.client.pipeline(transaction=False) as pipe:
                build(pipe)
                try:
                    return list(pipe.execute())
                except NoScriptError:
                    if attempt == 2:
                        raise
                    for script in (self._start, self._stage, self._finish):
                        self.client.script_load(script.script)
        raise AssertionError("unreachable")

    @staticmethod
    def _evalsha(pipe: Any, script: Any, keys: Sequence[str], args: Sequence[Any]) -> None:
        pipe.evalsha(script.sha, len(keys), *keys, *args)

    def start_many(self, job_ids: Sequence[str], *, worker: str) -> list[Started]:
        """Start several jobs in one round trip: each attempt, record and upload."""
        moment = now()

        def build(pipe: Any) -> None:
            for job_id in job_ids:
                self._evalsha(pipe, self._start, *self._start_call(job_id, worker, moment))
                pipe.hgetall(self.keys.job(job_id))
                pipe.get(self.keys.upload(job_id))

        replies = self._pipelined(build)
        started = []
        for i, job_id in enumerate(job_ids):
            attempt, raw, upload = replies[3 * i : 3 * i + 3]
            started.append(
                Started(
                    job_id=job_id,
                    attempt=int(attempt),
                    job=parse_record(raw) if int(attempt) > 0 else None,
                    upload=upload if isinstance(upload, bytes) else None,
                )
            )
        return started

    def start(self, job_id: str, *, worker: str = "") -> int:
        """Mark running and count the attempt; -1 if already final, -2 if gone."""
        keys, args = self._start_call(job_id, worker, now())
        return int(self._start(keys=keys, args=args))

    def _start_call(
        self, job_id: str, worker: str, moment: datetime
    ) -> tuple[list[str], list[str | float]]:
        """The keys and arguments of the start script for one job."""
        keys = [self.keys.job(job_id), self.keys.watchers(job_id), self.keys.pending]
        stage = JobStage.EMBEDDING.value
        return keys, [job_id, moment.isoformat(), worker, moment.timestamp(), stage]

    def set_stage(self, job_ids: Sequence[str], stage: JobStage) -> None:
        """Note the stage of running jobs, in one round trip for all."""
        if not job_ids:
            return

        def build(pipe: Any) -> None:
            for job_id in job_ids:
                keys = [self.keys.job(job_id), self.keys.watchers(job_id)]
                self._evalsha(pipe, self._stage, keys, [stage.value])

        self._pipelined(build)

    def succeed(self, job_id: str, result: JobResult) -> bool:
        """Store the result unless the job already ended; True when this call ended it."""
        return self._end(job_id, JobStatus.SUCCEEDED, "result", result.model_dump_json())

    def fail(self, job_id: str, error: str) -> bool:
        """Record why the job failed unless it already ended."""
        return self._end(job_id, JobStatus.FAILED, "error", error)

    def ready_workers(self, *, within_s: float) -> list[dict[str, Any]]:
        """The workers whose heartbeat is fresher than ``within_s`` seconds (any state)."""
        cutoff = now().timestamp() - within_s
        names = self.client.zrangebyscore(self.keys.workers, cutoff, "+inf")
        if not names:
            return []
        values = self.client.mget([self.keys.worker(as_text(n)) for n in names])  # type: ignore[union-attr]
        return [json.loads(v) for v in values if v]

    def succeed_many(self, results: Sequence[tuple[str, JobResult, bytes | None]]) -> list[bool]:
        """Store several results in one round trip; True where that call ended the job.

        Each may come with a small copy of its upload, which then replaces the upload (kept,
        with its TTL, only for the result picture).
        """
        moment = now().isoformat()

        def build(pipe: Any) -> None:
            for job_id, result, _ in results:
                args = [
                    job_id,
                    JobStatus.SUCCEEDED.value,
                    moment,
                    "result",
                    result.model_dump_json(),
                ]
                self._evalsha(pipe, self._finish, self._end_keys(job_id), args)
            for job_id, _, small in results:
                if small is not None:  # only where the upload still exists, with its TTL
                    pipe.set(self.keys.upload(job_id), small, xx=True, keepttl=True)

        replies = self._pipelined(build)
        return [int(reply) == 1 for reply in replies[: len(results)]]

    def finish_keys(self, job_id: str) -> list[str]:
        """The keys that ending a job touches: its hash, its watchers, the pending
        set, its upload (in the order the scripts that end jobs take them)."""
        return self._end_keys(job_id)

    def _end_keys(self, job_id: str) -> list[str]:
        k = self.keys
        return [k.job(job_id), k.watchers(job_id), k.pending, k.upload(job_id)]

    def _end(self, job_id: str, status: JobStatus, field: str, value: str) -> bool:
        args = [job_id, status.value, now().isoformat(), field, value]
        return int(self._finish(keys=self._end_keys(job_id), args=args)) == 1


class AsyncJobStore:
    """Asynchronous access for the API."""

    def __init__(self, client: aioredis.Redis, *, prefix: str, ttl_s: int) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self.ttl_s = ttl_s
        self.live = LiveKeys(prefix)
        self._submit = client.register_script(_SUBMIT)
        self._watch = client.register_script(_WATCH)

    async def submit(
        self,
        jobs: Sequence[NewJob],
        *,
        queue: str,
        messages: Sequence[bytes],
        waiting: Sequence[str],
        max_waiting: int,
        notify: str | None = None,
    ) -> list[JobRecord] | None:
        """Store jobs and queue their task ``messages`` on ``queue``, in one atomic step (a
        transaction: the pixels' SETs, then the script); None (nothing stored) when the
        ``waiting`` queues would hold more than ``max_waiting`` messages. (A job on a live
        gallery records the gallery's version.) With ``notify``, a channel: each job's end is
        pushed there (registered in the same step)."""
        keys = [self.keys.pending, queue, *waiting]
        args: list[str | bytes | int | float] = [max_waiting, self.ttl_s, len(waiting)]
        uploads: list[tuple[str, bytes]] = []
        records = []
        for new, message in zip(jobs, messages, strict=True):
            created = now()
            record = new.record(created)
            adding = str((new.options or {}).get("item_id", "")) if new.kind == JobKind.ADD else ""
            keys += [
                self.keys.job(new.job_id),
                self.keys.upload(new.job_id),
                self.live.gallery(new.gallery),
                self.live.pending(new.gallery),
                self.keys.watchers(new.job_id),
            ]
            if new.upload:
                uploads.append((self.keys.upload(new.job_id), new.upload))
            args += [
                new.job_id,
                created.timestamp(),
                json.dumps(record),
                message,
                adding,
                notify or "",
            ]
            parsed = parse_record(record)
            assert parsed is not None
            records.append(parsed)
        for attempt in (1, 2):
            async with self.client.pipeline(transaction=True) as pipe:
                for key, upload in uploads:
                    pipe.set(key, upload, ex=self.ttl_s)
                pipe.evalsha(self._submit.sha, len(keys), *keys, *args)
                try:
                    *_, accepted = await pipe.execute()
                    break
                except NoScriptError:  # Redis restarted: load it, then all again
                    if attempt == 2:
                        raise
                    await self.client.script_load(self._submit.script)
        return records if int(accepted) == 1 else None

    async def upload(self, job_id: str) -> bytes | None:
        data = await self.client.get(self.keys.upload(job_id))
        return data if isinstance(data, bytes) else None

    async def get(self, job_id: str) -> JobRecord | None:
        return parse_record(await self.client.hgetall(self.keys.job(job_id)))

    async def watch(self, job_id: str, channel: str, *, every_change: bool) -> JobRecord | None:
        """Read a job and, unless it has ended, have its end (``every_change``: each change)
        pushed to ``channel`` from then on; None when it is gone."""
        keys = [self.keys.job(job_id), self.keys.watchers(job_id)]
        flat = await self._watch(keys=keys, args=[channel, "all" if every_change else "end"])
        return parse_record(as_fields(flat))

    async def queue_length(self, *queues: str) -> int:
        """Messages waiting in these queues (not those already handed to a worker)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.llen(queue)
            return sum(int(n) for n in await pipe.execute())

    async def ready_workers(self, *, within_s: float) -> list[dict[str, Any]]:
        """The workers whose heartbeat is fresher than ``within_s`` seconds."""
        cutoff = now().timestamp() - within_s
        names = await self.client.zrangebyscore(self.keys.workers, cutoff, "+inf")
        if not names:
            return []
        values = await self.client.mget([self.keys.worker(as_text(n)) for n in names])  # type: ignore[arg-type]
        return [json.loads(v) for v in values if v]


def as_text(value: object) -> str:
    """Redis answers bytes; keys and ids are text."""
    return value.decode() if isinstance(value, bytes) else str(value)
