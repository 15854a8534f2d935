"""A thousand long polls and a thousand event streams on one job share the work: each gets the
end of the job, none a 503, and the API holds a bounded number of Redis connections."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import redis

from lookalike.stack import Stack, stack_env
from shared.jobs import JobStore, new_job_id

pytestmark = pytest.mark.e2e

POLLS = 1000
STREAMS = 1000
REDIS_CONNECTIONS_MAX = 80  # the API's pool (64), its pub/sub, its metrics flusher, Celery


async def request(port: int, path: str, ready: asyncio.Event | None = None) -> tuple[int, bytes]:
    """One raw HTTP/1.1 GET: status and body (the whole stream, for Server-Sent Events)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if ready is not None:
            ready.set()
        return status, await reader.read()
    finally:
        writer.close()


def dechunk(body: bytes) -> bytes:
    """A chunked transfer-encoded body (a stream's), reassembled."""
    out, rest = b"", body
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        length = int(size, 16)
        if length == 0:
            break
        out, rest = out + rest[:length], rest[length + 2 :]
    return out


def api_connections(client: redis.Redis) -> int:
    return sum(1 for c in client.client_list() if c.get("name", "") != "test")


@pytest.mark.timeout(180)
def test_a_thousand_long_polls_and_streams_on_one_job_all_get_its_end(
    tmp_path: Path, tiny_clip_dir: Path, fake_data_dir: Path
) -> None:
    env = stack_env(
        model_dir=tiny_clip_dir, data_dir=fake_data_dir, workdir=tmp_path, gallery_size=60
    )
    stack = Stack(env=env, workdir=tmp_path).start(workers=0)
    try:
        assert stack.redis is not None
        client = redis.Redis.from_url(stack.redis.url, client_name="test")
        store = JobStore(client, prefix="lookalike", ttl_s=600)
        job_id = new_job_id()
        store.create(job_id, k=5, text="a red sneaker")

        async def scenario() -> tuple[list[tuple[int, bytes]], int]:
            streams_open = [asyncio.Event() for _ in range(STREAMS)]
            tasks = [
                asyncio.create_task(request(stack.api_port, f"/jobs/{job_id}?wait=60"))
                for _ in range(POLLS)
            ] + [
                asyncio.create_task(request(stack.api_port, f"/jobs/{job_id}/events", opened))
                for opened in streams_open
            ]
            await asyncio.wait_for(
                asyncio.gather(*(event.wait() for event in streams_open)), timeout=90
            )
            await asyncio.sleep(2.0)  # the long polls are all waiting by now
            busiest = await asyncio.to_thread(api_connections, client)
            finished = [task.result() for task in tasks if task.done()]
            assert not finished, finished[:3]
            await asyncio.to_thread(store.fail, job_id, "ended for the test")
            return await asyncio.wait_for(asyncio.gather(*tasks), timeout=90), busiest

        replies, busiest = asyncio.run(scenario())
        polls, streams = replies[:POLLS], replies[POLLS:]
        assert sorted({status for status, _ in replies}) == [200], stack.logs()
        assert {json.loads(body)["status"] for _, body in polls} == {"failed"}
        for _, body in streams:
            text = dechunk(body).decode()
            events = [chunk for chunk in text.split("\n\n") if chunk.startswith("event:")]
            last = events[-1].splitlines()
            assert last[0] == "event: job", body
            assert json.loads(last[1].removeprefix("data: "))["status"] == "failed"
        assert busiest <= REDIS_CONNECTIONS_MAX
        print(
            f"\n{len(polls)} long polls and {len(streams)} streams on one job: statuses "
            f"{sorted({status for status, _ in replies})}, API Redis connections at most {busiest}"
        )
        client.close()
    finally:
        stack.stop()
