"""Fashion-MNIST read straight from its IDX files (the files Keras downloads).

Gallery position ``i`` is the ``i``-th image of train (60,000) followed by test (10,000).
The files are looked for in LOOKALIKE_DATA_DIR, Debian's ``dataset-fashion-mnist`` and Keras's
cache; when none holds them and Keras is installed (the ``tensorflow`` extra), Keras downloads
them into its cache, the way the original notebook loaded the dataset.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import struct
import sys
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
# None: Keras's own cache, see keras_dir(). A folder here stands in for it (tests point it
# elsewhere), and Keras is not asked to download: its files would land in its own cache.
KERAS_DIR: Path | None = None
HOW_TO_GET_IT = (
    "Get it one of three ways: install Debian's package "
    "('apt-get install dataset-fashion-mnist'), download it with 'lookalike data fetch', or "
    "install the TensorFlow extra ('pip install \"lookalike[tensorflow]\"') so that Keras "
    "downloads it at the next start; or put the four IDX files "
    "(train-images-idx3-ubyte.gz, ...) in a folder and set LOOKALIKE_DATA_DIR to it."
)

log = logging.getLogger(__name__)

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


def keras_dir() -> Path:
    """Where ``keras.datasets.fashion_mnist.load_data()`` keeps the four files:
    ``<keras home>/datasets/fashion-mnist``, the home being KERAS_HOME, else ``~/.keras`` (or
    ``/tmp/.keras`` where the home folder is read-only), as Keras itself decides."""
    if KERAS_DIR is not None:
        return KERAS_DIR.expanduser()
    home = os.environ.get("KERAS_HOME")
    if not home:
        base = Path("~").expanduser()
        home = str((base if os.access(base, os.W_OK) else Path("/tmp")) / ".keras")
    return Path(home).expanduser() / "datasets" / "fashion-mnist"


def candidate_dirs(data_dir: Path | None) -> list[Path]:
    """Where we look, in order: LOOKALIKE_DATA_DIR, Debian's package, Keras's cache."""
    dirs = [data_dir] if data_dir is not None else []
    return [*dirs, DEBIAN_DIR, keras_dir()]


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def holds_dataset(directory: Path) -> bool:
    """Whether ``directory`` holds the four IDX files (gzip-compressed or not)."""
    return all(_find(directory, stem) for pair in SPLITS.values() for stem in pair)


def find_dataset(data_dir: Path | None) -> Path:
    """The first directory holding all four IDX files; where none does and Keras is
    installed, Keras downloads them into its cache (:func:`download_with_keras`); else
    :class:`DatasetNotFound`, whose message lists the ways to get them."""
    for directory in candidate_dirs(data_dir):
        if holds_dataset(directory):
            return directory
    looked = ", ".join(str(d) for d in candidate_dirs(data_dir))
    if KERAS_DIR is not None:
        raise DatasetNotFound(f"Fashion-MNIST was not found (looked in {looked}). {HOW_TO_GET_IT}")
    return download_with_keras(looked=looked)


def _choose_keras_backend() -> None:
    """Keras 3 imports its backend with itself, TensorFlow unless told otherwise: where
    TensorFlow is absent, run it on the worker's torch (loading a dataset needs no more)."""
    if "keras" in sys.modules or os.environ.get("KERAS_BACKEND"):
        return  # already imported, or the user chose
    if importlib.util.find_spec("tensorflow") is None and importlib.util.find_spec("torch"):
        os.environ["KERAS_BACKEND"] = "torch"


def download_with_keras(*, looked: str) -> Path:
    """Have ``keras.datasets.fashion_mnist.load_data()`` download the four files into
    :func:`keras_dir` (the notebook's route, with the ``tensorflow`` extra) and return that
    folder; :class:`DatasetNotFound` when Keras is not installed or the download fails."""
    missing = f"Fashion-MNIST was not found (looked in {looked})"
    _choose_keras_backend()
    try:
        import keras
    except ModuleNotFoundError as error:
        if error.name != "keras":
            raise DatasetNotFound(
                f"{missing}, and Keras is installed but cannot start ({error}; it runs on "
                f"TensorFlow, or on torch with KERAS_BACKEND=torch). {HOW_TO_GET_IT}"
            ) from error
        raise DatasetNotFound(f"{missing}. {HOW_TO_GET_IT}") from None
    target = keras_dir()
    log.info("Fashion-MNIST not found: downloading it through Keras into %s", target)
    try:
        keras.datasets.fashion_mnist.load_data()
    except Exception as error:  # Keras raises a bare Exception for a failed fetch
        raise DatasetNotFound(
            f"{missing}, and Keras could not download it ({_first_line(error)}). {HOW_TO_GET_IT}"
        ) from error
    if not holds_dataset(target):
        raise DatasetNotFound(
            f"{missing}. Keras downloaded it, but not into {target}, where lookalike reads "
            "its cache; set LOOKALIKE_DATA_DIR to the folder Keras used."
        )
    return target


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


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
