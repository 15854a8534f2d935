"""Job records and uploads in Redis: the one place both sides read and write jobs.

A job is a Redis hash ``<prefix>:job:<id>``; its upload bytes live at ``<prefix>:upload:<id>``;
both expire after the job TTL. Status changes are atomic Lua scripts, so a job computed twice
(after a redelivery) is still answered once, and each change is published on
``<prefix>:events:<id>`` for long polls.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import redis
import redis.asyncio as aioredis

from shared.schemas import Job, JobResult, JobStatus

JOB_ID = re.compile(r"[0-9a-f]{32}")

# Start a job: only from queued/running; counts the attempt; returns it, or -1 when final
# (a redelivered message for an answered job) and -2 when the record is gone.
_START = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -2 end
if status == 'succeeded' or status == 'failed' then return -1 end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1])
redis.call('PUBLISH', KEYS[2], 'running')
return attempts
"""

# Finish a job once: the first final status wins, later ones are ignored (returns 0).
_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -2 end
if status == 'succeeded' or status == 'failed' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished_at', ARGV[2], ARGV[3], ARGV[4])
redis.call('PUBLISH', KEYS[2], ARGV[1])
return 1
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

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    @property
    def events_pattern(self) -> str:
        return f"{self.prefix}:events:*"

    def job_id_of_channel(self, channel: str) -> str:
        return channel.rsplit(":", 1)[-1]

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"


def new_record(job_id: str, *, k: int, created_at: datetime) -> dict[str, str]:
    return {
        "id": job_id,
        "status": JobStatus.QUEUED.value,
        "k": str(k),
        "created_at": created_at.isoformat(),
        "attempts": "0",
    }


def parse_record(raw: Mapping[Any, Any]) -> Job | None:
    """Turn a Redis hash (bytes or str) into a :class:`Job`; None when it does not exist."""
    if not raw:
        return None
    fields = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }
    result = fields.pop("result", None)
    return Job.model_validate(
        {
            **fields,
            "result": JobResult.model_validate_json(result) if result else None,
        }
    )


class JobStore:
    """Synchronous access for the worker and the CLI."""

    def __init__(self, client: redis.Redis, *, prefix: str, ttl_s: int) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self.ttl_s = ttl_s
        self._start = client.register_script(_START)
        self._finish = client.register_script(_FINISH)

    def create(self, job_id: str, *, upload: bytes, k: int) -> Job:
        record = new_record(job_id, k=k, created_at=now())
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.upload(job_id), upload, ex=self.ttl_s)
            pipe.hset(self.keys.job(job_id), mapping=record)  # type: ignore[arg-type]
            pipe.expire(self.keys.job(job_id), self.ttl_s)
            pipe.execute()
        job = parse_record(record)
        assert job is not None
        return job

    def get(self, job_id: str) -> Job | None:
        return parse_record(self.client.hgetall(self.keys.job(job_id)))

    def upload(self, job_id: str) -> bytes | None:
        data = self.client.get(self.keys.upload(job_id))
        return data if isinstance(data, bytes) else None

    def start(self, job_id: str) -> int:
        """Mark running and count the attempt; -1 if already final, -2 if gone."""
        keys = [self.keys.job(job_id), self.keys.events(job_id)]
        return int(self._start(keys=keys, args=[now().isoformat()]))

    def succeed(self, job_id: str, result: JobResult) -> bool:
        """Store the result unless the job already ended; True when this call ended it."""
        return self._end(job_id, JobStatus.SUCCEEDED, "result", result.model_dump_json())

    def fail(self, job_id: str, error: str) -> bool:
        """Record why the job failed unless it already ended."""
        return self._end(job_id, JobStatus.FAILED, "error", error)

    def _end(self, job_id: str, status: JobStatus, field: str, value: str) -> bool:
        keys = [self.keys.job(job_id), self.keys.events(job_id)]
        args = [status.value, now().isoformat(), field, value]
        return int(self._finish(keys=keys, args=args)) == 1


class AsyncJobStore:
    """Asynchronous access for the API."""

    def __init__(self, client: aioredis.Redis, *, prefix: str, ttl_s: int) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self.ttl_s = ttl_s

    async def create(self, job_id: str, *, upload: bytes, k: int) -> Job:
        record = new_record(job_id, k=k, created_at=now())
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.upload(job_id), upload, ex=self.ttl_s)
            pipe.hset(self.keys.job(job_id), mapping=record)  # type: ignore[arg-type]
            pipe.expire(self.keys.job(job_id), self.ttl_s)
            await pipe.execute()
        job = parse_record(record)
        assert job is not None
        return job

    async def get(self, job_id: str) -> Job | None:
        return parse_record(await self.client.hgetall(self.keys.job(job_id)))

    async def discard(self, job_id: str) -> None:
        await self.client.delete(self.keys.job(job_id), self.keys.upload(job_id))

    async def ready_workers(self, *, within_s: float) -> list[dict[str, Any]]:
        """The workers whose heartbeat is fresher than ``within_s`` seconds."""
        cutoff = now().timestamp() - within_s
        names = await self.client.zrangebyscore(self.keys.workers, cutoff, "+inf")
        if not names:
            return []
        values = await self.client.mget([self.keys.worker(_text(n)) for n in names])  # type: ignore[arg-type]
        return [json.loads(v) for v in values if v]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
