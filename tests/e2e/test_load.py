"""Load and backpressure over real HTTP: many concurrent clients, a capped queue.

The test is a short version of the load test recorded in the README; the full one is
``lookalike bench --requests 2000 --concurrency 50`` against a running service.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis

from api.submit import QUEUE_FULL
from lookalike.bench.service import make_payloads, run_bench, summarise
from tests.stacks import fault_stack, make_stack
from tests.support import gallery_png, wait_job

pytestmark = pytest.mark.e2e


def test_a_full_queue_answers_429_with_retry_after(
    tmp_path: Path, fake_data_dir: Path, fault_index: Path
) -> None:
    stack = fault_stack(tmp_path, fake_data_dir, fault_index, LOOKALIKE_MAX_QUEUED="3")
    stack.start(workers=0)  # no worker: nothing drains the queue
    try:
        with httpx.Client(base_url=stack.url, timeout=10) as client:
            statuses = [
                client.post("/jobs", files={"file": ("g.png", gallery_png(fake_data_dir, i))})
                for i in range(4)
            ]
    finally:
        stack.stop()
    assert [r.status_code for r in statuses] == [202, 202, 202, 429]
    assert statuses[3].json() == {"detail": QUEUE_FULL}
    assert int(statuses[3].headers["retry-after"]) > 0


def test_fifty_concurrent_clients_get_no_5xx_and_every_accepted_job_ends(
    tmp_path: Path, fake_data_dir: Path, fault_index: Path
) -> None:
    stack = fault_stack(
        tmp_path,
        fake_data_dir,
        fault_index,
        LOOKALIKE_MAX_QUEUED="5",  # small, so the clients meet the backpressure
        LOOKALIKE_MODEL="random:vit-b-32",
    )
    stack.start(workers=2)
    try:
        warm, timed, wall = asyncio.run(
            run_bench(
                stack.url,
                make_payloads(fake_data_dir),
                requests=300,
                concurrency=50,
                timeout_s=120,
            )
        )
    finally:
        stack.stop()
    summary = summarise(timed, wall_s=wall, url=stack.url, concurrency=50, warmup=len(warm))
    print(
        "\nload summary:",
        {
            k: summary[k]
            for k in (
                "submit_status_codes",
                "connection_errors",
                "accepted",
                "succeeded",
                "never_ended",
                "throughput_jobs_per_s",
                "latency_ms",
                "errors",
            )
        },
    )
    codes = summary["submit_status_codes"]
    assert set(codes) <= {"202", "429"}, codes
    assert summary["connection_errors"] == 0
    assert summary["poll_errors"] == 0
    assert summary["accepted"] == summary["succeeded"] == 300
    assert summary["never_ended"] == 0
    assert summary["retries_after_429"] > 0, "the clients should have met the queue cap"


def test_a_backlog_is_answered_in_full_batches(
    tmp_path: Path, tiny_clip_dir: Path, fake_data_dir: Path, built_index: Path
) -> None:
    """Jobs waiting when a worker comes are taken a batch at a time (worker.transport), not
    one message per Redis round trip while the batch timer runs out; and acknowledged a batch
    at a time."""
    stack = make_stack(tmp_path, tiny_clip_dir, fake_data_dir)
    stack.env.update(LOOKALIKE_INDEX_DIR=str(built_index), LOOKALIKE_WORKER_BATCH="64")
    stack.start(workers=0)
    try:
        broker = redis.Redis.from_url(stack.env["LOOKALIKE_REDIS_URL"])
        with httpx.Client(base_url=stack.url, timeout=30) as client:
            ids = []
            for i in range(150):
                reply = client.post(
                    "/jobs", files={"file": ("g.png", gallery_png(fake_data_dir, i % 100))}
                )
                assert reply.status_code == 202, reply.text
                ids.append(reply.json()["id"])
            broker.config_resetstat()
            stack.start_worker()
            jobs = [wait_job(client, job_id, timeout=120) for job_id in ids]
            time.sleep(0.5)  # the last acknowledgements
            # HDEL: each job's end drops its stage (a script); acknowledgements, a batch's in one
            hdels = broker.info("commandstats")["cmdstat_hdel"]["calls"]
            assert broker.hlen("unacked") == 0
    finally:
        stack.stop()
    assert [job["status"] for job in jobs] == ["succeeded"] * 150
    assert 150 < hdels <= 150 + 10, f"{hdels - 150} acknowledgement round trips for 3 batches"
    sizes = Counter(job["result"]["batch_size"] for job in jobs)  # type: ignore[index]
    print("\nbatch sizes of a 150-job backlog (size: jobs):", dict(sorted(sizes.items())))
    assert sizes == {64: 128, 22: 22}
