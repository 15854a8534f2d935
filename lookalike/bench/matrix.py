"""Service figures for docs/benchmarks.md: one fresh service per configuration, driven by
``lookalike bench`` over HTTP.

    .venv/bin/python -m lookalike.bench.matrix overhead batching scaling load
    .venv/bin/python -m lookalike.bench.matrix startup    # needs the 70,000-image index built
    .venv/bin/python -m lookalike.bench.matrix build      # distributed index builds
    .venv/bin/python -m lookalike.bench.matrix cpu        # the stack's CPU per job
    BENCH_API_PROCESSES=4 BENCH_REQUESTS=2000 .venv/bin/python -m lookalike.bench.matrix cpu
    BENCH_CHECKOUT=/tmp/base BENCH_CLI=shared.cli .venv/bin/python -m lookalike.bench.matrix cpu

Each configuration starts its own Redis, N ``lookalike worker`` processes and ``lookalike api``
(``lookalike.stack.Stack``, the stack the end-to-end tests start) with the settings below,
runs the bench, prints a markdown row and stops everything. The model is a randomly initialised
CLIP of ViT-B/32's exact shape, saved with ``save_pretrained`` in ``$BENCH_HOME/clip-b32`` and
loaded from there like any local checkpoint (its matches mean nothing; its compute and its
loading are the real model's). An index is built first if missing. ``BENCH_SUBMIT_WAIT=0``
has the bench submit each job, then long-poll it (two requests a job, as before
``POST /jobs?wait``), for figures comparable with earlier ones. ``cpu`` measures another
checkout with ``BENCH_CHECKOUT`` (a ``git worktree`` of an older commit) and ``BENCH_CLI`` (its
command module: ``shared.cli`` before the ``lookalike`` package), its service and its bench
client driven and measured exactly as this one's.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from lookalike.checkpoint import save_random_clip
from lookalike.stack import ROOT, Stack

HOME = Path(os.environ.get("BENCH_HOME", "/tmp/lookalike-bench"))
CHECKPOINT = HOME / "clip-b32"
TINY_CHECKPOINT = HOME / "clip-tiny"
BASE = {
    "LOOKALIKE_MODEL": os.environ.get("LOOKALIKE_MODEL", str(CHECKPOINT)),
    "LOOKALIKE_GALLERY_SIZE": os.environ.get("LOOKALIKE_GALLERY_SIZE", "2000"),
    "LOOKALIKE_INDEX_DIR": str(HOME / "index"),
    "LOOKALIKE_MAX_QUEUED": "100000",
}

# name: (workers, extra settings, requests, concurrency)
CONFIGS: dict[str, list[tuple[str, int, dict[str, str], int, int]]] = {
    "overhead": [("batching on, c=1", 1, {}, 200, 1)],
    "batching": [
        ("batching off (WORKER_BATCH=1), c=32", 1, {"LOOKALIKE_WORKER_BATCH": "1"}, 400, 32),
        ("batching on (WORKER_BATCH=16), c=32", 1, {"LOOKALIKE_WORKER_BATCH": "16"}, 400, 32),
        ("batching off, c=1", 1, {"LOOKALIKE_WORKER_BATCH": "1"}, 200, 1),
    ],
    "scaling": [
        ("1 worker, 1 thread, c=16", 1, {"LOOKALIKE_THREADS": "1"}, 400, 16),
        ("2 workers, 1 thread each, c=16", 2, {"LOOKALIKE_THREADS": "1"}, 400, 16),
    ],
    "load": [
        (
            "load: cap 50 waiting jobs, c=50",
            2,
            {"LOOKALIKE_MAX_QUEUED": "50", "LOOKALIKE_THREADS": "1"},
            2000,
            50,
        )
    ],
}


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, **BASE, **extra, "PYTHONUNBUFFERED": "1"}


def ensure_checkpoint() -> None:
    """A random CLIP of ViT-B/32's shape, with processor and tokenizer, saved like a hub one."""
    if BASE["LOOKALIKE_MODEL"] == str(CHECKPOINT) and not (CHECKPOINT / "config.json").exists():
        save_random_clip(CHECKPOINT, shape="vit-b-32")


