"""JobStore against a real Redis: records, TTLs, atomic status changes, pushed to watchers."""

from __future__ import annotations

import time

import pytest
import redis

from shared.jobs import JobStore, is_job_id, new_job_id, parse_record
from shared.schemas import GalleryInfo, JobResult, JobStage, JobStatus, Match, Timings
from shared.watchers import pushed_fields

PREFIX = "lookalike-test"
TTL_S = 600


@pytest.fixture
def store(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client, prefix=PREFIX, ttl_s=TTL_S)


def result(*, worker: str = "w1") -> JobResult:
    return JobResult(
        matches=[Match(rank=1, index=3, label=7, label_name="Sneaker", score=0.93)],
        model="tiny",
        model_is_random=False,
        gallery=GalleryInfo(name="fashion-mnist", size=100),
        device="cpu (fp32)",
        worker=worker,
        timings=Timings(queue_wait_ms=1, decode_ms=1, embed_ms=1, search_ms=1, total_ms=4),
    )


def created(store: JobStore, *, upload: bytes = b"png bytes", k: int = 5) -> str:
    job_id = new_job_id()
    store.create(job_id, upload=upload, k=k)
    return job_id


def messages(pubsub: redis.client.PubSub, *, count: int, timeout: float = 2.0) -> list[bytes]:
    found: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(found) < count and time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if message is not None:
            found.append(message["data"])
    return found


def subscribed(client: redis.Redis, channel: str) -> redis.client.PubSub:
    pubsub = client.pubsub()
    pubsub.subscribe(channel)
    confirmation = pubsub.get_message(timeout=2.0)  # the subscription is live from here
    assert confirmation is not None and confirmation["type"] == "subscribe"
    return pubsub


# --- create / get -------------------------------------------------------------------------------


def test_create_stores_a_queued_job_and_its_upload(store: JobStore) -> None:
    job_id = new_job_id()

    returned = store.create(job_id, upload=b"\x89PNG...", k=7)

    job = store.get(job_id)
    assert job == returned
    assert job is not None
    assert (job.id, job.status, job.k, job.attempts) == (job_id, JobStatus.QUEUED, 7, 0)
    assert job.started_at is job.finished_at is job.error is job.result is None
    assert store.upload(job_id) == b"\x89PNG..."


def test_create_sets_ttl_on_record_and_upload(store: JobStore, redis_client: redis.Redis) -> None:
    job_id = created(store)

    for key in (store.keys.job(job_id), store.keys.upload(job_id)):
        assert 0 < redis_client.ttl(key) <= TTL_S


def test_get_unknown_job_is_none(store: JobStore) -> None:
    assert store.get(new_job_id()) is None
    assert store.upload(new_job_id()) is None


# --- start --------------------------------------------------------------------------------------


def test_start_marks_running_and_counts_attempts(store: JobStore) -> None:
    job_id = created(store)

    assert store.start(job_id) == 1
    assert store.start(job_id) == 2

    job = store.get(job_id)
    assert job is not None
    assert (job.status, job.attempts) == (JobStatus.RUNNING, 2)
    assert job.started_at is not None


@pytest.mark.parametrize("final", [JobStatus.SUCCEEDED, JobStatus.FAILED])
def test_start_returns_minus_one_once_job_is_final(store: JobStore, final: JobStatus) -> None:
    job_id = created(store)
    store.start(job_id)
    if final is JobStatus.SUCCEEDED:
        store.succeed(job_id, result())
    else:
        store.fail(job_id, "no")

    assert store.start(job_id) == -1

    job = store.get(job_id)
    assert job is not None
    assert (job.status, job.attempts) == (final, 1)


def test_start_returns_minus_two_when_job_is_missing(
    store: JobStore, redis_client: redis.Redis
) -> None:
    job_id = new_job_id()

    assert store.start(job_id) == -2
    assert not redis_client.exists(store.keys.job(job_id))  # no half record is created


def test_start_returns_minus_two_after_the_record_expired(
    store: JobStore, redis_client: redis.Redis
) -> None:
    job_id = created(store)
    redis_client.delete(store.keys.job(job_id))

    assert store.start(job_id) == -2


# --- succeed / fail: answered once --------------------------------------------------------------


def test_succeed_then_fail_keeps_the_first_answer(store: JobStore) -> None:
    job_id = created(store)
    store.start(job_id)

    assert store.succeed(job_id, result()) is True
    assert store.fail(job_id, "too late") is False

    job = store.get(job_id)
    assert job is not None
    assert job.status is JobStatus.SUCCEEDED
    assert job.result == result()
    assert job.error is None
    assert job.finished_at is not None


