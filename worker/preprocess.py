"""Turning images into CLIP's input tensor, in batches, three ways; the worker uses the fastest
one that proves equivalent to the checkpoint's own image processor on its probe images.

* ``processor``: CLIP's image processor itself (Pillow and numpy, image by image): the
  reference, and the fall-back.
* ``pil+torch``: the processor's resize and crop, done by :func:`shared.images.model_input`
  (the same Pillow calls, so the same pixels), then one batched torch rescale-and-normalise.
* ``torch``: everything as batched tensor work on the device (uint8 pixels in, bicubic resize
  with antialiasing, centre crop, rescale, normalise): the default. On a GPU the model takes
  tens of thousands of images a second and Pillow in one thread could not keep up; on a CPU
  torch resizes uint8 images with Pillow's own arithmetic, vectorised: 0.39 ms for a
  320x240 image where Pillow takes 1.1 ms, to within a grey level of Pillow's pixels.

Images of one size go through torch together; mixed sizes are grouped by size.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from shared.images import InputSpec, model_input

PROCESSOR = "processor"
PIL_TORCH = "pil+torch"
TORCH = "torch"
PATHS = (PROCESSOR, PIL_TORCH, TORCH)


def _pair(size: Any) -> tuple[int, int]:
    """A processor's ``crop_size`` (``{"height", "width"}``, or one number) as (h, w)."""
    if isinstance(size, dict):
        side: Any = size.get("shortest_edge")
        return int(size.get("height", side)), int(size.get("width", side))
    return int(size), int(size)


@dataclass(frozen=True)
class Preprocessing:
    """The processor's steps, read from its configuration."""

    spec: InputSpec
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float

    @classmethod
    def of(cls, processor: Any) -> Preprocessing | None:
        """The steps of a CLIP-style processor (resize the short side, centre crop, rescale,
        normalise), or None for a processor that does something else (then only the processor
        itself is used)."""
        config = processor.to_dict()
        size = config.get("size") or {}
        steps = ("do_resize", "do_center_crop", "do_rescale", "do_normalize")
        if not isinstance(size, dict) or "shortest_edge" not in size:
            return None
        if not all(config.get(step, True) for step in steps) or config.get("do_pad"):
            return None
        crop_height, crop_width = _pair(config.get("crop_size") or size["shortest_edge"])
        mean = tuple(float(v) for v in config["image_mean"])
        std = tuple(float(v) for v in config["image_std"])
        if len(mean) != 3 or len(std) != 3:
            return None
        spec = InputSpec(
            shortest_edge=int(size["shortest_edge"]),
            crop_height=crop_height,
            crop_width=crop_width,
            resample=int(config.get("resample", Image.Resampling.BICUBIC)),
        )
        return cls(spec, mean, std, float(config.get("rescale_factor", 1 / 255)))  # type: ignore[arg-type]

    def prepare(self, image: Image.Image) -> npt.NDArray[np.uint8]:
        """The processor's resize and crop of one RGB image (Pillow), as an HxWx3 array."""
        return np.asarray(model_input(image, self.spec), dtype=np.uint8)

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """N x 3 x H x W uint8 (any device) to the model's input, float32: rescaled and
        normalised in place, on pixels made contiguous first. From the channels-last view of
        HxWx3 arrays, one multiply-add and the patch convolution after it took 0.45 ms an
        image on a CPU; this way 0.23 (ViT-B/32's convolution: 1.95 against 1.68 ms)."""
        shift, scale = _affine(self, batch.device)
        return batch.contiguous().to(torch.float32, copy=True).mul_(scale).add_(shift)

    def resize_and_crop(self, batch: torch.Tensor) -> torch.Tensor:
        """N x 3 x H x W uint8 of one size to the crop, as torch ops: the short side to
        ``shortest_edge`` (bicubic, antialiased like Pillow's), then the centre crop."""
        height, width = int(batch.shape[2]), int(batch.shape[3])
        spec = self.spec
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(spec.shortest_edge * long / short)
        new_h, new_w = (
            (new_long, spec.shortest_edge)
            if width <= height
            else (
                spec.shortest_edge,
                new_long,
            )
        )
        x = batch
        if (new_h, new_w) != (height, width):
            x = _resize(batch, (new_h, new_w), mode=_MODES.get(spec.resample, "bicubic"))
        top, left = (new_h - spec.crop_height) // 2, (new_w - spec.crop_width) // 2
        if top < 0 or left < 0:  # a crop larger than the image: padded with black, as Pillow
            pad = (max(0, -left), max(0, -left), max(0, -top), max(0, -top))
            x = torch.nn.functional.pad(x, pad)
            top, left = max(0, top), max(0, left)
        return x[:, :, top : top + spec.crop_height, left : left + spec.crop_width]


