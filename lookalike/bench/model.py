"""``lookalike bench --model-only``: the encoder and the search, timed in this process.

No service is involved. Figures: ms per image at batch 1 (preprocessing included, like a job's
``embed_ms``), images/s at a batch, plain fp32 eager against the configured fast path on the
same pixels, top-k search over the gallery index and over synthetic galleries of growing size,
and the time a fresh process takes to load the model and the index.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from shared.errors import IndexMismatch
from shared.fashion_mnist import load_gallery
from shared.images import decode_upload
from shared.settings import (
    FASHION_MNIST,
    FASHION_MNIST_SIZE,
    GallerySettings,
    ModelSettings,
    Settings,
)
from worker.encoder import ClipImageEncoder, load_encoder
from worker.engine import default_index_dir
from worker.index import STORED_DTYPE, gallery_to_images, load_index, top_k
from worker.loader import loader_processes
from worker.preprocess import PIL_TORCH, PROCESSOR, TORCH

DEFAULT_SIZES = (10_000, 70_000, 1_000_000)
COMPARE_IMAGES = 64
SEARCH_K = 5
SEARCH_BATCH = 32
BATCH1_WARMUP = 3
MIN_RUNS = 3
BUDGET_S = 10.0  # per measurement, past MIN_RUNS: 1M rows at batch 32 take seconds a run
COMPARE_BUDGET_S = 60.0  # both paths per run: fp32 alone takes seconds at batch 32 on a CPU
STARTUP_TIMEOUT_S = 600


def timed_runs(
    fn: Callable[[int], object],
    *,
    repeats: int,
    warmup: int = 1,
    budget_s: float | None = BUDGET_S,
) -> list[float]:
    """Seconds per call of ``fn(run_number)``, after ``warmup`` untimed calls.

    Stops early, after at least ``MIN_RUNS`` runs, once ``budget_s`` seconds are spent.
    """
    for i in range(warmup):
        fn(i)
    runs: list[float] = []
    spent = 0.0
    for i in range(repeats):
        started = time.perf_counter()
        fn(i)
        runs.append(time.perf_counter() - started)
        spent += runs[-1]
        if budget_s is not None and len(runs) >= MIN_RUNS and spent > budget_s:
            break
    return runs


def median_ms(runs: Sequence[float]) -> float:
    return statistics.median(runs) * 1000


def synthetic_rows(count: int, dim: int, *, seed: int = 0) -> npt.NDArray[np.float16]:
    """``count`` random L2-normalised rows in the stored dtype, made in chunks (low peak)."""
    rng = np.random.default_rng(seed)
    rows = np.empty((count, dim), dtype=STORED_DTYPE)
    chunk = 1 << 16
    for low in range(0, count, chunk):
        block = rng.standard_normal((min(chunk, count - low), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        rows[low : low + block.shape[0]] = block
    return rows


def _queries(embeddings: npt.NDArray[np.float32], count: int) -> npt.NDArray[np.float32]:
    reps = -(-count // embeddings.shape[0])
    return np.ascontiguousarray(np.tile(embeddings, (reps, 1))[:count])


def measure_encoder(
    encoder: ClipImageEncoder, images: Sequence[Image.Image], *, batch_size: int, repeats: int
) -> dict[str, Any]:
    """Batch 1 (median ms, preprocessing included and apart) and images/s at ``batch_size``."""

    def one(i: int) -> None:
        encoder.embed([images[i % len(images)]])

    def preprocess(i: int) -> None:
        encoder.pixels([images[i % len(images)]])

    batch = list(images[:batch_size])
    runs_1 = timed_runs(one, repeats=repeats, warmup=BATCH1_WARMUP)
    runs_pre = timed_runs(preprocess, repeats=repeats, warmup=1)
    runs_b = timed_runs(lambda _: encoder.embed(batch), repeats=repeats, warmup=1)
    return {
        "precision": encoder.precision,
        "batch1_ms": median_ms(runs_1),
        "batch1_preprocess_ms": median_ms(runs_pre),
        "batch1_runs": len(runs_1),
        "batch_size": len(batch),
        "batch_ms": median_ms(runs_b),
        "batch_images_per_s": len(batch) / statistics.median(runs_b),
        "batch_runs": len(runs_b),
    }


def compare_paths(
    baseline: ClipImageEncoder,
    fast: ClipImageEncoder,
    images: Sequence[Image.Image],
    *,
    batch_size: int,
    repeats: int,
) -> dict[str, Any]:
    """fp32 eager vs the fast path: forward passes on the same pixels, timed alternately so
    a change in the machine's load hits both, and the worst cosine between their rows."""
    pixels = fast.pixels(list(images[:batch_size]))
    base_runs: list[float] = []
    fast_runs: list[float] = []
    base_one: list[float] = []
    fast_one: list[float] = []

    def both(i: int) -> None:
        for encoder, runs, one in ((baseline, base_runs, base_one), (fast, fast_runs, fast_one)):
            started = time.perf_counter()
            encoder.embed_pixels(pixels)
            runs.append(time.perf_counter() - started)
            started = time.perf_counter()
            encoder.embed_pixels(pixels[i % len(pixels) : i % len(pixels) + 1])
            one.append(time.perf_counter() - started)

    timed_runs(both, repeats=1 + repeats, warmup=0, budget_s=COMPARE_BUDGET_S)
    base_runs, fast_runs = base_runs[1:], fast_runs[1:]  # the first pair warmed up
    base_one, fast_one = base_one[1:], fast_one[1:]
    base_rows = np.concatenate(
        [baseline.embed(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )
    fast_rows = np.concatenate(
        [fast.embed(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )
    cosines = np.sum(base_rows * fast_rows, axis=1)
    base_ms, fast_ms = median_ms(base_runs), median_ms(fast_runs)
    return {
        "batch_size": int(pixels.shape[0]),
        "runs": len(fast_runs),
        "fp32_precision": baseline.precision,
        "fast_precision": fast.precision,
        "fp32_ms": base_ms,
        "fast_ms": fast_ms,
        "fp32_images_per_s": pixels.shape[0] / base_ms * 1000,
        "fast_images_per_s": pixels.shape[0] / fast_ms * 1000,
        "speedup": base_ms / fast_ms,
        # What batching can win: time per image alone over time per image in the batch.
        "fp32_batch1_ms": median_ms(base_one),
        "fast_batch1_ms": median_ms(fast_one),
        "fp32_batch_gain": median_ms(base_one) / (base_ms / pixels.shape[0]),
        "fast_batch_gain": median_ms(fast_one) / (fast_ms / pixels.shape[0]),
        "cosine_images": len(images),
        "min_cosine": float(np.min(cosines)),
        "mean_cosine": float(np.mean(cosines)),
    }


def measure_search(
    matrix: torch.Tensor, embeddings: npt.NDArray[np.float32], *, repeats: int
) -> dict[str, Any]:
    """Top-k ms for one query, and per query with ``SEARCH_BATCH`` in one matrix product."""
    one = _queries(embeddings, 1)
    many = _queries(embeddings, SEARCH_BATCH)
    runs_1 = timed_runs(lambda _: top_k(matrix, one, k=SEARCH_K), repeats=max(repeats, 20))
    runs_b = timed_runs(lambda _: top_k(matrix, many, k=SEARCH_K), repeats=repeats)
    return {
        "rows": int(matrix.shape[0]),
        "dim": int(matrix.shape[1]),
        "dtype": str(matrix.dtype).removeprefix("torch."),
        "k": SEARCH_K,
        "matrix_mb": matrix.element_size() * matrix.nelement() / 2**20,
        "batch1_ms": median_ms(runs_1),
        "batch": SEARCH_BATCH,
        "batch_ms": median_ms(runs_b),
        "batch_per_query_ms": median_ms(runs_b) / SEARCH_BATCH,
    }


def _on_device(rows: npt.NDArray[np.float16], encoder: ClipImageEncoder) -> torch.Tensor:
    matrix = torch.from_numpy(rows)
    if encoder.device != "cpu":  # as load_index places it
        matrix = matrix.to(encoder.device, dtype=encoder.dtype)
    return matrix


def gallery_search(
    settings: Settings,
    encoder: ClipImageEncoder,
    embeddings: npt.NDArray[np.float32],
    *,
    repeats: int,
) -> dict[str, Any]:
    """Search the built index of these settings; synthetic rows of its size when none is."""
    gallery = settings.gallery
    directory = default_index_dir(settings)
    note = f"no index at {directory}: synthetic rows of the gallery size"
    if (directory / "manifest.json").exists():
        try:
            size = gallery.size if gallery.name == FASHION_MNIST else None
            index = load_index(directory, encoder, gallery=gallery.name, size=size)
        except IndexMismatch as error:
            note = f"the index was refused ({error}): synthetic rows of the gallery size"
        else:
            return {"source": "index", "note": f"index at {directory}"} | measure_search(
                index.matrix, embeddings, repeats=repeats
            )
    matrix = _on_device(synthetic_rows(gallery.size, encoder.dim), encoder)
    return {"source": "synthetic", "note": note} | measure_search(
        matrix, embeddings, repeats=repeats
    )


def measure_scaling(
    encoder: ClipImageEncoder,
    embeddings: npt.NDArray[np.float32],
    *,
    sizes: Sequence[int],
    repeats: int,
) -> list[dict[str, Any]]:
    """Search over synthetic galleries of each size; one matrix in memory at a time."""
    rows = []
    for size in sizes:
        matrix = _on_device(synthetic_rows(size, encoder.dim, seed=size), encoder)
        rows.append(measure_search(matrix, embeddings, repeats=repeats))
        del matrix
    return rows


def measure_startup(settings: Settings) -> dict[str, Any]:
    """Load the model and the index as a worker does, in a fresh Python process.

    Nothing this process has loaded or cached helps; the process time includes the
    interpreter and the imports of torch and transformers.
    """
    data = {
        "model": settings.model.model_dump(mode="json"),
        "gallery": settings.gallery.model_dump(mode="json"),
    }
    command = [
        sys.executable,
        "-c",
        "from lookalike.bench.model import startup_probe; startup_probe()",
    ]
    started = time.perf_counter()
    done = subprocess.run(
        command,
        input=json.dumps(data),
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT_S,
        check=False,
    )
    process_s = time.perf_counter() - started
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"mode": "fresh subprocess", "error": f"exit {done.returncode}: {tail[0]}"}
    child: dict[str, Any] = json.loads(lines[-1])
    return {
        "mode": "fresh subprocess",
        "process_s": process_s,
        "imports_and_interpreter_s": process_s - child["load_s"],
    } | child


def startup_probe() -> None:
    """The child of :func:`measure_startup`: settings as JSON on stdin, a JSON line out."""
    from worker.engine import load_engine

    data = json.loads(sys.stdin.read())
    settings = Settings(
        model=ModelSettings(**data["model"]), gallery=GallerySettings(**data["gallery"])
    )
    directory = default_index_dir(settings)
    result: dict[str, Any]
    if (directory / "manifest.json").exists():
        try:
            engine = load_engine(settings)
        except IndexMismatch as error:
            result = {"index_loaded": False, "note": f"index refused: {error}"}
        else:
            result = {
                "index_loaded": True,
                "load_s": engine.load_seconds,
                "precision": engine.encoder.precision,
                "rows": len(engine.index),
                "note": "model + index (worker.engine.load_engine)",
            }
            print(json.dumps(result))
            return
    else:
        result = {"index_loaded": False, "note": f"no index at {directory}: model only"}
    started = time.perf_counter()
    encoder = load_encoder(settings.model)
    result |= {"load_s": time.perf_counter() - started, "precision": encoder.precision}
    print(json.dumps(result))


PREPROCESS_IMAGES = 64
BUILD_IMAGES = 1024


def _jpeg(image: Image.Image, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def measure_preprocessing(
    encoder: ClipImageEncoder, images: Sequence[Image.Image], *, batch_size: int, repeats: int
) -> dict[str, Any]:
    """Images per second, one process, from a gallery image (28 px) or a 640x480 JPEG (decoded
    as uploads are) to the model's input: CLIP's image processor against the fast paths (the
    one this encoder uses is ``encoder.path``), in batches of ``batch_size``."""
    sample = list(images[:PREPROCESS_IMAGES])
    jpegs = [_jpeg(image, (640, 480)) for image in sample]
    paths = [PROCESSOR, *((PIL_TORCH, TORCH) if encoder.steps is not None else ())]
    figures: dict[str, Any] = {"path": encoder.path, "paths": paths, "batch_size": batch_size}

    def rate(fn: Callable[[list[Any]], object], inputs: list[Any]) -> float:
        def one(_: int) -> None:
            for low in range(0, len(inputs), batch_size):
                fn(inputs[low : low + batch_size])

        runs = timed_runs(one, repeats=repeats, warmup=1)
        return len(inputs) / statistics.median(runs)

    def decoded(data: list[bytes]) -> list[Image.Image]:
        return [decode_upload(d, max_pixels=10**8).image for d in data]

    def by(path: str) -> Callable[[list[Image.Image]], object]:
        return lambda batch: encoder.input_pixels(batch, path=path)

    def from_jpeg(
        to_pixels: Callable[[list[Image.Image]], object],
    ) -> Callable[[list[Any]], object]:
        return lambda batch: to_pixels(decoded(batch))

    for name in paths:
        fn = by(name)
        figures[name] = {
            "gallery_28px_per_s": rate(fn, sample),
            "jpeg_640x480_per_s": rate(from_jpeg(fn), jpegs),
        }
    return figures


def measure_build(
    encoder: ClipImageEncoder, settings: Settings, *, batch_size: int
) -> dict[str, Any]:
    """An index build of the first ``BUILD_IMAGES`` Fashion-MNIST images (at most the
    gallery's size; into a temporary folder, with loader processes as a build uses them)
    beside the model's forward passes alone on the same images' pixels."""
    import tempfile

    from shared.galleries import FashionMnistSource
    from worker.index import build_index

    count = min(BUILD_IMAGES, settings.gallery.size)
    source = FashionMnistSource.load(settings.gallery.data_dir, size=count)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        build_index(encoder, source, directory=Path(tmp), batch_size=batch_size, progress=False)
        build_s = time.perf_counter() - started
    pixels = encoder.input_pixels(source.images(0, min(batch_size, count)))

    def forward(_: int) -> None:
        encoder.embed_pixels(pixels)

    runs = timed_runs(forward, repeats=5, warmup=1)
    return {
        "images": count,
        "batch_size": batch_size,
        "build_images_per_s": count / build_s,
        "forward_images_per_s": int(pixels.shape[0]) / statistics.median(runs),
        "loader_processes": loader_processes(encoder.device),
    }


def run_model_bench(
    settings: Settings,
    *,
    batch_size: int = 32,
    repeats: int = 10,
    sizes: Sequence[int] = DEFAULT_SIZES,
    compare_images: int = COMPARE_IMAGES,
    startup: bool = True,
    build: bool = True,
) -> dict[str, Any]:
    """Every model-only figure, as the JSON written by ``--json``."""
    load_before = list(os.getloadavg())
    needed = min(max(batch_size, compare_images), FASHION_MNIST_SIZE)
    images = gallery_to_images(load_gallery(settings.gallery.data_dir, size=needed).images)
    startup_figures = measure_startup(settings) if startup else None
    fast = load_encoder(settings.model, probe_images=images[:8])
    baseline = load_encoder(
        settings.model.model_copy(update={"fast_cpu": "off", "cuda_graphs": "off"})
    )
    if baseline.dtype != torch.float32:  # fp16 on a GPU: the baseline is plain fp32
        baseline.model = baseline.model.float()
        baseline.dtype, baseline.precision = torch.float32, "fp32"
    encoder_figures = measure_encoder(fast, images, batch_size=batch_size, repeats=repeats)
    preprocessing = measure_preprocessing(fast, images, batch_size=batch_size, repeats=repeats)
    build_figures = measure_build(fast, settings, batch_size=batch_size) if build else None
    comparison = compare_paths(
        baseline, fast, images[:compare_images], batch_size=batch_size, repeats=repeats
    )
    del baseline
    embeddings = fast.embed(images[:SEARCH_BATCH])
    return {
        "kind": "model-only",
        "model": {
            "name": fast.model_id,
            "is_random": fast.is_random,
            "forward": fast.forward_note,
            "device": fast.device,
            "precision": fast.precision,
            "dim": fast.dim,
            "notes": [*fast.notes, fast.path_note],
            "attention": str(getattr(fast.model.config, "_attn_implementation", "?")),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average_before": load_before,
        },
        "encoder": encoder_figures,
        "preprocessing": preprocessing,
        "build": build_figures,
        "fp32_vs_fast": comparison,
        "search": gallery_search(settings, fast, embeddings, repeats=repeats),
        "scaling": measure_scaling(fast, embeddings, sizes=sizes, repeats=repeats),
        "startup": startup_figures,
        "load_average_after": list(os.getloadavg()),
    }


def format_model_report(report: dict[str, Any]) -> str:
    """The human report of :func:`run_model_bench`'s dict."""
    model, enc, cmp_ = report["model"], report["encoder"], report["fp32_vs_fast"]
    search, machine = report["search"], report["machine"]
    lines = [
        f"model {model['name']} on {model['device']} ({model['precision']}), dim {model['dim']}; "
        f"{machine['cpus']} CPUs, torch {machine['torch']} with {machine['torch_threads']} "
        "threads",
    ]
    if model["is_random"]:
        lines.append("note: random weights: these figures are for compute only")
    if model.get("forward", "eager") != "eager":
        lines.append(f"forward      {model['forward']}")
    pre, build = report.get("preprocessing"), report.get("build")
    if pre:
        lines.append(
            f"preprocess   one process, batches of {pre['batch_size']}, images/s: "
            + "; ".join(
                f"{name}{' (used)' if name == pre['path'] else ''} "
                f"{pre[name]['gallery_28px_per_s']:.0f} (28 px gallery image), "
                f"{pre[name]['jpeg_640x480_per_s']:.0f} (640x480 JPEG, decoded)"
                for name in pre.get("paths", dict.fromkeys(("processor", pre["path"])))
            )
        )
    if build:
        lines.append(
            f"build        {build['images']} Fashion-MNIST images, batch {build['batch_size']}, "
            f"{build['loader_processes']} loader processes: {build['build_images_per_s']:.0f} "
            f"images/s; the forward pass alone: {build['forward_images_per_s']:.0f} images/s"
        )
    lines += [
        f"encoder      batch 1: {enc['batch1_ms']:.1f} ms/image (median of "
        f"{enc['batch1_runs']}; preprocessing {enc['batch1_preprocess_ms']:.1f} ms of it)",
        f"             batch {enc['batch_size']}: {enc['batch_images_per_s']:.1f} images/s "
        f"({enc['batch_ms']:.0f} ms a batch, median of {enc['batch_runs']})",
        f"fp32 vs fast batch {cmp_['batch_size']}, forward only, alternating, median of "
        f"{cmp_['runs']}: {cmp_['fp32_precision']} {cmp_['fp32_ms']:.0f} ms "
        f"({cmp_['fp32_images_per_s']:.1f} img/s), {cmp_['fast_precision']} "
        f"{cmp_['fast_ms']:.0f} ms ({cmp_['fast_images_per_s']:.1f} img/s): "
        f"speed-up x{cmp_['speedup']:.2f}",
        f"batch gain   time per image at batch 1 over time per image at batch "
        f"{cmp_['batch_size']}: fp32 x{cmp_['fp32_batch_gain']:.2f} "
        f"({cmp_['fp32_batch1_ms']:.1f} ms alone), fast x{cmp_['fast_batch_gain']:.2f} "
        f"({cmp_['fast_batch1_ms']:.1f} ms alone): the most batching can give",
        f"             cosine fp32 vs fast over {cmp_['cosine_images']} gallery images: "
        f"min {cmp_['min_cosine']:.4f}, mean {cmp_['mean_cosine']:.4f}",
        f"search       {search['source']}: {search['note']}",
        f"             top-{search['k']} over {search['rows']} rows ({search['dtype']}, "
        f"{search['matrix_mb']:.1f} MB): batch 1 {search['batch1_ms']:.3f} ms, "
        f"{search['batch']} queries {search['batch_per_query_ms']:.3f} ms/query",
        f"scaling      synthetic L2-normalised rows, top-{search['k']}, {search['dtype']}:",
        f"  {'rows':>10}  {'matrix MB':>9}  {'batch 1 ms':>10}  "
        f"{'per query ms (x' + str(SEARCH_BATCH) + ')':>22}",
    ]
    for row in report["scaling"]:
        lines.append(
            f"  {row['rows']:>10,}  {row['matrix_mb']:>9.1f}  {row['batch1_ms']:>10.3f}  "
            f"{row['batch_per_query_ms']:>22.3f}"
        )
    start = report["startup"]
    if start is None:
        lines.append("start        not measured")
    elif "error" in start:
        lines.append(f"start        failed in a fresh subprocess: {start['error']}")
    else:
        lines.append(
            f"start        {start['process_s']:.1f} s for a fresh process: "
            f"{start['load_s']:.1f} s loading ({start['note']}, {start['precision']}) + "
            f"{start['imports_and_interpreter_s']:.1f} s interpreter and imports"
        )
    before = ", ".join(f"{x:.2f}" for x in machine["load_average_before"])
    after = ", ".join(f"{x:.2f}" for x in report["load_average_after"])
    lines.append(f"load average before: {before}; after: {after}")
    return "\n".join(lines)
