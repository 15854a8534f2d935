"""Jobs are stored and queued in one atomic step, with the message Celery itself would send."""

from __future__ import annotations

import asyncio
import base64
import json

import redis
import redis.asyncio as aioredis

from api.enqueue import TaskMessages
from lookalike.redis_server import RedisServer
from shared.celery_config import SEARCH_TASK, make_celery
from shared.jobs import AsyncJobStore, NewJob, new_job_id
from shared.settings import BrokerSettings, Settings

QUEUE = "lookalike"
WAITING = [QUEUE, f"{QUEUE}.text"]
# Different on every send, or every process: not part of what a message says.
RANDOM = {("properties", "delivery_tag"), ("properties", "reply_to"), ("headers", "origin")}


def settings(redis_server: RedisServer) -> Settings:
    return Settings(broker=BrokerSettings(redis_url=redis_server.url))


def comparable(raw: bytes) -> dict[str, object]:
    message = json.loads(raw)
    for part, field in RANDOM:
        message[part].pop(field)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


def test_the_message_is_the_one_celery_sends(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    celery = make_celery(settings(redis_server), name="test")
    messages = TaskMessages(celery)
    for queue in (*WAITING, QUEUE):  # each job's, from the queue's message made once
        job_id = new_job_id()
        celery.send_task(SEARCH_TASK, args=[job_id], task_id=job_id, queue=queue)
        sent = redis_client.lpop(queue)
        assert isinstance(sent, bytes)
        assert comparable(messages.search(job_id, queue=queue)) == comparable(sent)
    tags = {
        json.loads(messages.search(job_id, queue=QUEUE))["properties"]["delivery_tag"]
        for _ in range(3)
    }
    assert len(tags) == 3
    celery.close()


def submit(redis_server: RedisServer, jobs: list[NewJob], *, max_waiting: int) -> object:
    async def run() -> object:
        client = aioredis.Redis.from_url(redis_server.url)
        store = AsyncJobStore(client, prefix="lookalike", ttl_s=600)
        messages = TaskMessages(make_celery(settings(redis_server), name="test"))
        try:
            return await store.submit(
                jobs,
                queue=QUEUE,
                messages=[messages.search(job.job_id, queue=QUEUE) for job in jobs],
                waiting=WAITING,
                max_waiting=max_waiting,
            )
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_submit_stores_each_job_its_pixels_and_its_message(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    jobs = [NewJob(new_job_id(), k=5, gallery="g", upload=b"pixels %d" % i) for i in range(3)]
    records = submit(redis_server, jobs, max_waiting=10)
    assert isinstance(records, list) and [r.id for r in records] == [j.job_id for j in jobs]
    for job in jobs:
        stored = redis_client.hgetall(f"lookalike:job:{job.job_id}")
        assert stored[b"status"] == b"queued" and stored[b"k"] == b"5"
        assert 0 < redis_client.ttl(f"lookalike:job:{job.job_id}") <= 600
        assert redis_client.get(f"lookalike:upload:{job.job_id}") == job.upload
        assert 0 < redis_client.ttl(f"lookalike:upload:{job.job_id}") <= 600
        assert redis_client.zscore("lookalike:pending", job.job_id) is not None
    queued = [json.loads(m)["headers"]["id"] for m in redis_client.lrange(QUEUE, 0, -1)]
    assert sorted(queued) == sorted(j.job_id for j in jobs)


def test_submit_past_the_cap_stores_nothing(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    redis_client.rpush(f"{QUEUE}.text", b"a", b"b")
    jobs = [NewJob(new_job_id(), k=5, gallery="g", text="t") for _ in range(2)]
    assert submit(redis_server, jobs, max_waiting=3) is None
    assert redis_client.llen(QUEUE) == 0
    assert redis_client.zcard("lookalike:pending") == 0
    assert not redis_client.exists(*(f"lookalike:job:{j.job_id}" for j in jobs))
    assert submit(redis_server, jobs[:1], max_waiting=3) is not None


def test_submit_past_the_cap_leaves_no_pixels_behind(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    redis_client.rpush(QUEUE, b"a", b"b", b"c")
    jobs = [NewJob(new_job_id(), k=5, gallery="g", upload=b"pixels") for _ in range(2)]
    assert submit(redis_server, jobs, max_waiting=4) is None
    assert not redis_client.exists(*(f"lookalike:upload:{j.job_id}" for j in jobs))
    assert redis_client.llen(QUEUE) == 3


def test_submit_after_redis_forgot_its_scripts_loads_them_and_stores_once(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    submit(redis_server, [NewJob(new_job_id(), k=5, gallery="g", text="t")], max_waiting=10)
    redis_client.script_flush()  # as after a restart
    job = NewJob(new_job_id(), k=5, gallery="g", upload=b"pixels")
    assert submit(redis_server, [job], max_waiting=10) is not None
    assert redis_client.get(f"lookalike:upload:{job.job_id}") == b"pixels"
    assert redis_client.hget(f"lookalike:job:{job.job_id}", "status") == b"queued"
    assert redis_client.llen(QUEUE) == 2