# Pillow's filters that torch has (antialiased like Pillow's); any other is refused by the
# start check against the processor.
_MODES = {int(Image.Resampling.BILINEAR): "bilinear", int(Image.Resampling.BICUBIC): "bicubic"}


def _resize(batch: torch.Tensor, size: tuple[int, int], *, mode: str) -> torch.Tensor:
    """Pillow's antialiased resize of N x 3 x H x W uint8, as uint8: on a CPU by torch's uint8
    kernel (Pillow's arithmetic), elsewhere (a GPU) in float32."""
    if batch.device.type == "cpu":
        return torch.nn.functional.interpolate(
            batch, size=size, mode=mode, antialias=True, align_corners=False
        )
    return _resize_float(batch, size, mode=mode)


def _resize_float(batch: torch.Tensor, size: tuple[int, int], *, mode: str) -> torch.Tensor:
    """The same in float32, rounded and clamped back to uint8: what a GPU runs."""
    x = torch.nn.functional.interpolate(
        batch.float(), size=size, mode=mode, antialias=True, align_corners=False
    )
    return x.clamp_(0, 255).round_().to(torch.uint8)


@functools.cache
def _affine(
    preprocessing: Preprocessing, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation's shift and scale as 1 x 3 x 1 x 1 tensors on ``device``, made once
    rather than per batch (normal tensors, usable in and out of inference mode)."""
    with torch.inference_mode(False):
        std = torch.tensor(preprocessing.std, device=device)
        scale = std.reciprocal() * preprocessing.rescale
        shift = -torch.tensor(preprocessing.mean, device=device) / std
    return shift.view(1, 3, 1, 1), scale.view(1, 3, 1, 1)


Picture = Image.Image | npt.NDArray[np.uint8]  # an RGB image, or its HxWx3 uint8 pixels


def as_array(image: Picture) -> npt.NDArray[np.uint8]:
    if isinstance(image, np.ndarray):
        return image
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return np.asarray(rgb, dtype=np.uint8)


def as_image(image: Picture) -> Image.Image:
    return Image.fromarray(image) if isinstance(image, np.ndarray) else image


def stack_by_size(
    arrays: Sequence[npt.NDArray[np.uint8]],
) -> list[tuple[list[int], torch.Tensor]]:
    """Groups of equal-sized HxWx3 arrays as N x 3 x H x W uint8 tensors, with their
    positions in ``arrays``."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for position, array in enumerate(arrays):
        groups.setdefault(array.shape, []).append(position)
    return [
        (positions, torch.from_numpy(np.stack([arrays[p] for p in positions])).permute(0, 3, 1, 2))
        for positions in groups.values()
    ]


def tensor_input(
    preprocessing: Preprocessing,
    arrays: Sequence[npt.NDArray[np.uint8]],
    *,
    device: str,
    on_device: bool,
) -> torch.Tensor:
    """The model's input for ``arrays`` (HxWx3 uint8) on ``device``, in their order.

    With ``on_device`` the arrays may have any size (resized by torch there); without, they
    must already be at the crop size (:meth:`Preprocessing.prepare`)."""
    parts: list[tuple[list[int], torch.Tensor]] = []
    for positions, batch in stack_by_size(arrays):
        batch = batch.to(device, non_blocking=True)
        if on_device:
            batch = preprocessing.resize_and_crop(batch)
        parts.append((positions, batch))
    pixels = parts[0][1]
    if len(parts) > 1:  # back in order, still uint8, for one normalisation of them all
        # One copy an image: on a CPU, index_copy_ of uint8 rows took 0.37 ms an image (a
        # batch of 16 in three sizes: 5.9 ms against 0.32).
        pixels = pixels.new_empty((len(arrays), *pixels.shape[1:]))
        for positions, batch in parts:
            for row, position in enumerate(positions):
                pixels[position].copy_(batch[row])
    return preprocessing.normalise(pixels)
