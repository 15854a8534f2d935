"""Faults, for real: workers killed with SIGKILL, Redis stopped and restarted, lost messages.

These tests use the ViT-B/32-sized random model on one thread, so a job takes ~100 ms and a
kill can land in the middle of one. Timeouts are shortened through the usual settings.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from celery import Celery

from lookalike.stack import Stack
from shared.celery_config import SEARCH_TASK
from shared.jobs import JobStore
from tests.stacks import fault_stack
from tests.support import gallery_png, wait_job
from worker.search import TOO_MANY_ATTEMPTS

pytestmark = pytest.mark.e2e


@pytest.fixture
def stack_factory(tmp_path: Path, fake_data_dir: Path, fault_index: Path) -> Iterator[type[object]]:
    stacks: list[Stack] = []

    def make(*, workers: int, **extra: str) -> Stack:
        stack = fault_stack(tmp_path / f"s{len(stacks)}", fake_data_dir, fault_index, **extra)
        stack.workdir.mkdir(parents=True)
        stacks.append(stack)
        return stack.start(workers=workers)

    yield make  # type: ignore[misc]
    for stack in stacks:
        stack.stop()


def submit_all(client: httpx.Client, data_dir: Path, indices: list[int]) -> list[str]:
    ids = []
    for i in indices:
        reply = client.post("/jobs", files={"file": ("g.png", gallery_png(data_dir, i))})
        assert reply.status_code == 202, reply.text
        ids.append(reply.json()["id"])
    return ids


def store_of(stack: Stack) -> JobStore:
    return JobStore(
        redis.Redis.from_url(stack.env["LOOKALIKE_REDIS_URL"]), prefix="lookalike", ttl_s=600
    )


def test_worker_killed_mid_job_loses_nothing(stack_factory, fake_data_dir: Path) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory(workers=2)
    victim = stack.worker_name(0)
    store = store_of(stack)
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        ids = submit_all(client, fake_data_dir, list(range(20)))
        deadline = time.monotonic() + 30
        killed_job = None
        while killed_job is None and time.monotonic() < deadline:
            for job_id in ids:
                job = store.get(job_id)
                if job and job.status == "running" and job.worker == victim:
                    stack.kill_worker(0)
                    killed_job = job_id
                    break
        assert killed_job is not None, "the victim never took a job"
        jobs = [wait_job(client, job_id, timeout=90) for job_id in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 20
    assert [j["result"]["matches"][0]["index"] for j in jobs] == list(range(20))
    rescued = jobs[ids.index(killed_job)]
    assert rescued["attempts"] >= 2
    assert rescued["result"]["worker"] != victim


def test_redis_restart_keeps_queued_jobs_and_the_api_answers_503_meanwhile(
    stack_factory, fake_data_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory(workers=1)
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        ids = submit_all(client, fake_data_dir, list(range(30)))
        assert stack.redis is not None
        port, directory = stack.redis.port, stack.redis.directory
        stack.redis.stop()  # SIGTERM: Redis writes its append-only file and exits
        try:
            down_post = client.post(
                "/jobs", files={"file": ("g.png", gallery_png(fake_data_dir, 1))}
            )
            down_get = client.get(f"/jobs/{ids[0]}")
            down_ready = client.get("/readyz")
        finally:
            from lookalike.redis_server import start_redis

            stack.redis = start_redis(directory, port=port)
        assert down_post.status_code == 503
        assert down_post.headers["retry-after"]
        assert down_get.status_code == 503
        assert down_get.json() == {"detail": "The job store is unavailable; retry shortly."}
        assert down_ready.status_code == 503
        jobs = [wait_job(client, job_id, timeout=90) for job_id in ids]
        assert [j["status"] for j in jobs] == ["succeeded"] * 30
        assert [j["result"]["matches"][0]["index"] for j in jobs] == list(range(30))
        # the API and the worker came back by themselves
        after = wait_job(client, submit_all(client, fake_data_dir, [42])[0])
        assert after["status"] == "succeeded"


def test_a_job_whose_message_never_reached_the_queue_is_repaired(
    stack_factory, fake_data_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    """The API died between storing the job and enqueueing it: the reconciler sends it."""
    stack = stack_factory(workers=1)
    store = store_of(stack)
    job_id = "ab" * 16
    store.create(job_id, upload=gallery_png(fake_data_dir, 17), k=5)  # stored, never enqueued
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        job = wait_job(client, job_id, timeout=60)
    assert job["status"] == "succeeded"
    assert job["result"]["matches"][0]["index"] == 17


def test_jobs_whose_queue_redis_lost_are_repaired(stack_factory, fake_data_dir: Path) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory(workers=0)  # nothing consumes yet
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        ids = submit_all(client, fake_data_dir, list(range(8)))
        lost = redis.Redis.from_url(stack.env["LOOKALIKE_REDIS_URL"]).delete("lookalike")
        assert lost == 1  # the queue is gone, the job records are not
        stack.start_worker()
        jobs = [wait_job(client, job_id, timeout=90) for job_id in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 8


def test_a_job_past_its_attempts_fails_instead_of_looping(
    stack_factory, fake_data_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory(workers=1, LOOKALIKE_MAX_ATTEMPTS="2")
    store = store_of(stack)
    job_id = "cd" * 16
    store.create(job_id, upload=gallery_png(fake_data_dir, 3), k=5)
    store.client.hset(store.keys.job(job_id), "attempts", 2)  # two workers already died on it
    Celery(broker=stack.env["LOOKALIKE_REDIS_URL"]).send_task(
        SEARCH_TASK, args=[job_id], queue="lookalike"
    )
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        job = wait_job(client, job_id, timeout=60)
    assert job["status"] == "failed"
    assert job["error"] == TOO_MANY_ATTEMPTS.format(n=2)


def test_expired_jobs_are_gone(stack_factory, fake_data_dir: Path) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory(workers=1, LOOKALIKE_JOB_TTL="2")
    store = store_of(stack)
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        (job_id,) = submit_all(client, fake_data_dir, [5])
        assert wait_job(client, job_id)["status"] == "succeeded"
        time.sleep(2.5)
        reply = client.get(f"/jobs/{job_id}")
    assert reply.status_code == 404
    assert store.client.exists(store.keys.job(job_id), store.keys.upload(job_id)) == 0


def test_a_worker_whose_model_fails_takes_no_jobs_and_readyz_says_why(
    stack_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    stack = stack_factory(workers=0, LOOKALIKE_MODEL=str(tmp_path / "missing-model"))
    worker = stack.start_worker()
    assert worker.wait(timeout=120) == 2
    reply = httpx.get(f"{stack.url}/readyz", timeout=5)
    assert reply.status_code == 503
    assert "Could not load the CLIP model" in reply.json()["detail"]
    assert "LOOKALIKE_MODEL" in reply.json()["detail"]
