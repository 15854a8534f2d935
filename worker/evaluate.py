"""``lookalike eval``: label precision@k of CLIP on Fashion-MNIST, against raw pixels.

Queries are the first N images of Fashion-MNIST's test split; the gallery is the first S images
of its train split (gallery positions 0..S-1, so a built index of that size is the same gallery
and its embeddings are reused). Precision@k is the share of a query's top-k matches that have
the query's class, averaged over queries, per class and overall. The baseline ranks the same
gallery by the cosine of raw pixels (28x28 flattened to 784 floats): a CLIP model worth
deploying must beat it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from shared.errors import IndexMismatch, LookalikeError
from shared.fashion_mnist import CLASS_NAMES, SPLITS, Gallery, find_dataset, read_idx
from shared.settings import Settings
from worker.encoder import ClipImageEncoder, index_batch_size, load_encoder
from worker.index import gallery_to_images, index_dir, load_index, top_k

log = logging.getLogger(__name__)

GALLERY = "fashion-mnist"  # the gallery whose labels are judged, whatever LOOKALIKE_GALLERY says
TRAIN_SIZE = 60_000
TEST_SIZE = 10_000
SEARCH_CHUNK = 1024  # queries per matrix product: bounds the score matrix to ~250 MB at 60k
PROBES = 8
RANDOM_WARNING = (
    "WARNING: LOOKALIKE_MODEL={model} has RANDOM weights: its CLIP figures are MEANINGLESS. "
    "Only the raw-pixel baseline is real; set LOOKALIKE_MODEL to a trained CLIP to judge it."
)


@dataclass(frozen=True)
class PrecisionAtK:
    """Label precision@k, overall (mean over all queries) and per class (mean over its queries)."""

    k: int
    overall: float
    per_class: tuple[float | None, ...]  # None where the class has no query
    queries: tuple[int, ...]  # queries per class


def precision_at_k(
    query_labels: npt.NDArray[np.integer[Any]],
    match_labels: npt.NDArray[np.integer[Any]],
    *,
    classes: int = len(CLASS_NAMES),
) -> PrecisionAtK:
    """Share of each query's matches (one row of ``match_labels``) that have its label."""
    queries = np.asarray(query_labels, dtype=np.int64)
    matches = np.asarray(match_labels, dtype=np.int64)
    if matches.ndim != 2 or matches.shape[0] != queries.shape[0] or matches.shape[1] < 1:
        raise ValueError(
            f"match labels of shape {matches.shape} do not fit {queries.shape[0]} queries"
        )
    if queries.size == 0:
        raise ValueError("precision@k needs at least one query")
    per_query = np.mean(matches == queries[:, None], axis=1)
    counts = np.bincount(queries, minlength=classes)[:classes]
    sums = np.bincount(queries, weights=per_query, minlength=classes)[:classes]
    return PrecisionAtK(
        k=int(matches.shape[1]),
        overall=float(np.mean(per_query)),
        per_class=tuple(float(s / n) if n else None for s, n in zip(sums, counts, strict=True)),
        queries=tuple(int(n) for n in counts),
    )


def search_labels(
    matrix: torch.Tensor,
    queries: npt.NDArray[np.float32],
    labels: npt.NDArray[np.uint8],
    *,
    k: int,
) -> npt.NDArray[np.uint8]:
    """Labels of each query's top-``k`` gallery rows (by dot product), best first."""
    found = [
        top_k(matrix, queries[low : low + SEARCH_CHUNK], k=k)[1]
        for low in range(0, queries.shape[0], SEARCH_CHUNK)
    ]
    return labels[np.concatenate(found)]


