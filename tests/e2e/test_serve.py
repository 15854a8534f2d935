"""``lookalike serve``, the README's first command, as a user runs it: one process that starts
and supervises Redis, a worker and the API."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from lookalike.redis_server import free_port
from lookalike.stack import ROOT, stack_env
from tests.support import gallery_png, wait_job

pytestmark = pytest.mark.e2e


@dataclass
class Serve:
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.process.poll() is None, self.output()
            time.sleep(0.3)
        raise AssertionError(f"serve was not ready in {timeout}s:\n{self.output()}")

    def redis_url(self) -> str:
        found = re.search(r"Redis on (redis://\S+)", self.output())
        assert found, self.output()
        return found[1]


def start_serve(tmp_path: Path, model_dir: Path, data_dir: Path) -> Serve:
    env = stack_env(model_dir=model_dir, data_dir=data_dir, workdir=tmp_path, gallery_size=60)
    port = free_port()
    log = tmp_path / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "lookalike", "serve", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Serve(process, port, log, env)


def stop(serve: Serve) -> None:
    if serve.process.poll() is None:
        serve.process.send_signal(signal.SIGTERM)
        try:
            serve.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.process.pid, signal.SIGKILL)
            serve.process.wait()


@pytest.fixture
def serve(tmp_path: Path, tiny_clip_dir: Path, fake_data_dir: Path) -> Iterator[Serve]:
    running = start_serve(tmp_path, tiny_clip_dir, fake_data_dir)
    yield running
    stop(running)


def query(serve: Serve, image: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lookalike", "query", str(image), "--url", serve.url],
        env=serve.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_serve_starts_everything_and_answers_a_query(
    serve: Serve, tmp_path: Path, fake_data_dir: Path
) -> None:
    """Redis, index build, worker and API from one command; Ctrl+C/SIGTERM is a clean stop."""
    image = tmp_path / "query.png"
    image.write_bytes(gallery_png(fake_data_dir, 11))
    serve.wait_ready()
    done = query(serve, image)
    stop(serve)
    assert done.returncode == 0, done.stderr + serve.output()
    first_row = done.stdout.splitlines()[1].split()
    assert first_row[:2] == ["1", "11"]
    assert "indexing" in serve.output()  # the progress bar was shown
    assert serve.process.returncode == 0


def test_serve_restarts_a_killed_redis_and_every_accepted_job_is_answered(
    serve: Serve, fake_data_dir: Path
) -> None:
    serve.wait_ready()
    url = serve.redis_url()
    with httpx.Client(base_url=serve.url, timeout=30) as client:
        accepted = []
        for i in range(12):
            files = {"file": ("q.png", gallery_png(fake_data_dir, i), "image/png")}
            reply = client.post("/jobs", files=files)
            assert reply.status_code == 202, reply.text
            accepted.append(reply.json()["id"])
        pid = int(redis.Redis.from_url(url).info("server")["process_id"])
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        while True:  # the same URL answers again: same port, same data folder
            try:
                restarted = int(redis.Redis.from_url(url).info("server")["process_id"])
                print(f"\nserve restarted its Redis in {time.monotonic() - killed_at:.2f} s")
                break
            except redis.RedisError:
                assert time.monotonic() - killed_at < 30, serve.output()
                time.sleep(0.1)
        jobs = [wait_job(client, job_id, timeout=120) for job_id in accepted]
        after = client.post(
            "/jobs", files={"file": ("q.png", gallery_png(fake_data_dir, 3), "image/png")}
        )
        assert after.status_code == 202, after.text
        last = wait_job(client, after.json()["id"], timeout=60)
    assert restarted != pid
    assert "the Redis stopped (signal SIGKILL); restarting" in serve.output()
    assert [job["status"] for job in jobs] == ["succeeded"] * len(accepted)
    assert [job["result"]["matches"][0]["index"] for job in jobs] == list(range(12))
    assert last["status"] == "succeeded"


def test_serve_exits_non_zero_and_names_the_part_that_cannot_start(
    tmp_path: Path, tiny_clip_dir: Path, fake_data_dir: Path
) -> None:
    """A checkpoint whose tokenizer is unusable: the worker cannot start, serve says so and
    exits 1, so a script or a supervisor can tell it from a clean stop."""
    checkpoint = Path(shutil.copytree(tiny_clip_dir, tmp_path / "clip"))
    (checkpoint / "tokenizer.json").write_text("{not json")
    running = start_serve(tmp_path, checkpoint, fake_data_dir)
    try:
        code = running.process.wait(timeout=180)
    finally:
        stop(running)
    assert code == 1, running.output()
    assert "lookalike: stopping: the worker cannot start" in running.output()
    assert "tokenizer" in running.output().lower() or "text tower" in running.output()
