"""Prometheus metrics shared by every process through one Redis hash.

Each process (API or worker) counts in memory and adds its counts to ``<prefix>:metrics``
every second (one pipeline of HINCRBYFLOAT), so a job costs no Redis round trip of its own and
the API's ``GET /metrics`` reports all workers, wherever they run. Gauges (queue length,
workers ready) are read when scraped. A process that dies loses at most its last second of
counts. The exposition is prometheus_client's: a custom collector (:class:`StoredMetrics`)
turns the gathered counts into metric families and ``generate_latest`` writes them.
"""

from __future__ import annotations

import bisect
import logging
import re
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

FLUSH_S = 1.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Definition:
    kind: str  # counter | histogram
    help: str
    buckets: tuple[float, ...] = ()


DEFINITIONS: dict[str, Definition] = {
    "lookalike_jobs_submitted_total": Definition("counter", "Jobs accepted by the API."),
    "lookalike_requests_refused_total": Definition(
        "counter", "Requests the API refused, by HTTP status."
    ),
    "lookalike_jobs_finished_total": Definition(
        "counter", "Jobs that ended, by status and failure reason."
    ),
    "lookalike_jobs_duplicate_total": Definition(
        "counter", "Job computations whose result was already stored (redeliveries)."
    ),
    "lookalike_job_latency_seconds": Definition(
        "histogram", "From acceptance by the API to the result being stored.", LATENCY_BUCKETS
    ),
    "lookalike_job_queue_wait_seconds": Definition(
        "histogram", "From acceptance to a worker starting the job.", LATENCY_BUCKETS
    ),
    "lookalike_job_stage_seconds": Definition(
        "histogram", "Time in each stage of a job (decode, embed, search).", STAGE_BUCKETS
    ),
    "lookalike_items_added_total": Definition(
        "counter", "Items added to (or replaced in) a live gallery, by gallery."
    ),
    "lookalike_items_deleted_total": Definition(
        "counter", "Items deleted from a live gallery, by gallery."
    ),
    "lookalike_batch_size": Definition(
        "histogram", "Jobs embedded in one forward pass.", BATCH_BUCKETS
    ),
}

Labels = Mapping[str, str]


def _label_text(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{_escape(str(value))}"' for key, value in sorted(labels.items()))
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """In-memory counts of one process, flushed to Redis by a background thread."""

    def __init__(self, client: redis.Redis, *, prefix: str) -> None:
        self.client = client
        self.key = f"{prefix}:metrics"
        self._lock = threading.Lock()
        self._pending: dict[str, float] = defaultdict(float)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def inc(self, name: str, labels: Labels | None = None, value: float = 1.0) -> None:
        assert DEFINITIONS[name].kind == "counter", name
        with self._lock:
            self._pending[name + _label_text(labels or {})] += value

    def observe(self, name: str, value: float, labels: Labels | None = None) -> None:
        definition = DEFINITIONS[name]
        assert definition.kind == "histogram", name
        label_text = _label_text(labels or {})
        slot = bisect.bisect_left(definition.buckets, value)
        le = "+Inf" if slot == len(definition.buckets) else _number(definition.buckets[slot])
        with self._lock:
            self._pending[f"{name}_bucket{label_text}|{le}"] += 1
            self._pending[f"{name}_sum{label_text}"] += value
            self._pending[f"{name}_count{label_text}"] += 1

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, defaultdict(float)
        if not pending:
            return
        fields = list(pending.items())
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for field, value in fields:
                    # Always the float command: a sum holds a float, and HINCRBY refuses one.
                    pipe.hincrbyfloat(self.key, field, value)
                replies = pipe.execute(raise_on_error=False)
        except redis.RedisError as error:  # nothing was sent: keep every count
            log.warning("metrics not flushed (%s); retrying", error)
            replies = [error] * len(fields)
        failed = [(f, v) for (f, v), reply in zip(fields, replies, strict=True) if _failed(reply)]
        if failed:
            with self._lock:  # only what did not land is counted again
                for field, value in failed:
                    self._pending[field] += value

    def start(self, interval_s: float = FLUSH_S) -> None:
        def run() -> None:
            while not self._stop.wait(interval_s):
                self.flush()

        self._thread = threading.Thread(target=run, name="metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.flush()


def _failed(reply: object) -> bool:
    return isinstance(reply, Exception)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class StoredMetrics(Collector):
    """The counts gathered in Redis (and gauges read at scrape time) as metric families, for
    ``prometheus_client`` to render."""

    def __init__(
        self, stored: Mapping[str, float], gauges: Iterable[tuple[str, str, Labels, float]]
    ) -> None:
        self.stored = stored
        self.gauges = list(gauges)

    def collect(self) -> Iterator[Metric]:
        for name, definition in DEFINITIONS.items():
            if definition.kind == "counter":
                yield self._counter(name, definition)
            else:
                yield self._histogram(name, definition)
        families: dict[str, GaugeMetricFamily] = {}
        for name, help_text, labels, value in sorted(self.gauges, key=lambda g: g[0]):
            family = families.setdefault(name, GaugeMetricFamily(name, help_text))
            family.add_sample(name, dict(labels), value)
        yield from families.values()

    def _counter(self, name: str, definition: Definition) -> Metric:
        family = CounterMetricFamily(name, definition.help)
        for field in sorted(f for f in self.stored if f == name or f.startswith(name + "{")):
            family.add_sample(name, parse_labels(field[len(name) :]), self.stored[field])
        return family

    def _histogram(self, name: str, definition: Definition) -> Metric:
        family = HistogramMetricFamily(name, definition.help)
        per_labels: dict[str, dict[str, float]] = defaultdict(dict)
        prefix = f"{name}_bucket"
        for field, value in self.stored.items():
            if field.startswith(prefix):
                label_text, _, le = field[len(prefix) :].rpartition("|")
                per_labels[label_text][le] = value
        for label_text in sorted(per_labels):
            labels = parse_labels(label_text)
            running = 0.0
            # le written as ever ("1", not prometheus_client's "1.0"): a label value is a string
            # to Prometheus, and a changed one would split a histogram's series in two.
            for le in [*(_number(b) for b in definition.buckets), "+Inf"]:
                running += per_labels[label_text].get(le, 0.0)
                family.add_sample(f"{name}_bucket", {**labels, "le": le}, running)
            total = self.stored.get(f"{name}_sum{label_text}", 0.0)
            family.add_sample(f"{name}_sum", labels, total)
            family.add_sample(f"{name}_count", labels, running)
        return family


def render(stored: Mapping[str, float], gauges: Iterable[tuple[str, str, Labels, float]]) -> str:
    """The Prometheus text format (``generate_latest``) of stored counts plus
    ``(name, help, labels, value)`` gauges."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoredMetrics(stored, gauges))
    return generate_latest(registry).decode()


_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse_labels(text: str) -> dict[str, str]:
    """``{a="1",b="x\\"y"}`` (as :func:`_label_text` writes it) back to a dict."""
    return {
        key: re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], value)
        for key, value in _LABEL.findall(text)
    }


def read_stored(raw: Mapping[bytes | str, bytes | str]) -> dict[str, float]:
    """The metrics hash as read from Redis."""
    decoded = {}
    for key, value in raw.items():
        name = key.decode() if isinstance(key, bytes) else key
        text = value.decode() if isinstance(value, bytes) else value
        try:
            decoded[name] = float(text)
        except ValueError:
            continue
    return decoded
