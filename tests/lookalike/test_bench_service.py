"""The HTTP benchmark's plain parts, and its driver against a scripted service over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from lookalike.bench.http_lite import HttpClient, multipart
from lookalike.bench.service import (
    Outcome,
    bench_service,
    count_statuses,
    exit_code,
    format_summary,
    payloads_from_images,
    percentile,
    retry_after_seconds,
    run_bench,
    run_one,
    shares,
    summarise,
)
from lookalike.redis_server import free_port
from shared.errors import BenchAborted

TIMINGS = {"queue_wait_ms": 2.0, "decode_ms": 0.5, "embed_ms": 30.0, "search_ms": 0.2}


def result(**timings: float) -> dict[str, object]:
    return {
        "matches": [],
        "model": "random:vit-b-32",
        "model_is_random": True,
        "device": "cpu (int8-dynamic)",
        "worker": "w:1",
        "gallery": {"name": "fashion-mnist", "size": 2000},
        "timings": {**TIMINGS, "total_ms": 40.0, **timings},
    }


def succeeded(latency_s: float, *, embed_ms: float = 30.0, kind: str = "png-28x28") -> Outcome:
    return Outcome(
        kind=kind,
        submit_statuses=[202],
        accepted=True,
        job_status="succeeded",
        latency_s=latency_s,
        timings={**TIMINGS, "embed_ms": embed_ms},
        result_info={k: v for k, v in result().items() if k not in ("matches", "timings")},
    )


# --- percentiles -----------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0, 10, 50, 95, 99, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    values = list(np.random.default_rng(3).exponential(size=101))
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_none() -> None:
    assert percentile([], 50) is None


def test_percentile_of_one_value_is_that_value() -> None:
    assert percentile([7.0], 99) == 7.0


def test_percentile_ignores_input_order() -> None:
    assert percentile([4, 1, 3, 2], 50) == 2.5


# --- status counting and Retry-After ---------------------------------------------------------


def test_count_statuses_groups_by_class() -> None:
    codes = [202, 202, 429, 400, 413, 422, 500, 503, 302]
    assert count_statuses(codes) == {"202": 2, "429": 1, "4xx": 3, "5xx": 2, "other": 1}


def test_count_statuses_names_every_class_even_when_empty() -> None:
    assert count_statuses([]) == {"202": 0, "429": 0, "4xx": 0, "5xx": 0, "other": 0}


@pytest.mark.parametrize(("header", "seconds"), [("2", 2.0), ("0.5", 0.5), ("-3", 0.0)])
def test_retry_after_reads_seconds(header: str, seconds: float) -> None:
    assert retry_after_seconds(header) == seconds


def test_retry_after_reads_an_http_date() -> None:
    header = format_datetime(datetime.now(UTC) + timedelta(seconds=10), usegmt=True)
    assert 8 <= retry_after_seconds(header) <= 10


@pytest.mark.parametrize("header", [None, "", "soon"])
def test_retry_after_falls_back_to_the_default(header: str | None) -> None:
    assert retry_after_seconds(header, default=1.5) == 1.5


# --- summary ---------------------------------------------------------------------------------


def test_summarise_counts_every_ending() -> None:
    outcomes = [
        succeeded(0.040, embed_ms=30),
        succeeded(0.060, embed_ms=50, kind="jpeg-640x480"),
        Outcome(kind="png-28x28", submit_statuses=[429, 429, 202], accepted=True,
                job_status="failed", latency_s=0.1, error="job failed: boom"),
        Outcome(kind="png-28x28", submit_statuses=[202], accepted=True, error="timeout"),
        Outcome(kind="png-28x28", submit_statuses=[503], error="submit: 503 down"),
        Outcome(kind="png-28x28", connection_errors=1, error="submit: ConnectError"),
    ]  # fmt: skip
    summary = summarise(outcomes, wall_s=2.0, url="http://x", concurrency=4, warmup=1)
    assert summary["requests"] == 6
    assert summary["accepted"] == 4
    assert summary["succeeded"] == 2
    assert summary["failed"] == 1
    assert summary["never_ended"] == 1
    assert summary["not_accepted"] == 2
    assert summary["connection_errors"] == 1
    assert summary["retries_after_429"] == 2
    assert summary["submit_status_counts"] == {"202": 4, "429": 2, "4xx": 0, "5xx": 1, "other": 0}
    assert summary["submit_status_codes"] == {"202": 4, "429": 2, "503": 1}
    assert summary["throughput_jobs_per_s"] == pytest.approx(1.0)
    assert summary["latency_ms"]["p50"] == pytest.approx(50.0)
    assert summary["server_ms"]["embed_ms"]["p50"] == pytest.approx(40.0)
    assert set(summary["latency_ms_by_kind"]) == {"png-28x28", "jpeg-640x480"}
    assert summary["service"]["model_is_random"] is True
    assert exit_code(summary) == 1
    json.dumps(summary)  # what --json writes


def test_exit_code_is_zero_only_when_every_request_succeeded() -> None:
    ok = summarise([succeeded(0.05)] * 3, wall_s=1.0, url="u", concurrency=1, warmup=0)
    assert exit_code(ok) == 0
    empty = summarise([], wall_s=0.0, url="u", concurrency=1, warmup=0)
    assert exit_code(empty) == 1


def test_format_summary_prints_the_figures_and_the_random_warning() -> None:
    summary = summarise([succeeded(0.05)], wall_s=1.0, url="u", concurrency=1, warmup=1)
    text = format_summary(summary)
    for needle in ("p50 50.0 ms", "p95", "p99", "jobs/s", "queue_wait", "embed", "search",
                   "202: 1", "429: 0", "4xx: 0", "5xx: 0", "connection errors: 0",
                   "never ended 0", "compute only"):  # fmt: skip
        assert needle in text


# --- payloads --------------------------------------------------------------------------------


def test_payloads_are_a_png_and_two_jpeg_photos_per_image() -> None:
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    payloads = payloads_from_images(images)
    assert [p.kind for p in payloads[:3]] == ["png-28x28", "jpeg-640x480", "jpeg-1600x1200"]
    assert len(payloads) == 6
    sizes = [Image.open(io.BytesIO(p.data)).size for p in payloads[:3]]
    assert sizes == [(28, 28), (640, 480), (1600, 1200)]


def test_the_http_driver_does_not_import_torch() -> None:
    import subprocess

    code = "import lookalike.bench.service, sys; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


# --- the driver, against a scripted service over real HTTP -----------------------------------


class ScriptedService:
    """Answers 429 (Retry-After: 0) to the first three submissions, then 202; finishes each
    job on its first long poll, or in a submission that waits (200) when ``ends_in_submission``;
    jobs whose upload is a PNG fail. Served by a real uvicorn."""

    def __init__(self, *, ends_in_submission: bool = False) -> None:
        self.submissions = 0
        self.jobs: dict[str, bool] = {}
        self.waits: list[float] = []
        self.submit_waits: list[float] = []
        self.ends_in_submission = ends_in_submission

    def ended(self, job_id: str) -> JSONResponse:
        if self.jobs[job_id]:
            return JSONResponse({"id": job_id, "status": "failed", "error": "no"})
        return JSONResponse({"id": job_id, "status": "succeeded", "result": result()})

    def app(self) -> Starlette:
        async def submit(request: Request) -> JSONResponse:
            self.submissions += 1
            if self.submissions <= 3:
                return JSONResponse({"detail": "full"}, 429, headers={"Retry-After": "0"})
            body = await request.body()  # (read before numbering: requests interleave here)
            job_id = f"job{len(self.jobs)}"
            self.jobs[job_id] = b"image/png" in body
            if "wait" in request.query_params:
                self.submit_waits.append(float(request.query_params["wait"]))
                if self.ends_in_submission:
                    return self.ended(job_id)
            return JSONResponse({"id": job_id, "status": "queued"}, 202)

        async def poll(request: Request) -> JSONResponse:
            self.waits.append(float(request.query_params["wait"]))
            return self.ended(request.path_params["job_id"])

        return Starlette(
            routes=[
                Route("/jobs", submit, methods=["POST"]),
                Route("/jobs/{job_id}", poll, methods=["GET"]),
            ]
        )


@contextlib.contextmanager
def serving(app: Starlette) -> Iterator[str]:
    """``app`` on a free port of 127.0.0.1, in a thread; yields its URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_keep_alive=1)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_run_bench_retries_429_and_waits_with_the_long_poll() -> None:
    payloads = payloads_from_images(np.zeros((1, 28, 28), dtype=np.uint8))
    service = ScriptedService()
    with serving(service.app()) as url:
        warm, outcomes, wall_s = asyncio.run(
            run_bench(url, payloads, requests=6, concurrency=3, timeout_s=10, warmup=0)
        )
    assert warm == [] and len(outcomes) == 6 and wall_s > 0
    assert all(o.accepted and o.submit_statuses[-1] == 202 for o in outcomes)
    assert [o.kind for o in outcomes] == [p.kind for p in payloads] * 2
    summary = summarise(outcomes, wall_s=wall_s, url="u", concurrency=3, warmup=0)
    assert summary["retries_after_429"] == 3
    assert summary["submit_status_counts"]["429"] == 3
    assert summary["failed"] == 2  # the PNGs
    assert summary["succeeded"] == 4
    assert summary["server_ms"]["embed_ms"]["p50"] == TIMINGS["embed_ms"]
    assert len(service.waits) == 6 and all(0 < w <= 10 for w in service.waits)
    assert service.submit_waits == []  # submitted, then long-polled
    assert exit_code(summary) == 1


