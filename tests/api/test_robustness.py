"""Refusals found in review: hostile JSON bodies, a full or read-only Redis, the workers' own
default gallery, and a failed worker's reason in /readyz. In process, on the real Redis."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from api.deps import STORE_DOWN
from api.uploads import BAD_JSON, BAD_TEXT, MAX_TEXT_CHARS
from tests.api.conftest import MakeClient


def heartbeat(client: redis.Redis, name: str, *, age: float = 0, **record: object) -> None:
    """A worker's record, as worker.heartbeat writes it, last beaten ``age`` seconds ago."""
    ttl = 300 if record.get("state") == "failed" else 15
    client.set(f"lookalike:worker:{name}", json.dumps({"name": name, **record}), ex=ttl)
    client.zadd("lookalike:workers", {name: time.time() - age})


def test_deeply_nested_json_is_400_not_500(make_client: MakeClient) -> None:
    client: TestClient = make_client()
    body = "[" * 5000 + "]" * 5000

    reply = client.post("/jobs", content=body, headers={"content-type": "application/json"})

    assert (reply.status_code, reply.json()) == (400, {"detail": BAD_JSON})


def test_json_body_larger_than_a_text_query_is_400(make_client: MakeClient) -> None:
    client: TestClient = make_client()
    body = json.dumps({"text": "a shoe", "padding": "x" * 100_000})

    reply = client.post("/jobs", content=body, headers={"content-type": "application/json"})

    assert (reply.status_code, reply.json()) == (400, {"detail": BAD_JSON})


def test_text_with_a_lone_surrogate_is_422(make_client: MakeClient) -> None:
    client: TestClient = make_client()
    body = '{"text": "a \\ud800 shoe"}'

    reply = client.post("/jobs", content=body, headers={"content-type": "application/json"})

    assert reply.status_code == 422
    assert reply.json() == {"detail": BAD_TEXT.format(n=MAX_TEXT_CHARS)}


@pytest.fixture
def full_redis(redis_client: redis.Redis) -> Iterator[redis.Redis]:
    """The session Redis with no memory left for writes (noeviction): every write is refused."""
    redis_client.config_set("maxmemory", "1")
    yield redis_client
    redis_client.config_set("maxmemory", "0")


def test_a_full_redis_is_503_with_retry_after(
    make_client: MakeClient, full_redis: redis.Redis
) -> None:
    client: TestClient = make_client()

    reply = client.post("/jobs", json={"text": "a shoe"})

    assert (reply.status_code, reply.json()) == (503, {"detail": STORE_DOWN})
    assert reply.headers["retry-after"]
    full_redis.config_set("maxmemory", "0")
    assert client.post("/jobs", json={"text": "a shoe"}).status_code == 202  # and it recovers


def test_jobs_without_a_gallery_go_to_the_workers_default(
    make_client: MakeClient, redis_client: redis.Redis
) -> None:
    shop = {"name": "shop", "size": 3, "model": "m", "kind": "folder", "classes": ["a"]}
    heartbeat(
        redis_client,
        "w1",
        state="ready",
        gallery="shop",
        galleries=[shop],
        modes={"image": True, "text": True},
    )
    client: TestClient = make_client()  # its own setting says fashion-mnist

    job = client.post("/jobs", json={"text": "a shoe"}).json()
    listed = client.get("/galleries").json()

    assert job["gallery"] == "shop"
    assert listed["default"] == "shop"
    assert [g["name"] for g in listed["galleries"]] == ["shop"]


def test_readyz_still_gives_a_failed_workers_reason_a_minute_later(
    make_client: MakeClient, redis_client: redis.Redis
) -> None:
    reason = "Could not load the CLIP model 'x': no such directory."
    heartbeat(redis_client, "w9", state="failed", reason=reason, age=60)
    client: TestClient = make_client()

    reply = client.get("/readyz")

    assert reply.status_code == 503
    assert reason in reply.json()["detail"]
