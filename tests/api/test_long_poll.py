"""Long polls, in process: a job that ends while its record is being read wakes the poller."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import redis
from fastapi.testclient import TestClient

from api.events import RECHECK_S
from shared.jobs import JobRecord, JobStore


def test_long_poll_wakes_for_a_job_that_ends_while_it_is_being_read(
    redis_client: redis.Redis, make_client: Callable[..., TestClient]
) -> None:
    client = make_client()
    deadline = time.monotonic() + 10
    while redis_client.pubsub_numpat() < 1:  # the event hub listens (and has read what it watches)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.1)
    sync_store = JobStore(redis_client, prefix="lookalike", ttl_s=600)
    job_id = "c" * 32
    sync_store.create(job_id, upload=b"never enqueued", k=5)
    store = client.app.state.lookalike.store  # type: ignore[attr-defined]
    read = store.get
    reads = 0

    async def get_while_the_job_ends(wanted: str) -> JobRecord | None:
        # The first read sees "queued"; a worker ends the job before the answer is used.
        nonlocal reads
        reads += 1
        record = await read(wanted)
        if reads == 1:
            sync_store.fail(job_id, "it ended during the read")
            await asyncio.sleep(0.2)  # the event hub hears of it meanwhile
        return record

    store.get = get_while_the_job_ends
    started = time.monotonic()
    reply: Any = client.get(f"/jobs/{job_id}", params={"wait": "5"})
    elapsed = time.monotonic() - started

    assert reply.status_code == 200
    assert reply.json()["status"] == "failed"
    assert elapsed < 0.2 + RECHECK_S / 2, f"woke after {elapsed:.2f}s"
