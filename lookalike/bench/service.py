"""``lookalike bench``: drive a running service over HTTP the way real clients do.

Each request uploads real image bytes (a gallery image as a PNG, or the same image upscaled
into a 640x480 or 1600x1200 JPEG, like a phone photo) and waits for the job's end in the same
request (``POST /jobs?wait=30``), then with the long poll (``GET /jobs/<id>?wait=30``) if it
has not come (``--submit-wait 0``: always). End-to-end latency runs from the first byte of the
first submission to the answer that carries the job's end, so the wait after a 429 counts.

Light on purpose (Pillow, numpy and lookalike.bench.http_lite, a lean HTTP client): no torch, and
little CPU per request, so it can run next to the service it measures.
"""

from __future__ import annotations

import asyncio
import io
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from lookalike.bench.http_lite import HttpClient, Reply, multipart
from shared.errors import BenchAborted, HttpError
from shared.fashion_mnist import load_gallery

POLL_WAIT_S = 30.0
REQUEST_TIMEOUT_S = POLL_WAIT_S + 30.0  # a long poll holds its connection up to POLL_WAIT_S
STATUS_CLASSES = ("202", "429", "4xx", "5xx", "other")
TIMING_KEYS = ("queue_wait_ms", "decode_ms", "embed_ms", "search_ms", "total_ms")
PHOTO_SIZES = ((640, 480), (1600, 1200))
DEFAULT_RETRY_AFTER_S = 1.0
POLL_RETRY_S = 0.5


@dataclass(frozen=True)
class Payload:
    """One upload: its bytes and what kind of picture they are (``png-28x28``...), with the
    multipart body that carries it, built once."""

    kind: str
    filename: str
    content_type: str
    data: bytes

    @cached_property
    def encoded(self) -> tuple[bytes, str]:
        return multipart("file", self.filename, self.content_type, self.data)

    @property
    def body(self) -> bytes:
        return self.encoded[0]

    @property
    def body_type(self) -> str:
        return self.encoded[1]


@dataclass
class Outcome:
    """What happened to one request, from its first submission to its end (or not)."""

    kind: str
    submit_statuses: list[int] = field(default_factory=list)
    connection_errors: int = 0
    poll_errors: int = 0
    accepted: bool = False
    job_status: str | None = None  # "succeeded", "failed", or None: never ended / not accepted
    latency_s: float | None = None
    timings: dict[str, float] | None = None
    server_batch: int | None = None  # jobs embedded in the same forward pass, when said
    result_info: dict[str, Any] | None = None
    error: str | None = None


# --- payloads --------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=90)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def payloads_from_images(images: npt.NDArray[np.uint8]) -> list[Payload]:
    """Every gallery image as a PNG and as JPEG "photos" of each size in ``PHOTO_SIZES``."""
    payloads = []
    for number, pixels in enumerate(images):
        grey = Image.fromarray(np.ascontiguousarray(pixels), mode="L")
        height, width = pixels.shape[:2]
        payloads.append(
            Payload(f"png-{width}x{height}", f"g{number}.png", "image/png", _encode(grey, "PNG"))
        )
        for size in PHOTO_SIZES:
            photo = grey.convert("RGB").resize(size, Image.Resampling.BICUBIC)
            kind = f"jpeg-{size[0]}x{size[1]}"
            payloads.append(
                Payload(kind, f"g{number}-{kind}.jpg", "image/jpeg", _encode(photo, "JPEG"))
            )
    return payloads


def make_payloads(data_dir: Path | None, *, count: int = 8) -> list[Payload]:
    """Payloads made in memory from the first ``count`` gallery images (``3 * count``)."""
    return payloads_from_images(load_gallery(data_dir, size=count).images)


# --- pure helpers ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100), numpy's linear interpolation; None for no values."""
    return float(np.percentile(values, q)) if len(values) else None


def status_class(code: int) -> str:
    if code in (202, 429):
        return str(code)
    if 400 <= code < 500:
        return "4xx"
    if 500 <= code < 600:
        return "5xx"
    return "other"


def count_statuses(codes: Iterable[int]) -> dict[str, int]:
    """Submission answers by class: 202, 429, other 4xx, 5xx, anything else."""
    counts = Counter(status_class(code) for code in codes)
    return {name: counts.get(name, 0) for name in STATUS_CLASSES}


def retry_after_seconds(header: str | None, *, default: float = DEFAULT_RETRY_AFTER_S) -> float:
    """Seconds to wait from a ``Retry-After`` header: a number of seconds or an HTTP date."""
    if header is None or not header.strip():
        return default
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return default
    return max(0.0, when.timestamp() - time.time())


def _spread(values: Sequence[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95)}


