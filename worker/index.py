"""The gallery index: build (batched, resumable), save with a manifest, load, search.

On disk, one folder per (gallery, size, model)::

    embeddings.npy   float16 (n, dim), L2-normalised rows: half the memory of float32,
                     scores within ~1e-3
    labels.npy       uint8 (n,)
    probes.npy       the first few gallery images (uint8), re-embedded at load to prove the
                     model that answers is the model that built the index
    manifest.json    model id, gallery, count, dim, dtype, preprocessing, checksums

A stale or mismatched index is refused with :class:`IndexMismatch`, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from pydantic import BaseModel

from shared.errors import IndexMismatch
from shared.images import to_rgb
from worker.encoder import EQUIVALENCE_MIN_COSINE, ClipImageEncoder

log = logging.getLogger(__name__)

FORMAT = 1
CHUNK = 1024  # images per resumable piece of a build
PROBES = 4
STORED_DTYPE = np.float16


class Manifest(BaseModel):
    format: int = FORMAT
    model_id: str
    gallery: str
    count: int
    dim: int
    dtype: str
    preprocessing: dict[str, Any]
    preprocessing_digest: str
    precision: str
    embeddings_sha256: str
    labels_sha256: str
    built_at: str
    build_seconds: float


def index_dir(root: Path, *, gallery: str, size: int, model_id: str) -> Path:
    """``<root>/<gallery>-<size>__<model slug>-<hash>``: one folder per identity."""
    tail = "-".join(Path(model_id.rstrip("/")).parts[-2:])
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", tail).strip("-")[:60] or "model"
    digest = hashlib.sha256(model_id.encode()).hexdigest()[:8]
    return root / f"{gallery}-{size}__{slug}-{digest}"


def gallery_to_images(pixels: npt.NDArray[np.uint8]) -> list[Image.Image]:
    """Gallery arrays (n, h, w) or (n, h, w, 3) to RGB images, by the upload conversion."""
    mode = "L" if pixels.ndim == 3 else "RGB"
    return [to_rgb(Image.fromarray(np.ascontiguousarray(p), mode=mode)) for p in pixels]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _save_atomic(path: Path, array: npt.NDArray[Any]) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


def build_index(
    encoder: ClipImageEncoder,
    images: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.uint8],
    *,
    gallery: str,
    directory: Path,
    batch_size: int,
    progress: bool = True,
) -> Manifest:
    """Embed every gallery image in batches and save the index in ``directory``.

    Work is saved in chunks of ``CHUNK`` images under ``directory/parts``; a build that was
    interrupted resumes from the chunks it finished, after checking they came from this model.
    """
    started = time.perf_counter()
    count = int(labels.shape[0])
    parts = directory / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    identity = {
        "model_id": encoder.model_id,
        "gallery": gallery,
        "count": count,
        "preprocessing_digest": encoder.preprocessing_digest,
        "chunk": CHUNK,
    }
    identity_file = parts / "build.json"
    if identity_file.exists() and json.loads(identity_file.read_text()) != identity:
        log.warning("discarding an unfinished build of another identity in %s", parts)
        shutil.rmtree(parts)
        parts.mkdir(parents=True)
    identity_file.write_text(json.dumps(identity))

    chunks = range(0, count, CHUNK)
    done = [start for start in chunks if (parts / f"{start:08d}.npy").exists()]
    if done and not _chunk_matches(encoder, images, parts / f"{done[0]:08d}.npy", done[0]):
        log.warning("unfinished build in %s came from other weights; starting over", parts)
        for start in done:
            (parts / f"{start:08d}.npy").unlink()
        done = []
    already = sum(min(CHUNK, count - start) for start in done)
    bar = _progress_bar(total=count, initial=already, enabled=progress)
    try:
        for start in chunks:
            path = parts / f"{start:08d}.npy"
            if path.exists():
                continue
            stop = min(start + CHUNK, count)
            rows = []
            for low in range(start, stop, batch_size):
                high = min(low + batch_size, stop)
                rows.append(encoder.embed(gallery_to_images(images[low:high])))
                bar.update(high - low)
            _save_atomic(path, np.concatenate(rows).astype(STORED_DTYPE))
    finally:
        bar.close()

    embeddings = np.concatenate([np.load(parts / f"{s:08d}.npy") for s in chunks])
    directory.mkdir(parents=True, exist_ok=True)
    _save_atomic(directory / "embeddings.npy", embeddings)
    _save_atomic(directory / "labels.npy", np.asarray(labels, dtype=np.uint8))
    _save_atomic(directory / "probes.npy", np.asarray(images[:PROBES], dtype=np.uint8))
    manifest = Manifest(
        model_id=encoder.model_id,
        gallery=gallery,
        count=count,
        dim=int(embeddings.shape[1]),
        dtype=str(embeddings.dtype),
        preprocessing=encoder.preprocessing,
        preprocessing_digest=encoder.preprocessing_digest,
        precision=encoder.precision,
        embeddings_sha256=_sha256(directory / "embeddings.npy"),
        labels_sha256=_sha256(directory / "labels.npy"),
        built_at=datetime.now(UTC).isoformat(),
        build_seconds=round(time.perf_counter() - started, 2),
    )
    tmp = directory / "manifest.json.tmp"
    tmp.write_text(manifest.model_dump_json(indent=2))
    tmp.replace(directory / "manifest.json")
    shutil.rmtree(parts)
    return manifest


def _chunk_matches(
    encoder: ClipImageEncoder, images: npt.NDArray[np.uint8], path: Path, start: int
) -> bool:
    stored = np.load(path)[:PROBES].astype(np.float32)
    fresh = encoder.embed(gallery_to_images(images[start : start + stored.shape[0]]))
    return bool(np.min(np.sum(stored * fresh, axis=1)) >= EQUIVALENCE_MIN_COSINE)


def _progress_bar(*, total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="img",
        desc="indexing",
        disable=not enabled,
        smoothing=0.1,
        dynamic_ncols=True,
    )


@dataclass
class GalleryIndex:
    """A loaded index: the matrix (memory-mapped) and its labels, searched on ``device``."""

    manifest: Manifest
    embeddings: npt.NDArray[np.float16]
    labels: npt.NDArray[np.uint8]
    matrix: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def search(
        self, queries: npt.NDArray[np.float32], *, k: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Top-``k`` cosine matches of each query row: one matrix product and one top-k."""
        return top_k(self.matrix, queries, k=k)