@pytest.mark.parametrize("ends_in_submission", [True, False])
def test_run_bench_with_submit_wait_makes_one_request_a_job_when_the_answer_comes_in_it(
    ends_in_submission: bool,
) -> None:
    payloads = payloads_from_images(np.zeros((1, 28, 28), dtype=np.uint8))
    service = ScriptedService(ends_in_submission=ends_in_submission)
    service.submissions = 3  # no 429s
    with serving(service.app()) as url:
        _, outcomes, wall_s = asyncio.run(
            run_bench(
                url, payloads, requests=6, concurrency=3, timeout_s=10, warmup=0, submit_wait_s=7
            )
        )
    summary = summarise(outcomes, wall_s=wall_s, url="u", concurrency=3, warmup=0)
    assert (summary["succeeded"], summary["failed"]) == (4, 2)
    assert service.submit_waits == [7.0] * 6
    assert len(service.waits) == (0 if ends_in_submission else 6)  # long polls only if needed


@pytest.mark.parametrize("concurrency", [1, 4])
def test_run_bench_reuses_connections_the_server_closed_while_idle(concurrency: int) -> None:
    """After a pause the server closes every idle connection at once: a request that finds
    its pooled connection closed tries again on a new one, not on another stale one."""
    payloads = payloads_from_images(np.zeros((1, 28, 28), dtype=np.uint8))
    service = ScriptedService()
    service.submissions = 3  # no 429s

    async def twice() -> list[Outcome]:
        client = HttpClient(url, limit=concurrency + 4)
        client_outcomes = []
        try:
            for _ in range(2):
                client_outcomes += await asyncio.gather(
                    *(run_one(client, payloads[i % 3], timeout_s=10) for i in range(concurrency))
                )
                await asyncio.sleep(1.5)  # past the server's keep-alive: it closes them all
        finally:
            await client.close()
        return client_outcomes

    with serving(service.app()) as url:
        outcomes = asyncio.run(twice())
    assert len(outcomes) == 2 * concurrency
    assert all(o.accepted and o.connection_errors == 0 for o in outcomes)


