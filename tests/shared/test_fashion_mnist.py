"""The IDX reader, where the dataset is looked for, Keras's download, and the gallery's order."""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import struct
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import shared.fashion_mnist as fashion_mnist
from shared.errors import DatasetNotFound
from shared.fashion_mnist import SPLITS, find_dataset, keras_dir, load_gallery, read_idx
from tests.support import write_fake_fashion_mnist, write_idx

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")
ROOT = Path(__file__).resolve().parents[2]
KERAS_ORIGIN = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"


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
    monkeypatch.setitem(sys.modules, "keras", None)  # as if Keras were not installed
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
    assert message.startswith("Fashion-MNIST was not found (looked in ")
    assert "apt-get install dataset-fashion-mnist" in message
    assert "lookalike data fetch" in message
    assert 'pip install "lookalike[tensorflow]"' in message
    assert "LOOKALIKE_DATA_DIR" in message
    assert "\n" not in message
    for directory in (empty, debian, keras):
        assert str(directory) in message


# --- Keras's cache and download -----------------------------------------------------------------


def test_keras_dir_follows_keras_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fashion_mnist, "KERAS_DIR", None)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))

    assert keras_dir() == tmp_path / "kh" / "datasets" / "fashion-mnist"


def test_keras_dir_defaults_to_dot_keras_at_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(fashion_mnist, "KERAS_DIR", None)
    monkeypatch.delenv("KERAS_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))

    assert keras_dir() == tmp_path / ".keras" / "datasets" / "fashion-mnist"


@pytest.fixture
def keras_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Keras's cache under this test's KERAS_HOME, no Debian copy: returns the cache folder."""
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setattr(fashion_mnist, "KERAS_DIR", None)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.setenv("KERAS_BACKEND", "")  # whatever lookalike sets is undone after the test
    return tmp_path / "keras-home" / "datasets" / "fashion-mnist"


def test_find_dataset_does_not_download_when_keras_cache_is_replaced(
    no_system_dataset: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    monkeypatch.setitem(sys.modules, "keras", stub_keras(lambda: calls.append(1)))

    with pytest.raises(DatasetNotFound, match="lookalike data fetch"):
        find_dataset(None)

    assert calls == []


def stub_keras(load_data: object) -> types.ModuleType:
    """A module shaped like ``keras`` as far as ``keras.datasets.fashion_mnist`` goes."""
    keras = types.ModuleType("keras")
    fashion = types.SimpleNamespace(load_data=load_data)
    keras.datasets = types.SimpleNamespace(fashion_mnist=fashion)  # type: ignore[attr-defined]
    return keras


def test_find_dataset_has_keras_download_it_when_nothing_is_found(
    keras_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def load_data() -> None:
        calls.append(1)
        write_fake_fashion_mnist(keras_home, train=3, test=2)

    monkeypatch.setitem(sys.modules, "keras", stub_keras(load_data))

    assert find_dataset(None) == keras_home
    assert find_dataset(None) == keras_home  # found there now: not downloaded again
    assert calls == [1]
    assert len(load_gallery(None, size=5)) == 5


def test_keras_download_failure_says_why_and_how(
    keras_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def load_data() -> None:
        raise Exception(f"URL fetch failure on {KERAS_ORIGIN}x.gz: None -- [Errno -3] no DNS")

    monkeypatch.setitem(sys.modules, "keras", stub_keras(load_data))

    with pytest.raises(DatasetNotFound) as caught:
        find_dataset(None)

    message = str(caught.value)
    assert message.startswith("Fashion-MNIST was not found (looked in ")
    assert f"Keras could not download it (URL fetch failure on {KERAS_ORIGIN}x.gz" in message
    assert "lookalike data fetch" in message


def test_keras_that_downloads_elsewhere_is_reported(
    keras_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "keras", stub_keras(lambda: None))

    with pytest.raises(DatasetNotFound, match=f"but not into {keras_home}"):
        find_dataset(None)


def test_keras_not_installed_lists_the_three_ways(
    keras_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "keras", None)

    with pytest.raises(DatasetNotFound) as caught:
        find_dataset(None)

    message = str(caught.value)
    assert f"looked in {fashion_mnist.DEBIAN_DIR}, {keras_home})" in message
    assert "lookalike data fetch" in message and "lookalike[tensorflow]" in message


class _KerasWithoutBackend:
    """An import finder: ``import keras`` fails as Keras 3 does without TensorFlow."""

    def find_spec(self, name: str, *args: object) -> None:
        if name == "keras":
            raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")
        return None


def test_keras_that_cannot_start_says_so(keras_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "keras", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_KerasWithoutBackend(), *sys.meta_path])

    with pytest.raises(DatasetNotFound) as caught:
        find_dataset(None)

    assert "Keras is installed but cannot start (No module named 'tensorflow'" in str(caught.value)
    tensorflow, torch = (importlib.util.find_spec(name) for name in ("tensorflow", "torch"))
    if tensorflow is None and torch is not None:
        assert os.environ["KERAS_BACKEND"] == "torch"  # chosen before importing Keras


@pytest.fixture
def keras_origin(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """Small Fashion-MNIST-shaped files served over HTTP: (url, folder, paths requested)."""
    folder = write_fake_fashion_mnist(tmp_path / "origin", train=30, test=10)
    requested: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            requested.append(self.path)
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", folder, requested
    server.shutdown()
    server.server_close()
    thread.join()


# Runs in a fresh interpreter: Keras reads KERAS_HOME and picks its backend once, at import.
# Keras's own download (keras.utils.get_file -> urllib's urlretrieve -> urlopen) is pointed at
# the local server by rewriting the origin in urllib.request.urlopen, the one call patched.
KERAS_SCRIPT = """
import json, sys, urllib.request
from pathlib import Path

origin, local, empty = sys.argv[1:4]
real_urlopen = urllib.request.urlopen

def urlopen(url, *args, **kwargs):
    if isinstance(url, str) and url.startswith(origin):
        url = local + url[len(origin):]
    return real_urlopen(url, *args, **kwargs)

urllib.request.urlopen = urlopen
import shared.fashion_mnist as fashion_mnist
fashion_mnist.DEBIAN_DIR = Path(empty)
gallery = fashion_mnist.load_gallery(None, size=40)
import keras
print(json.dumps({
    "found": str(fashion_mnist.find_dataset(None)),
    "backend": keras.backend.backend(),
    "images": gallery.images.tolist(),
    "labels": gallery.labels.tolist(),
}))
"""


@pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="Keras is not installed")
def test_real_keras_downloads_into_its_cache_where_lookalike_reads_it(
    keras_origin: tuple[str, Path, list[str]], tmp_path: Path
) -> None:
    url, origin_folder, requested = keras_origin
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KERAS_", "LOOKALIKE_"))}
    env |= {"KERAS_HOME": str(tmp_path / "keras-home"), "HOME": str(tmp_path / "home")}
    empty = tmp_path / "no-debian"

    done = subprocess.run(
        [sys.executable, "-c", KERAS_SCRIPT, KERAS_ORIGIN, url, str(empty)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    cache = tmp_path / "keras-home" / "datasets" / "fashion-mnist"
    assert report["found"] == str(cache)
    names = sorted(f"{stem}.gz" for pair in SPLITS.values() for stem in pair)
    assert sorted(requested) == [f"/{name}" for name in names]
    for name in names:
        assert (cache / name).read_bytes() == (origin_folder / name).read_bytes()
    if importlib.util.find_spec("tensorflow") is None:
        assert report["backend"] == "torch"  # chosen by lookalike: no TensorFlow here
    train_images = read_idx(origin_folder / "train-images-idx3-ubyte.gz")
    test_images = read_idx(origin_folder / "t10k-images-idx3-ubyte.gz")
    expected = np.concatenate([train_images, test_images])
    np.testing.assert_array_equal(np.array(report["images"], dtype=np.uint8), expected)
    assert len(report["labels"]) == 40


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
