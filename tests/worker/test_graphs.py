"""worker.graphs: batches padded to the captured sizes, copies out of the static output, and
graphs kept only when they embed the probes as the eager pass does.

CUDA graphs need a GPU: here a recorder with the same contract (a static input it reads, a
static output it writes on each replay) runs the real tiny CLIP eagerly on CPU; the padding,
the sizes, the copies and the decision are the code under test. On a GPU the real recorder
runs (test_encoder's CUDA test, and the start check in every GPU worker).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from shared.settings import ModelSettings
from worker import graphs
from worker.encoder import ClipImageEncoder, load_encoder
from worker.graphs import Forward


def eager_recorder(calls: list[int]) -> graphs.Recorder:
    """Records nothing: each replay runs the forward pass on the static input, into the
    static output, as a graph replay does."""

    def record(eager: Forward, inputs: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None]]:
        outputs = eager(inputs)

        def run() -> None:
            calls.append(int(inputs.shape[0]))
            outputs.copy_(eager(inputs))

        return outputs, run

    return record


@pytest.fixture(scope="module")
def encoder(tiny_clip_dir: Path) -> ClipImageEncoder:
    return load_encoder(ModelSettings(name=str(tiny_clip_dir), device="cpu", fast_cpu="off"))


def pixels(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, 224, 224, generator=generator)


def test_each_batch_replays_the_smallest_size_that_holds_it(encoder: ClipImageEncoder) -> None:
    calls: list[int] = []
    graphed, note = graphs.capture(encoder.eager, pixels(3), recorder=eager_recorder(calls))
    assert graphed is not None, note
    calls.clear()

    with torch.inference_mode():
        for count in (1, 2, 3, 5, 9, 64):
            graphed(pixels(count, seed=count))
        beyond = graphed(pixels(65))

    assert calls == [1, 2, 4, 8, 16, 64]
    assert beyond.shape[0] == 65  # eager: no size holds it


def test_padded_batches_embed_as_the_eager_pass(encoder: ClipImageEncoder) -> None:
    graphed, _ = graphs.capture(encoder.eager, pixels(3), recorder=eager_recorder([]))
    assert graphed is not None
    batch = pixels(5, seed=7)

    with torch.inference_mode():
        found = graphed(batch)  # padded to 8 with whatever the static input held
        expected = encoder.eager(batch)

    assert found.shape == expected.shape
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-5)


def test_a_result_is_a_copy_the_next_replay_leaves_alone(encoder: ClipImageEncoder) -> None:
    graphed, _ = graphs.capture(encoder.eager, pixels(3), recorder=eager_recorder([]))
    assert graphed is not None

    with torch.inference_mode():
        first = graphed(pixels(1, seed=1))
        kept = first.clone()
        graphed(pixels(1, seed=2))

    torch.testing.assert_close(first, kept)


def test_graphs_that_do_not_match_the_eager_pass_are_refused(encoder: ClipImageEncoder) -> None:
    def stale(eager: Forward, inputs: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None]]:
        return eager(inputs), lambda: None  # replays never update the output

    graphed, note = graphs.capture(encoder.eager, pixels(4), recorder=stale)

    assert graphed is None
    assert note.startswith("CUDA graphs refused: min cosine")


def test_a_model_that_cannot_be_captured_runs_eagerly(encoder: ClipImageEncoder) -> None:
    def failing(eager: Forward, inputs: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None]]:
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    graphed, note = graphs.capture(encoder.eager, pixels(2), recorder=failing)

    assert graphed is None
    assert note == "CUDA graphs refused: operation not permitted when stream is capturing"


def test_an_encoder_with_graphs_embeds_through_them(encoder: ClipImageEncoder) -> None:
    calls: list[int] = []
    graphed, _ = graphs.capture(encoder.eager, pixels(3), recorder=eager_recorder(calls))
    calls.clear()
    eager_embeddings = encoder.embed_pixels(pixels(3, seed=3))
    encoder.graphed = graphed
    try:
        graphed_embeddings = encoder.embed_pixels(pixels(3, seed=3))
    finally:
        encoder.graphed = None

    assert calls == [4]
    assert (eager_embeddings * graphed_embeddings).sum(axis=1).min() > 0.9999


def test_cpu_workers_run_eagerly(encoder: ClipImageEncoder) -> None:
    assert encoder.graphed is None
    assert encoder.forward_note == "eager"


def test_replays_from_two_threads_do_not_mix_their_batches(encoder: ClipImageEncoder) -> None:
    graphed, _ = graphs.capture(encoder.eager, pixels(3), recorder=eager_recorder([]))
    assert graphed is not None
    batches = [pixels(2, seed=seed) for seed in range(8)]
    with torch.inference_mode():
        expected = [encoder.eager(batch) for batch in batches]

    def embed(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return graphed(batch)

    with ThreadPoolExecutor(max_workers=4) as pool:
        found = list(pool.map(embed, batches * 4))

    for position, result in enumerate(found):
        torch.testing.assert_close(result, expected[position % 8], rtol=1e-4, atol=1e-5)
