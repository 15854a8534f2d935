"""What a filter costs a search: the worker's own search step (worker.search) over a live
gallery of 100,000 items, unfiltered and with filters of several selectivities.

    .venv/bin/python -m lookalike.bench.filters [--items 100000] [--batch 1,16] [--device cpu]

Items are random unit vectors of CLIP ViT-B/32's width (512) with a shop's attributes
(category: one of 10, price: 0-200, in_stock: a coin, brand: one of 50). Each figure is the
median of ``--repeats`` runs of the whole step for a batch of queries: one matrix product,
then each query's mask, top-k and matches, as a worker runs it for a batch of jobs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from shared.jobs import JobRecord
from shared.schemas import JobKind, JobStatus
from worker.live import LiveGallery
from worker.search import _Ready, _search

DIM = 512
CATEGORIES = [f"c{n}" for n in range(10)]
FILTERS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "category (10 %)": {"category": "c3"},
    "price < 20 (10 %)": {"price": {"lt": 20}},
    "in_stock (50 %)": {"in_stock": True},
    "4 conditions (0.5 %)": {
        "category": {"in": ["c1", "c2"]},
        "in_stock": True,
        "price": {"gte": 10, "lt": 60},
        "brand": {"in": ["b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8", "b9", "b10"]},
    },
    "no item has it (0 %)": {"colour": "red"},
}


@dataclass
class _Engine:
    """The one thing worker.search asks of an engine here: the gallery."""

    gallery: LiveGallery

    def searchable(self, name: str, *, version: int | None = None) -> LiveGallery:
        return self.gallery


def make_gallery(items: int, *, device: str, seed: int = 0) -> LiveGallery:
    rng = np.random.default_rng(seed)
    dtype = torch.float32 if device == "cpu" else torch.float16
    gallery = LiveGallery("bench", DIM, device, dtype, capacity=items)
    vectors = rng.standard_normal((items, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    categories = rng.integers(0, len(CATEGORIES), items)
    prices = rng.uniform(0, 200, items).round(2)
    stock = rng.random(items) < 0.5
    brands = rng.integers(1, 51, items)
    for row in range(items):
        gallery.upsert(
            f"item-{row}",
            vectors[row],
            {
                "category": CATEGORIES[categories[row]],
                "price": float(prices[row]),
                "in_stock": bool(stock[row]),
                "brand": f"b{brands[row]}",
            },
        )
    return gallery


def ready(queries: np.ndarray, conditions: dict[str, Any] | None, *, k: int) -> list[_Ready]:
    jobs = []
    for n, query in enumerate(queries):
        job = JobRecord(
            id=f"job{n}",
            status=JobStatus.RUNNING,
            kind=JobKind.IMAGE,
            gallery="bench",
            k=k,
            filter=conditions,
            created_at=datetime.now(UTC),
        )
        jobs.append(_Ready(job, None, 0.0, 0.0, query=query))
    return jobs


def measure(
    gallery: LiveGallery, batch: int, conditions: dict[str, Any] | None, *, repeats: int, k: int
) -> tuple[float, int]:
    """Median milliseconds of the search step for ``batch`` queries; matches of the first."""
    engine: Any = _Engine(gallery)
    rng = np.random.default_rng(batch)
    queries = rng.standard_normal((batch, DIM), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    times = []
    found = 0
    for _ in range(repeats + 2):
        jobs = ready(queries, conditions, k=k)
        t0 = time.perf_counter()
        _search(engine, jobs)
        times.append((time.perf_counter() - t0) * 1000)
        found = len(jobs[0].matches)
    return statistics.median(times[2:]), found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--batch", default="1,16", help="queries per search step")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a worker's: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    gallery = make_gallery(args.items, device=args.device)
    print(
        f"{args.items:,} items on {args.device} ({torch.get_num_threads()} torch threads), "
        f"made in {time.perf_counter() - t0:.1f}s; k={args.k}; median of {args.repeats}"
    )
    print()
    batches = [int(b) for b in args.batch.split(",")]
    header = " | ".join(f"{b} quer{'y' if b == 1 else 'ies'}: ms (x none)" for b in batches)
    print(f"| filter | {header} | matches |")
    print("|---|" + "---|" * len(batches) + "---|")
    base: dict[int, float] = {}
    for name, conditions in FILTERS.items():
        cells = []
        found = 0
        for batch in batches:
            ms, found = measure(gallery, batch, conditions, repeats=args.repeats, k=args.k)
            base.setdefault(batch, ms)
            cells.append(f"{ms:.2f} ({ms / base[batch]:.2f}x)")
        print(f"| {name} | {' | '.join(cells)} | {found} |")


if __name__ == "__main__":
    main()
