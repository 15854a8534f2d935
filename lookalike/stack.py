"""A real service of separate processes: Redis, N ``lookalike worker`` and ``lookalike api``.

The end-to-end tests and the service benchmarks (``lookalike.bench.matrix``) start the service
this way, as a user would: every part is its own process started with the ``lookalike``
command, with the settings of ``Stack.env``, talking over real sockets.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from lookalike.redis_server import RedisServer, free_port, start_redis
from shared.jobs import JobStore

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Stack:
    """A real service: Redis, worker processes and the API, each a process started with the
    ``lookalike`` command as a user would, logging to ``<workdir>/<name>.log``.

    ``root`` and ``command`` run another checkout instead (its command module, such as
    ``shared.cli`` before the ``lookalike`` package), to measure an older version the same way.
    """

    env: dict[str, str]
    workdir: Path
    root: Path = ROOT
    command: str = "lookalike"
    redis: RedisServer | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    api: subprocess.Popen[bytes] | None = None
    api_port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def run_cli(
        self, *args: str, timeout: float = 600, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """Run a ``lookalike`` command to its end with the stack's settings (plus ``env``)."""
        return subprocess.run(
            [sys.executable, "-m", self.command, *args],
            env={**self.env, **env},
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("ab")
        return subprocess.Popen(
            [sys.executable, "-m", self.command, *args],
            env=self.env,
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start_redis(self) -> None:
        self.redis = start_redis(self.workdir / "redis")
        self.env["LOOKALIKE_REDIS_URL"] = self.redis.url

    def start(self, *, workers: int, api: bool = True) -> Stack:
        """Redis, ``workers`` worker processes and (unless ``api`` is False) the API; wait
        until they serve."""
        self.start_redis()
        for _ in range(workers):
            self.start_worker()
        try:
            if api:
                self.start_api()
                if workers:
                    self.wait_ready(workers=workers)
                else:
                    self.wait_api()
            else:
                self.wait_workers(workers)
        except Exception:
            self.stop()
            raise
        return self

    def restart_redis(self, *, down_s: float = 0.0) -> None:
        """Stop Redis (it writes its append-only file) and start it again on the same port."""
        assert self.redis is not None
        port, directory = self.redis.port, self.redis.directory
        self.redis.stop()
        time.sleep(down_s)
        self.redis = start_redis(directory, port=port)

    def kill_worker(self, index: int) -> None:
        """SIGKILL a worker process: no goodbye, no acknowledgement."""
        os.killpg(self.workers[index].pid, signal.SIGKILL)
        self.workers[index].wait()

    def replace_worker(self, index: int) -> None:
        """Start a new worker in the slot of a dead one, as a supervisor would."""
        self.workers[index] = self.spawn(f"worker{index}", "worker")

    def worker_name(self, index: int) -> str:
        return f"{socket.gethostname()}:{self.workers[index].pid}"

    def start_worker(self) -> subprocess.Popen[bytes]:
        process = self.spawn(f"worker{len(self.workers)}", "worker")
        self.workers.append(process)
        return process

    def start_api(self, *args: str) -> None:
        """The API on a free port; ``args`` are more ``lookalike api`` flags (``--workers``)."""
        self.api_port = free_port()
        self.api = self.spawn("api", "api", "--port", str(self.api_port), *args)

    def wait_api(self, *, timeout: float = 60) -> None:
        """Wait for the API process to answer /healthz (workers or not)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.api is not None and self.api.poll() is not None:
                raise RuntimeError(f"the API exited early:\n{self.logs()}")
            time.sleep(0.1)
        raise RuntimeError(f"the API did not answer in {timeout}s:\n{self.logs()}")

    def wait_ready(self, *, workers: int = 1, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                reply = httpx.get(f"{self.url}/readyz", timeout=2)
                if reply.status_code == 200 and len(reply.json()["workers"]) >= workers:
                    return
            except httpx.HTTPError:
                pass
            for process in [*self.workers, self.api]:
                if process is not None and process.poll() is not None:
                    raise RuntimeError(f"a process exited early:\n{self.logs()}")
            time.sleep(0.2)
        raise RuntimeError(f"the service was not ready in {timeout}s:\n{self.logs()}")

    def wait_workers(self, count: int, *, timeout: float = 300) -> None:
        """Wait until ``count`` workers say they are ready in Redis (no API needed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.ready_workers()) >= count:
                return
            if any(process.poll() is not None for process in self.workers):
                raise RuntimeError(f"a worker exited early:\n{self.logs()}")
            time.sleep(0.2)
        raise RuntimeError(f"{count} worker(s) not ready in {timeout}s:\n{self.logs()}")

    def ready_workers(self) -> list[dict[str, Any]]:
        """The workers that say, in Redis, that they are ready."""
        assert self.redis is not None
        client = redis.Redis.from_url(self.redis.url)
        store = JobStore(client, prefix=self.env.get("LOOKALIKE_KEY_PREFIX", "lookalike"), ttl_s=1)
        try:
            return [w for w in store.ready_workers(within_s=15) if w.get("state") == "ready"]
        finally:
            client.close()

    def pids(self) -> dict[str, list[int]]:
        """The process ids of each part: ``redis``, ``api`` and ``workers``."""
        return {
            "redis": [self.redis.process.pid] if self.redis else [],
            "api": [self.api.pid] if self.api else [],
            "workers": [process.pid for process in self.workers],
        }

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
            for p in sorted(self.workdir.glob("*.log"))
        )

    def stop(self) -> None:
        for process in [*self.workers, self.api]:
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in [*self.workers, self.api]:
            if process is None:
                continue
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self.redis is not None:
            self.redis.stop()


def stack_env(
    *, model_dir: Path, data_dir: Path, workdir: Path, gallery_size: int
) -> dict[str, str]:
    """This process's environment without its LOOKALIKE_* settings, plus the stack's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    env.update(
        LOOKALIKE_MODEL=str(model_dir),
        LOOKALIKE_DATA_DIR=str(data_dir),
        LOOKALIKE_GALLERY_SIZE=str(gallery_size),
        LOOKALIKE_INDEX_DIR=str(workdir / "index"),
        LOOKALIKE_HOME=str(workdir / "home"),
        LOOKALIKE_THREADS="1",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
    )
    return env