def bench(
    stack: Stack, *, requests: int, concurrency: int, out: Path, warmup: int = 5
) -> dict[str, Any]:
    """``lookalike bench`` against the stack's API; its JSON figures."""
    submit_wait = os.environ.get("BENCH_SUBMIT_WAIT")
    stack.run_cli(
        "bench",
        *(("--submit-wait", submit_wait) if submit_wait else ()),
        "--url",
        stack.url,
        "--requests",
        str(requests),
        "--concurrency",
        str(concurrency),
        "--warmup",
        str(warmup),
        "--json",
        str(out),
        timeout=3600,
    )
    figures: dict[str, Any] = json.loads(out.read_text())
    return figures


def run_config(
    workers: int, extra: dict[str, str], requests: int, concurrency: int
) -> dict[str, Any]:
    env = environment(**extra)
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(env=env, workdir=Path(tmp))
        built = stack.run_cli("index", "build", "--no-progress", timeout=3600)
        if built.returncode:
            raise SystemExit(f"index build failed:\n{built.stderr}")
        stack.start(workers=workers)
        try:
            return bench(stack, requests=requests, concurrency=concurrency, out=Path(tmp) / "b")
        finally:
            stack.stop()


def row(name: str, s: dict[str, Any]) -> str:
    lat, server = s["latency_ms"], s["server_ms"]
    codes = ", ".join(f"{k}: {v}" for k, v in s["submit_status_codes"].items())
    return (
        f"| {name} | {s['requests']} | {s['throughput_jobs_per_s']:.1f} | "
        f"{lat['p50']:.1f} / {lat['p95']:.1f} / {lat['p99']:.1f} | "
        f"{server['embed_ms']['p50']:.1f} | {server['search_ms']['p50']:.2f} | "
        f"{server['queue_wait_ms']['p50']:.1f} | {s['server_batch_size'].get('p50') or 1:.0f} | "
        f"{codes} | {s['connection_errors']} | {s['succeeded']}/{s['accepted']} | "
        f"{s['load_average'][0]:.2f} |"
    )


def startup(repeats: int = 3) -> None:
    """Worker start to /readyz ready, with the 70,000-image index (built beforehand)."""
    print("| worker start, 70,000-image index | to /readyz ready (s) | loading (s) | precision |")
    print("| --- | --- | --- | --- |")
    for run in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            stack = Stack(env=environment(LOOKALIKE_GALLERY_SIZE="70000"), workdir=Path(tmp))
            stack.start(workers=0)
            try:
                started = time.monotonic()
                stack.start_worker()
                stack.wait_ready(workers=1, timeout=120)
                ready_s = time.monotonic() - started
                worker = httpx.get(f"{stack.url}/readyz").json()["workers"][0]
                print(
                    f"| run {run + 1} | {ready_s:.2f} | {worker['load_seconds']:.2f} | "
                    f"{worker['precision']} |",
                    flush=True,
                )
            finally:
                stack.stop()


def build(size: int = 4096) -> None:
    """Index builds of ``size`` images: here, and spread over 1 and 2 workers (1 thread each)."""
    root = HOME / "build-bench"
    print(f"| build of {size} images | seconds | images/s |")
    print("| --- | --- | --- |")
    args = ("index", "build", "--size", str(size), "--force", "--no-progress")
    with tempfile.TemporaryDirectory() as tmp:
        here = Stack(env=environment(LOOKALIKE_INDEX_DIR=str(root / "local")), workdir=Path(tmp))
        local = here.run_cli(*args, timeout=3600)
    print(f"| here, one process, 2 threads | {_build_figures(local.stdout)} |", flush=True)
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            stack = Stack(env=environment(LOOKALIKE_THREADS="1"), workdir=Path(tmp))
            stack.start(workers=workers, api=False)
            try:
                target = str(root / f"dist{workers}")
                done = stack.run_cli(
                    *args, "--distributed", timeout=3600, LOOKALIKE_INDEX_DIR=target
                )
            finally:
                stack.stop()
        print(
            f"| --distributed over {workers} worker(s), 1 thread each | "
            f"{_build_figures(done.stdout)} |",
            flush=True,
        )


