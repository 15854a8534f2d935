"""The image tower's forward pass replayed from CUDA graphs, for the small batches of jobs.

On a GPU a small forward pass costs the CPU that launches its few hundred kernels, not the GPU
that runs them: on an H100, ViT-B/32 in fp16 embedded one image in 3.5 ms, most of it spent
launching (docs/benchmarks.md), and a worker under load spent its core doing that for batches
of a few jobs. A CUDA graph records the launches once and replays them in one call. One graph
is captured per batch size of ``SIZES`` (a batch is padded up to the next size: each image's
embedding depends on that image alone, so the padding rows change nothing and are dropped);
larger batches (index builds, at 256) run eagerly, where the GPU is the bound anyway.

Graphs are used only where they prove equal to the eager pass at start (:func:`capture`,
called by worker.encoder), on the probe images, alone and padded; else the worker runs eagerly
and says why (in /readyz's ``forward`` and the log).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

SIZES = (1, 2, 4, 8, 16, 32, 64)
MIN_COSINE = 0.999

Forward = Callable[[torch.Tensor], torch.Tensor]
"""pixel values (N x 3 x H x W, the model's dtype and device) to image embeddings (N x D)."""


@dataclass
class Replay:
    """One captured size: its static input, the graph that reads it, and the static output
    the graph writes (``run`` replays it)."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    run: Callable[[], None]


@dataclass
class GraphedForward:
    """``eager``'s forward pass, replayed from the captured graph of the smallest size that
    holds the batch; eager beyond the largest."""

    eager: Forward
    replays: dict[int, Replay] = field(default_factory=dict)
    # The static buffers are shared: one replay at a time (a worker's live-gallery follower
    # thread may embed while its main thread answers jobs).
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        count = int(pixels.shape[0])
        replay = next((self.replays[s] for s in sorted(self.replays) if s >= count), None)
        if replay is None:
            return self.eager(pixels)
        with self.lock:
            replay.inputs[:count].copy_(pixels)
            replay.run()
            # a copy: the next replay overwrites the static output
            return replay.outputs[:count].clone()


def record(eager: Forward, inputs: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None]]:
    """Capture ``eager`` on the static ``inputs`` in a CUDA graph (warmed up on a side stream
    first, as torch asks); the static output and the replay."""
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            eager(inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = eager(inputs)
    return outputs, graph.replay


Recorder = Callable[[Forward, torch.Tensor], "tuple[torch.Tensor, Callable[[], None]]"]


def capture(
    eager: Forward,
    probes: torch.Tensor,
    *,
    sizes: tuple[int, ...] = SIZES,
    recorder: Recorder = record,
) -> tuple[GraphedForward | None, str]:
    """Graphs of ``eager`` for each size, kept only if they embed ``probes`` (already on the
    device, in the model's dtype) as the eager pass does: each probe alone (padded to the
    smallest size) and all of them together, to cosine >= ``MIN_COSINE``. The graphed forward
    (or None) and a sentence saying what was decided."""
    try:
        with torch.inference_mode():
            graphed = GraphedForward(eager)
            for size in sorted(sizes, reverse=True):
                inputs = probes[:1].expand(size, *probes.shape[1:]).clone()
                outputs, run = recorder(eager, inputs)
                graphed.replays[size] = Replay(inputs, outputs, run)
            worst = _worst_cosine(eager, graphed, probes)
    except Exception as error:  # a model or torch that cannot be captured runs eagerly
        text = str(error).strip().splitlines()
        return None, f"CUDA graphs refused: {text[0] if text else type(error).__name__}"
    if worst < MIN_COSINE:
        return None, f"CUDA graphs refused: min cosine {worst:.5f} with the eager pass"
    largest = max(sizes)
    return graphed, (
        f"CUDA graphs for batches up to {largest} (min cosine {worst:.5f} with the eager pass "
        f"on {len(probes)} probes)"
    )


def _worst_cosine(eager: Forward, graphed: GraphedForward, probes: torch.Tensor) -> float:
    reference = torch.nn.functional.normalize(eager(probes).float(), dim=-1)
    alone = torch.cat([graphed(probes[i : i + 1]) for i in range(len(probes))])
    together = graphed(probes)
    worst = 1.0
    for found in (alone, together):
        found = torch.nn.functional.normalize(found.float(), dim=-1)
        worst = min(worst, float((reference * found).sum(dim=-1).min()))
    return worst