def pixel_vectors(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """Images flattened to float rows, L2-normalised (an all-black image stays zero)."""
    rows = images.reshape(images.shape[0], -1).astype(np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    rows /= np.maximum(norms, np.float32(1e-12))
    return rows


def pixel_baseline(
    query_images: npt.NDArray[np.uint8],
    gallery_images: npt.NDArray[np.uint8],
    gallery_labels: npt.NDArray[np.uint8],
    *,
    k: int,
) -> npt.NDArray[np.uint8]:
    """Labels of each query's top-``k`` gallery images by cosine of raw pixels."""
    matrix = torch.from_numpy(pixel_vectors(gallery_images))
    return search_labels(matrix, pixel_vectors(query_images), gallery_labels, k=k)


def load_split(data_dir: Path | None, split: str, *, count: int) -> Gallery:
    """The first ``count`` images and labels of one Fashion-MNIST split ("train" or "test")."""
    directory = find_dataset(data_dir)
    arrays = []
    for stem in SPLITS[split]:
        path = directory / stem
        arrays.append(read_idx(path if path.is_file() else path.with_name(stem + ".gz")))
    images, labels = arrays
    if images.shape[0] < count:
        flag = "--queries" if split == "test" else "--gallery-size"
        raise LookalikeError(
            f"{flag} {count} asks for more images than the {split} split in {directory} "
            f"holds ({images.shape[0]})"
        )
    return Gallery(
        images=np.asarray(images[:count], dtype=np.uint8),
        labels=np.asarray(labels[:count], dtype=np.uint8),
    )


def indexed_gallery(
    settings: Settings, encoder: ClipImageEncoder, gallery: Gallery
) -> tuple[torch.Tensor | None, str]:
    """The built index's matrix for this gallery, size and model, if there is a valid one.

    Returns ``(matrix, note)``; ``matrix`` is None when the gallery must be embedded here. All
    knowledge of the index module's layout is kept in this function.
    """
    size = len(gallery)
    directory = index_dir(
        settings.gallery.index_dir, gallery=GALLERY, size=size, model_id=encoder.model_id
    )
    if not (directory / "manifest.json").exists():
        return None, f"embedded here: no index at {directory}"
    try:
        index = load_index(directory, encoder, gallery=GALLERY, size=size)
    except IndexMismatch as error:
        log.warning("not using the index: %s", error)
        return None, f"embedded here: the index at {directory} was refused"
    if not np.array_equal(np.asarray(index.labels), gallery.labels):
        return None, f"embedded here: the index at {directory} has other labels"
    return index.matrix, f"reused the index at {directory}"


def _progress_bar(*, total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="img",
        desc="embedding",
        disable=not enabled,
        smoothing=0.1,
        dynamic_ncols=True,
    )


def embed_images(
    encoder: ClipImageEncoder, images: npt.NDArray[np.uint8], *, batch_size: int, bar: Any
) -> npt.NDArray[np.float32]:
    """CLIP rows of gallery-style arrays, converted like uploads, ``batch_size`` at a time."""
    rows = []
    for low in range(0, images.shape[0], batch_size):
        batch = images[low : low + batch_size]
        rows.append(encoder.embed(gallery_to_images(batch)))
        bar.update(batch.shape[0])
    return np.concatenate(rows)


def _rows(clip: PrecisionAtK, pixels: PrecisionAtK, names: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {"label": label, "name": name, "queries": n, "clip": c, "pixels": p}
        for label, (name, n, c, p) in enumerate(
            zip(names, clip.queries, clip.per_class, pixels.per_class, strict=True)
        )
    ]


def run_eval(
    settings: Settings,
    *,
    queries: int,
    k: int,
    gallery_size: int,
    batch_size: int | None,
    progress: bool = True,
) -> dict[str, Any]:
    """Precision@k of CLIP and of raw pixels, per class and overall, as ``--json`` writes it."""
    started = time.perf_counter()
    if not 1 <= k <= gallery_size:
        raise LookalikeError(f"--k {k} must be from 1 to the gallery size ({gallery_size})")
    data_dir = settings.gallery.data_dir
    query_set = load_split(data_dir, "test", count=queries)
    gallery = load_split(data_dir, "train", count=gallery_size)
    encoder = load_encoder(settings.model, probe_images=gallery_to_images(gallery.images[:PROBES]))
    batch_size = index_batch_size(batch_size, encoder.device)
    loaded = time.perf_counter()
    matrix, gallery_note = indexed_gallery(settings, encoder, gallery)
    bar = _progress_bar(total=queries + (gallery_size if matrix is None else 0), enabled=progress)
    try:
        query_rows = embed_images(encoder, query_set.images, batch_size=batch_size, bar=bar)
        if matrix is None:
            gallery_rows = embed_images(encoder, gallery.images, batch_size=batch_size, bar=bar)
            matrix = torch.from_numpy(gallery_rows).to(encoder.device, encoder.dtype)
    finally:
        bar.close()
    embedded = time.perf_counter()
    clip = precision_at_k(query_set.labels, search_labels(matrix, query_rows, gallery.labels, k=k))
    pixels = precision_at_k(
        query_set.labels, pixel_baseline(query_set.images, gallery.images, gallery.labels, k=k)
    )
    finished = time.perf_counter()
    margin = clip.overall - pixels.overall
    return {
        "kind": "eval",
        "model": {
            "name": encoder.model_id,
            "device": encoder.device,
            "precision": encoder.precision,
            "notes": encoder.notes,
        },
        "model_is_random": encoder.is_random,
        "warning": RANDOM_WARNING.format(model=encoder.model_id) if encoder.is_random else None,
        "settings": {
            "dataset": GALLERY,
            "data_dir": str(find_dataset(data_dir)),
            "queries": queries,
            "query_split": "test",
            "gallery_size": gallery_size,
            "gallery_split": "train",
            "k": k,
            "batch_size": batch_size,
            "index_dir": str(settings.gallery.index_dir),
        },
        "gallery_source": gallery_note,
        "overall": {"queries": queries, "clip": clip.overall, "pixels": pixels.overall},
        "classes": _rows(clip, pixels, CLASS_NAMES),
        "winner": "clip" if margin > 0 else "pixels" if margin < 0 else "tie",
        "margin": margin,
        "timings": {
            "load_s": loaded - started,
            "embed_s": embedded - loaded,
            "search_s": finished - embedded,
            "total_s": finished - started,
        },
    }


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def format_eval_report(report: dict[str, Any]) -> str:
    """The human report of :func:`run_eval`'s dict: a table per class, the verdict, the run."""
    k = report["settings"]["k"]
    model, run, timings = report["model"], report["settings"], report["timings"]
    banner = [f"!!! {report['warning']} !!!", ""] if report["model_is_random"] else []
    clip_head, pixel_head = f"CLIP P@{k}", f"pixels P@{k}"
    lines = [
        *banner,
        f"{'class':<12}  {'queries':>7}  {clip_head:>10}  {pixel_head:>10}",
        *(
            f"{row['name']:<12}  {row['queries']:>7}  {_percent(row['clip']):>10}  "
            f"{_percent(row['pixels']):>10}"
            for row in report["classes"]
        ),
        f"{'overall':<12}  {report['overall']['queries']:>7}  "
        f"{_percent(report['overall']['clip']):>10}  {_percent(report['overall']['pixels']):>10}",
        "",
        _verdict(report),
        f"model    {model['name']} on {model['device']} ({model['precision']})",
        f"gallery  the first {run['gallery_size']:,} Fashion-MNIST train images; "
        f"{report['gallery_source']}",
        f"queries  the first {run['queries']:,} Fashion-MNIST test images; k {k}, "
        f"batch {run['batch_size']}",
        f"time     {timings['total_s']:.1f} s (load {timings['load_s']:.1f} s, embed "
        f"{timings['embed_s']:.1f} s, search {timings['search_s']:.1f} s)",
    ]
    if report["model_is_random"]:
        lines += ["", f"!!! {report['warning']} !!!"]
    return "\n".join(lines)


def _verdict(report: dict[str, Any]) -> str:
    k = report["settings"]["k"]
    clip, pixels = report["overall"]["clip"], report["overall"]["pixels"]
    points = abs(report["margin"]) * 100
    if report["winner"] == "clip":
        return (
            f"CLIP wins: {points:.1f} points of P@{k} above raw pixels "
            f"({_percent(clip)} vs {_percent(pixels)})"
        )
    if report["winner"] == "pixels":
        return (
            f"raw pixels win: CLIP is {points:.1f} points of P@{k} below them "
            f"({_percent(clip)} vs {_percent(pixels)}): not worth deploying"
        )
    return f"a tie: CLIP and raw pixels both reach {_percent(clip)} P@{k}"
