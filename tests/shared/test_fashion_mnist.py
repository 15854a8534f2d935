"""The IDX reader, where the dataset is looked for, and the gallery's order."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

import shared.fashion_mnist as fashion_mnist
from shared.errors import DatasetNotFound
from shared.fashion_mnist import SPLITS, find_dataset, load_gallery, read_idx
from tests.support import write_fake_fashion_mnist, write_idx

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray, *, type_code: int = 0x08, dtype: str = "u1") -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


@pytest.fixture
def no_system_dataset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Path, Path]:
    """Debian's and Keras's places, pointed at empty folders of this test."""
    debian, keras = tmp_path / "debian", tmp_path / "keras"
    debian.mkdir()
    keras.mkdir()
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", debian)
    monkeypatch.setattr(fashion_mnist, "KERAS_DIR", keras)
    return debian, keras


# --- read_idx -----------------------------------------------------------------------------------


def test_read_idx_reads_gzip_file(tmp_path: Path) -> None:
    array = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    write_idx(tmp_path / "images-idx3-ubyte.gz", array)

    found = read_idx(tmp_path / "images-idx3-ubyte.gz")

    assert found.dtype == np.uint8
    np.testing.assert_array_equal(found, array)


def test_read_idx_reads_uncompressed_file(tmp_path: Path) -> None:
    array = np.arange(10, dtype=np.uint8)
    (tmp_path / "labels-idx1-ubyte").write_bytes(idx_bytes(array))

    np.testing.assert_array_equal(read_idx(tmp_path / "labels-idx1-ubyte"), array)


def test_read_idx_reads_big_endian_int32(tmp_path: Path) -> None:
    array = np.array([[1, -2], [70000, -70000]], dtype=np.int32)
    (tmp_path / "values-idx2-int").write_bytes(idx_bytes(array, type_code=0x0C, dtype=">i4"))

    np.testing.assert_array_equal(read_idx(tmp_path / "values-idx2-int"), array)


def test_read_idx_refuses_wrong_magic(tmp_path: Path) -> None:
    data = bytearray(idx_bytes(np.zeros((2, 2), dtype=np.uint8)))
    data[0] = 0x1F
    (tmp_path / "bad").write_bytes(bytes(data))

    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")


def test_read_idx_refuses_unknown_type_code(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8), type_code=0x07))

    with pytest.raises(ValueError, match="unknown IDX type 0x07"):
        read_idx(tmp_path / "bad")


def test_read_idx_refuses_truncated_header(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">I", 10))

    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "bad")


def test_read_idx_refuses_truncated_data(tmp_path: Path) -> None:
    data = idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))
    (tmp_path / "raw").write_bytes(data[:-100])

    with pytest.raises(ValueError, match="its header says 3136"):
        read_idx(tmp_path / "raw")


def test_read_idx_refuses_truncated_data_in_gzip_file(tmp_path: Path) -> None:
    data = idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))
    with gzip.open(tmp_path / "short.gz", "wb") as handle:
        handle.write(data[:-1])

    with pytest.raises(ValueError, match="its header says 3136"):
        read_idx(tmp_path / "short.gz")


def test_read_idx_refuses_cut_off_gzip_file(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    noise = np.random.default_rng(0).integers(0, 256, size=(50, 28, 28), dtype=np.uint8)
    write_idx(path, noise)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        read_idx(path)


def test_read_idx_refuses_trailing_data(tmp_path: Path) -> None:
    (tmp_path / "long").write_bytes(idx_bytes(np.zeros(5, dtype=np.uint8)) + b"\x00")

    with pytest.raises(ValueError, match="holds 6 bytes"):
        read_idx(tmp_path / "long")


# --- find_dataset -------------------------------------------------------------------------------


def test_find_dataset_prefers_data_dir(
    no_system_dataset: tuple[Path, Path], tmp_path: Path
) -> None:
    debian, keras = no_system_dataset
    mine = tmp_path / "mine"
    for directory in (mine, debian, keras):
        write_fake_fashion_mnist(directory, train=1, test=1)

    assert find_dataset(mine) == mine


def test_find_dataset_uses_debian_before_keras(no_system_dataset: tuple[Path, Path]) -> None:
    debian, keras = no_system_dataset
    write_fake_fashion_mnist(debian, train=1, test=1)
    write_fake_fashion_mnist(keras, train=1, test=1)

    assert find_dataset(None) == debian


def test_find_dataset_falls_back_to_keras(no_system_dataset: tuple[Path, Path]) -> None:
    _, keras = no_system_dataset
    write_fake_fashion_mnist(keras, train=1, test=1)

    assert find_dataset(None) == keras


def test_find_dataset_skips_data_dir_missing_a_file(
    no_system_dataset: tuple[Path, Path], tmp_path: Path
) -> None:
    debian, _ = no_system_dataset
    mine = write_fake_fashion_mnist(tmp_path / "mine", train=1, test=1)
    (mine / "t10k-labels-idx1-ubyte.gz").unlink()
    write_fake_fashion_mnist(debian, train=1, test=1)

    assert find_dataset(mine) == debian


def test_find_dataset_accepts_uncompressed_files(
    no_system_dataset: tuple[Path, Path], tmp_path: Path
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    for pair in SPLITS.values():
        for stem in pair:
            (mine / stem).write_bytes(idx_bytes(np.zeros(1, dtype=np.uint8)))

    assert find_dataset(mine) == mine


def test_dataset_not_found_says_how_to_get_it(
    no_system_dataset: tuple[Path, Path], tmp_path: Path
) -> None:
    debian, keras = no_system_dataset
    empty = tmp_path / "empty"

    with pytest.raises(DatasetNotFound) as caught:
        find_dataset(empty)

    message = str(caught.value)
    assert "dataset-fashion-mnist" in message
    assert "LOOKALIKE_DATA_DIR" in message
    for directory in (empty, debian, keras):
        assert str(directory) in message


# --- load_gallery -------------------------------------------------------------------------------


def test_load_gallery_spans_train_then_test(tmp_path: Path) -> None:
    directory = write_fake_fashion_mnist(tmp_path, train=5, test=5)
    train_images = read_idx(directory / "train-images-idx3-ubyte.gz")
    train_labels = read_idx(directory / "train-labels-idx1-ubyte.gz")
    test_images = read_idx(directory / "t10k-images-idx3-ubyte.gz")
    test_labels = read_idx(directory / "t10k-labels-idx1-ubyte.gz")

    gallery = load_gallery(directory, size=8)

    assert len(gallery) == 8
    assert gallery.images.shape == (8, 28, 28)
    assert gallery.images.dtype == gallery.labels.dtype == np.uint8
    np.testing.assert_array_equal(gallery.images[:5], train_images)
    np.testing.assert_array_equal(gallery.images[5:], test_images[:3])
    np.testing.assert_array_equal(gallery.labels, np.concatenate([train_labels, test_labels[:3]]))


def test_load_gallery_within_train_reads_train_only(tmp_path: Path) -> None:
    directory = write_fake_fashion_mnist(tmp_path, train=5, test=5)

    gallery = load_gallery(directory, size=3)

    np.testing.assert_array_equal(
        gallery.images, read_idx(directory / "train-images-idx3-ubyte.gz")[:3]
    )


def test_load_gallery_refuses_size_beyond_dataset(tmp_path: Path) -> None:
    directory = write_fake_fashion_mnist(tmp_path, train=5, test=5)

    with pytest.raises(ValueError, match="asks for 11 images"):
        load_gallery(directory, size=11)


def test_load_gallery_refuses_labels_that_do_not_pair_up(tmp_path: Path) -> None:
    directory = write_fake_fashion_mnist(tmp_path, train=5, test=5)
    write_idx(directory / "train-labels-idx1-ubyte.gz", np.zeros(4, dtype=np.uint8))

    with pytest.raises(ValueError, match="do not pair up"):
        load_gallery(directory, size=8)


@pytest.mark.skipif(not REAL_DIR.is_dir(), reason=f"{REAL_DIR} is absent")
def test_load_gallery_reads_the_real_debian_files() -> None:
    gallery = load_gallery(REAL_DIR, size=70_000)

    assert len(gallery) == 70_000
    assert gallery.images.shape == (70_000, 28, 28)
    assert gallery.images.dtype == np.uint8
    assert sorted(np.unique(gallery.labels).tolist()) == list(range(10))
    assert np.bincount(gallery.labels).tolist() == [7_000] * 10
