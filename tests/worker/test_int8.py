"""worker.int8: int8 linear layers whose results never depend on the batch."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shared.settings import ModelSettings
from worker.encoder import load_encoder
from worker.int8 import Int8Linear, quantise


def bright_and_dark(count: int) -> list[Image.Image]:
    """Coarse random pictures, then a white and a black one: strangers sharing a batch."""
    rng = np.random.default_rng(4)
    coarse = rng.integers(0, 256, size=(count, 6, 6, 3), dtype=np.uint8)
    images = [Image.fromarray(np.kron(c, np.ones((8, 8, 1), dtype=np.uint8))) for c in coarse]
    return [*images, Image.new("RGB", (48, 48), "white"), Image.new("RGB", (48, 48), "black")]


def test_a_layer_is_close_to_its_float_original() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(5, 7, 64)

    quantised = Int8Linear(linear)(x)

    assert quantised.shape == (5, 7, 48)
    expected = linear(x).detach()
    assert torch.max(torch.abs(quantised - expected)) < 0.02 * torch.max(torch.abs(expected))


def test_each_row_gives_the_same_result_alone_or_beside_any_other() -> None:
    torch.manual_seed(1)
    layer = Int8Linear(torch.nn.Linear(32, 16, bias=False))
    rows = torch.randn(6, 32)
    rows[3] *= 1000  # an outlier: one scale for the whole input would crush the others

    together = layer(rows)
    alone = torch.cat([layer(rows[i : i + 1]) for i in range(6)])

    assert torch.equal(together, alone)


def test_a_model_is_copied_with_every_linear_layer_replaced() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    original = copy.deepcopy(model)

    quantised = quantise(model)

    assert [type(m).__name__ for m in quantised] == ["Int8Linear", "ReLU", "Int8Linear"]
    unchanged = zip(model.parameters(), original.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in unchanged)


def test_an_image_embeds_the_same_alone_and_in_any_batch(tiny_clip_dir: Path) -> None:
    """What a search needs: a gallery image finds itself at 1.0 whoever shares its pass (with
    torch's per-tensor dynamic quantisation it scored 0.89 beside other uploads)."""
    fp32 = load_encoder(ModelSettings(name=str(tiny_clip_dir), device="cpu", fast_cpu="off"))
    encoder = dataclasses.replace(fp32, model=quantise(fp32.model), max_forward=None, notes=[])
    images = bright_and_dark(6)

    alone = np.concatenate([encoder.embed([image]) for image in images])
    together = encoder.embed(images)
    reversed_ = encoder.embed(images[::-1])[::-1]

    assert np.min(np.sum(alone * together, axis=1)) > 0.99999
    assert np.min(np.sum(alone * reversed_, axis=1)) > 0.99999
    assert np.min(np.sum(alone * fp32.embed(images), axis=1)) > 0.99