def test_fail_then_succeed_keeps_the_failure(store: JobStore) -> None:
    job_id = created(store)
    store.start(job_id)

    assert store.fail(job_id, "The upload is empty.") is True
    assert store.succeed(job_id, result()) is False

    job = store.get(job_id)
    assert job is not None
    assert (job.status, job.error, job.result) == (JobStatus.FAILED, "The upload is empty.", None)


def test_second_success_keeps_the_first_result(store: JobStore) -> None:
    job_id = created(store)
    store.start(job_id)

    assert store.succeed(job_id, result(worker="first")) is True
    assert store.succeed(job_id, result(worker="second")) is False

    job = store.get(job_id)
    assert job is not None and job.result is not None
    assert job.result.worker == "first"


def test_finishing_a_missing_job_creates_nothing(
    store: JobStore, redis_client: redis.Redis
) -> None:
    job_id = new_job_id()

    assert store.succeed(job_id, result()) is False
    assert store.fail(job_id, "gone") is False
    assert not redis_client.exists(store.keys.job(job_id))


# --- events -------------------------------------------------------------------------------------


def watching(
    client: redis.Redis, store: JobStore, job_id: str, *, wants: str = "end", name: str = "a"
) -> redis.client.PubSub:
    """A process's channel, subscribed and registered as a watcher of ``job_id``."""
    channel = store.keys.channel(name)
    client.hset(store.keys.watchers(job_id), channel, wants)
    return subscribed(client, channel)


def pushed(pubsub: redis.client.PubSub, *, count: int, timeout: float = 2.0) -> list[str]:
    """The statuses of the records pushed to a channel."""
    return [
        str(parse_record(pushed_fields(data)).status)  # type: ignore[union-attr]
        for data in messages(pubsub, count=count, timeout=timeout)
    ]


def test_a_watcher_of_every_change_is_pushed_each_record(
    store: JobStore, redis_client: redis.Redis
) -> None:
    job_id = created(store)
    pubsub = watching(redis_client, store, job_id, wants="all")
    try:
        store.start(job_id, worker="w1")
        store.succeed(job_id, result())

        first, last = (parse_record(pushed_fields(data)) for data in messages(pubsub, count=2))
        assert first is not None and (first.status, first.worker) == ("running", "w1")
        assert last == store.get(job_id)  # the whole record, as stored
    finally:
        pubsub.close()


def test_a_watcher_of_the_end_hears_only_the_end_and_is_then_forgotten(
    store: JobStore, redis_client: redis.Redis
) -> None:
    job_id = created(store)
    pubsub = watching(redis_client, store, job_id, wants="end")
    try:
        store.start(job_id)
        store.fail(job_id, "no")

        assert pushed(pubsub, count=2, timeout=0.5) == ["failed"]
        assert not redis_client.exists(store.keys.watchers(job_id))
    finally:
        pubsub.close()


def test_every_watching_process_hears_the_end(store: JobStore, redis_client: redis.Redis) -> None:
    job_id = created(store)
    one = watching(redis_client, store, job_id, name="one")
    two = watching(redis_client, store, job_id, wants="all", name="two")
    try:
        store.succeed(job_id, result())

        assert pushed(one, count=1) == ["succeeded"]
        assert pushed(two, count=1) == ["succeeded"]
    finally:
        one.close()
        two.close()


def test_ignored_change_pushes_nothing(store: JobStore, redis_client: redis.Redis) -> None:
    job_id = created(store)
    store.succeed(job_id, result())
    pubsub = watching(redis_client, store, job_id, wants="all")
    try:
        store.fail(job_id, "too late")
        store.start(job_id)

        assert messages(pubsub, count=1, timeout=0.3) == []
    finally:
        pubsub.close()


def test_changes_of_one_job_reach_only_its_watchers(
    store: JobStore, redis_client: redis.Redis
) -> None:
    watched, other = created(store), created(store)
    pubsub = watching(redis_client, store, watched, wants="all")
    try:
        store.start(other)
        store.succeed(other, result())
        store.start(watched)

        assert pushed(pubsub, count=2, timeout=0.5) == ["running"]
    finally:
        pubsub.close()


