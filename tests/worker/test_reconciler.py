"""The reconciler's decisions, against a real Redis, with a recording enqueue."""

from __future__ import annotations

import json
import time

import redis

from shared.jobs import JobStore
from shared.schemas import JobKind, JobStatus
from worker.reconciler import NO_TEXT_WORKER, UNACKED_KEY, Reconciler, message_ids


def kombu_message(job_id: str) -> bytes:
    return json.dumps({"body": "", "headers": {"id": job_id, "task": "lookalike.search"}}).encode()


def make(client: redis.Redis, *, name: str = "w1", stuck_after_s: float = 5.0):  # type: ignore[no-untyped-def]
    store = JobStore(client, prefix="lookalike", ttl_s=600)
    sent: list[str] = []
    reconciler = Reconciler(
        store,
        lambda job_id, kind: sent.append(job_id),
        queues=["lookalike", "lookalike.text"],
        stuck_after_s=stuck_after_s,
        time_limit_s=30,
        name=name,
    )
    return store, reconciler, sent


def age(store: JobStore, job_id: str, seconds: float) -> None:
    store.client.zadd(store.keys.pending, {job_id: time.time() - seconds})


def beat(store: JobStore, worker: str, *, seconds_ago: float = 0.0) -> None:
    store.client.zadd(store.keys.workers, {worker: time.time() - seconds_ago})


def test_message_ids_reads_queue_entries_and_unacked_entries() -> None:
    assert message_ids([kombu_message("a"), b"not json", b"{}"]) == {"a"}
    unacked = json.dumps([json.loads(kombu_message("b")), "", "lookalike"]).encode()
    assert message_ids([unacked], unacked=True) == {"b"}


def test_fresh_jobs_are_left_alone(redis_client: redis.Redis) -> None:
    store, reconciler, sent = make(redis_client)
    store.create("a" * 32, upload=b"x", k=5)
    assert reconciler.run_once().requeued == []
    assert sent == []


def test_queued_job_without_a_message_is_requeued(redis_client: redis.Redis) -> None:
    store, reconciler, sent = make(redis_client)
    store.create("a" * 32, upload=b"x", k=5)
    age(store, "a" * 32, 60)
    report = reconciler.run_once()
    assert report.requeued == ["a" * 32]
    assert sent == ["a" * 32]
    # touched: the next sweep waits another stuck_after_s before trying again
    assert reconciler.run_once().requeued == []


def test_queued_job_still_in_the_queue_is_left_alone(redis_client: redis.Redis) -> None:
    store, reconciler, sent = make(redis_client)
    store.create("a" * 32, upload=b"x", k=5)
    age(store, "a" * 32, 60)
    redis_client.lpush("lookalike", kombu_message("a" * 32))
    assert reconciler.run_once().still_moving == 1
    assert sent == []


def test_queued_job_held_unacknowledged_is_left_alone(redis_client: redis.Redis) -> None:
    store, reconciler, sent = make(redis_client)
    store.create("a" * 32, upload=b"x", k=5)
    age(store, "a" * 32, 60)
    entry = json.dumps([json.loads(kombu_message("a" * 32)), "", "lookalike"])
    redis_client.hset(UNACKED_KEY, "tag-1", entry)
    assert reconciler.run_once().still_moving == 1
    assert sent == []


def test_running_job_of_a_live_worker_is_left_alone(redis_client: redis.Redis) -> None:
    store, reconciler, sent = make(redis_client)
    store.create("a" * 32, upload=b"x", k=5)
    store.start("a" * 32, worker="host:1")
    beat(store, "host:1")
    age(store, "a" * 32, 60)
    assert reconciler.run_once().still_moving == 1
    assert sent == []


def test_running_job_of_a_dead_worker_is_requeued(redis_client: redis.Redis) -> None:
    store, reconciler, sent = make(redis_client)
    store.create("a" * 32, upload=b"x", k=5)
    store.start("a" * 32, worker="host:1")
    beat(store, "host:1", seconds_ago=120)  # its heartbeat stopped
    age(store, "a" * 32, 60)
    assert reconciler.run_once().requeued == ["a" * 32]


def test_running_job_past_its_time_limit_is_requeued_even_if_its_worker_lives(
    redis_client: redis.Redis,
) -> None:
    store, reconciler, sent = make(redis_client)
    store.create("a" * 32, upload=b"x", k=5)
    store.start("a" * 32, worker="host:1")
    redis_client.hset(store.keys.job("a" * 32), "started_at", "2020-01-01T00:00:00+00:00")
    beat(store, "host:1")
    age(store, "a" * 32, 60)
    assert reconciler.run_once().requeued == ["a" * 32]


def test_finished_and_vanished_jobs_leave_the_pending_set(redis_client: redis.Redis) -> None:
    store, reconciler, sent = make(redis_client)
    store.create("a" * 32, upload=b"x", k=5)
    store.fail("a" * 32, "no")
    redis_client.zadd(store.keys.pending, {"a" * 32: 0, "b" * 32: 0})
    report = reconciler.run_once()
    assert report.dropped == 2
    assert redis_client.zcard(store.keys.pending) == 0
    assert sent == []


