"""The gallery index: top-k, build and load round trip, refusals, and resumable builds."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import worker.index as index_module
from lookalike.checkpoint import save_random_clip
from shared.errors import IndexMismatch
from shared.fashion_mnist import CLASS_NAMES, Gallery, load_gallery
from shared.galleries import THUMBS, FashionMnistSource, FolderSource, ThumbnailPack, scan_folder
from shared.settings import ModelSettings
from worker.encoder import ClipImageEncoder, load_encoder
from worker.index import (
    Manifest,
    build_index,
    gallery_to_images,
    index_dir,
    load_index,
    own_gallery_dirs,
    top_k,
)

GALLERY = "fashion-mnist"
SIZE = 100
BATCH = 16


def unit_rows(count: int, dim: int, *, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(encoder: ClipImageEncoder, gallery: Gallery, directory: Path) -> Manifest:
    return build_index(
        encoder,
        FashionMnistSource(gallery.images, gallery.labels),
        directory=directory,
        batch_size=BATCH,
        progress=False,
    )


@pytest.fixture(scope="module")
def encoder(tiny_clip_dir: Path) -> ClipImageEncoder:
    return load_encoder(ModelSettings(name=str(tiny_clip_dir), device="cpu", fast_cpu="off"))


@pytest.fixture(scope="module")
def gallery(fake_data_dir: Path) -> Gallery:
    return load_gallery(fake_data_dir, size=SIZE)


@pytest.fixture(scope="module")
def built(
    encoder: ClipImageEncoder, gallery: Gallery, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Manifest]:
    """One index built for the module: read it, never change it (copy it to change it)."""
    directory = tmp_path_factory.mktemp("index") / "built"
    return directory, build(encoder, gallery, directory)


@pytest.fixture
def index_copy(built: tuple[Path, Manifest], tmp_path: Path) -> Path:
    return Path(shutil.copytree(built[0], tmp_path / "copy"))


@pytest.fixture(scope="module")
def other_weights_dir(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CLIP's shape and preprocessing, initialised from another seed."""
    return save_random_clip(tmp_path_factory.mktemp("tiny-clip-b"), shape="tiny", seed=1)


# --- top_k --------------------------------------------------------------------------------------


DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
]


@pytest.mark.parametrize("k", [1, 5, 50])
@pytest.mark.parametrize("dtype", DTYPES)
def test_top_k_agrees_with_brute_force(k: int, dtype: torch.dtype) -> None:
    gallery = unit_rows(1000, 32, seed=0)
    queries = unit_rows(7, 32, seed=1)
    matrix = torch.from_numpy(gallery).to(dtype)
    reference = queries @ gallery.T
    expected = -np.sort(-reference, axis=1)[:, :k]

    scores, indices = top_k(matrix, queries, k=k)

    assert scores.shape == indices.shape == (7, k)
    assert scores.dtype == np.float32
    assert indices.dtype == np.int64
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first
    tolerance = 1e-5 if dtype == torch.float32 else 3e-3
    np.testing.assert_allclose(scores, expected, atol=tolerance)
    # The indices' true scores are the best ones (fp16 may swap near ties only).
    np.testing.assert_allclose(
        np.take_along_axis(reference, indices, axis=1), expected, atol=2 * tolerance
    )
    if dtype == torch.float32:
        np.testing.assert_array_equal(indices, np.argsort(-reference, axis=1)[:, :k])


@pytest.mark.parametrize("dtype", DTYPES)
def test_top_k_larger_than_gallery_returns_whole_gallery(dtype: torch.dtype) -> None:
    gallery = unit_rows(10, 8, seed=2)
    query = gallery[3:4]

    _, indices = top_k(torch.from_numpy(gallery).to(dtype), query, k=50)

    assert indices.shape == (1, 10)
    assert sorted(indices[0].tolist()) == list(range(10))
    assert indices[0, 0] == 3


