"""Long polls, in process (no worker: the tests end the jobs themselves): a job that ends while
its record is being read wakes the poller; a submission can wait for its job's end; a waiting
request reads its job once, and its changes are pushed to it."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
from fastapi.testclient import TestClient
from PIL import Image

from api.events import RECHECK_S
from shared.jobs import JobRecord, JobStore, new_job_id


def listening(make_client: Callable[..., TestClient], redis_client: redis.Redis) -> TestClient:
    """An in-process app whose event hub listens (and has read what it watches)."""
    client = make_client()
    channel = client.app.state.lookalike.events.channel  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while redis_client.pubsub_numsub(channel)[0][1] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.1)
    return client


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (28, 28), (200, 100, 50)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_long_poll_wakes_for_a_job_that_ends_while_it_is_being_read(
    redis_client: redis.Redis, make_client: Callable[..., TestClient]
) -> None:
    client = listening(make_client, redis_client)
    sync_store = JobStore(redis_client, prefix="lookalike", ttl_s=600)
    job_id = "c" * 32
    sync_store.create(job_id, upload=b"never enqueued", k=5)
    store = client.app.state.lookalike.store  # type: ignore[attr-defined]
    read = store.watch
    reads = 0

    async def read_while_the_job_ends(wanted: str, *args: Any, **kwargs: Any) -> JobRecord | None:
        # The first read sees "queued"; a worker ends the job before the answer is used.
        nonlocal reads
        reads += 1
        record = await read(wanted, *args, **kwargs)
        if reads == 1:
            sync_store.fail(job_id, "it ended during the read")
            await asyncio.sleep(0.2)  # the event hub hears of it meanwhile
        return record

    store.watch = read_while_the_job_ends
    started = time.monotonic()
    reply: Any = client.get(f"/jobs/{job_id}", params={"wait": "5"})
    elapsed = time.monotonic() - started

    assert reply.status_code == 200
    assert reply.json()["status"] == "failed"
    assert elapsed < 0.2 + RECHECK_S / 2, f"woke after {elapsed:.2f}s"


def _submit_while_a_worker_ends_it(
    client: TestClient, redis_client: redis.Redis, *, before: Callable[[], Any] | None = None
) -> tuple[Any, float]:
    """``POST /jobs?wait=5`` (after ``before()``, once the job is watched and not yet stored),
    while a "worker" starts the job 0.2 s after it is stored and fails it 0.2 s later; the
    answer, and how long it took."""
    sync_store = JobStore(redis_client, prefix="lookalike", ttl_s=600)
    store = client.app.state.lookalike.store  # type: ignore[attr-defined]
    submit = store.submit

    async def submit_then_end_soon(jobs: Sequence[Any], **kwargs: Any) -> Any:
        if before is not None:
            before()
            await asyncio.sleep(0.1)
        records = await submit(jobs, **kwargs)  # stored and queued; the "worker" ends it soon
        job_id = jobs[0].job_id
        threading.Timer(0.2, sync_store.start, args=(job_id,)).start()
        threading.Timer(0.4, sync_store.fail, args=(job_id, "ended by the test")).start()
        return records

    store.submit = submit_then_end_soon
    started = time.monotonic()
    reply = client.post("/jobs", params={"wait": "5"}, files={"file": ("q.png", png())})
    return reply, time.monotonic() - started


def test_a_submission_with_wait_answers_200_with_the_job_once_it_ends(
    redis_client: redis.Redis, make_client: Callable[..., TestClient]
) -> None:
    client = listening(make_client, redis_client)
    reads = _count_reads(client)

    reply, elapsed = _submit_while_a_worker_ends_it(client, redis_client)

    assert reply.status_code == 200
    job = reply.json()
    assert (job["status"], job["error"]) == ("failed", "ended by the test")
    assert reply.headers["location"] == f"/jobs/{job['id']}"
    assert elapsed < 0.4 + RECHECK_S / 2, f"answered after {elapsed:.2f}s"
    assert reads == {"get": [], "watch": []}  # told of its end, not reading it
    assert not redis_client.exists(f"lookalike:watchers:{job['id']}")  # the watcher's last


def test_a_recheck_during_the_submission_does_not_end_its_wait(
    redis_client: redis.Redis, make_client: Callable[..., TestClient]
) -> None:
    """The hub rereads every watched job now and then; one that reads a job whose submission
    is still under way finds nothing, and the submission must still wait for the end."""
    client = listening(make_client, redis_client)
    events = client.app.state.lookalike.events  # type: ignore[attr-defined]

    reply, _ = _submit_while_a_worker_ends_it(client, redis_client, before=events._refresh_all)

    assert reply.status_code == 200
    assert reply.json()["status"] == "failed"


def test_a_submission_whose_wait_runs_out_answers_202_with_the_queued_job(
    redis_client: redis.Redis, make_client: Callable[..., TestClient]
) -> None:
    client = listening(make_client, redis_client)
    started = time.monotonic()
    reply: Any = client.post("/jobs", params={"wait": "0.5"}, files={"file": ("q.png", png())})
    elapsed = time.monotonic() - started

    assert reply.status_code == 202
    assert reply.json()["status"] == "queued"
    assert reply.headers["location"] == f"/jobs/{reply.json()['id']}"
    assert 0.45 <= elapsed < 3


def _count_reads(client: TestClient) -> dict[str, list[str]]:
    """The app's reads of jobs from here on: plain (``get``) and registering (``watch``)."""
    store = client.app.state.lookalike.store  # type: ignore[attr-defined]
    reads: dict[str, list[str]] = {"get": [], "watch": []}
    for name, calls in reads.items():
        read = getattr(store, name)

        async def counted(
            job_id: str, *args: Any, _read: Any = read, _calls: list[str] = calls, **kwargs: Any
        ) -> JobRecord | None:
            _calls.append(job_id)
            return await _read(job_id, *args, **kwargs)  # type: ignore[no-any-return]

        setattr(store, name, counted)
    return reads


