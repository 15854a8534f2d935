"""The API's early refusal: how many jobs wait, read from Redis at most one request at a time."""

from __future__ import annotations

import asyncio

import pytest
import redis

from api.backlog import Backlog
from shared.jobs import AsyncJobStore
from shared.redis_clients import async_client


async def _backlog(url: str, reads: list[str]) -> tuple[Backlog, AsyncJobStore]:
    store = AsyncJobStore(async_client(url), prefix="lookalike", ttl_s=600)
    read = store.queue_length

    async def counted(*queues: str) -> int:
        reads.append("read")
        await asyncio.sleep(0.02)  # a slow round trip: the other requests arrive meanwhile
        return await read(*queues)

    store.queue_length = counted  # type: ignore[method-assign]
    return Backlog(store, ["search"], limit=3), store


def test_requests_in_flight_share_one_read_of_the_queues(redis_client: redis.Redis) -> None:
    redis_client.lpush("search", "a", "b", "c")
    url = redis_client.connection_pool.connection_kwargs
    reads: list[str] = []

    async def main() -> list[bool]:
        backlog, store = await _backlog(f"redis://{url['host']}:{url['port']}/{url['db']}", reads)
        try:
            first = await backlog.full(1)  # reads: 3 waiting
            backlog._read_at = float("-inf")  # stale again
            return [first, *await asyncio.gather(*(backlog.full(0) for _ in range(20)))]
        finally:
            await store.client.aclose()

    answers = asyncio.run(main())
    assert len(reads) == 2  # the first request's, then one for the twenty
    assert answers[0] is True  # 3 + 1 > 3
    assert answers[1:] == [False] * 20  # 3 + 0 is not over the limit


def test_a_failed_read_is_tried_again_by_the_next_request(redis_client: redis.Redis) -> None:
    reads: list[str] = []

    async def main() -> None:
        kwargs = redis_client.connection_pool.connection_kwargs
        backlog, store = await _backlog(f"redis://{kwargs['host']}:1/0", reads)  # nothing there
        try:
            for _ in range(2):
                with pytest.raises(redis.RedisError):
                    await backlog.full(1)
        finally:
            await store.client.aclose()

    asyncio.run(main())
    assert len(reads) == 2
