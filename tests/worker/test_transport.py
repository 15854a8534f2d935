"""worker.transport against a real Redis and the pinned kombu: job messages taken many per
round trip, recorded as unacknowledged in kombu's own format (so kombu gives back a dead
worker's messages as before), a batch's acknowledgements sent together, other queues as kombu
takes them."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.asynchronous import Hub
from kombu.utils.json import loads

from lookalike.redis_server import RedisServer
from worker import transport
from worker.transport import QoS

JOBS, BUILDS = "jobs", "jobs.build"
OURS = "worker.transport:Transport"


def queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def publish(url: str, name: str, bodies: list[Any]) -> None:
    """Publish as any kombu producer does (the API builds the same messages)."""
    with Connection(url) as connection:
        producer = connection.Producer(serializer="json")
        for body in bodies:
            producer.publish(body, exchange=name, routing_key=name, declare=[queue(name)])


class Received:
    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.messages: list[Any] = []
        self.waiting: list[int | None] = []

    def __call__(self, body: Any, message: Any) -> None:
        self.bodies.append(body)
        self.messages.append(message)
        self.waiting.append(transport.intake.waiting)


@pytest.fixture
def consumer(redis_server: RedisServer, redis_client: redis.Redis) -> Iterator[Any]:
    """A kombu consumer on worker.transport (jobs taken in bulk, builds not), prefetch 64."""
    options = {"bulk_queues": (JOBS,), "visibility_timeout": 3600}
    with Connection(redis_server.url, transport=OURS, transport_options=options) as connection:
        received = Received()
        with connection.Consumer(
            [queue(JOBS), queue(BUILDS)], callbacks=[received], prefetch_count=64
        ) as kombu_consumer:
            yield connection, kombu_consumer, received


def unacked(client: redis.Redis) -> dict[str, Any]:
    return {tag.decode(): loads(value) for tag, value in client.hgetall("unacked").items()}


def test_one_wake_up_takes_every_waiting_job_in_order(
    redis_server: RedisServer, redis_client: redis.Redis, consumer: Any
) -> None:
    publish(redis_server.url, JOBS, list(range(10)))
    connection, _, received = consumer

    connection.drain_events(timeout=5)

    assert received.bodies == list(range(10))
    # what each delivery knew of the jobs behind it: no Redis question per message
    assert received.waiting == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert transport.intake.waiting is None  # known only while a take is handed over
    assert redis_client.llen(JOBS) == 0


def test_taken_jobs_are_recorded_as_kombu_records_them(
    redis_server: RedisServer, redis_client: redis.Redis, consumer: Any
) -> None:
    publish(redis_server.url, JOBS, ["a", "b", "c"])
    connection, _, received = consumer

    connection.drain_events(timeout=5)

    records = unacked(redis_client)
    assert set(records) == {m.delivery_tag for m in received.messages}
    for message in received.messages:
        payload, exchange, routing_key = records[message.delivery_tag]
        assert payload == message._raw  # kombu's QoS.append writes [message, exchange, key]
        assert (exchange, routing_key) == (JOBS, JOBS)
    assert redis_client.zcard("unacked_index") == 3


def test_a_dead_workers_taken_jobs_come_back_through_kombus_own_sweep(
    redis_server: RedisServer, redis_client: redis.Redis, consumer: Any
) -> None:
    publish(redis_server.url, JOBS, ["a", "b", "c", "d"])
    connection, _, received = consumer
    connection.drain_events(timeout=5)
    assert len(received.bodies) == 4  # taken, never acknowledged: the worker "died"

    # another process's plain kombu channel, as any worker's sweep after the visibility timeout
    with Connection(redis_server.url, transport_options={"visibility_timeout": 0}) as other:
        other.default_channel.qos.restore_visible(num=100)

    assert redis_client.llen(JOBS) == 4
    assert unacked(redis_client) == {}
    back = [loads(item) for item in redis_client.lrange(JOBS, 0, -1)]
    assert sorted(m["body"] for m in back) == sorted(m._raw["body"] for m in received.messages)


def test_the_acknowledgements_of_a_turn_of_the_event_loop_go_in_one_pipeline(
    redis_server: RedisServer, redis_client: redis.Redis, consumer: Any
) -> None:
    publish(redis_server.url, JOBS, list(range(20)))
    connection, kombu_consumer, received = consumer
    connection.drain_events(timeout=5)
    hub = Hub()  # as a Celery worker polls: from its event loop
    connection.transport.register_with_event_loop(connection.connection, hub)
    qos: QoS = kombu_consumer.channel.qos
    pipelines = []
    real_pipeline = redis.Redis.pipeline

    def counted(self: redis.Redis, *args: Any, **kwargs: Any) -> Any:
        pipelines.append(1)
        return real_pipeline(self, *args, **kwargs)

    redis.Redis.pipeline = counted  # type: ignore[method-assign]
    try:
        for message in received.messages:  # as Celery does when a batch ends
            message.ack()
        assert len(unacked(redis_client)) == 20 and pipelines == []  # due, not sent
        for tick in list(hub.on_tick):  # the next turn: the poll starts
            tick()
        assert len(pipelines) == 1
    finally:
        redis.Redis.pipeline = real_pipeline  # type: ignore[method-assign]
        hub.close()

    assert unacked(redis_client) == {}
    assert redis_client.zcard("unacked_index") == 0
    assert qos.can_consume_max_estimate() == 64  # the prefetch room is free again


def test_acknowledgements_due_when_the_channel_closes_are_sent_not_given_back(
    redis_server: RedisServer, redis_client: redis.Redis, consumer: Any
) -> None:
    publish(redis_server.url, JOBS, ["a", "b", "c"])
    connection, kombu_consumer, received = consumer
    connection.drain_events(timeout=5)
    hub = Hub()
    connection.transport.register_with_event_loop(connection.connection, hub)
    for message in received.messages[:2]:
        message.ack()  # due at the next poll, which never comes

    kombu_consumer.channel.close()
    hub.close()

    assert unacked(redis_client) == {}
    back = [loads(item) for item in redis_client.lrange(JOBS, 0, -1)]
    assert [m["body"] for m in back] == [received.messages[2]._raw["body"]]  # the third, back


def test_acknowledgements_outside_a_batch_go_at_once(
    redis_server: RedisServer, redis_client: redis.Redis, consumer: Any
) -> None:
    publish(redis_server.url, JOBS, ["a", "b"])
    connection, _, received = consumer
    connection.drain_events(timeout=5)

    received.messages[0].ack()

    assert set(unacked(redis_client)) == {received.messages[1].delivery_tag}


def test_a_take_stops_at_the_prefetch_room(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    publish(redis_server.url, JOBS, list(range(10)))
    options = {"bulk_queues": (JOBS,)}
    with Connection(redis_server.url, transport=OURS, transport_options=options) as connection:
        received = Received()
        with connection.Consumer([queue(JOBS)], callbacks=[received], prefetch_count=4):
            connection.drain_events(timeout=5)

    assert received.bodies == [0, 1, 2, 3]
    assert received.waiting == [9, 8, 7, 6]  # 3, 2, 1, 0 handed over after this one + 6 left


def test_an_unreadable_message_goes_back_where_it_was(
    redis_server: RedisServer, redis_client: redis.Redis, consumer: Any
) -> None:
    publish(redis_server.url, JOBS, ["a", "b"])
    redis_client.lpush(JOBS, b"not json")  # behind "a" and "b"
    publish(redis_server.url, JOBS, ["c"])
    connection, _, received = consumer

    connection.drain_events(timeout=5)

    assert received.bodies == ["a", "b"]
    # first in line again, for kombu's own path; "c" behind it, intact
    assert redis_client.lindex(JOBS, -1) == b"not json"
    assert redis_client.llen(JOBS) == 2
    assert base64.b64decode(loads(redis_client.lindex(JOBS, 0))["body"]) == b'"c"'


def test_other_queues_are_taken_one_message_at_a_time(
    redis_server: RedisServer, redis_client: redis.Redis, consumer: Any
) -> None:
    publish(redis_server.url, BUILDS, ["chunk-1", "chunk-2", "chunk-3"])
    connection, _, received = consumer

    connection.drain_events(timeout=5)

    assert received.bodies == ["chunk-1"]  # long tasks: left for other workers to take
    assert received.waiting == [None]
    assert redis_client.llen(BUILDS) == 2
    assert len(unacked(redis_client)) == 1  # recorded by kombu's own QoS.append


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", transport.NAME),
        ("rediss://cache.example:6380/0", None),  # kombu's own: it sets TLS up by its name
    ],
)
def test_workers_take_in_bulk_over_plain_redis_urls(url: str, expected: str | None) -> None:
    assert transport.bulk_transport(url) == expected


def test_jobs_taken_but_never_handed_over_go_back_first_in_line(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    publish(redis_server.url, JOBS, list(range(6)))
    options = {"bulk_queues": (JOBS,)}
    received = Received()

    def fails_on_2(body: Any, message: Any) -> None:
        received(body, message)
        if body == 2:
            raise ConnectionError("the worker's Redis went away")

    with (
        Connection(redis_server.url, transport=OURS, transport_options=options) as connection,
        connection.Consumer([queue(JOBS)], callbacks=[fails_on_2], prefetch_count=64),
    ):
        with pytest.raises(ConnectionError):
            connection.drain_events(timeout=5)
        delivered = {m.delivery_tag for m in received.messages}
        assert set(unacked(redis_client)) == delivered  # 0, 1 and 2: kombu restores those
        assert redis_client.llen(JOBS) == 3

        connection.drain_events(timeout=5)  # the next wake-up takes the rest, in order

    assert received.bodies == [0, 1, 2, 3, 4, 5]
    assert transport.intake.waiting is None
