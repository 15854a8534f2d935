"""Metrics counted in memory, flushed into a real Redis hash, rendered as Prometheus text."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from lookalike.redis_server import free_port
from shared.metrics import DEFINITIONS, LATENCY_BUCKETS, Metrics, read_stored, render

PREFIX = "lookalike-test"
KEY = f"{PREFIX}:metrics"
LATENCY = "lookalike_job_latency_seconds"
STAGE = "lookalike_job_stage_seconds"
FINISHED = "lookalike_jobs_finished_total"

# The Prometheus text format (0.0.4), strictly: a metric name, optional labels whose values
# escape only backslash, quote and newline, one space, a float.
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf"(?P<name>{_NAME})(?P<labels>\{{{_LABEL}(?:,{_LABEL})*\}})? (?P<value>\S+)")
_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
_COMMENT = re.compile(rf"# (?P<what>HELP|TYPE) (?P<name>{_NAME}) (?P<rest>.+)")

Sample = tuple[str, tuple[tuple[str, str], ...]]


def parse(text: str) -> tuple[dict[Sample, float], dict[str, str], list[str]]:
    """Samples, types and HELP names of Prometheus text; fails on any line out of format."""
    assert text.endswith("\n")
    samples: dict[Sample, float] = {}
    types: dict[str, str] = {}
    helps: list[str] = []
    for line in text.splitlines():
        comment = _COMMENT.fullmatch(line)
        if comment:
            if comment["what"] == "HELP":
                helps.append(comment["name"])
            else:
                assert comment["rest"] in ("counter", "gauge", "histogram"), line
                assert comment["name"] not in types, f"TYPE twice: {line}"
                types[comment["name"]] = comment["rest"]
            continue
        match = _SAMPLE.fullmatch(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        labels = tuple(sorted(_PAIR.findall(match["labels"] or "")))  # order means nothing
        value = float(match["value"])  # a number, +Inf or NaN; anything else raises
        family = re.sub(r"_(bucket|sum|count)$", "", match["name"])
        assert match["name"] in types or family in types, f"sample before its TYPE: {line}"
        key = (match["name"], labels)
        assert key not in samples, f"sample twice: {line}"
        samples[key] = value
    return samples, types, helps


def unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], value)


@pytest.fixture
def metrics(redis_client: redis.Redis) -> Metrics:
    return Metrics(redis_client, prefix=PREFIX)


def stored(client: redis.Redis) -> dict[str, float]:
    return read_stored(client.hgetall(KEY))


def rendered(client: redis.Redis) -> tuple[dict[Sample, float], dict[str, str], list[str]]:
    return parse(render(stored(client), []))


def test_inc_and_observe_stay_in_memory_until_flush(
    metrics: Metrics, redis_client: redis.Redis
) -> None:
    metrics.inc(FINISHED, {"status": "succeeded", "reason": ""})
    metrics.observe(LATENCY, 0.2)

    assert not redis_client.exists(KEY)
    metrics.flush()

    assert stored(redis_client) == {
        'lookalike_jobs_finished_total{reason="",status="succeeded"}': 1.0,
        f"{LATENCY}_bucket|0.25": 1.0,
        f"{LATENCY}_sum": 0.2,
        f"{LATENCY}_count": 1.0,
    }


def test_flush_with_nothing_counted_writes_nothing(
    metrics: Metrics, redis_client: redis.Redis
) -> None:
    metrics.flush()

    assert not redis_client.exists(KEY)


def test_counts_from_two_processes_add_up(redis_client: redis.Redis) -> None:
    api, worker = Metrics(redis_client, prefix=PREFIX), Metrics(redis_client, prefix=PREFIX)
    api.inc("lookalike_jobs_submitted_total", value=3)
    worker.inc("lookalike_jobs_submitted_total")
    api.observe(LATENCY, 0.3)
    worker.observe(LATENCY, 0.4)
    worker.observe(LATENCY, 50.0)

    api.flush()
    worker.flush()
    api.inc("lookalike_jobs_submitted_total")
    api.flush()

    values = stored(redis_client)
    assert values["lookalike_jobs_submitted_total"] == 5
    assert values[f"{LATENCY}_count"] == 3
    assert values[f"{LATENCY}_sum"] == pytest.approx(50.7)
    assert values[f"{LATENCY}_bucket|0.5"] == 2
    assert values[f"{LATENCY}_bucket|120"] == 1


def test_flush_while_redis_is_unreachable_keeps_counts_for_the_next_flush(
    metrics: Metrics, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    real = metrics.client
    metrics.client = redis.Redis(port=free_port(), retry=Retry(NoBackoff(), 0))
    metrics.inc(FINISHED, {"status": "failed", "reason": "bad_image"}, value=2)
    metrics.observe(LATENCY, 0.7)

    metrics.flush()  # logs a warning, raises nothing
    assert "metrics not flushed" in caplog.text
    metrics.inc(FINISHED, {"status": "failed", "reason": "bad_image"})
    metrics.client = real
    metrics.flush()

    values = stored(redis_client)
    assert values['lookalike_jobs_finished_total{reason="bad_image",status="failed"}'] == 3
    assert values[f"{LATENCY}_count"] == 1
    assert values[f"{LATENCY}_sum"] == pytest.approx(0.7)


def test_stop_flushes_what_is_left(metrics: Metrics, redis_client: redis.Redis) -> None:
    metrics.start(interval_s=60)
    metrics.inc("lookalike_jobs_duplicate_total")

    metrics.stop()

    assert stored(redis_client) == {"lookalike_jobs_duplicate_total": 1.0}


def test_whole_sum_after_a_fractional_sum_is_flushed_once(
    metrics: Metrics, redis_client: redis.Redis
) -> None:
    metrics.observe(LATENCY, 0.3)
    metrics.flush()
    metrics.observe(LATENCY, 0.0)  # e.g. a decode of 0.00 ms: its sum is whole
    metrics.flush()
    metrics.flush()

    values = stored(redis_client)
    assert values[f"{LATENCY}_count"] == 2
    assert values[f"{LATENCY}_sum"] == pytest.approx(0.3)


def test_render_has_help_and_type_for_every_definition(redis_client: redis.Redis) -> None:
    samples, types, helps = rendered(redis_client)

    assert types == {name: d.kind for name, d in DEFINITIONS.items()}
    assert helps == list(DEFINITIONS)
    assert samples == {}


def test_render_histogram_buckets_are_cumulative_up_to_inf_equal_to_count(
    metrics: Metrics, redis_client: redis.Redis
) -> None:
    observed = [0.001, 0.005, 0.3, 0.3, 1.0, 7.0, 500.0]
    for value in observed:
        metrics.observe(LATENCY, value)
    metrics.flush()

    samples, _, _ = rendered(redis_client)

    buckets = [
        (dict(labels)["le"], v) for (n, labels), v in samples.items() if n.endswith("_bucket")
    ]
    assert [le for le, _ in buckets] == [*(f"{b:g}" for b in LATENCY_BUCKETS), "+Inf"]
    for le, value in buckets:  # le is inclusive: 0.005 and 1.0 count in their own bucket
        bound = math.inf if le == "+Inf" else float(le)
        assert value == sum(1 for v in observed if v <= bound), le
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert samples[(f"{LATENCY}_bucket", (("le", "+Inf"),))] == len(observed)
    assert samples[(f"{LATENCY}_count", ())] == len(observed)
    assert samples[(f"{LATENCY}_sum", ())] == pytest.approx(sum(observed))


def test_render_histogram_keeps_label_sets_apart(
    metrics: Metrics, redis_client: redis.Redis
) -> None:
    metrics.observe(STAGE, 0.002, {"stage": "decode"})
    metrics.observe(STAGE, 0.02, {"stage": "embed"})
    metrics.observe(STAGE, 0.03, {"stage": "embed"})
    metrics.flush()

    samples, _, _ = rendered(redis_client)

    assert samples[(f"{STAGE}_count", (("stage", "decode"),))] == 1
    assert samples[(f"{STAGE}_count", (("stage", "embed"),))] == 2
    assert samples[(f"{STAGE}_sum", (("stage", "embed"),))] == pytest.approx(0.05)
    assert samples[(f"{STAGE}_bucket", (("le", "0.025"), ("stage", "embed")))] == 1
    assert samples[(f"{STAGE}_bucket", (("le", "+Inf"), ("stage", "embed")))] == 2
    assert samples[(f"{STAGE}_bucket", (("le", "0.0025"), ("stage", "decode")))] == 1


def test_render_counters_with_sorted_labels(metrics: Metrics, redis_client: redis.Redis) -> None:
    metrics.inc(FINISHED, {"status": "succeeded", "reason": ""}, value=4)
    metrics.inc(FINISHED, {"status": "failed", "reason": "text_off"})
    metrics.inc("lookalike_requests_refused_total", {"status": "429"})
    metrics.flush()

    text = render(stored(redis_client), [])
    samples, _, _ = parse(text)

    assert 'lookalike_jobs_finished_total{reason="",status="succeeded"} 4.0\n' in text
    assert samples[(FINISHED, (("reason", "text_off"), ("status", "failed")))] == 1
    assert samples[("lookalike_requests_refused_total", (("status", "429"),))] == 1


def test_render_escapes_quotes_newlines_and_backslashes_in_labels(
    metrics: Metrics, redis_client: redis.Redis
) -> None:
    nasty = 'say "hi"\nC:\\path'
    metrics.inc(FINISHED, {"status": "failed", "reason": nasty})
    metrics.observe(STAGE, 0.1, {"stage": nasty})
    metrics.flush()

    text = render(stored(redis_client), [("lookalike_workers_ready", "Workers.", {"w": nasty}, 1)])
    samples, _, _ = parse(text)

    assert r'reason="say \"hi\"\nC:\\path"' in text
    reasons = [dict(labels).get("reason") for (name, labels) in samples if name == FINISHED]
    assert [unescape(r) for r in reasons if r is not None] == [nasty]
    stages = {
        unescape(dict(labels)["stage"]) for (name, labels) in samples if name.startswith(STAGE)
    }
    assert stages == {nasty}
    assert samples[("lookalike_workers_ready", (("w", r"say \"hi\"\nC:\\path"),))] == 1


def test_render_histogram_with_a_pipe_in_a_label_value(
    metrics: Metrics, redis_client: redis.Redis
) -> None:
    metrics.observe(STAGE, 0.1, {"stage": "a|b"})
    metrics.flush()

    samples, _, _ = rendered(redis_client)

    assert samples[(f"{STAGE}_bucket", (("le", "+Inf"), ("stage", "a|b")))] == 1


def test_render_gauges_have_help_and_type_once_per_name(redis_client: redis.Redis) -> None:
    gauges = [
        ("lookalike_workers_ready", "Workers whose heartbeat is fresh.", {}, 2),
        ("lookalike_queue_length", "Messages waiting.", {"queue": "search"}, 7),
        ("lookalike_queue_length", "Messages waiting.", {"queue": "build"}, 0),
    ]

    text = render({}, gauges)
    samples, types, helps = parse(text)

    assert helps.count("lookalike_queue_length") == 1
    assert helps.count("lookalike_workers_ready") == 1
    assert types["lookalike_queue_length"] == "gauge"
    assert samples[("lookalike_queue_length", (("queue", "search"),))] == 7
    assert samples[("lookalike_queue_length", (("queue", "build"),))] == 0
    assert samples[("lookalike_workers_ready", ())] == 2
    lines = text.splitlines()
    help_at = lines.index("# HELP lookalike_queue_length Messages waiting.")
    assert lines[help_at + 1] == "# TYPE lookalike_queue_length gauge"
    assert all(
        line.startswith("lookalike_queue_length{") for line in lines[help_at + 2 : help_at + 4]
    )


def test_read_stored_skips_values_that_are_not_numbers() -> None:
    raw: dict[bytes | str, bytes | str] = {
        b"lookalike_jobs_submitted_total": b"3",
        b"junk": b"not a number",
        "x_sum": "0.25",
    }

    assert read_stored(raw) == {"lookalike_jobs_submitted_total": 3.0, "x_sum": 0.25}


BEFORE = Path(__file__).with_name("metrics_before.prom")


def test_render_keeps_every_name_label_and_value_of_the_hand_written_exposition() -> None:
    """metrics_before.prom is what the hand-written renderer wrote for these counts (kept from
    before prometheus_client took over): every sample, with its labels and value, is still
    there, and every family keeps its type and help."""
    text = BEFORE.read_text()
    stored = {
        'lookalike_jobs_submitted_total{kind="image"}': 7.0,
        'lookalike_jobs_submitted_total{kind="text"}': 2.0,
        'lookalike_requests_refused_total{status="413"}': 1.0,
        'lookalike_requests_refused_total{status="429"}': 3.0,
        'lookalike_jobs_finished_total{reason="",status="succeeded"}': 8.0,
        'lookalike_jobs_finished_total{reason="bad_image",status="failed"}': 1.0,
        "lookalike_jobs_duplicate_total": 1.0,
        "lookalike_job_latency_seconds_bucket|0.025": 5.0,
        "lookalike_job_latency_seconds_bucket|+Inf": 1.0,
        "lookalike_job_latency_seconds_sum": 0.5,
        "lookalike_job_latency_seconds_count": 6.0,
        "lookalike_job_queue_wait_seconds_bucket|0.005": 6.0,
        "lookalike_job_queue_wait_seconds_sum": 0.01,
        "lookalike_job_queue_wait_seconds_count": 6.0,
        'lookalike_job_stage_seconds_bucket{stage="embed"}|0.01': 6.0,
        'lookalike_job_stage_seconds_sum{stage="embed"}': 0.03,
        'lookalike_job_stage_seconds_count{stage="embed"}': 6.0,
        'lookalike_job_stage_seconds_bucket{stage="decode"}|0.001': 6.0,
        'lookalike_job_stage_seconds_sum{stage="decode"}': 0.003,
        'lookalike_job_stage_seconds_count{stage="decode"}': 6.0,
        "lookalike_batch_size_bucket|4": 2.0,
        "lookalike_batch_size_sum": 7.0,
        "lookalike_batch_size_count": 2.0,
    }
    gauges = [
        ("lookalike_queue_length", "Jobs waiting in a broker queue.", {"queue": "lookalike"}, 3.0),
        (
            "lookalike_queue_length",
            "Jobs waiting in a broker queue.",
            {"queue": "lookalike.text"},
            0.0,
        ),
        ("lookalike_jobs_unfinished", "Jobs accepted and not yet ended.", {}, 4.0),
        (
            "lookalike_workers",
            "Workers with a recent heartbeat, by state.",
            {"state": "ready"},
            1.0,
        ),
    ]
    before, before_types, before_helps = parse(text)
    now, now_types, now_helps = parse(render(stored, gauges))

    assert {key: now.get(key) for key in before} == before
    assert {name: now_types.get(name) for name in before_types} == before_types
    assert set(before_helps) <= set(now_helps)