def _reads_while_it_starts_and_ends(
    redis_client: redis.Redis,
    make_client: Callable[..., TestClient],
    request: Callable[[TestClient, str], Any],
) -> tuple[Any, dict[str, list[str]]]:
    """``request(client, job_id)``'s answer while a "worker" starts the job, then fails it;
    and the app's reads of the job meanwhile."""
    client = listening(make_client, redis_client)
    sync_store = JobStore(redis_client, prefix="lookalike", ttl_s=600)
    job_id = new_job_id()
    sync_store.create(job_id, upload=b"never enqueued", k=5)
    reads = _count_reads(client)

    def start_then_end() -> None:
        time.sleep(0.3)  # the request watches the job
        sync_store.start(job_id, worker="test")  # pushed to streams
        time.sleep(0.3)
        sync_store.fail(job_id, "ended by the test")  # pushed to every waiter

    worker = threading.Thread(target=start_then_end)
    worker.start()
    answer = request(client, job_id)
    worker.join()
    return answer, reads


def test_a_long_poll_reads_the_job_once_and_is_told_its_end(
    redis_client: redis.Redis, make_client: Callable[..., TestClient]
) -> None:
    reply, reads = _reads_while_it_starts_and_ends(
        redis_client,
        make_client,
        lambda client, job_id: client.get(f"/jobs/{job_id}", params={"wait": "5"}),
    )

    assert reply.json()["status"] == "failed"
    assert reply.json()["error"] == "ended by the test"
    assert (len(reads["watch"]), len(reads["get"])) == (1, 0)  # its own read; then pushes


def test_a_stream_reads_the_job_once_and_is_told_each_change(
    redis_client: redis.Redis, make_client: Callable[..., TestClient]
) -> None:
    def stream(client: TestClient, job_id: str) -> list[str]:
        with client.stream("GET", f"/jobs/{job_id}/events") as reply:
            return [line for line in reply.iter_lines() if line.startswith("data: ")]

    events, reads = _reads_while_it_starts_and_ends(redis_client, make_client, stream)

    statuses = [line.split('"status":"')[1].split('"')[0] for line in events]
    assert statuses == ["queued", "running", "failed"]
    assert (len(reads["watch"]), len(reads["get"])) == (1, 0)


def test_a_record_never_replaces_a_later_one(
    redis_client: redis.Redis, make_client: Callable[..., TestClient]
) -> None:
    """A read that raced a push (it left Redis before the end, and came back after it) does
    not take a job back to running."""
    client = listening(make_client, redis_client)
    sync_store = JobStore(redis_client, prefix="lookalike", ttl_s=600)
    job_id = new_job_id()
    sync_store.create(job_id, upload=b"never enqueued", k=5)
    sync_store.start(job_id)
    running = sync_store.get(job_id)
    sync_store.fail(job_id, "ended")
    events = client.app.state.lookalike.events  # type: ignore[attr-defined]

    with events.watch(job_id) as waiter:
        waiter.watch.update(sync_store.get(job_id))
        waiter.watch.update(running)

        assert waiter.watch.job.status == "failed"
