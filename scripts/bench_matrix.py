"""Service figures for docs/benchmarks.md: one fresh service per configuration, driven by
``lookalike bench`` over HTTP.

    .venv/bin/python scripts/bench_matrix.py overhead batching scaling load

Each configuration starts its own Redis, N ``lookalike worker`` processes and ``lookalike api``
with the settings below (ViT-B/32 compute: ``random:vit-b-32``; an index is built first if
missing), runs the bench, prints a markdown row and stops everything.
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

from shared.redis_server import free_port, start_redis  # noqa: E402

HOME = Path(os.environ.get("BENCH_HOME", "/tmp/lookalike-bench"))
BASE = {
    "LOOKALIKE_MODEL": os.environ.get("LOOKALIKE_MODEL", "random:vit-b-32"),
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
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                try:
                    reply = httpx.get(f"{url}/readyz", timeout=2)
                    if reply.status_code == 200 and len(reply.json()["workers"]) == workers:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.3)
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
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=30)
            redis.stop()


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


def main(groups: list[str]) -> None:
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