def _process_cpu() -> Iterator[tuple[int, int, float]]:
    """Each process's id, session and CPU seconds (user + system, with those of its children
    that ended: Redis rewrites its append-only file in children), read from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_path.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        ticks = sum(int(t) for t in fields[11:15])  # utime, stime, cutime, cstime
        yield int(stat_path.parent.name), int(fields[3]), ticks / tick


def cpu_seconds(pids: list[int], *, sessions: bool) -> float:
    """CPU seconds of these processes; with ``sessions``, of every process in their sessions
    (an API's uvicorn workers, for one)."""
    return sum(
        seconds
        for pid, session, seconds in _process_cpu()
        if pid in pids or (sessions and session in pids)
    )


def cpu_by_session() -> dict[int, float]:
    """CPU seconds of every process, summed by session (scripts/bench_gpu.sh starts each part
    of the service in a session of its own)."""
    totals: dict[int, float] = {}
    for _, session, seconds in _process_cpu():
        totals[session] = totals.get(session, 0.0) + seconds
    return totals


def stack_cpu(stack: Stack) -> dict[str, float]:
    pids = stack.pids()
    return {
        "api": cpu_seconds(pids["api"], sessions=True),
        "worker": cpu_seconds(pids["workers"], sessions=True),
        "redis": cpu_seconds(pids["redis"], sessions=False),
    }


def cpu(requests: int = 600, concurrency: int = 32, runs: int = 2) -> None:
    """The service stack's own CPU per image job: a tiny random CLIP (the model costs next to
    nothing), one API (``BENCH_API_PROCESSES``: that many API processes, as on a GPU machine),
    one worker with one torch thread, ``requests`` jobs at ``concurrency``; each process's CPU
    time over the timed run (after a warm-up run), divided by the jobs."""
    api_processes = os.environ.get("BENCH_API_PROCESSES", "1")
    checkout = os.environ.get("BENCH_CHECKOUT")
    root, command = Path(checkout or ROOT), os.environ.get("BENCH_CLI", "lookalike")
    if not (TINY_CHECKPOINT / "config.json").exists():
        save_random_clip(TINY_CHECKPOINT, shape="tiny")
    index = "index-tiny" + (f"-{Path(checkout).resolve().name}" if checkout else "")
    env = environment(
        LOOKALIKE_MODEL=str(TINY_CHECKPOINT),
        LOOKALIKE_INDEX_DIR=str(HOME / index),  # (index formats differ between versions)
        LOOKALIKE_THREADS="1",
    )
    print(
        "| run | jobs/s | p50 ms | API ms/job | worker ms/job | Redis ms/job | stack ms/job | "
        "bench client ms/job | batch p50 | load avg |"
    )
    print("|" + " --- |" * 10)
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(env=env, workdir=Path(tmp), root=root, command=command)
        built = stack.run_cli("index", "build", "--no-progress", timeout=3600)
        if built.returncode:
            raise SystemExit(f"index build failed:\n{built.stderr}")
        stack.start(workers=1, api=False)
        try:
            stack.start_api("--workers", api_processes)
            stack.wait_ready(workers=1)
            bench(stack, requests=200, concurrency=concurrency, out=Path(tmp) / "warm")
            for run in range(1, runs + 1):
                before, client_before = stack_cpu(stack), _children_cpu()
                out = Path(tmp) / "b"
                s = bench(stack, requests=requests, concurrency=concurrency, out=out, warmup=0)
                after, client_after = stack_cpu(stack), _children_cpu()
                done = max(1, s["succeeded"])
                per = {k: (after[k] - before[k]) * 1000 / done for k in after}
                client = (client_after - client_before) * 1000 / done
                print(
                    f"| {run} | {s['throughput_jobs_per_s']:.1f} | {s['latency_ms']['p50']:.1f} | "
                    f"{per['api']:.2f} | {per['worker']:.2f} | {per['redis']:.2f} | "
                    f"{sum(per.values()):.2f} | {client:.2f} | "
                    f"{s['server_batch_size'].get('p50') or 1:.0f} | {s['load_average'][0]:.2f} |",
                    flush=True,
                )
        finally:
            stack.stop()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _build_figures(stdout: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith("index built"))
    seconds = line.split(" in ")[1].split("s ")[0]
    rate = line.rsplit("(", 1)[1].split(" ")[0]
    return f"{seconds} | {rate}"


def main(groups: list[str]) -> None:
    ensure_checkpoint()
    if groups == ["startup"]:
        startup()
        return
    if groups == ["build"]:
        build()
        return
    if groups == ["cpu"]:
        cpu(requests=int(os.environ.get("BENCH_REQUESTS", "600")))
        return
    print(
        "| configuration | requests | jobs/s | p50 / p95 / p99 ms | embed p50 ms | "
        "search p50 ms | queue p50 ms | batch p50 | submit statuses | conn. errors | "
        "succeeded | load avg |"
    )
    print("|" + " --- |" * 12)
    for group in groups:
        for name, workers, extra, requests, concurrency in CONFIGS[group]:
            summary = run_config(workers, extra, requests, concurrency)
            print(row(name, summary), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(CONFIGS))
