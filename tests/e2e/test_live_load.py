"""A catalogue changing under load: adds, deletes and searches interleaved at concurrency 32
against two real workers, then every acknowledged add found by a search for its own image
and every acknowledged delete absent.

The figures print with ``-s``; for a longer run set LIVE_LOAD_ADDS / LIVE_LOAD_SEARCHES.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from lookalike.stack import Stack
from tests.support import picture

pytestmark = pytest.mark.e2e

ADDS = int(os.environ.get("LIVE_LOAD_ADDS", "2000"))
SEARCHES = int(os.environ.get("LIVE_LOAD_SEARCHES", "2000"))
DELETES = ADDS // 10
CONCURRENCY = 32
GALLERY = "catalogue"
CHECK_FILES = 16  # images per verification request (POST /jobs/batch)


@pytest.fixture
def load_stack(live_service: Stack) -> Stack:
    return live_service


async def ended(
    client: httpx.AsyncClient, job: dict[str, Any], statuses: Counter[int]
) -> dict[str, Any]:
    """The job once it ended (long polls)."""
    while job["status"] not in ("succeeded", "failed"):
        polled = await client.get(f"/jobs/{job['id']}", params={"wait": "20"})
        statuses[polled.status_code] += 1
        job = polled.json()
    return job


class Load:
    """The operations, their HTTP statuses and what the catalogue must now hold."""

    def __init__(self, client: httpx.AsyncClient, images: dict[str, bytes]) -> None:
        self.client = client
        self.images = images
        self.statuses: Counter[int] = Counter()
        self.failed: list[dict[str, Any]] = []
        self.acknowledged: set[str] = set()  # adds whose job said "indexed"
        self.deleted: set[str] = set()  # deletes answered 204
        self.latency: dict[str, list[float]] = {"add": [], "search": [], "delete": []}
        self.batches: dict[str, list[int]] = {"add": [], "search": []}  # jobs per forward pass

    async def job(self, reply: httpx.Response) -> dict[str, Any]:
        job = await ended(self.client, reply.json(), self.statuses)
        if job["status"] != "succeeded":
            self.failed.append(job)
        return job

    async def add(self, item_id: str) -> None:
        t0 = time.perf_counter()
        reply = await self.client.put(
            f"/galleries/{GALLERY}/items/{item_id}",
            files={"file": ("i.png", self.images[item_id], "image/png")},
            data={"attributes": f'{{"n": {item_id[1:]}}}'},
        )
        self.statuses[reply.status_code] += 1
        if reply.status_code != 202:
            return
        job = await self.job(reply)
        if job["status"] == "succeeded" and job["result"]["item"]["state"] == "indexed":
            self.acknowledged.add(item_id)
            self.batches["add"].append(job["result"]["batch_size"])
        self.latency["add"].append(time.perf_counter() - t0)

    async def search(self, image: bytes, **fields: str) -> None:
        t0 = time.perf_counter()
        reply = await self.client.post(
            "/jobs",
            params={"gallery": GALLERY, "wait": "20"},
            files={"file": ("q.png", image, "image/png")},
            data=fields,
        )
        self.statuses[reply.status_code] += 1
        if reply.status_code in (200, 202):
            job = await self.job(reply)
            self.latency["search"].append(time.perf_counter() - t0)
            if job["status"] == "succeeded":
                self.batches["search"].append(job["result"]["batch_size"])

    async def delete(self, item_id: str) -> None:
        t0 = time.perf_counter()
        reply = await self.client.delete(f"/galleries/{GALLERY}/items/{item_id}")
        self.statuses[reply.status_code] += 1
        if reply.status_code == 204:
            self.deleted.add(item_id)
        self.latency["delete"].append(time.perf_counter() - t0)


async def run_load(url: str, rng: random.Random) -> tuple[Load, float]:
    images = {f"a{n}": picture(10_000 + n) for n in range(ADDS)}
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        assert (await client.put(f"/galleries/{GALLERY}")).status_code in (200, 201)
        load = Load(client, images)
        plan: list[tuple[str, str]] = [("add", item) for item in images]
        plan += [("search", "")] * SEARCHES
        rng.shuffle(plan)
        operations = iter(plan)
        deletes_left = DELETES

        async def user() -> None:
            nonlocal deletes_left
            for operation, item in operations:
                if operation == "add":
                    await load.add(item)
                    continue
                known = sorted(load.acknowledged - load.deleted)
                if known and deletes_left and rng.random() < DELETES / SEARCHES * 1.5:
                    deletes_left -= 1
                    await load.delete(rng.choice(known))
                if known and rng.random() < 0.5:
                    image = images[rng.choice(known)]
                else:
                    image = picture(rng.randrange(10**6, 2 * 10**6))
                options = {"filter": '{"n": {"lt": 1000}}'} if rng.random() < 0.25 else {}
                await load.search(image, **options)

        started = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(CONCURRENCY)))
        return load, time.perf_counter() - started


async def verify(url: str, load: Load) -> tuple[list[str], list[str]]:
    """The acknowledged adds a search for their own image does not find with a score of at
    least 0.99, and the deleted items a search still returns."""
    kept = sorted(load.acknowledged - load.deleted)
    missing: list[str] = []
    resurrected: list[str] = []
    limits = httpx.Limits(max_connections=8)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        gate = asyncio.Semaphore(8)

        async def check(items: list[str]) -> None:
            async with gate:
                reply = await client.post(
                    "/jobs/batch",
                    params={"gallery": GALLERY, "k": "5"},
                    files=[("file", (f"{i}.png", load.images[i], "image/png")) for i in items],
                )
                assert reply.status_code == 202, reply.text
                for item, accepted in zip(items, reply.json()["jobs"], strict=True):
                    job = await ended(client, accepted, load.statuses)
                    assert job["status"] == "succeeded", job
                    matches = {m["item_id"]: m["score"] for m in job["result"]["matches"]}
                    if item in load.deleted and item in matches:
                        resurrected.append(item)
                    if item not in load.deleted and matches.get(item, -1.0) < 0.99:
                        missing.append(f"{item}: {matches} ({job['result']['worker']})")

        everything = kept + sorted(load.deleted)
        await asyncio.gather(
            *(
                check(everything[low : low + CHECK_FILES])
                for low in range(0, len(everything), CHECK_FILES)
            )
        )
    return missing, resurrected


def test_adds_deletes_and_searches_interleaved_lose_nothing(load_stack: Stack) -> None:
    load, seconds = asyncio.run(run_load(load_stack.url, random.Random(3)))
    errors = {status: n for status, n in load.statuses.items() if status >= 500}
    assert errors == {}, load.statuses
    assert load.failed == []
    assert len(load.acknowledged) == ADDS
    assert len(load.deleted) >= DELETES // 2

    missing, resurrected = asyncio.run(verify(load_stack.url, load))
    assert missing == [] and resurrected == []

    with httpx.Client(base_url=load_stack.url, timeout=30) as http:
        listed = http.get("/galleries").json()["galleries"]
        size = next(g["size"] for g in listed if g["name"] == GALLERY)
    assert size == ADDS - len(load.deleted)
    p50 = {name: statistics.median(times) * 1000 for name, times in load.latency.items() if times}
    print(
        f"\nlive load: {ADDS} adds, {SEARCHES} searches, {len(load.deleted)} deletes at "
        f"concurrency {CONCURRENCY} in {seconds:.1f}s "
        f"({(ADDS + SEARCHES) / seconds:.0f} jobs/s); p50 "
        + ", ".join(f"{name} {ms:.0f} ms" for name, ms in p50.items())
        + "; jobs per batch p50 "
        + ", ".join(f"{name} {statistics.median(b):.0f}" for name, b in load.batches.items() if b)
        + f"; statuses {dict(sorted(load.statuses.items()))}"
    )
