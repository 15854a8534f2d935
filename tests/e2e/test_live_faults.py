"""Live galleries when things go wrong: every part restarted, a worker SIGKILLed in the middle
of adds, a model switched under traffic. Real Redis (append-only), worker and API processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from lookalike.checkpoint import save_random_clip
from lookalike.redis_server import start_redis
from lookalike.stack import Stack
from shared.live import LiveKeys
from tests.e2e.test_live import add, ids, search
from tests.stacks import fault_stack, make_stack
from tests.support import picture, wait_job

pytestmark = pytest.mark.e2e


def gallery_log(stack: Stack, gallery: str) -> list[dict[str, str]]:
    client = redis.Redis.from_url(stack.env["LOOKALIKE_REDIS_URL"], decode_responses=True)
    try:
        return [fields for _, fields in client.xrange(LiveKeys("lookalike").changes(gallery))]
    finally:
        client.close()


def listed(http: httpx.Client, gallery: str) -> list[str]:
    page = http.get(f"/galleries/{gallery}/items", params={"limit": 200}).json()
    return [item["id"] for item in page["items"]]


def test_acknowledged_adds_and_deletes_survive_a_restart_of_every_part(
    tmp_path: Path, tiny_clip_dir: Path, fake_data_dir: Path, built_index: Path
) -> None:
    stack = make_stack(tmp_path, tiny_clip_dir, fake_data_dir)
    stack.env["LOOKALIKE_INDEX_DIR"] = str(built_index)
    stack.start(workers=1)
    try:
        with httpx.Client(base_url=stack.url, timeout=30) as http:
            assert http.put("/galleries/kept").status_code == 201
            for n in range(4):
                add(http, "kept", f"item-{n}", picture(100 + n), n=n)
            assert http.delete("/galleries/kept/items/item-0").status_code == 204

        # Redis killed outright (no goodbye: only its append-only file), then the API and
        # the worker, SIGKILLed too and started again.
        assert stack.redis is not None
        port, directory = stack.redis.port, stack.redis.directory
        stack.redis.process.kill()
        stack.redis.process.wait()
        stack.redis = start_redis(directory, port=port)
        assert stack.api is not None
        stack.api.send_signal(signal.SIGKILL)
        stack.api.wait()
        stack.kill_worker(0)
        stack.replace_worker(0)
        stack.start_api()
        stack.wait_ready(workers=1)

        with httpx.Client(base_url=stack.url, timeout=30) as http:
            assert sorted(listed(http, "kept")) == ["item-1", "item-2", "item-3"]
            assert http.get("/galleries/kept/items/item-2").json()["attributes"] == {"n": 2}
            for n in (1, 2, 3):
                assert ids(search(http, "kept", picture(100 + n)))[0] == f"item-{n}"
            assert "item-0" not in ids(search(http, "kept", picture(100)))
    finally:
        stack.stop()


def test_a_worker_killed_during_adds_indexes_each_exactly_once(
    tmp_path: Path, fake_data_dir: Path, fault_index: Path
) -> None:
    """A slower model (ViT-B/32's shape) so the kill lands while the adds are embedded."""
    stack = fault_stack(tmp_path, fake_data_dir, fault_index)
    stack.start(workers=1)
    try:
        with httpx.Client(base_url=stack.url, timeout=30) as http:
            assert http.put("/galleries/killed").status_code == 201
            jobs = {}
            for n in range(12):
                reply = http.put(
                    f"/galleries/killed/items/k{n}",
                    files={"file": ("k.png", picture(200 + n), "image/png")},
                )
                assert reply.status_code == 202, reply.text
                jobs[f"k{n}"] = reply.json()["id"]
            client = redis.Redis.from_url(stack.env["LOOKALIKE_REDIS_URL"])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # the moment a worker took some of them
                statuses = [client.hget(f"lookalike:job:{j}", "status") for j in jobs.values()]
                if b"running" in statuses:
                    break
                time.sleep(0.005)
            client.close()
            stack.kill_worker(0)
            stack.replace_worker(0)
            ended = {item: wait_job(http, job, timeout=120) for item, job in jobs.items()}
            assert all(job["status"] == "succeeded" for job in ended.values()), ended
            states = Counter(job["result"]["item"]["state"] for job in ended.values())  # type: ignore[index]
            assert states == {"indexed": 12}

            assert sorted(listed(http, "killed")) == sorted(jobs)
            added = Counter(c["id"] for c in gallery_log(stack, "killed") if c["op"] == "add")
            assert added == Counter({item: 1 for item in jobs})  # committed once each
            for n in (0, 5, 11):
                found = search(http, "killed", picture(200 + n), k="12")
                assert ids(found)[0] == f"k{n}" and len(set(ids(found))) == 12
    finally:
        stack.stop()


def test_a_new_model_takes_over_without_refusing_a_request(
    tmp_path: Path, tiny_clip_dir: Path, fake_data_dir: Path, built_index: Path
) -> None:
    """Model B's index is built beside model A's while A serves; B's workers start (embedding
    the live gallery's items for B as they load), A's stop; traffic never sees a refusal."""
    index_root = tmp_path / "index"
    shutil.copytree(built_index, index_root)
    model_b = save_random_clip(tmp_path / "model-b", shape="tiny", seed=1)
    stack = make_stack(tmp_path, tiny_clip_dir, fake_data_dir)
    stack.env["LOOKALIKE_INDEX_DIR"] = str(index_root)
    stack.start(workers=1)
    outcomes: Counter[str] = Counter()
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=stack.url, timeout=30) as client:
            n = 0
            while not stop.is_set():
                n += 1
                gallery = "switch" if n % 2 else "fashion-mnist"
                reply = client.post(
                    "/jobs",
                    params={"gallery": gallery, "wait": "20"},
                    files={"file": ("q.png", picture(300 + n % 3), "image/png")},
                )
                if reply.status_code not in (200, 202):
                    outcomes[f"http {reply.status_code}: {reply.text}"] += 1
                    continue
                job: dict[str, Any] = wait_job(client, reply.json()["id"])  # type: ignore[assignment]
                outcomes[job["status"] if job["status"] == "succeeded" else str(job)] += 1

    try:
        with httpx.Client(base_url=stack.url, timeout=30) as http:
            assert http.put("/galleries/switch").status_code == 201
            for n in range(3):
                add(http, "switch", f"s{n}", picture(300 + n))
            thread = threading.Thread(target=traffic)
            thread.start()

            built = stack.run_cli("index", "build", "--no-progress", LOOKALIKE_MODEL=str(model_b))
            assert built.returncode == 0, built.stderr
            stack.env["LOOKALIKE_MODEL"] = str(model_b)
            stack.start_worker()
            stack.wait_ready(workers=2)
            os.killpg(stack.workers[0].pid, signal.SIGTERM)  # A stops warm: its jobs finish
            stack.workers[0].wait(timeout=60)
            time.sleep(2)
            stop.set()
            thread.join()

            workers = http.get("/readyz").json()["workers"]
            assert [w["model"] for w in workers] == [str(model_b)]
            for n in range(3):
                assert ids(search(http, "switch", picture(300 + n)))[0] == f"s{n}"
    finally:
        stop.set()
        stack.stop()
    assert set(outcomes) == {"succeeded"}, outcomes
    assert outcomes["succeeded"] > 10