def test_bench_spread_over_processes_is_summarised_as_one_run(fake_data_dir: Path) -> None:
    service = ScriptedService()
    service.submissions = 3  # no 429s
    with serving(service.app()) as url:
        summary = bench_service(
            url,
            requests=12,
            concurrency=4,
            timeout_s=10,
            warmup=1,
            data_dir=fake_data_dir,
            processes=2,
        )
    assert summary["processes"] == 2
    assert summary["requests"] == 12
    assert summary["succeeded"] + summary["failed"] == 12
    assert summary["failed"] == 4  # the PNGs: one payload in three, as in a single process
    assert summary["throughput_jobs_per_s"] > 0
    assert len(service.jobs) == 13  # and the warm-up


def test_shares_split_a_total_as_evenly_as_whole_numbers_allow() -> None:
    assert shares(10, 3) == [4, 3, 3]
    assert shares(2, 4) == [1, 1, 0, 0]


def test_multipart_body_carries_the_file_and_its_type() -> None:
    body, content_type = multipart("file", "a.png", "image/png", b"\x89PNG-bytes")
    boundary = content_type.split("boundary=")[1]

    assert content_type.startswith("multipart/form-data; boundary=")
    assert body.startswith(f"--{boundary}\r\n".encode())
    assert b'name="file"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n\x89PNG-bytes' in body
    assert body.endswith(f"\r\n--{boundary}--\r\n".encode())


def test_run_bench_stops_when_the_warm_up_cannot_connect() -> None:
    payloads = payloads_from_images(np.zeros((1, 28, 28), dtype=np.uint8))
    with pytest.raises(BenchAborted, match="warm-up"):
        asyncio.run(
            run_bench(
                f"http://127.0.0.1:{free_port()}",
                payloads,
                requests=5,
                concurrency=2,
                timeout_s=5,
            )
        )


def test_run_bench_counts_connection_errors_when_timed() -> None:
    payloads = payloads_from_images(np.zeros((1, 28, 28), dtype=np.uint8))
    _, outcomes, wall_s = asyncio.run(
        run_bench(
            f"http://127.0.0.1:{free_port()}",  # nothing listens there
            payloads,
            requests=4,
            concurrency=2,
            timeout_s=5,
            warmup=0,
        )
    )
    summary = summarise(outcomes, wall_s=wall_s, url="u", concurrency=2, warmup=0)
    assert summary["connection_errors"] == 4
    assert summary["not_accepted"] == 4
    assert summary["errors"] == {"submit: ConnectError": 4}
    assert exit_code(summary) == 1
