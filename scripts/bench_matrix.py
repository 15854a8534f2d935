"""Service figures for docs/benchmarks.md: one fresh service per configuration, driven by
``lookalike bench`` over HTTP.

    .venv/bin/python scripts/bench_matrix.py overhead batching scaling load
    .venv/bin/python scripts/bench_matrix.py startup      # needs the 70,000-image index built
    .venv/bin/python scripts/bench_matrix.py build        # distributed index builds

Each configuration starts its own Redis, N ``lookalike worker`` processes and ``lookalike api``
with the settings below, runs the bench, prints a markdown row and stops everything. The model
is a randomly initialised CLIP of ViT-B/32's exact shape, saved with ``save_pretrained`` in
``$BENCH_HOME/clip-b32`` and loaded from there like any local checkpoint (its matches mean
nothing; its compute and its loading are the real model's). An index is built first if missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.redis_server import RedisServer, free_port, start_redis  # noqa: E402

HOME = Path(os.environ.get("BENCH_HOME", "/tmp/lookalike-bench"))
CHECKPOINT = HOME / "clip-b32"
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


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "shared.cli", *args]


def stop(procs: list[subprocess.Popen[bytes]], redis: RedisServer) -> None:
    """Stop the service's processes, killing any that do not stop in time, then Redis."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    redis.stop()


def ensure_checkpoint() -> None:
    """A random CLIP of ViT-B/32's shape, with processor and tokenizer, saved like a hub one."""
    if BASE["LOOKALIKE_MODEL"] != str(CHECKPOINT) or (CHECKPOINT / "config.json").exists():
        return
    import torch
    from transformers import CLIPConfig, CLIPModel

    from worker.encoder import RANDOM_SHAPES, _Processor
    from worker.text_encoder import byte_level_tokenizer

    shape = RANDOM_SHAPES["vit-b-32"]  # CLIPConfig's defaults are ViT-B/32's
    torch.manual_seed(0)
    config = CLIPConfig(text_config=shape, vision_config=shape, **shape)
    CLIPModel(config).save_pretrained(CHECKPOINT)
    _Processor().save_pretrained(CHECKPOINT)
    byte_level_tokenizer().save_pretrained(CHECKPOINT)