def _ms(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "mean": sum(values) / len(values) if values else None,
        "max": max(values) if values else None,
    }


def summarise(
    outcomes: Sequence[Outcome],
    *,
    wall_s: float,
    url: str,
    concurrency: int,
    warmup: int,
) -> dict[str, Any]:
    """Everything the run measured, as the JSON written by ``--json``."""
    accepted = [o for o in outcomes if o.accepted]
    succeeded = [o for o in accepted if o.job_status == "succeeded"]
    latencies_ms = [o.latency_s * 1000 for o in succeeded if o.latency_s is not None]
    statuses = [code for o in outcomes for code in o.submit_statuses]
    by_kind: dict[str, list[float]] = {}
    for o in succeeded:
        if o.latency_s is not None:
            by_kind.setdefault(o.kind, []).append(o.latency_s * 1000)
    server = {
        key: _spread([o.timings[key] for o in succeeded if o.timings and key in o.timings])
        for key in TIMING_KEYS
    }
    batches = [float(o.server_batch) for o in succeeded if o.server_batch is not None]
    info = next((o.result_info for o in succeeded if o.result_info), None)
    errors = Counter(o.error for o in outcomes if o.error)
    return {
        "kind": "http",
        "url": url,
        "requests": len(outcomes),
        "concurrency": concurrency,
        "warmup": warmup,
        "wall_s": wall_s,
        "throughput_jobs_per_s": len(succeeded) / wall_s if wall_s > 0 else None,
        "latency_ms": _ms(latencies_ms),
        "latency_ms_by_kind": {kind: _spread(v) for kind, v in sorted(by_kind.items())},
        "server_ms": server,
        "server_batch_size": _spread(batches) | {"max": max(batches) if batches else None},
        "submit_status_counts": count_statuses(statuses),
        "submit_status_codes": {str(c): n for c, n in sorted(Counter(statuses).items())},
        "retries_after_429": sum(o.submit_statuses.count(429) for o in accepted),
        "connection_errors": sum(o.connection_errors for o in outcomes),
        "poll_errors": sum(o.poll_errors for o in outcomes),
        "accepted": len(accepted),
        "not_accepted": len(outcomes) - len(accepted),
        "succeeded": len(succeeded),
        "failed": sum(o.job_status == "failed" for o in accepted),
        "never_ended": sum(o.job_status is None for o in accepted),
        "errors": dict(errors.most_common(10)),
        "service": info,
        "load_average": list(os.getloadavg()),
    }


def exit_code(summary: dict[str, Any]) -> int:
    """0 when every request was accepted and every accepted job succeeded, 1 otherwise."""
    ok = summary["requests"] > 0 and summary["succeeded"] == summary["requests"]
    return 0 if ok else 1


