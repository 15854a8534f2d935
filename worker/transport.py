"""kombu's Redis transport, taking many job messages per Redis round trip.

kombu hands a Redis consumer one message per round trip (``BRPOP``), then writes it to the
unacknowledged set in a second one and removes it from there in a third when it is
acknowledged. Under load that, not the model, bounds a worker: on an H100 machine a worker
spent 6.9 ms of CPU per job, each worker process near 90 % of a core, while the GPU idled and
batches stayed at 3 to 4 jobs of a possible 64 (docs/benchmarks.md). Here, for the job queues:

* after ``BRPOP`` wakes the consumer, one script pops up to as many more messages as the
  worker may still hold (its prefetch room) and records them as unacknowledged, atomically,
  in kombu's own format (so kombu's sweep still gives back the messages of a dead worker);
* the script also says how many messages are left, so a batch knows at once whether anything
  else is waiting (:func:`more_waiting`) instead of asking Redis per message;
* the acknowledgements made in one turn of the worker's event loop (Celery makes a batch's
  there, one by one, when the batch ends) go to Redis in one pipeline as the next poll starts,
  before it decides whether there is room for more messages (:meth:`QoS.send_acks`); and a
  Redis client is not built for each (kombu's acknowledgement built one: 10 % of a worker's
  Python time).

Other queues (distributed index builds, whose chunks are long and must spread over workers)
take kombu's path unchanged, and so does a ``rediss://`` (TLS) broker, whose options kombu
derives from its own transport's name (:func:`bulk_transport`). The subclass reaches into
kombu's Redis channel (``_brpop_read``, ``_deliver``, ``_q_for_pri``, the unacked keys), so
kombu is pinned in pyproject.toml to the release tested here (tests/worker/test_transport.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import loads

log = logging.getLogger(__name__)

#: Pops up to ARGV[2] messages from KEYS[3..] in order (BRPOP's order: the oldest first) and
#: records each as unacknowledged as kombu's QoS.append does (index: delivery tag -> time;
#: hash: delivery tag -> [message, exchange, routing key]). Returns {left, key, message, ...}.
#: A message it cannot read goes back where it was (a script's pops are not undone by an
#: error), for kombu's own path to deal with.
TAKE_SCRIPT = """
local now, room = ARGV[1], tonumber(ARGV[2])
local out = {0}
for i = 3, #KEYS do
  while room > 0 do
    local item = redis.call('RPOP', KEYS[i])
    if not item then break end
    local ok, message = pcall(cjson.decode, item)
    local props = ok and type(message) == 'table' and message['properties']
    local tag = type(props) == 'table' and props['delivery_tag']
    local info = type(props) == 'table' and props['delivery_info']
    if type(tag) ~= 'string' or type(info) ~= 'table' then
      redis.call('RPUSH', KEYS[i], item)
      break
    end
    redis.call('ZADD', KEYS[1], now, tag)
    redis.call('HSET', KEYS[2], tag, '[' .. item .. ',' .. cjson.encode(info['exchange']) ..
      ',' .. cjson.encode(info['routing_key']) .. ']')
    out[#out + 1] = KEYS[i]
    out[#out + 1] = item
    room = room - 1
  end
end
for i = 3, #KEYS do
  out[1] = out[1] + redis.call('LLEN', KEYS[i])
end
return out
"""

#: Most messages taken at once when the prefetch room is unlimited.
MAX_TAKE = 256
NAME = "worker.transport:Transport"


def bulk_transport(redis_url: str) -> str | None:
    """The kombu transport a worker uses for ``redis_url``: this one for ``redis://``; None
    (kombu's own) for the others, such as ``rediss://``, whose TLS settings kombu derives
    from the name of its transport."""
    return NAME if redis_url.startswith("redis://") else None


class Intake:
    """How many job messages wait beyond the one being handed over, as the last take saw it:
    None when unknown (the message came by kombu's own path)."""

    def __init__(self) -> None:
        self.waiting: int | None = None


intake = Intake()


def more_waiting() -> bool | None:
    """Whether more job messages wait for this worker (None: not known without asking Redis)."""
    return None if intake.waiting is None else intake.waiting > 0


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    """kombu's acknowledgement emulation, told which messages a take already recorded, and
    sending the acknowledgements of a turn of the event loop together."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: set[str] = set()
        self._due: list[str] = []

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.recorded:  # the take script wrote it with the pop
            self.recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        """As the next poll starts (:class:`Poller`), or at once outside an event loop."""
        if self.channel.connection.cycle.in_loop:
            self._due.append(delivery_tag)
        else:
            super().ack(delivery_tag)

    def send_acks(self) -> None:
        """The acknowledgements due, in one pipeline. Should that fail, the messages stay
        recorded as unacknowledged and come back after the visibility timeout, to be skipped
        as already answered."""
        if not self._due:
            return
        due, self._due = self._due, []
        try:
            with self.channel.conn_or_acquire() as client, client.pipeline() as pipe:
                pipe.zrem(self.unacked_index_key, *due)
                pipe.hdel(self.unacked_key, *due)
                pipe.execute()
        except self.channel.connection_errors as exc:
            log.warning("%d acknowledgements not sent (%s): redelivered later", len(due), exc)
        for tag in due:
            virtual.QoS.ack(self, tag)

    def restore_unacked_once(self, stderr: Any = None) -> Any:
        """On the channel's close: what was answered is acknowledged, not given back."""
        self.send_acks()
        return super().restore_unacked_once(stderr)


class Poller(kombu_redis.MultiChannelPoller):  # type: ignore[misc]
    """kombu's poller of the channels, which sends their due acknowledgements as a poll
    starts: in the same turn of the event loop as they were made, and before it checks
    whether a channel has room for more messages (else it would wait a turn, up to a second,
    for a BRPOP it could have sent)."""

    #: True once the transport polls from an event loop (a worker's hub)
    in_loop = False

    def on_poll_start(self) -> None:
        for channel in self._channels:
            channel.qos.send_acks()
        super().on_poll_start()


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = QoS
    from_transport_options = (*kombu_redis.Channel.from_transport_options, "bulk_queues")

    #: The queues whose messages are taken many at once (transport option ``bulk_queues``).
    bulk_queues: tuple[str, ...] = ()
    _take_script: Any = None

    def _brpop_read(self, **options: Any) -> bool:
        with self.connection.holding() as held:
            result: bool = super()._brpop_read(**options)  # raises Empty when nothing came
        taken: list[tuple[Any, str]] = []
        left: int | None = None
        room = self._room()
        if held and held[0][1] in self.bulk_queues and room and not self.global_keyprefix:
            taken, left = self._take(room=room)
        deliveries = [*held, *taken]
        position = 0
        try:
            for position, (payload, destination) in enumerate(deliveries):
                intake.waiting = None if left is None else len(deliveries) - position - 1 + left
                self.connection._deliver(payload, destination)
        except BaseException:
            self._give_back([payload for payload, _ in deliveries[position + 1 :]])
            raise
        finally:
            intake.waiting = None
        return result

    def _give_back(self, payloads: list[Any]) -> None:
        """Put taken messages that were never handed over back at the head of their queue
        (kombu's own restore), oldest first in line; should Redis refuse, they stay recorded
        as unacknowledged and come back after the visibility timeout."""
        for payload in reversed(payloads):
            tag = payload["properties"]["delivery_tag"]
            self.qos.recorded.discard(tag)
            try:
                self.qos.restore_by_tag(tag)  # RPUSH: where BRPOP takes from
            except self.connection_errors as exc:
                log.warning("message %s not given back (%s): redelivered later", tag, exc)

    def _room(self) -> int:
        """How many more messages the worker may hold now (prefetch count less held)."""
        estimate = self.qos.can_consume_max_estimate()
        return MAX_TAKE if estimate is None else max(0, min(MAX_TAKE, estimate - 1))

    def _take(self, *, room: int) -> tuple[list[tuple[Any, str]], int | None]:
        keys = [
            self._q_for_pri(queue, priority)
            for priority in self.priority_steps
            for queue in self.bulk_queues
            if queue in self.active_queues
        ]
        try:
            with self.conn_or_acquire() as client:
                if self._take_script is None:
                    self._take_script = client.register_script(TAKE_SCRIPT)
                reply = self._take_script(
                    keys=[self.unacked_index_key, self.unacked_key, *keys],
                    args=[time.time(), room],
                    client=client,
                )
        except self.connection_errors as exc:
            log.warning("taking more messages failed (%s): one at a time until it works", exc)
            return [], None
        left, *pairs = reply
        taken = []
        for key, item in zip(pairs[::2], pairs[1::2], strict=True):
            payload = loads(item)
            self.qos.recorded.add(payload["properties"]["delivery_tag"])
            key = key.decode() if isinstance(key, bytes) else key
            taken.append((payload, key.rsplit(self.sep, 1)[0]))  # less a priority suffix
        return taken, int(left)


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = Poller()
        self._held: list[tuple[Any, str]] | None = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)
        self.cycle.in_loop = True

    @contextmanager
    def holding(self) -> Iterator[list[tuple[Any, str]]]:
        """Messages delivered inside are kept in the yielded list instead of handed over."""
        held: list[tuple[Any, str]] = []
        self._held = held
        try:
            yield held
        finally:
            self._held = None

    def _deliver(self, message: Any, queue: str) -> None:
        if self._held is not None:
            self._held.append((message, queue))
        else:
            super()._deliver(message, queue)
