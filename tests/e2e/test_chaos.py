"""The whole chain under chaos, checked like a queue checker does.

Jobs are submitted while workers are killed with SIGKILL (and replaced, as a supervisor
would) and Redis is restarted. Afterwards every accepted job must have ended, succeeded or
failed, exactly once; none may be lost; jobs computed more than once are counted and reported.

The test runs a short version; for the figures run more jobs, e.g.
``CHAOS_JOBS=600 .venv/bin/python -m pytest tests/e2e/test_chaos.py -s``.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from lookalike.redis_server import start_redis
from lookalike.stack import Stack
from shared.jobs import JobStore
from tests.stacks import FAULT_GALLERY, fault_stack
from tests.support import gallery_png

pytestmark = pytest.mark.e2e

JOBS = int(os.environ.get("CHAOS_JOBS", "200"))
SEED = int(os.environ.get("CHAOS_SEED", "1"))
START_CAP_S = 60


class Chaos:
    """Kills a random worker or restarts Redis every few seconds until told to stop.

    A worker is killed only once every worker has started (up to ``START_CAP_S``): killed
    faster than a worker starts (15 s on a slow 2-core machine), the service would never
    serve, and the test would measure the machine, not the chain."""

    def __init__(self, stack: Stack, rng: random.Random) -> None:
        self.stack = stack
        self.rng = rng
        self.stop = threading.Event()
        self.kills = 0
        self.redis_restarts = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        plan = ["kill", "redis"]  # both kinds happen at least once, then chance decides
        while not self.stop.wait(self.rng.uniform(1.5, 4.0)):
            action = plan.pop(0) if plan else ("kill" if self.rng.random() < 0.7 else "redis")
            if action == "kill":
                self.wait_started()
                victim = self.rng.randrange(len(self.stack.workers))
                self.stack.kill_worker(victim)
                self.stack.replace_worker(victim)
                self.kills += 1
            else:
                assert self.stack.redis is not None
                port, directory = self.stack.redis.port, self.stack.redis.directory
                self.stack.redis.stop()  # SIGTERM: the append-only file is complete
                time.sleep(self.rng.uniform(0.2, 1.5))
                self.stack.redis = start_redis(directory, port=port)
                self.redis_restarts += 1

    def wait_started(self) -> None:
        deadline = time.monotonic() + START_CAP_S
        while not self.stop.is_set() and time.monotonic() < deadline:
            if len(self.stack.ready_workers()) >= len(self.stack.workers):
                return
            time.sleep(0.2)


def submit_with_retries(client: httpx.Client, data: bytes, deadline: float) -> tuple[str, int]:
    """Submit until accepted; a client honours 503/429 with Retry-After. Returns (id, refusals)."""
    refusals = 0
    while time.monotonic() < deadline:
        try:
            reply = client.post("/jobs", files={"file": ("g.png", data)})
        except httpx.HTTPError:
            refusals += 1
            time.sleep(0.3)
            continue
        if reply.status_code == 202:
            return reply.json()["id"], refusals
        assert reply.status_code in (429, 503), reply.text
        refusals += 1
        time.sleep(0.3)
    raise AssertionError("could not submit before the deadline")


def read_records(stack: Stack, ids: dict[str, int]) -> dict[str, Any]:
    """The job records, or {} while Redis is down (it is being restarted)."""
    client = redis.Redis.from_url(stack.env["LOOKALIKE_REDIS_URL"], socket_connect_timeout=1)
    store = JobStore(client, prefix="lookalike", ttl_s=600)
    try:
        return {job_id: store.get(job_id) for job_id in ids}
    except redis.RedisError:
        return {}
    finally:
        client.close()


def run_chaos(stack: Stack, data_dir: Path, *, jobs: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    images = {i: gallery_png(data_dir, i) for i in range(FAULT_GALLERY)}
    expected: dict[str, int] = {}
    refusals = 0
    chaos = Chaos(stack, rng)
    started = time.monotonic()
    chaos.thread.start()
    try:
        with httpx.Client(base_url=stack.url, timeout=10) as client:
            for n in range(jobs):
                index = n % FAULT_GALLERY
                job_id, refused = submit_with_retries(
                    client, images[index], deadline=time.monotonic() + 60
                )
                expected[job_id] = index
                refusals += refused
                time.sleep(rng.uniform(0, 0.08))
        submitted_in = time.monotonic() - started
        # the chaos goes on while the backlog drains, until every job has ended
        deadline = time.monotonic() + 180
        records: dict[str, Any] = {}
        while time.monotonic() < deadline:
            records = read_records(stack, expected)
            if records and all(r is not None and r.status.is_final for r in records.values()):
                break
            time.sleep(1)
    finally:
        chaos.stop.set()
        chaos.thread.join()
    records = read_records(stack, expected)
    lost = sorted(j for j, r in records.items() if r is None)
    unfinished = sorted(j for j, r in records.items() if r is not None and not r.status.is_final)
    statuses = Counter(r.status.value for r in records.values() if r is not None)
    wrong = sorted(
        j
        for j, r in records.items()
        if r is not None
        and r.status == "succeeded"
        and r.result is not None
        and r.result.matches[0].index != expected[j]
    )
    computed = Counter(r.computed for r in records.values() if r is not None)
    attempts = Counter(r.attempts for r in records.values() if r is not None)
    errors = Counter(r.error for r in records.values() if r is not None and r.error)
    return {
        "accepted": len(expected),
        "succeeded": statuses.get("succeeded", 0),
        "failed": statuses.get("failed", 0),
        "failed_because": dict(errors),
        "lost": lost,
        "unfinished": unfinished,
        "wrong_matches": wrong,
        "computed_more_than_once": sum(n for c, n in computed.items() if c > 1),
        "computations_histogram": {str(c): n for c, n in sorted(computed.items())},
        "attempts_histogram": {str(a): n for a, n in sorted(attempts.items())},
        "worker_kills": chaos.kills,
        "redis_restarts": chaos.redis_restarts,
        "submissions_refused_then_retried": refusals,
        "submission_seconds": round(submitted_in, 1),
        "seconds_to_all_ended": round(time.monotonic() - started, 1),
    }


def test_no_job_is_lost_or_answered_twice_under_chaos(
    tmp_path: Path, fake_data_dir: Path, fault_index: Path
) -> None:
    stack = fault_stack(tmp_path, fake_data_dir, fault_index, LOOKALIKE_MAX_ATTEMPTS="6")
    stack.start(workers=2)
    try:
        report = run_chaos(stack, fake_data_dir, jobs=JOBS, seed=SEED)
    finally:
        stack.stop()
    print("\nchaos report:", json.dumps(report, indent=2))
    assert report["lost"] == []
    assert report["unfinished"] == []
    assert report["wrong_matches"] == []
    assert report["succeeded"] + report["failed"] == report["accepted"] == JOBS
    assert report["worker_kills"] + report["redis_restarts"] > 0
    # a job fails only by using up its attempts (workers kept dying under it), never silently
    assert set(report["failed_because"]) <= {
        f"The job was abandoned after {n} attempts: its worker stopped each time." for n in (6,)
    }
