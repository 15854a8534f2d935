"""Fashion-MNIST read straight from its IDX files (the files Keras downloads).

Gallery position ``i`` is the ``i``-th image of train (60,000) followed by test (10,000).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.errors import DatasetNotFound

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
KERAS_DIR = Path("~/.keras/datasets/fashion-mnist")

_DTYPES: dict[int, str | type[np.generic]] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


@dataclass(frozen=True)
class Gallery:
    """The first ``len(labels)`` images of the gallery, as uint8 arrays."""

    images: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.uint8]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def read_idx(path: Path) -> npt.NDArray[np.generic]:
    """Read one IDX file (optionally gzip-compressed) into an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ValueError(f"{path} is truncated or not gzip: {error}") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file")
    type_code, ndim = data[2], data[3]
    if type_code not in _DTYPES:
        raise ValueError(f"{path} has an unknown IDX type 0x{type_code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is truncated")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype: np.dtype[Any] = np.dtype(_DTYPES[type_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path} holds {len(data) - header} bytes of data, its header says {expected}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def candidate_dirs(data_dir: Path | None) -> list[Path]:
    """Where we look, in order: LOOKALIKE_DATA_DIR, Debian's package, Keras's cache."""
    dirs = [data_dir] if data_dir is not None else []
    return [*dirs, DEBIAN_DIR, KERAS_DIR.expanduser()]


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def find_dataset(data_dir: Path | None) -> Path:
    """The first directory holding all four IDX files, or :class:`DatasetNotFound`."""
    for directory in candidate_dirs(data_dir):
        if all(_find(directory, stem) for pair in SPLITS.values() for stem in pair):
            return directory
    looked = ", ".join(str(d) for d in candidate_dirs(data_dir))
    raise DatasetNotFound(
        f"Fashion-MNIST was not found (looked in {looked}). Install it with "
        "'apt-get install dataset-fashion-mnist', or put the four IDX files "
        "(train-images-idx3-ubyte.gz, ...) in a folder and set LOOKALIKE_DATA_DIR to it."
    )


def load_gallery(data_dir: Path | None, *, size: int) -> Gallery:
    """Load the first ``size`` gallery images (train, then test) and their labels."""
    directory = find_dataset(data_dir)
    images: list[npt.NDArray[np.uint8]] = []
    labels: list[npt.NDArray[np.uint8]] = []
    remaining = size
    for image_stem, label_stem in SPLITS.values():
        if remaining <= 0:
            break
        image_path, label_path = _find(directory, image_stem), _find(directory, label_stem)
        assert image_path is not None and label_path is not None
        split_images = read_idx(image_path)
        split_labels = read_idx(label_path)
        if split_images.ndim != 3 or split_labels.shape[0] != split_images.shape[0]:
            raise ValueError(f"{image_path} and {label_path} do not pair up")
        images.append(np.asarray(split_images[:remaining], dtype=np.uint8))
        labels.append(np.asarray(split_labels[:remaining], dtype=np.uint8))
        remaining -= images[-1].shape[0]
    if remaining > 0:
        raise ValueError(f"the gallery asks for {size} images, {directory} has {size - remaining}")
    return Gallery(images=np.concatenate(images), labels=np.concatenate(labels))