def top_k(
    matrix: torch.Tensor, queries: npt.NDArray[np.float32], *, k: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Scores and indices of the ``k`` highest dot products per query, best first."""
    k = min(k, int(matrix.shape[0]))
    with torch.inference_mode():
        q = torch.from_numpy(np.ascontiguousarray(queries)).to(matrix.device, matrix.dtype)
        scores = q @ matrix.T
        best, where = torch.topk(scores, k, dim=1, largest=True, sorted=True)
        clipped = best.float().clamp(-1.0, 1.0)
    return clipped.cpu().numpy(), where.cpu().numpy().astype(np.int64)


def load_index(
    directory: Path, encoder: ClipImageEncoder, *, gallery: str, size: int
) -> GalleryIndex:
    """Load a built index and prove it matches; raise :class:`IndexMismatch` otherwise."""
    manifest_path = directory / "manifest.json"
    if not manifest_path.exists():
        raise IndexMismatch(
            f"No index at {directory}: build it with 'lookalike index build' "
            "(or start 'lookalike serve', which builds it)."
        )
    manifest = Manifest.model_validate_json(manifest_path.read_text())
    expected = {
        "format": FORMAT,
        "model_id": encoder.model_id,
        "gallery": gallery,
        "count": size,
        "dim": encoder.dim,
        "preprocessing_digest": encoder.preprocessing_digest,
    }
    for key, value in expected.items():
        found = getattr(manifest, key)
        if found != value:
            raise IndexMismatch(
                f"The index at {directory} was built with {key}={found!r}, this worker has "
                f"{value!r}: rebuild it with 'lookalike index build'."
            )
    embeddings_path = directory / "embeddings.npy"
    if _sha256(embeddings_path) != manifest.embeddings_sha256:
        raise IndexMismatch(f"The index at {directory} is corrupt (checksum): rebuild it.")
    embeddings = np.load(embeddings_path, mmap_mode="c")
    labels = np.load(directory / "labels.npy")
    if embeddings.shape != (manifest.count, manifest.dim) or labels.shape != (manifest.count,):
        raise IndexMismatch(f"The index at {directory} has the wrong shape: rebuild it.")
    probes = np.load(directory / "probes.npy")
    if not _probes_match(encoder, probes, embeddings):
        raise IndexMismatch(
            f"The index at {directory} was built by other weights than {encoder.model_id!r} "
            "has now: rebuild it with 'lookalike index build'."
        )
    matrix = torch.from_numpy(embeddings)
    if encoder.device != "cpu":
        matrix = matrix.to(encoder.device, dtype=encoder.dtype)
    index = GalleryIndex(manifest=manifest, embeddings=embeddings, labels=labels, matrix=matrix)
    index.search(np.zeros((1, manifest.dim), dtype=np.float32), k=1)  # fault the pages in
    return index


def _probes_match(
    encoder: ClipImageEncoder, probes: npt.NDArray[np.uint8], embeddings: npt.NDArray[Any]
) -> bool:
    fresh = encoder.embed(gallery_to_images(probes))
    stored = np.asarray(embeddings[: len(probes)], dtype=np.float32)
    return bool(np.min(np.sum(stored * fresh, axis=1)) >= EQUIVALENCE_MIN_COSINE)
