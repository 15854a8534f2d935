"""The gallery index: build (batched, resumable), save with a manifest, load, search.

On disk, one folder per gallery and model (and size, for Fashion-MNIST)::

    embeddings.npy       float16 (n, dim), L2-normalised rows: half the memory of float32,
                         scores within ~1e-3
    labels.npy           int32 (n,)
    thumbs.bin, thumbs.offsets.npy
                         every gallery image, small, for the API (see shared.galleries)
    paths.json           own galleries: each image's file, relative to the folder
    skipped.json         own galleries: the files that could not be read, and why
    probes.npy           CLIP pixels of the first few gallery images, re-embedded at load to
                         prove the model that answers is the model that built the index
    manifest.json        gallery, kind, model id, count, dim, dtype, classes, preprocessing,
                         checksums

A build embeds the gallery in chunks of ``CHUNK`` images saved under ``parts/``: an interrupted
build resumes from the chunks it finished, and chunks can be computed by other processes (see
worker.distributed). A stale or mismatched index is refused with :class:`IndexMismatch`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from pydantic import BaseModel

from shared.errors import IndexMismatch
from shared.galleries import (
    FOLDER,
    THUMBS,
    GallerySource,
    Skipped,
    ThumbnailPack,
    built_indexes,
    encode_thumbnail,
    read_manifest,
    write_thumbnail_pack,
)
from shared.images import to_rgb
from shared.schemas import Embeddings, Match, gallery_image_url
from worker import loader
from worker.encoder import EQUIVALENCE_MIN_COSINE, ClipImageEncoder
from worker.filters import Columns, Mask
from worker.preprocess import PIL_TORCH, PROCESSOR

log = logging.getLogger(__name__)

FORMAT = 2
CHUNK = 256  # images per resumable (and distributable) piece of a build
PROBES = 4
STORED_DTYPE = np.float16


class Manifest(BaseModel):
    format: int = FORMAT
    gallery: str
    kind: str
    model_id: str
    count: int
    dim: int
    dtype: str
    class_names: list[str]
    source: str | None = None
    skipped: int = 0
    preprocessing: dict[str, Any]
    preprocessing_digest: str
    precision: str
    embeddings_sha256: str
    labels_sha256: str
    built_at: str
    build_seconds: float


def index_dir(root: Path, *, gallery: str, model_id: str, size: int | None = None) -> Path:
    """``<root>/<gallery>[-<size>]__<model slug>-<hash>``: one folder per identity."""
    tail = "-".join(Path(model_id.rstrip("/")).parts[-2:])
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", tail).strip("-")[:60] or "model"
    digest = hashlib.sha256(model_id.encode()).hexdigest()[:8]
    label = gallery if size is None else f"{gallery}-{size}"
    return root / f"{label}__{slug}-{digest}"


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


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# --- building --------------------------------------------------------------------------------


def plan_chunks(count: int) -> list[tuple[int, int]]:
    """The (start, stop) pieces a build of ``count`` images is made of."""
    return [(start, min(start + CHUNK, count)) for start in range(0, count, CHUNK)]


def build_identity(encoder: ClipImageEncoder, source: GallerySource) -> dict[str, Any]:
    """What a half-done build must share with this one to be resumed."""
    return {
        "format": FORMAT,
        "model_id": encoder.model_id,
        "gallery": source.name,
        "count": len(source),
        "fingerprint": source.fingerprint,
        "preprocessing_digest": encoder.preprocessing_digest,
        "chunk": CHUNK,
    }


class BuildParts:
    """The finished chunks of a build in progress, in ``<index folder>/parts``."""

    def __init__(self, directory: Path, identity: dict[str, Any]) -> None:
        self.path = directory / "parts"
        self.path.mkdir(parents=True, exist_ok=True)
        identity_file = self.path / "build.json"
        if identity_file.exists() and json.loads(identity_file.read_text()) != identity:
            log.warning("discarding an unfinished build of another identity in %s", self.path)
            self.discard()
            self.path.mkdir(parents=True)
        identity_file.write_text(json.dumps(identity))

    def _stem(self, start: int) -> Path:
        return self.path / f"{start:08d}"

    def has(self, start: int) -> bool:
        # The embeddings are written last: their presence means the chunk is whole.
        return Path(f"{self._stem(start)}.npy").exists()

    def save(self, start: int, embeddings: npt.NDArray[Any], thumbnails: Iterable[bytes]) -> None:
        write_thumbnail_pack(Path(f"{self._stem(start)}.thumbs"), thumbnails)
        _save_atomic(Path(f"{self._stem(start)}.npy"), embeddings.astype(STORED_DTYPE))

    def embeddings(self, start: int) -> npt.NDArray[Any]:
        loaded: npt.NDArray[Any] = np.load(f"{self._stem(start)}.npy")
        return loaded

    def thumbnails(self, start: int) -> Iterable[bytes]:
        return ThumbnailPack(Path(f"{self._stem(start)}.thumbs")).iter_all()

    def forget(self, start: int) -> None:
        for path in self.path.glob(f"{start:08d}.*"):
            path.unlink()

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def embed_chunks(
    encoder: ClipImageEncoder,
    source: GallerySource,
    chunks: Sequence[tuple[int, int]],
    *,
    batch_size: int,
    processes: int = 0,
    on_batch: Callable[[int], object] | None = None,
) -> Iterator[tuple[int, npt.NDArray[np.float16], list[bytes]]]:
    """Each chunk ``(start, stop)`` of the gallery as ``(start, embeddings, thumbnails)``, in
    order, as soon as it is embedded.

    On the fast preprocessing paths the images are decoded and prepared ahead by
    ``processes`` loader processes (worker.loader) while the model embeds, in batches of
    ``batch_size`` that may span chunks; on the processor path, image by image here.
    """
    if encoder.path == PROCESSOR:
        for start, stop in chunks:
            rows: list[Embeddings] = []
            thumbnails: list[bytes] = []
            for low in range(start, stop, batch_size):
                images = source.images(low, min(low + batch_size, stop))
                rows.append(encoder.embed(images))
                thumbnails.extend(encode_thumbnail(image) for image in images)
                if on_batch is not None:
                    on_batch(len(images))
            yield start, np.concatenate(rows).astype(STORED_DTYPE), thumbnails
        return
    bounds = list(chunks)
    indices = [i for start, stop in bounds for i in range(start, stop)]
    pending_rows: list[Embeddings] = []
    pending_thumbs: list[bytes] = []
    filled = 0
    current = 0  # the chunk being filled
    prepared = encoder.path == PIL_TORCH
    for batch in loader.batches(
        source,
        indices,
        batch_size=batch_size,
        steps=encoder.steps,
        path=encoder.path,
        processes=processes,
    ):
        pending_rows.append(encoder.embed_arrays(batch.arrays, prepared=prepared))
        pending_thumbs.extend(batch.thumbnails)
        filled += len(batch.arrays)
        if on_batch is not None:
            on_batch(len(batch.arrays))
        rows_so_far = np.concatenate(pending_rows)
        pending_rows = [rows_so_far]
        while current < len(bounds):
            start, stop = bounds[current]
            if filled < stop - start:
                break
            size = stop - start
            yield start, rows_so_far[:size].astype(STORED_DTYPE), pending_thumbs[:size]
            rows_so_far = rows_so_far[size:]
            pending_rows, pending_thumbs = [rows_so_far], pending_thumbs[size:]
            filled -= size
            current += 1


def embed_chunk(
    encoder: ClipImageEncoder,
    source: GallerySource,
    start: int,
    stop: int,
    *,
    batch_size: int,
    on_batch: Callable[[int], object] | None = None,
) -> tuple[npt.NDArray[np.float16], list[bytes]]:
    """Embeddings and thumbnails of gallery images ``start`` to ``stop``, here (a
    distributed build's chunk, in a worker that must not fork)."""
    ((_, embeddings, thumbnails),) = list(
        embed_chunks(encoder, source, [(start, stop)], batch_size=batch_size, on_batch=on_batch)
    )
    return embeddings, thumbnails


def open_build(
    encoder: ClipImageEncoder, source: GallerySource, directory: Path
) -> tuple[BuildParts, list[tuple[int, int]]]:
    """The parts of a (possibly resumed) build and the chunks still to compute.

    A resumed build's first chunk is re-embedded: if other weights made it, all is redone.
    """
    parts = BuildParts(directory, build_identity(encoder, source))
    plan = plan_chunks(len(source))
    done = [(start, stop) for start, stop in plan if parts.has(start)]
    if done:
        start, _ = done[0]
        stored = parts.embeddings(start)[:PROBES].astype(np.float32)
        fresh = encoder.embed(source.images(start, start + stored.shape[0]))
        if float(np.min(np.sum(stored * fresh, axis=1))) < EQUIVALENCE_MIN_COSINE:
            log.warning("unfinished build in %s came from other weights; starting over", parts.path)
            for start, _ in done:
                parts.forget(start)
            done = []
    return parts, [chunk for chunk in plan if chunk not in done]


def build_index(
    encoder: ClipImageEncoder,
    source: GallerySource,
    *,
    directory: Path,
    batch_size: int,
    progress: bool = True,
    loaders: int | None = None,
) -> Manifest:
    """Embed every gallery image in batches, here, and save the index in ``directory``;
    ``loaders`` processes decode ahead (default: by the device, worker.loader)."""
    started = time.perf_counter()
    parts, missing = open_build(encoder, source, directory)
    already = len(source) - sum(stop - start for start, stop in missing)
    bar = progress_bar(total=len(source), initial=already, enabled=progress)
    processes = loader.loader_processes(encoder.device) if loaders is None else loaders
    try:
        for start, embeddings, thumbnails in embed_chunks(
            encoder,
            source,
            missing,
            batch_size=batch_size,
            processes=processes,
            on_batch=bar.update,
        ):
            parts.save(start, embeddings, thumbnails)
    finally:
        bar.close()
    return finish_index(encoder, source, parts, directory=directory, started=started)


def finish_index(
    encoder: ClipImageEncoder,
    source: GallerySource,
    parts: BuildParts,
    *,
    directory: Path,
    started: float,
) -> Manifest:
    """Assemble the finished chunks into the index files, write the manifest last."""
    plan = plan_chunks(len(source))
    embeddings = np.concatenate([parts.embeddings(start) for start, _ in plan])
    if embeddings.shape[0] != len(source):
        raise IndexMismatch(f"The build in {parts.path} is incomplete: run it again.")
    _save_atomic(directory / "embeddings.npy", embeddings)
    _save_atomic(directory / "labels.npy", np.asarray(source.labels, dtype=np.int32))
    write_thumbnail_pack(
        directory / THUMBS, itertools.chain.from_iterable(parts.thumbnails(s) for s, _ in plan)
    )
    probe_pixels = encoder.pixels(source.images(0, min(PROBES, len(source))))
    _save_atomic(directory / "probes.npy", probe_pixels.numpy().astype(np.float32))
    if source.paths is not None:
        _write_text_atomic(directory / "paths.json", json.dumps(source.paths))
        skipped = [{"path": s.path, "reason": s.reason} for s in source.skipped]
        _write_text_atomic(directory / "skipped.json", json.dumps(skipped, indent=1))
    manifest = Manifest(
        gallery=source.name,
        kind=source.kind,
        model_id=encoder.model_id,
        count=len(source),
        dim=int(embeddings.shape[1]),
        dtype=str(embeddings.dtype),
        class_names=list(source.class_names),
        source=source.location,
        skipped=len(source.skipped),
        preprocessing=encoder.preprocessing,
        preprocessing_digest=encoder.preprocessing_digest,
        precision=encoder.precision,
        embeddings_sha256=_sha256(directory / "embeddings.npy"),
        labels_sha256=_sha256(directory / "labels.npy"),
        built_at=datetime.now(UTC).isoformat(),
        build_seconds=round(time.perf_counter() - started, 2),
    )
    _write_text_atomic(directory / "manifest.json", manifest.model_dump_json(indent=2))
    parts.discard()
    return manifest


def progress_bar(
    *, total: int | None, initial: int = 0, enabled: bool = True, desc: str = "indexing"
) -> Any:
    """A tqdm bar with the rate (img/s) and the ETA."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="img",
        desc=desc,
        disable=not enabled,
        smoothing=0.1,
        dynamic_ncols=True,
    )


# --- loading and searching -------------------------------------------------------------------


CLASS_ATTRIBUTE = "class"  # a built gallery's items' attribute: Fashion-MNIST's or the sub-folder


@dataclass
class GalleryIndex:
    """A loaded index: the matrix (memory-mapped) and its labels, searched on ``device``."""

    name: str
    directory: Path
    manifest: Manifest
    embeddings: npt.NDArray[np.float16]
    labels: npt.NDArray[np.int32]
    class_names: tuple[str, ...]
    paths: list[str] | None
    matrix: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def search(
        self, queries: npt.NDArray[np.float32], *, k: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Top-``k`` cosine matches of each query row: one matrix product and one top-k."""
        return top_k(self.matrix, queries, k=k)

    # The search's view of a gallery (worker.engine.Searchable): an item is a row, its id
    # is its position, its one attribute its class.

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @cached_property
    def columns(self) -> Columns:
        return Columns.of_labels(CLASS_ATTRIBUTE, self.labels, self.class_names)

    def candidates(self) -> Mask | None:
        return None  # every row is an item

    def row_of(self, item_id: str) -> int | None:
        if not item_id.isdecimal() or len(item_id) > 9:
            return None
        row = int(item_id)
        return row if row < len(self) else None

    def item_id(self, row: int) -> str:
        return str(row)

    def embedding_of(self, row: int) -> npt.NDArray[np.float32]:
        return np.asarray(self.embeddings[row], dtype=np.float32)

    def filter_mask(self, conditions: Any, rows: int) -> Mask:
        return self.columns.mask(conditions, rows)

    def match(self, row: int, *, rank: int, score: float) -> Match:
        label = int(self.labels[row])
        return Match(
            rank=rank,
            item_id=str(row),
            attributes={CLASS_ATTRIBUTE: self.class_names[label]},
            index=row,
            label=label,
            label_name=self.class_names[label],
            score=score,
            image_url=gallery_image_url(self.name, row),
            path=self.paths[row] if self.paths is not None else None,
        )

    def summary(self, *, default: bool) -> dict[str, Any]:
        """What a worker advertises about this gallery (see /galleries)."""
        return {
            "name": self.name,
            "size": len(self),
            "model": self.manifest.model_id,
            "kind": self.manifest.kind,
            "classes": list(self.class_names),
            "default": default,
            "dir": self.directory.name,
        }


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
    directory: Path, encoder: ClipImageEncoder, *, gallery: str, size: int | None = None
) -> GalleryIndex:
    """Load a built index and prove it matches; raise :class:`IndexMismatch` otherwise."""
    manifest_path = directory / "manifest.json"
    if not manifest_path.exists():
        raise IndexMismatch(
            f"No index at {directory}: build it with 'lookalike index build' "
            "(or start 'lookalike serve', which builds it)."
        )
    raw = read_manifest(directory) or {}
    if raw.get("format") != FORMAT:
        raise IndexMismatch(
            f"The index at {directory} has format {raw.get('format')!r}, this worker reads "
            f"{FORMAT}: rebuild it with 'lookalike index build --force'."
        )
    manifest = Manifest.model_validate_json(manifest_path.read_text())
    expected: dict[str, Any] = {
        "model_id": encoder.model_id,
        "gallery": gallery,
        "dim": encoder.dim,
        "preprocessing_digest": encoder.preprocessing_digest,
    }
    if size is not None:
        expected["count"] = size
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
    probes = torch.from_numpy(np.load(directory / "probes.npy"))
    fresh = encoder.embed_pixels(probes)
    stored = np.asarray(embeddings[: len(probes)], dtype=np.float32)
    if float(np.min(np.sum(stored * fresh, axis=1))) < EQUIVALENCE_MIN_COSINE:
        raise IndexMismatch(
            f"The index at {directory} was built by other weights than {encoder.model_id!r} "
            "has now: rebuild it with 'lookalike index build'."
        )
    paths = None
    if (directory / "paths.json").exists():
        paths = list(json.loads((directory / "paths.json").read_text()))
    matrix = torch.from_numpy(embeddings)
    if encoder.device != "cpu":
        matrix = matrix.to(encoder.device, dtype=encoder.dtype)
    index = GalleryIndex(
        name=manifest.gallery,
        directory=directory,
        manifest=manifest,
        embeddings=embeddings,
        labels=labels,
        class_names=tuple(manifest.class_names),
        paths=paths,
        matrix=matrix,
    )
    index.search(np.zeros((1, manifest.dim), dtype=np.float32), k=1)  # fault the pages in
    return index