def test_only_one_reconciler_leads(redis_client: redis.Redis) -> None:
    _, first, _ = make(redis_client, name="w1")
    _, second, _ = make(redis_client, name="w2")
    assert first.lead(ttl_s=5)
    assert not second.lead(ttl_s=5)
    assert first.lead(ttl_s=5)  # the leader keeps its lock


def test_stuck_text_job_waiting_in_the_text_queue_is_left_alone(redis_client: redis.Redis) -> None:
    store, reconciler, sent = make(redis_client)
    store.create("b" * 32, text="a shoe", k=5)
    redis_client.lpush("lookalike.text", kombu_message("b" * 32))
    redis_client.zadd(store.keys.pending, {"b" * 32: time.time() - 3600})

    report = reconciler.run_once()

    assert sent == []
    assert report.still_moving == 1


def test_stuck_text_job_is_requeued_as_a_text_job(redis_client: redis.Redis) -> None:
    kinds: list[JobKind] = []
    store = JobStore(redis_client, prefix="lookalike", ttl_s=600)
    reconciler = Reconciler(
        store,
        lambda job_id, kind: kinds.append(kind),
        queues=["lookalike", "lookalike.text"],
        stuck_after_s=1,
        time_limit_s=30,
        name="me",
    )
    store.create("c" * 32, text="a bag", k=5)
    redis_client.zadd(store.keys.pending, {"c" * 32: time.time() - 3600})

    reconciler.run_once()

    assert kinds == [JobKind.TEXT]


def ready_worker(client: redis.Redis, name: str, *, text: bool) -> None:
    """A worker's readiness record, as worker.heartbeat writes it."""
    record = {"name": name, "state": "ready", "modes": {"image": True, "text": text}}
    client.set(f"lookalike:worker:{name}", json.dumps(record), ex=15)
    client.zadd("lookalike:workers", {name: time.time()})


def test_queued_text_job_fails_when_the_ready_workers_take_no_text(
    redis_client: redis.Redis,
) -> None:
    store, reconciler, sent = make(redis_client)
    ready_worker(redis_client, "w2", text=False)
    store.create("d" * 32, text="a shoe", k=5)
    redis_client.lpush("lookalike.text", kombu_message("d" * 32))
    redis_client.zadd(store.keys.pending, {"d" * 32: time.time() - 3600})

    report = reconciler.run_once()

    job = store.get("d" * 32)
    assert job is not None and job.status == JobStatus.FAILED
    assert job.error == NO_TEXT_WORKER
    assert report.failed == ["d" * 32] and sent == []
    assert redis_client.llen("lookalike.text") == 0  # nobody would ever take it


def test_queued_text_job_waits_while_no_worker_is_ready(redis_client: redis.Redis) -> None:
    store, reconciler, _ = make(redis_client)
    store.create("e" * 32, text="a shoe", k=5)
    redis_client.lpush("lookalike.text", kombu_message("e" * 32))
    redis_client.zadd(store.keys.pending, {"e" * 32: time.time() - 3600})

    report = reconciler.run_once()

    job = store.get("e" * 32)
    assert job is not None and job.status == JobStatus.QUEUED
    assert report.still_moving == 1 and report.failed == []


def test_queued_text_job_waits_when_a_ready_worker_takes_text(redis_client: redis.Redis) -> None:
    store, reconciler, _ = make(redis_client)
    ready_worker(redis_client, "w2", text=False)
    ready_worker(redis_client, "w3", text=True)
    store.create("f" * 32, text="a shoe", k=5)
    redis_client.lpush("lookalike.text", kombu_message("f" * 32))
    redis_client.zadd(store.keys.pending, {"f" * 32: time.time() - 3600})

    report = reconciler.run_once()

    assert report.failed == [] and report.still_moving == 1


def test_an_unreadable_record_does_not_stop_the_sweep(redis_client: redis.Redis) -> None:
    store, reconciler, sent = make(redis_client)
    redis_client.hset(store.keys.job("1" * 32), mapping={"id": "1" * 32, "status": "bogus"})
    store.create("2" * 32, upload=b"x", k=5)
    old = time.time() - 3600
    redis_client.zadd(store.keys.pending, {"1" * 32: old - 1, "2" * 32: old})

    reconciler.run_once()

    assert sent == ["2" * 32]  # the lost job behind it is still re-enqueued


def test_a_leader_that_stopped_renewing_loses_the_lead(redis_client: redis.Redis) -> None:
    _, first, _ = make(redis_client, name="w1")
    _, second, _ = make(redis_client, name="w2")
    assert first.lead(ttl_s=0.2)
    time.sleep(0.3)
    assert second.lead(ttl_s=5)
    assert not first.lead(ttl_s=5)
