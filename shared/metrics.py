"""Prometheus metrics shared by every process through one Redis hash.

Each process (API or worker) counts in memory and adds its counts to ``<prefix>:metrics``
every second (one pipeline of HINCRBY/HINCRBYFLOAT), so a job costs no Redis round trip of
its own and the API's ``GET /metrics`` reports all workers, wherever they run. Gauges (queue
length, workers ready) are read when scraped. A process that dies loses at most its last
second of counts.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import redis

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


def render(stored: Mapping[str, float], gauges: Iterable[tuple[str, str, Labels, float]]) -> str:
    """The Prometheus text format of stored counts plus ``(name, help, labels, value)`` gauges."""
    lines: list[str] = []
    for name, definition in DEFINITIONS.items():
        lines.append(f"# HELP {name} {definition.help}")
        lines.append(f"# TYPE {name} {definition.kind}")
        if definition.kind == "counter":
            for field in sorted(f for f in stored if f == name or f.startswith(name + "{")):
                lines.append(f"{field} {_number(stored[field])}")
            continue
        lines.extend(_histogram_lines(name, definition, stored))
    for name, help_text, labels, value in _grouped(gauges):
        if help_text:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} gauge")
        lines.append(f"{name}{_label_text(labels)} {_number(value)}")
    return "\n".join(lines) + "\n"


def _grouped(
    gauges: Iterable[tuple[str, str, Labels, float]],
) -> list[tuple[str, str, Labels, float]]:
    """Gauges with HELP/TYPE written once per name (the first sample carries the help)."""
    seen: set[str] = set()
    rows = []
    for name, help_text, labels, value in sorted(gauges, key=lambda g: g[0]):
        rows.append((name, "" if name in seen else help_text, labels, value))
        seen.add(name)
    return rows


def _histogram_lines(name: str, definition: Definition, stored: Mapping[str, float]) -> list[str]:
    label_sets: dict[str, dict[str, float]] = defaultdict(dict)
    prefix = f"{name}_bucket"
    for field, value in stored.items():
        if field.startswith(prefix):
            label_text, _, le = field[len(prefix) :].rpartition("|")
            label_sets[label_text][le] = value
    lines = []
    for label_text in sorted(label_sets):
        per_bucket = label_sets[label_text]
        inner = label_text[1:-1] if label_text else ""
        running = 0.0
        for le in [*(_number(b) for b in definition.buckets), "+Inf"]:
            running += per_bucket.get(le, 0.0)
            le_label = f'le="{le}"'
            joined = f"{inner},{le_label}" if inner else le_label
            lines.append(f"{name}_bucket{{{joined}}} {_number(running)}")
        lines.append(f"{name}_sum{label_text} {stored.get(f'{name}_sum{label_text}', 0.0)}")
        lines.append(f"{name}_count{label_text} {_number(running)}")
    return lines


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