def probe_thumbnails(directory: Path, count: int = 8) -> list[Image.Image]:
    """The first images of an index's thumbnail pack: the gallery's own kind of image, for the
    start-up check of the preprocessing (any built index has them)."""
    if not ThumbnailPack.exists(directory / THUMBS):
        return []
    pack = ThumbnailPack(directory / THUMBS)
    return [pack.image(i) for i in range(min(count, len(pack)))]


def load_probe_pixels(directory: Path) -> torch.Tensor | None:
    """The stored probe pixels of an index, for the start-up precision check, if any."""
    path = directory / "probes.npy"
    try:
        return torch.from_numpy(np.load(path)) if path.exists() else None
    except ValueError:
        return None


def own_gallery_dirs(root: Path, *, model_id: str, exclude: str) -> list[Path]:
    """Built indexes of own (folder) galleries for ``model_id``, except gallery ``exclude``."""
    return [
        directory
        for directory, manifest in built_indexes(root)
        if manifest.get("kind") == FOLDER
        and manifest.get("model_id") == model_id
        and manifest.get("gallery") != exclude
    ]


def skipped_files(directory: Path) -> list[Skipped]:
    path = directory / "skipped.json"
    if not path.exists():
        return []
    return [Skipped(item["path"], item["reason"]) for item in json.loads(path.read_text())]