def wait_ready(url: str, workers: int, *, timeout: float = 300) -> float:
    """Seconds until /readyz lists ``workers`` ready workers."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            reply = httpx.get(f"{url}/readyz", timeout=2)
            if reply.status_code == 200 and len(reply.json()["workers"]) >= workers:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{workers} worker(s) not ready in {timeout}s")


def run_config(workers: int, extra: dict[str, str], requests: int, concurrency: int) -> dict:
    env = {**os.environ, **BASE, **extra, "PYTHONUNBUFFERED": "1"}
    built = subprocess.run(cli("index", "build", "--no-progress"), env=env, cwd=ROOT)
    if built.returncode:
        raise SystemExit("index build failed")
    with tempfile.TemporaryDirectory() as tmp:
        redis = start_redis(Path(tmp) / "redis")
        env["LOOKALIKE_REDIS_URL"] = redis.url
        port = free_port()
        logs = open(Path(tmp) / "log", "wb")  # noqa: SIM115
        procs = [
            subprocess.Popen(cli("worker"), env=env, cwd=ROOT, stdout=logs, stderr=logs)
            for _ in range(workers)
        ]
        procs.append(
            subprocess.Popen(
                cli("api", "--port", str(port)), env=env, cwd=ROOT, stdout=logs, stderr=logs
            )
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, workers)
            out = Path(tmp) / "bench.json"
            subprocess.run(
                cli(
                    "bench",
                    "--url",
                    url,
                    "--requests",
                    str(requests),
                    "--concurrency",
                    str(concurrency),
                    "--warmup",
                    "5",
                    "--json",
                    str(out),
                ),
                env=env,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
            )
            return json.loads(out.read_text())
        finally:
            stop(procs, redis)


def row(name: str, s: dict) -> str:
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
    env = {**os.environ, **BASE, "LOOKALIKE_GALLERY_SIZE": "70000", "PYTHONUNBUFFERED": "1"}
    print("| worker start, 70,000-image index | to /readyz ready (s) | loading (s) | precision |")
    print("| --- | --- | --- | --- |")
    for run in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            redis = start_redis(Path(tmp) / "redis")
            env["LOOKALIKE_REDIS_URL"] = redis.url
            port = free_port()
            logs = open(Path(tmp) / "log", "wb")  # noqa: SIM115
            api = subprocess.Popen(
                cli("api", "--port", str(port)), env=env, stdout=logs, stderr=logs
            )
            url = f"http://127.0.0.1:{port}"
            procs = [api]
            try:
                while True:
                    try:
                        httpx.get(f"{url}/healthz", timeout=1)
                        break
                    except httpx.HTTPError:
                        time.sleep(0.05)
                started = time.monotonic()
                procs.append(subprocess.Popen(cli("worker"), env=env, stdout=logs, stderr=logs))
                wait_ready(url, 1, timeout=120)
                ready_s = time.monotonic() - started
                worker = httpx.get(f"{url}/readyz").json()["workers"][0]
                print(
                    f"| run {run + 1} | {ready_s:.2f} | {worker['load_seconds']:.2f} | "
                    f"{worker['precision']} |",
                    flush=True,
                )
            finally:
                stop(procs, redis)


def build(size: int = 4096) -> None:
    """Index builds of ``size`` images: here, and spread over 1 and 2 workers (1 thread each)."""
    env = {**os.environ, **BASE, "PYTHONUNBUFFERED": "1"}
    root = HOME / "build-bench"
    print(f"| build of {size} images | seconds | images/s |")
    print("| --- | --- | --- |")
    local = subprocess.run(
        cli("index", "build", "--size", str(size), "--force", "--no-progress"),
        env={**env, "LOOKALIKE_INDEX_DIR": str(root / "local")},
        capture_output=True,
        text=True,
        check=True,
    )
    print(f"| here, one process, 2 threads | {_build_figures(local.stdout)} |", flush=True)
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            redis = start_redis(Path(tmp) / "redis")
            worker_env = {**env, "LOOKALIKE_REDIS_URL": redis.url, "LOOKALIKE_THREADS": "1"}
            logs = open(Path(tmp) / "log", "wb")  # noqa: SIM115
            procs = [
                subprocess.Popen(cli("worker"), env=worker_env, stdout=logs, stderr=logs)
                for _ in range(workers)
            ]
            try:
                _wait_workers(redis.url, workers)
                done = subprocess.run(
                    cli(
                        "index",
                        "build",
                        "--size",
                        str(size),
                        "--force",
                        "--distributed",
                        "--no-progress",
                    ),
                    env={**worker_env, "LOOKALIKE_INDEX_DIR": str(root / f"dist{workers}")},
                    capture_output=True,
                    text=True,
                    check=True,
                )
                print(
                    f"| --distributed over {workers} worker(s), 1 thread each | "
                    f"{_build_figures(done.stdout)} |",
                    flush=True,
                )
            finally:
                stop(procs, redis)


def _build_figures(stdout: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith("index built"))
    seconds = line.split(" in ")[1].split("s ")[0]
    rate = line.rsplit("(", 1)[1].split(" ")[0]
    return f"{seconds} | {rate}"


def _wait_workers(redis_url: str, workers: int) -> None:
    import redis as redis_lib

    client = redis_lib.Redis.from_url(redis_url)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        names = client.zrangebyscore("lookalike:workers", time.time() - 15, "+inf")
        states = [json.loads(client.get(f"lookalike:worker:{n.decode()}") or "{}") for n in names]
        if sum(1 for s in states if s.get("state") == "ready") >= workers:
            return
        time.sleep(0.2)
    raise SystemExit("workers not ready")


def main(groups: list[str]) -> None:
    ensure_checkpoint()
    if groups == ["startup"]:
        startup()
        return
    if groups == ["build"]:
        build()
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