def test_top_k_scores_stay_within_cosine_range() -> None:
    gallery = unit_rows(20, 32, seed=3)
    matrix = torch.from_numpy(gallery).to(torch.float16)

    scores, _ = top_k(matrix, gallery, k=3)

    assert scores.max() <= 1.0
    assert scores.min() >= -1.0


# --- build and load -----------------------------------------------------------------------------


def test_build_index_writes_manifest(
    built: tuple[Path, Manifest], encoder: ClipImageEncoder
) -> None:
    directory, manifest = built

    on_disk = Manifest.model_validate_json((directory / "manifest.json").read_text())

    assert on_disk.model_dump(mode="json") == manifest.model_dump(mode="json")
    assert manifest.model_id == encoder.model_id
    assert (manifest.gallery, manifest.count, manifest.dim) == (GALLERY, SIZE, 32)
    assert manifest.dtype == "float16"
    assert manifest.precision == "fp32"
    assert manifest.preprocessing_digest == encoder.preprocessing_digest
    assert manifest.embeddings_sha256 == sha256(directory / "embeddings.npy")
    assert manifest.labels_sha256 == sha256(directory / "labels.npy")
    assert (manifest.kind, manifest.class_names) == (GALLERY, list(CLASS_NAMES))
    assert not (directory / "parts").exists()


def test_build_index_keeps_every_gallery_image_as_a_thumbnail(
    built: tuple[Path, Manifest], gallery: Gallery
) -> None:
    pack = ThumbnailPack(built[0] / THUMBS)

    assert len(pack) == SIZE
    for position in (0, 37, SIZE - 1):
        shown = np.asarray(pack.image(position).convert("L"))
        np.testing.assert_array_equal(shown, gallery.images[position])


def test_load_index_round_trips_the_build(
    built: tuple[Path, Manifest], encoder: ClipImageEncoder, gallery: Gallery
) -> None:
    loaded = load_index(built[0], encoder, gallery=GALLERY, size=SIZE)

    assert len(loaded) == SIZE
    assert loaded.embeddings.shape == (SIZE, 32)
    assert loaded.embeddings.dtype == np.float16
    np.testing.assert_array_equal(loaded.labels, gallery.labels)
    np.testing.assert_allclose(np.linalg.norm(loaded.embeddings, axis=1), 1.0, atol=2e-3)


def test_every_gallery_image_finds_itself_first(
    built: tuple[Path, Manifest], encoder: ClipImageEncoder, gallery: Gallery
) -> None:
    loaded = load_index(built[0], encoder, gallery=GALLERY, size=SIZE)
    queries = encoder.embed(gallery_to_images(gallery.images))

    scores, indices = loaded.search(queries, k=1)

    np.testing.assert_array_equal(indices[:, 0], np.arange(SIZE))
    assert scores[:, 0].min() >= 0.99


def test_index_dir_differs_by_model_size_and_gallery(tmp_path: Path) -> None:
    a = index_dir(tmp_path, gallery=GALLERY, size=100, model_id="/models/clip")
    assert a == index_dir(tmp_path, gallery=GALLERY, size=100, model_id="/models/clip")
    assert a.parent == tmp_path
    assert a != index_dir(tmp_path, gallery=GALLERY, size=101, model_id="/models/clip")
    assert a != index_dir(tmp_path, gallery=GALLERY, size=100, model_id="/other/clip")
    assert a != index_dir(tmp_path, gallery="shoes", model_id="/models/clip")


# --- refusals -----------------------------------------------------------------------------------


def test_load_index_refuses_other_size(
    built: tuple[Path, Manifest], encoder: ClipImageEncoder
) -> None:
    with pytest.raises(IndexMismatch, match="count=100"):
        load_index(built[0], encoder, gallery=GALLERY, size=SIZE - 1)


def test_load_index_refuses_other_gallery(
    built: tuple[Path, Manifest], encoder: ClipImageEncoder
) -> None:
    with pytest.raises(IndexMismatch, match="gallery="):
        load_index(built[0], encoder, gallery="mnist", size=SIZE)


