"""Feeding an index build: gallery images decoded and prepared in a pool of processes, in
batches, while the model embeds the previous ones (a torch ``DataLoader`` with workers).

Each item is an image's model input as uint8 pixels (already resized and cropped by Pillow on
the ``pil+torch`` path, raw on the ``torch`` path, where the device resizes a whole batch at
once) and its thumbnail for the API. The processes are forked: they read the gallery as the
builder holds it (Fashion-MNIST's arrays, a folder's file list), nothing is pickled but the
results.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from torch.utils.data import DataLoader, Dataset

from shared.galleries import GallerySource, encode_thumbnail
from worker.preprocess import PIL_TORCH, PROCESSOR, Preprocessing, as_array

Item = tuple[npt.NDArray[np.uint8], bytes]


@dataclass
class Batch:
    """Gallery images ``indices``, in order: their model input pixels and thumbnails."""

    indices: list[int]
    arrays: list[npt.NDArray[np.uint8]]
    thumbnails: list[bytes]


class GalleryItems(Dataset[Item]):
    """Gallery images ``indices`` as model input pixels and thumbnails."""

    def __init__(
        self, source: GallerySource, indices: Sequence[int], steps: Preprocessing | None, path: str
    ) -> None:
        self.source = source
        self.indices = list(indices)
        self.steps = steps
        self.prepare = path == PIL_TORCH and steps is not None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> Item:
        index = self.indices[position]
        (image,) = self.source.images(index, index + 1)
        thumbnail = encode_thumbnail(image)
        if self.prepare:
            assert self.steps is not None
            return self.steps.prepare(image), thumbnail
        return as_array(image), thumbnail


def _keep_as_list(items: list[Item]) -> list[Item]:
    return items  # images of different sizes do not stack; tensor_input groups them


def loader_processes(device: str, *, cpus: int | None = None) -> int:
    """Processes decoding for a build: most of the cores beside a GPU, none on a small CPU
    (there the model itself needs the cores, and Pillow's share is a few percent)."""
    cpus = cpus or os.cpu_count() or 1
    if device.startswith("cuda"):
        return max(1, min(8, cpus - 2))
    return min(4, cpus // 4)


def batches(
    source: GallerySource,
    indices: Sequence[int],
    *,
    batch_size: int,
    steps: Preprocessing | None,
    path: str,
    processes: int,
) -> Iterator[Batch]:
    """Gallery images ``indices``, prepared, in batches of ``batch_size``, in order; with
    ``processes`` > 0, made ahead by that many forked processes (one pool for the whole
    build, so a resumed build's scattered chunks cost one start)."""
    if path == PROCESSOR:
        raise ValueError("the processor path embeds images, not prepared pixels")
    indices = list(indices)
    items = GalleryItems(source, indices, steps, path)
    loader = DataLoader(
        items,
        batch_size=batch_size,
        shuffle=False,
        num_workers=processes,
        collate_fn=_keep_as_list,
        multiprocessing_context="fork" if processes else None,
        prefetch_factor=4 if processes else None,
    )
    position = 0
    for chunk in loader:
        yield Batch(
            indices[position : position + len(chunk)],
            [array for array, _ in chunk],
            [thumbnail for _, thumbnail in chunk],
        )
        position += len(chunk)