def format_summary(summary: dict[str, Any]) -> str:
    """The human report of :func:`summarise`'s dict."""

    def f(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lat = summary["latency_ms"]
    counts = summary["submit_status_counts"]
    lines = [
        f"{summary['requests']} requests at concurrency {summary['concurrency']} to "
        f"{summary['url']} in {summary['wall_s']:.1f}s "
        f"(after {summary['warmup']} warm-up request(s); "
        + (
            f"each submission waits up to {summary['submit_wait_s']:g}s for its job's end)"
            if summary.get("submit_wait_s")
            else "each job submitted, then long-polled)"
        ),
        f"throughput   {f(summary['throughput_jobs_per_s'], 2)} jobs/s",
        f"end-to-end   p50 {f(lat['p50'])} ms   p95 {f(lat['p95'])} ms   "
        f"p99 {f(lat['p99'])} ms   max {f(lat['max'])} ms",
    ]
    for kind, spread in summary["latency_ms_by_kind"].items():
        lines.append(f"  {kind:<16} p50 {f(spread['p50'])} ms   p95 {f(spread['p95'])} ms")
    lines.append("server split (from each result's timings):")
    for key in ("queue_wait_ms", "decode_ms", "embed_ms", "search_ms"):
        spread = summary["server_ms"][key]
        name = key.removesuffix("_ms")
        lines.append(f"  {name:<16} p50 {f(spread['p50'])} ms   p95 {f(spread['p95'])} ms")
    batch = summary["server_batch_size"]
    if batch["p50"] is not None:
        lines.append(
            f"  {'batch (jobs)':<16} p50 {f(batch['p50'], 0)}   p95 {f(batch['p95'], 0)}   "
            f"max {f(batch['max'], 0)}"
        )
    lines += [
        "submissions  " + "   ".join(f"{name}: {counts[name]}" for name in STATUS_CLASSES),
        f"retried after 429: {summary['retries_after_429']}   "
        f"connection errors: {summary['connection_errors']}   "
        f"poll errors: {summary['poll_errors']}",
        f"jobs         accepted {summary['accepted']}   succeeded {summary['succeeded']}   "
        f"failed {summary['failed']}   never ended {summary['never_ended']}   "
        f"not accepted {summary['not_accepted']}",
    ]
    for error, count in summary["errors"].items():
        lines.append(f"  {count} x {error}")
    service = summary["service"]
    if service:
        lines.append(
            f"service      model {service['model']} on {service['device']}, "
            f"gallery {service['gallery']['name']} ({service['gallery']['size']} images)"
        )
        if service["model_is_random"]:
            lines.append(
                "note: the service runs a random model: these figures are for compute only"
            )
    load = ", ".join(f"{x:.2f}" for x in summary["load_average"])
    lines.append(f"load average at the end: {load} ({os.cpu_count()} CPUs)")
    return "\n".join(lines)


# --- the driver ------------------------------------------------------------------------------


async def _submit(
    client: HttpClient, payload: Payload, outcome: Outcome, deadline: float, wait_s: float
) -> dict[str, Any] | None:
    """POST the image until accepted (``?wait``: the answer carries the job's end if it comes
    within ``wait_s``); wait out each 429's Retry-After. The job, or None."""
    path = f"/jobs?wait={wait_s:g}" if wait_s > 0 else "/jobs"
    while True:
        try:
            reply = await client.request(
                "POST",
                path,
                body=payload.body,
                content_type=payload.body_type,
                timeout=REQUEST_TIMEOUT_S,
            )
        except HttpError as error:
            outcome.connection_errors += 1
            outcome.error = f"submit: {_error_name(error)}"
            return None
        outcome.submit_statuses.append(reply.status)
        if reply.status in (200, 202):  # ended within the wait, or accepted
            outcome.accepted = True
            job: dict[str, Any] = reply.json()
            return job
        if reply.status != 429:
            outcome.error = f"submit: {reply.status} {_detail(reply)}"
            return None
        pause = retry_after_seconds(reply.headers.get("retry-after"))
        if time.monotonic() + pause > deadline:
            outcome.error = "submit: still 429 at the deadline"
            return None
        await asyncio.sleep(pause)


async def _wait(
    client: HttpClient, job: dict[str, Any], outcome: Outcome, deadline: float
) -> dict[str, Any] | None:
    """Long-poll the job until it ends or the deadline passes. The ended job, or None."""
    while job["status"] not in ("succeeded", "failed"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            outcome.error = "the job did not end before --timeout"
            return None
        wait = f"{min(POLL_WAIT_S, remaining):.1f}"
        try:
            reply = await client.request(
                "GET", f"/jobs/{job['id']}?wait={wait}", timeout=REQUEST_TIMEOUT_S
            )
        except HttpError as error:
            outcome.poll_errors += 1
            outcome.error = f"poll: {_error_name(error)}"
            await asyncio.sleep(POLL_RETRY_S)
            continue
        if reply.status != 200:
            outcome.poll_errors += 1
            outcome.error = f"poll: {reply.status} {_detail(reply)}"
            await asyncio.sleep(POLL_RETRY_S)
            continue
        job = reply.json()
    return job


async def run_one(
    client: HttpClient, payload: Payload, *, timeout_s: float, submit_wait_s: float = 0.0
) -> Outcome:
    """One client's request: submit (waiting up to ``submit_wait_s`` for the end in the same
    request), long-poll to the end if it has not come, record what was seen."""
    outcome = Outcome(kind=payload.kind)
    started = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    job = await _submit(client, payload, outcome, deadline, min(submit_wait_s, POLL_WAIT_S))
    if job is None:
        return outcome
    ended = await _wait(client, job, outcome, deadline)
    if ended is None:
        return outcome
    outcome.latency_s = time.perf_counter() - started
    outcome.job_status = ended["status"]
    outcome.error = None
    if ended["status"] == "failed":
        outcome.error = f"job failed: {ended.get('error')}"
    result = ended.get("result")
    if result:
        outcome.timings = {k: float(v) for k, v in result["timings"].items()}
        if "batch_size" in result:
            outcome.server_batch = int(result["batch_size"])
        outcome.result_info = {
            k: result[k] for k in ("model", "model_is_random", "device", "gallery")
        }
    return outcome


def _error_name(error: HttpError) -> str:
    return str(error).split(":", 1)[0]


def _detail(reply: Reply) -> str:
    try:
        return str(reply.json().get("detail", reply.body.decode(errors="replace")))[:200]
    except (ValueError, AttributeError):
        return reply.body.decode(errors="replace")[:200]


async def run_bench(
    url: str,
    payloads: Sequence[Payload],
    *,
    requests: int,
    concurrency: int,
    timeout_s: float,
    warmup: int = 1,
    api_key: str | None = None,
    start_at: float | None = None,
    offset: int = 0,
    submit_wait_s: float = 0.0,
) -> tuple[list[Outcome], list[Outcome], float]:
    """Warm up, then ``requests`` requests, at most ``concurrency`` at a time (from
    ``start_at``, a ``time.time()``, when given: processes started apart begin together).

    Returns the warm-up outcomes, the timed outcomes and the timed wall time in seconds.
    """
    if not payloads:
        raise ValueError("no payloads to send")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = HttpClient(url, limit=concurrency + 4, headers=headers)
    try:
        warm = [
            await run_one(
                client,
                payloads[i % len(payloads)],
                timeout_s=timeout_s,
                submit_wait_s=submit_wait_s,
            )
            for i in range(warmup)
        ]
        unreachable = [o for o in warm if o.connection_errors and not o.accepted]
        if unreachable:
            raise BenchAborted(f"the warm-up request to {url} failed ({unreachable[0].error})")
        gate = asyncio.Semaphore(concurrency)

        async def gated(i: int) -> Outcome:
            async with gate:
                payload = payloads[(offset + i) % len(payloads)]
                return await run_one(
                    client, payload, timeout_s=timeout_s, submit_wait_s=submit_wait_s
                )

        if start_at is not None:
            await asyncio.sleep(max(0.0, start_at - time.time()))
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(gated(i) for i in range(requests)))
        wall_s = time.perf_counter() - started
    finally:
        await client.close()
    return warm, list(outcomes), wall_s


def _bench_part(arguments: dict[str, Any]) -> tuple[list[Outcome], float]:
    """One process's share of a ``--processes`` run: its outcomes and its wall time."""
    _, outcomes, wall_s = asyncio.run(run_bench(**arguments))
    return outcomes, wall_s


def shares(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal whole shares, largest first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def bench_service(
    url: str,
    *,
    requests: int,
    concurrency: int,
    timeout_s: float,
    warmup: int,
    data_dir: Path | None,
    api_key: str | None = None,
    processes: int = 1,
    submit_wait_s: float = 0.0,
) -> dict[str, Any]:
    """Run the HTTP benchmark and return its summary; :class:`BenchAborted` when the warm-up
    cannot reach the service.

    With ``processes`` > 1 the requests and the concurrency are shared among that many
    processes (each with its own event loop and connections) that start together after the
    warm-up; their outcomes are summarised as one run. One process's event loop tops out at
    about a thousand requests a second: past that, it would be the bottleneck it measures.

    With ``submit_wait_s`` each job is one request (``POST /jobs?wait=``) unless it outlasts
    the wait; without, two (the submission, then a long poll).
    """
    payloads = make_payloads(data_dir)
    if processes <= 1:
        _, outcomes, wall_s = asyncio.run(
            run_bench(
                url,
                payloads,
                requests=requests,
                concurrency=concurrency,
                timeout_s=timeout_s,
                warmup=warmup,
                api_key=api_key,
                submit_wait_s=submit_wait_s,
            )
        )
        summary = summarise(
            outcomes, wall_s=wall_s, url=url, concurrency=concurrency, warmup=warmup
        )
        summary["submit_wait_s"] = submit_wait_s
        return summary
    if warmup:
        asyncio.run(
            run_bench(
                url,
                payloads,
                requests=0,
                concurrency=1,
                timeout_s=timeout_s,
                warmup=warmup,
                api_key=api_key,
                submit_wait_s=submit_wait_s,
            )
        )
    start_at = time.time() + 1.0 + 0.05 * processes  # every process is up by then
    counts, gates = shares(requests, processes), shares(concurrency, processes)
    parts: list[dict[str, Any]] = [
        {
            "url": url,
            "payloads": payloads,
            "requests": counts[i],
            "concurrency": gates[i],
            "timeout_s": timeout_s,
            "warmup": 0,
            "api_key": api_key,
            "start_at": start_at,
            "offset": sum(counts[:i]),
            "submit_wait_s": submit_wait_s,
        }
        for i in range(processes)
        if counts[i] and gates[i]
    ]
    context = multiprocessing.get_context("spawn")  # a clean interpreter: no inherited loop
    with context.Pool(len(parts)) as pool:
        results = pool.map(_bench_part, parts)
    outcomes = [outcome for part, _ in results for outcome in part]
    wall_s = max(wall for _, wall in results)
    summary = summarise(outcomes, wall_s=wall_s, url=url, concurrency=concurrency, warmup=warmup)
    summary["processes"] = len(parts)
    summary["submit_wait_s"] = submit_wait_s
    return summary
