"""Test helpers: Fashion-MNIST-shaped IDX files, gallery uploads, waiting for a job.

The real service (Redis, worker and API processes) is ``lookalike.stack.Stack``; the random
CLIP checkpoints are ``lookalike.checkpoint.save_random_clip``."""

from __future__ import annotations

import gzip
import struct
import time
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt

SEARCH_GALLERY = 100  # images in the gallery of the worker tests' engine (tests/worker/conftest.py)


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


def gallery_png(data_dir: Path, index: int) -> bytes:
    """Gallery image ``index`` encoded as a PNG upload."""
    import io

    from PIL import Image

    from shared.fashion_mnist import load_gallery

    gallery = load_gallery(data_dir, size=index + 1)
    buffer = io.BytesIO()
    Image.fromarray(gallery.images[index], mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def picture(seed: int, size: int = 48) -> bytes:
    """A distinct PNG: coarse random blocks of colour, so every seed looks unlike the others."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    pixels = np.kron(coarse, np.ones((size // 6, size // 6, 1), dtype=np.uint8))
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def wait_job(client: httpx.Client, job_id: str, *, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = client.get(f"/jobs/{job_id}", params={"wait": "10"})
        job: dict[str, object] = reply.json()
        assert "status" in job, f"{reply.status_code}: {reply.text}"
        if job["status"] in ("succeeded", "failed"):
            return job
    raise AssertionError(f"job {job_id} did not end in {timeout}s")
