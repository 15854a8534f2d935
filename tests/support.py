"""Test helpers that start real things: a tiny CLIP checkpoint, IDX files, Redis, processes."""

from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt

from shared.redis_server import RedisServer, free_port, start_redis

ROOT = Path(__file__).resolve().parent.parent


def write_idx(path: Path, array: npt.NDArray[np.uint8]) -> None:
    """Write ``array`` as a gzip IDX file (unsigned bytes), as Fashion-MNIST ships."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_fake_fashion_mnist(directory: Path, *, train: int = 240, test: int = 60) -> Path:
    """Random-looking 28x28 garments (blobs on black), labels 0..9, in the four IDX files."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for stem_images, stem_labels, count in (
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", train),
        ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", test),
    ):
        coarse = rng.integers(0, 256, size=(count, 7, 7), dtype=np.uint8)
        images = np.kron(coarse, np.ones((4, 4), dtype=np.uint8))
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        write_idx(directory / f"{stem_images}.gz", images)
        write_idx(directory / f"{stem_labels}.gz", labels)
    return directory


def save_tiny_clip(directory: Path) -> Path:
    """A randomly initialised, tiny CLIP saved with save_pretrained, like a hub checkpoint.

    A large initializer factor spreads its embeddings apart, so rankings are meaningful
    enough to test (default random weights map every image to nearly the same point).
    """
    import torch
    from transformers import CLIPConfig, CLIPModel

    from worker.encoder import _Processor
    from worker.text_encoder import byte_level_tokenizer

    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "vocab_size": 49408,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 224,
            "patch_size": 32,
            "initializer_factor": 5.0,
        },
        projection_dim=32,
        initializer_factor=5.0,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(directory)
    _Processor().save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)  # a real checkpoint ships its vocabulary
    # Hub checkpoints name the processor class like this; loading must cope.
    path = directory / "preprocessor_config.json"
    processor = json.loads(path.read_text())
    processor["image_processor_type"] = "CLIPImageProcessor"
    path.write_text(json.dumps(processor, indent=2))
    return directory


def gallery_png(data_dir: Path, index: int) -> bytes:
    """Gallery image ``index`` encoded as a PNG upload."""
    import io

    from PIL import Image

    from shared.fashion_mnist import load_gallery

    gallery = load_gallery(data_dir, size=index + 1)
    buffer = io.BytesIO()
    Image.fromarray(gallery.images[index], mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Stack:
    """A real service: Redis, worker processes and the API, started as a user would."""

    env: dict[str, str]
    workdir: Path
    redis: RedisServer | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    api: subprocess.Popen[bytes] | None = None
    api_port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def run_cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "shared.cli", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("ab")
        return subprocess.Popen(
            [sys.executable, "-m", "shared.cli", *args],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start_redis(self) -> None:
        self.redis = start_redis(self.workdir / "redis")
        self.env["LOOKALIKE_REDIS_URL"] = self.redis.url

    def start(self, *, workers: int) -> Stack:
        """Redis, ``workers`` worker processes and the API; wait until they serve."""
        self.start_redis()
        for _ in range(workers):
            self.start_worker()
        self.start_api()
        try:
            if workers:
                self.wait_ready(workers=workers)
            else:
                self.wait_api()
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
        self.workers[index] = self._spawn(f"worker{index}", "worker")

    def worker_name(self, index: int) -> str:
        import socket

        return f"{socket.gethostname()}:{self.workers[index].pid}"

    def start_worker(self) -> subprocess.Popen[bytes]:
        process = self._spawn(f"worker{len(self.workers)}", "worker")
        self.workers.append(process)
        return process

    def start_api(self) -> None:
        self.api_port = free_port()
        self.api = self._spawn("api", "api", "--port", str(self.api_port))

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


def base_env(
    *, model_dir: Path, data_dir: Path, workdir: Path, gallery_size: int
) -> dict[str, str]:
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


def wait_job(client: httpx.Client, job_id: str, *, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, object] = client.get(f"/jobs/{job_id}", params={"wait": "10"}).json()
        if job["status"] in ("succeeded", "failed"):
            return job
    raise AssertionError(f"job {job_id} did not end in {timeout}s")