def test_load_index_refuses_other_model_id(
    built: tuple[Path, Manifest], encoder: ClipImageEncoder
) -> None:
    renamed = dataclasses.replace(encoder, model_id="someone/else", notes=[])

    with pytest.raises(IndexMismatch, match="model_id="):
        load_index(built[0], renamed, gallery=GALLERY, size=SIZE)


def test_load_index_refuses_corrupted_embeddings(
    index_copy: Path, encoder: ClipImageEncoder
) -> None:
    path = index_copy / "embeddings.npy"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))

    with pytest.raises(IndexMismatch, match="checksum"):
        load_index(index_copy, encoder, gallery=GALLERY, size=SIZE)


def test_load_index_refuses_index_built_by_other_weights(
    index_copy: Path, other_weights_dir: Path
) -> None:
    other = load_encoder(ModelSettings(name=str(other_weights_dir), device="cpu", fast_cpu="off"))
    manifest = json.loads((index_copy / "manifest.json").read_text())
    manifest["model_id"] = other.model_id  # the label says B, the vectors are A's
    (index_copy / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(IndexMismatch, match="other weights"):
        load_index(index_copy, other, gallery=GALLERY, size=SIZE)


def test_load_index_refuses_an_older_format(index_copy: Path, encoder: ClipImageEncoder) -> None:
    manifest = json.loads((index_copy / "manifest.json").read_text())
    manifest["format"] = 1
    (index_copy / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(IndexMismatch, match="format 1"):
        load_index(index_copy, encoder, gallery=GALLERY, size=SIZE)


def test_load_index_refuses_missing_index(tmp_path: Path, encoder: ClipImageEncoder) -> None:
    with pytest.raises(IndexMismatch, match="No index at"):
        load_index(tmp_path / "nothing", encoder, gallery=GALLERY, size=SIZE)


# --- resumable builds ---------------------------------------------------------------------------


class Interrupted(Exception):
    pass


class CountingEmbed:
    """Stands in for ``encoder.embed`` and ``encoder.embed_arrays`` (the build's fast path):
    counts calls and images, can fail after ``fail_after``."""

    def __init__(self, encoder: ClipImageEncoder, *, fail_after: int | None = None) -> None:
        self.encoder = encoder
        self.fail_after = fail_after
        self.calls = 0
        self.images = 0

    def _count(self, images: object) -> None:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise Interrupted
        self.calls += 1
        self.images += len(images)  # type: ignore[arg-type]

    def __call__(self, images: list[object]) -> np.ndarray:
        self._count(images)
        return self.encoder.embed(images)  # type: ignore[arg-type]

    def arrays(self, arrays: list[np.ndarray], *, prepared: bool) -> np.ndarray:
        self._count(arrays)
        return self.encoder.embed_arrays(arrays, prepared=prepared)


def with_embed(encoder: ClipImageEncoder, embed: CountingEmbed) -> ClipImageEncoder:
    patched = dataclasses.replace(encoder, notes=[])
    patched.embed = embed  # type: ignore[method-assign]
    patched.embed_arrays = embed.arrays  # type: ignore[method-assign]
    return patched


def test_interrupted_build_resumes_from_saved_chunks(
    encoder: ClipImageEncoder,
    gallery: Gallery,
    built: tuple[Path, Manifest],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(index_module, "CHUNK", 32)  # chunks 0, 32, 64, 96; two batches each
    directory = tmp_path / "resumed"
    first = CountingEmbed(encoder, fail_after=4)  # two chunks done, the third interrupted

    with pytest.raises(Interrupted):
        build(with_embed(encoder, first), gallery, directory)

    saved = sorted(p.name for p in (directory / "parts").glob("0*[0-9].npy"))
    assert saved == ["00000000.npy", "00000032.npy"]
    assert not (directory / "manifest.json").exists()

    second = CountingEmbed(encoder)
    manifest = build(with_embed(encoder, second), gallery, directory)

    # One probe batch proves the saved chunks are this model's; then 32 + 4 new images.
    assert second.images == index_module.PROBES + (SIZE - 64)
    assert second.calls == 1 + 3
    np.testing.assert_array_equal(
        np.load(directory / "embeddings.npy"), np.load(built[0] / "embeddings.npy")
    )
    assert manifest.embeddings_sha256 == built[1].embeddings_sha256
    assert not (directory / "parts").exists()


def test_interrupted_build_by_other_weights_starts_over(
    encoder: ClipImageEncoder,
    gallery: Gallery,
    built: tuple[Path, Manifest],
    other_weights_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(index_module, "CHUNK", 32)
    other = load_encoder(ModelSettings(name=str(other_weights_dir), device="cpu", fast_cpu="off"))
    # Same path, new weights: the model id (hence the build identity) is unchanged.
    impostor = dataclasses.replace(other, model_id=encoder.model_id, notes=[])
    directory = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        build(with_embed(impostor, CountingEmbed(impostor, fail_after=4)), gallery, directory)

    counting = CountingEmbed(encoder)
    build(with_embed(encoder, counting), gallery, directory)

    assert counting.images == index_module.PROBES + SIZE  # everything embedded again
    np.testing.assert_array_equal(
        np.load(directory / "embeddings.npy"), np.load(built[0] / "embeddings.npy")
    )


# --- own galleries ------------------------------------------------------------------------------


def write_folder_gallery(root: Path) -> Path:
    """shoes/ (3), bags/nested/ (2), one loose image, a text file, one broken JPEG."""
    from PIL import Image

    rng = np.random.default_rng(5)
    layout = {
        "shoes/a.png": "PNG",
        "shoes/b.jpg": "JPEG",
        "shoes/c.webp": "WEBP",
        "bags/nested/d.png": "PNG",
        "bags/e.bmp": "BMP",
        "loose.png": "PNG",
    }
    for relative, fmt in layout.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, format=fmt)
    (root / "shoes" / "notes.txt").write_text("not an image")
    (root / "bags" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return root


def test_folder_gallery_is_labelled_by_top_level_folder_and_skips_unreadable(
    tmp_path: Path,
) -> None:
    listing = scan_folder(write_folder_gallery(tmp_path / "photos"), max_pixels=10**7)

    assert listing.paths == [
        "loose.png",
        "bags/e.bmp",
        "bags/nested/d.png",
        "shoes/a.png",
        "shoes/b.jpg",
        "shoes/c.webp",
    ]
    names = [listing.class_names[label] for label in listing.labels]
    assert names == ["unlabelled", "bags", "bags", "shoes", "shoes", "shoes"]
    assert [s.path for s in listing.skipped] == ["bags/broken.jpg"]
    assert listing.ignored == 1


def test_folder_gallery_index_serves_its_paths_and_classes(
    encoder: ClipImageEncoder, tmp_path: Path
) -> None:
    listing = scan_folder(write_folder_gallery(tmp_path / "photos"), max_pixels=10**7)
    source = FolderSource("photos", listing, max_pixels=10**7)
    directory = index_dir(tmp_path / "index", gallery="photos", model_id=encoder.model_id)

    manifest = build_index(encoder, source, directory=directory, batch_size=4, progress=False)
    loaded = load_index(directory, encoder, gallery="photos")

    assert (manifest.kind, manifest.count, manifest.skipped) == ("folder", 6, 1)
    assert loaded.paths == listing.paths
    assert loaded.class_names == ("unlabelled", "bags", "shoes")
    queries = encoder.embed(source.images(0, len(source)))
    _, indices = loaded.search(queries, k=1)
    np.testing.assert_array_equal(indices[:, 0], np.arange(6))
    assert own_gallery_dirs(tmp_path / "index", model_id=encoder.model_id, exclude=GALLERY) == [
        directory
    ]
    assert own_gallery_dirs(tmp_path / "index", model_id="other", exclude=GALLERY) == []