def test_a_job_nobody_watches_publishes_nothing(store: JobStore, redis_client: redis.Redis) -> None:
    job_id = created(store)
    redis_client.config_resetstat()
    store.start(job_id)
    store.succeed(job_id, result())

    assert "cmdstat_publish" not in redis_client.info("commandstats")
    assert store.get(job_id).status == JobStatus.SUCCEEDED  # type: ignore[union-attr]


# --- ids ----------------------------------------------------------------------------------------


def test_new_job_id_is_32_lowercase_hex_characters() -> None:
    job_id = new_job_id()

    assert len(job_id) == 32
    assert set(job_id) <= set("0123456789abcdef")
    assert is_job_id(job_id)


def test_new_job_ids_are_unique() -> None:
    assert len({new_job_id() for _ in range(10_000)}) == 10_000


@pytest.mark.parametrize(
    "value",
    [
        "",
        "abc",
        "0" * 31,
        "0" * 33,
        "A" * 32,
        "g" * 32,
        "0" * 31 + "\n",
        "0" * 32 + "\n",
        " " + "0" * 31,
        "../../../../etc/passwd/aaaaaaaaa",
        "\u0660" * 32,  # Arabic-Indic zeros are digits to \d, not to [0-9]
        "a" * 1_000_000,
    ],
    ids=[
        "empty",
        "short",
        "31",
        "33",
        "upper",
        "not-hex",
        "newline-in-32",
        "trailing-newline",
        "space",
        "path",
        "unicode-digits",
        "huge",
    ],
)
def test_is_job_id_rejects_bad_id(value: str) -> None:
    assert is_job_id(value) is False


# --- what is kept of an upload ------------------------------------------------------------------


def test_failing_a_job_deletes_its_upload(store: JobStore, redis_client: redis.Redis) -> None:
    job_id = created(store, upload=b"x" * 1000)

    store.fail(job_id, "The image is corrupt or truncated.")

    assert not redis_client.exists(store.keys.upload(job_id))
    assert store.get(job_id) is not None  # the record, with its sentence, stays


def test_succeeding_with_a_small_copy_replaces_the_upload_and_keeps_its_ttl(
    store: JobStore, redis_client: redis.Redis
) -> None:
    job_id = created(store, upload=b"x" * 200_000)

    ended = store.succeed_many([(job_id, result(), b"small copy")])

    assert ended == [True]
    assert redis_client.get(store.keys.upload(job_id)) == b"small copy"
    assert 0 < redis_client.ttl(store.keys.upload(job_id)) <= TTL_S


def test_succeeding_without_a_copy_keeps_the_upload(
    store: JobStore, redis_client: redis.Redis
) -> None:
    job_id = created(store, upload=b"tiny png")

    store.succeed_many([(job_id, result(), None)])

    assert redis_client.get(store.keys.upload(job_id)) == b"tiny png"


def test_a_small_copy_never_recreates_an_expired_upload(
    store: JobStore, redis_client: redis.Redis
) -> None:
    job_id = created(store)
    redis_client.delete(store.keys.upload(job_id))

    store.succeed_many([(job_id, result(), b"small copy")])

    assert not redis_client.exists(store.keys.upload(job_id))


def test_start_many_reads_attempt_record_and_upload_in_one_go(store: JobStore) -> None:
    first, second = created(store, upload=b"one"), created(store, upload=b"two")
    store.fail(second, "Stopped by a test.")

    started = store.start_many([first, second, "f" * 32], worker="w1")

    assert [(s.attempt, s.upload) for s in started] == [(1, b"one"), (-1, None), (-2, None)]
    assert started[0].job is not None and started[0].job.status == JobStatus.RUNNING
    assert started[0].job.stage is not None


def test_jobs_start_and_end_after_redis_forgot_its_scripts(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """A restarted Redis knows no scripts: the batch calls load them and run once more."""
    job_id = new_job_id()
    store.create(job_id, upload=b"x", k=5)
    redis_client.script_flush()
    (started,) = store.start_many([job_id], worker="w")
    assert started.attempt == 1
    redis_client.script_flush()
    store.set_stage([job_id], JobStage.EMBEDDING)
    assert store.get(job_id).stage == JobStage.EMBEDDING  # type: ignore[union-attr]
    redis_client.script_flush()
    result = JobResult(
        matches=[],
        model="m",
        model_is_random=True,
        gallery=GalleryInfo(name="g", size=1),
        device="cpu",
        worker="w",
        timings=Timings(queue_wait_ms=0, decode_ms=0, embed_ms=0, search_ms=0, total_ms=0),
    )
    assert store.succeed_many([(job_id, result, None)]) == [True]
