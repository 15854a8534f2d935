"""Gallery sources, folder scans and thumbnail packs, on small files written to tmp_path."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.errors import GalleryError
from shared.fashion_mnist import CLASS_NAMES, load_gallery
from shared.galleries import (
    FOLDER,
    THUMB_MAX,
    UNLABELLED,
    FashionMnistSource,
    FolderListing,
    FolderSource,
    ThumbnailPack,
    encode_thumbnail,
    find_gallery_dirs,
    pack_files,
    scan_folder,
    write_thumbnail_pack,
)
from shared.images import CORRUPT, NOT_AN_IMAGE, TOO_MANY_PIXELS
from shared.settings import FASHION_MNIST

MAX_PIXELS = 1_000_000


def encode(image: Image.Image, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def write_image(
    path: Path,
    *,
    size: tuple[int, int] = (8, 8),
    colour: tuple[int, int, int] = (200, 30, 30),
    mode: str = "RGB",
    image_format: str = "PNG",
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour).convert(mode)
    path.write_bytes(encode(image, image_format))
    return path


def scan(
    root: Path, *, max_pixels: int = MAX_PIXELS, on_file: Callable[[], object] | None = None
) -> FolderListing:
    return scan_folder(root, max_pixels=max_pixels, on_file=on_file)


def folder_source(root: Path, name: str = "mine") -> FolderSource:
    return FolderSource(name, scan(root), max_pixels=MAX_PIXELS)


# --- scan_folder -----------------------------------------------------------------------------


def test_scan_labels_images_by_their_top_level_folder(tmp_path: Path) -> None:
    write_image(tmp_path / "shoes" / "red" / "1.png")
    write_image(tmp_path / "shoes" / "2.jpg", image_format="JPEG")
    write_image(tmp_path / "bags" / "1.webp", image_format="WEBP")
    write_image(tmp_path / "loose.png")

    listing = scan(tmp_path)

    labelled = {
        path: listing.class_names[label]
        for path, label in zip(listing.paths, listing.labels, strict=True)
    }
    assert labelled == {
        "shoes/red/1.png": "shoes",
        "shoes/2.jpg": "shoes",
        "bags/1.webp": "bags",
        "loose.png": UNLABELLED,
    }
    assert sorted(listing.class_names) == ["bags", "shoes", UNLABELLED]
    assert (listing.skipped, listing.ignored) == ([], 0)
    assert listing.root == tmp_path


def test_scan_order_is_sorted_and_stable_whatever_the_creation_order(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    names = ["b/2.png", "a/10.png", "a/1.png", "c.png", "a.png", "b/1.png"]
    for name in names:
        write_image(first / name)
    for name in reversed(names):
        write_image(second / name)

    listing = scan(first)

    # Each folder's files in name order, loose files before the sub-folders'.
    assert listing.paths == ["a.png", "c.png", "a/1.png", "a/10.png", "b/1.png", "b/2.png"]
    assert listing.class_names == [UNLABELLED, "a", "b"]
    assert listing.labels == [0, 0, 1, 1, 2, 2]
    again = scan(second)
    assert (again.paths, again.labels, again.class_names) == (
        listing.paths,
        listing.labels,
        listing.class_names,
    )


def test_scan_ignores_and_counts_files_without_an_image_name(tmp_path: Path) -> None:
    write_image(tmp_path / "shoes" / "1.PNG")  # the suffix is matched in any case
    (tmp_path / "shoes" / "notes.txt").write_text("not a picture")
    (tmp_path / "README").write_text("readme")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    write_image(tmp_path / "shoes" / "picture.png.bak")
    seen: list[int] = []

    listing = scan(tmp_path, on_file=lambda: seen.append(1))

    assert listing.paths == ["shoes/1.PNG"]
    assert listing.ignored == 4
    assert listing.skipped == []
    assert len(seen) == 1  # on_file is called for image names only


def test_scan_lists_undecodable_files_in_skipped_with_the_reason(tmp_path: Path) -> None:
    write_image(tmp_path / "good" / "ok.png")
    (tmp_path / "good" / "report.png").write_bytes(b"%PDF-1.7\n1 0 obj << >> endobj\n%%EOF\n")
    whole = encode(Image.new("RGB", (64, 64), (10, 20, 30)))
    (tmp_path / "good" / "cut.png").write_bytes(whole[: len(whole) // 2])
    write_image(tmp_path / "good" / "huge.png", size=(200, 200))
    (tmp_path / "good" / "empty.jpg").write_bytes(b"")
    seen: list[int] = []

    listing = scan(tmp_path, max_pixels=100 * 100, on_file=lambda: seen.append(1))

    assert listing.paths == ["good/ok.png"]
    reasons = {skipped.path: skipped.reason for skipped in listing.skipped}
    assert reasons == {
        "good/cut.png": CORRUPT,
        "good/empty.jpg": "The upload is empty.",
        "good/huge.png": TOO_MANY_PIXELS,
        "good/report.png": NOT_AN_IMAGE,
    }
    assert listing.ignored == 0
    assert len(seen) == 5


def test_scan_does_not_follow_symlinks_out_of_the_folder(tmp_path: Path) -> None:
    outside, root = tmp_path / "outside", tmp_path / "gallery"
    write_image(outside / "secret" / "1.png")
    write_image(outside / "other.png")
    write_image(root / "shoes" / "1.png")
    (root / "linked-dir").symlink_to(outside / "secret", target_is_directory=True)
    (root / "shoes" / "linked.png").symlink_to(outside / "other.png")

    listing = scan(root)

    assert listing.paths == ["shoes/1.png"]
    assert listing.class_names == ["shoes"]
    assert listing.skipped == []


def test_scan_of_a_file_raises_gallery_error(tmp_path: Path) -> None:
    path = write_image(tmp_path / "one.png")

    with pytest.raises(GalleryError, match="is not a folder"):
        scan(path)


def test_scan_of_a_missing_folder_raises_gallery_error(tmp_path: Path) -> None:
    with pytest.raises(GalleryError, match=r"nowhere is not a folder\.$"):
        scan(tmp_path / "nowhere")


# --- FolderSource ----------------------------------------------------------------------------


def test_folder_source_of_an_empty_folder_says_why(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "broken.png").write_bytes(b"not a png")

    with pytest.raises(GalleryError) as caught:
        folder_source(tmp_path)

    assert str(caught.value) == f"{tmp_path} holds no readable image (1 skipped, 1 other files)."


def test_folder_source_describes_the_gallery(tmp_path: Path) -> None:
    write_image(tmp_path / "shoes" / "1.png")
    write_image(tmp_path / "shoes" / "2.png")
    write_image(tmp_path / "bags" / "1.png")
    (tmp_path / "bags" / "bad.png").write_bytes(b"junk")

    source = folder_source(tmp_path, "mine")

    assert (source.name, source.kind, len(source)) == ("mine", FOLDER, 3)
    assert source.paths == ["bags/1.png", "shoes/1.png", "shoes/2.png"]
    assert source.class_names == ("bags", "shoes")
    assert source.labels.dtype == np.int32
    assert source.labels.tolist() == [0, 1, 1]
    assert [s.path for s in source.skipped] == ["bags/bad.png"]
    assert source.location == str(tmp_path.resolve())


def test_folder_source_images_are_rgb_in_index_order(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", colour=(255, 255, 255), mode="L", size=(5, 7))
    write_image(tmp_path / "b.png", colour=(0, 0, 255), mode="RGBA")
    write_image(tmp_path / "c.gif", colour=(0, 255, 0), mode="P", image_format="GIF")

    images = folder_source(tmp_path).images(0, 3)

    assert [image.mode for image in images] == ["RGB", "RGB", "RGB"]
    assert images[0].size == (5, 7)
    assert [image.getpixel((0, 0)) for image in images] == [
        (255, 255, 255),
        (0, 0, 255),
        (0, 255, 0),
    ]


def test_folder_source_images_takes_a_slice(tmp_path: Path) -> None:
    for i in range(4):
        write_image(tmp_path / f"{i}.png", colour=(i * 50, 0, 0))

    images = folder_source(tmp_path).images(1, 3)

    assert [image.getpixel((0, 0)) for image in images] == [(50, 0, 0), (100, 0, 0)]


def test_folder_source_images_of_a_file_removed_since_the_scan(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    gone = write_image(tmp_path / "b.png")
    source = folder_source(tmp_path)
    gone.unlink()

    with pytest.raises(GalleryError, match=r"^b\.png changed while the gallery was being indexed"):
        source.images(0, 2)


def test_folder_source_fingerprint_changes_when_a_file_changes(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    changing = write_image(tmp_path / "b.png")
    source = folder_source(tmp_path)
    before = source.fingerprint

    assert folder_source(tmp_path).fingerprint == before  # same files, same fingerprint
    write_image(changing, size=(16, 16))
    assert source.fingerprint != before


def test_folder_source_fingerprint_changes_when_only_the_mtime_does(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.png")
    source = folder_source(tmp_path)
    before = source.fingerprint
    stat = path.stat()

    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    assert source.fingerprint != before


def test_folder_source_fingerprint_differs_between_galleries(tmp_path: Path) -> None:
    write_image(tmp_path / "one" / "a.png")
    write_image(tmp_path / "two" / "b.png")

    one, two = folder_source(tmp_path / "one"), folder_source(tmp_path / "two")

    assert one.fingerprint != two.fingerprint
    assert len(one.fingerprint) == 32


# --- FashionMnistSource ----------------------------------------------------------------------


def test_fashion_mnist_source_reads_the_first_images(fake_data_dir: Path) -> None:
    gallery = load_gallery(fake_data_dir, size=20)

    source = FashionMnistSource.load(fake_data_dir, size=20)

    assert (source.name, source.kind, len(source)) == (FASHION_MNIST, FASHION_MNIST, 20)
    assert source.class_names == CLASS_NAMES
    assert source.labels.dtype == np.int32
    np.testing.assert_array_equal(source.labels, gallery.labels)
    assert source.skipped == [] and source.paths is None
    assert source.fingerprint == f"{FASHION_MNIST}-20"
    images = source.images(3, 6)
    assert [(image.mode, image.size) for image in images] == [("RGB", (28, 28))] * 3
    for image, pixels in zip(images, gallery.images[3:6], strict=True):
        np.testing.assert_array_equal(np.asarray(image)[:, :, 0], pixels)
        np.testing.assert_array_equal(np.asarray(image)[:, :, 2], pixels)


def test_fashion_mnist_source_spans_train_and_test(fake_data_dir: Path) -> None:
    source = FashionMnistSource.load(fake_data_dir, size=250)  # 240 train + 10 test

    assert len(source) == 250
    assert source.fingerprint == f"{FASHION_MNIST}-250"
    assert len(source.images(238, 250)) == 12


# --- thumbnails ------------------------------------------------------------------------------


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_encode_thumbnail_keeps_small_images_lossless_png() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(64, 40, 3), dtype=np.uint8)

    thumb = decoded(encode_thumbnail(Image.fromarray(pixels)))

    assert (thumb.format, thumb.size) == ("PNG", (40, 64))
    np.testing.assert_array_equal(np.asarray(thumb.convert("RGB")), pixels)


def test_encode_thumbnail_of_a_28px_image_is_png() -> None:
    thumb = decoded(encode_thumbnail(Image.new("RGB", (28, 28), (1, 2, 3))))

    assert (thumb.format, thumb.size) == ("PNG", (28, 28))


def test_encode_thumbnail_makes_a_jpeg_above_64_px() -> None:
    thumb = decoded(encode_thumbnail(Image.new("RGB", (65, 65), (1, 2, 3))))

    assert (thumb.format, thumb.size) == ("JPEG", (65, 65))


def test_a_quick_thumbnail_shrinks_photos_by_a_whole_factor_to_at_most_256_px() -> None:
    photo = Image.new("RGB", (1200, 600), (120, 60, 30))

    thumb = decoded(encode_thumbnail(photo, quick=True))

    assert (thumb.format, thumb.size) == ("JPEG", (240, 120))  # 1200 / 5
    assert decoded(encode_thumbnail(Image.new("RGB", (250, 90)), quick=True)).size == (250, 90)


def test_encode_thumbnail_shrinks_photos_to_256_px() -> None:
    photo = Image.new("RGB", (1200, 600), (120, 60, 30))

    thumb = decoded(encode_thumbnail(photo))

    assert thumb.format == "JPEG"
    assert thumb.size == (THUMB_MAX, THUMB_MAX // 2)
    assert photo.size == (1200, 600)  # the original is left alone


def test_thumbnail_pack_round_trip(tmp_path: Path) -> None:
    thumbs = [encode_thumbnail(Image.new("RGB", (8 + i, 8), (i * 40, 0, 0))) for i in range(5)]
    stem = tmp_path / "thumbs"

    count = write_thumbnail_pack(stem, iter(thumbs))

    assert count == 5
    assert ThumbnailPack.exists(stem)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thumbs.bin", "thumbs.offsets.npy"]
    pack = ThumbnailPack(stem)
    assert len(pack) == 5
    assert [pack.get(i) for i in range(5)] == thumbs
    assert list(pack.iter_all()) == thumbs
    image = pack.image(3)
    assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (11, 8), (120, 0, 0))


@pytest.mark.parametrize("index", [-1, 3, 100])
def test_thumbnail_pack_get_out_of_range_raises_index_error(tmp_path: Path, index: int) -> None:
    write_thumbnail_pack(tmp_path / "thumbs", [b"a", b"bb", b"ccc"])
    pack = ThumbnailPack(tmp_path / "thumbs")

    with pytest.raises(IndexError):
        pack.get(index)


def test_thumbnail_pack_of_nothing_is_empty(tmp_path: Path) -> None:
    assert write_thumbnail_pack(tmp_path / "thumbs", []) == 0

    pack = ThumbnailPack(tmp_path / "thumbs")

    assert len(pack) == 0
    assert list(pack.iter_all()) == []


def test_thumbnail_pack_rewrite_replaces_the_old_one(tmp_path: Path) -> None:
    stem = tmp_path / "thumbs"
    write_thumbnail_pack(stem, [b"old", b"older"])

    write_thumbnail_pack(stem, [b"new"])

    pack = ThumbnailPack(stem)
    assert list(pack.iter_all()) == [b"new"]


def test_thumbnail_pack_exists_needs_both_files(tmp_path: Path) -> None:
    stem = tmp_path / "thumbs"
    write_thumbnail_pack(stem, [b"x"])
    data_path, offsets_path = pack_files(stem)

    offsets_path.unlink()

    assert data_path.is_file()
    assert not ThumbnailPack.exists(stem)
    assert not ThumbnailPack.exists(tmp_path / "other")


# --- find_gallery_dirs -----------------------------------------------------------------------


def write_manifest(directory: Path, manifest: object) -> Path:
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_find_gallery_dirs_lists_a_gallerys_indexes_largest_first(tmp_path: Path) -> None:
    small = write_manifest(tmp_path / "shoes__a", {"gallery": "shoes", "count": 10})
    large = write_manifest(tmp_path / "shoes__b", {"gallery": "shoes", "count": 300})
    unknown = write_manifest(tmp_path / "shoes__c", {"gallery": "shoes"})
    write_manifest(tmp_path / "bags__a", {"gallery": "bags", "count": 1000})
    write_manifest(tmp_path / "list", ["shoes"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    (tmp_path / "loose-file").write_text("x")

    found = find_gallery_dirs(tmp_path, "shoes")

    assert list(found) == [large, small, unknown]


def test_find_gallery_dirs_of_a_missing_root_is_empty(tmp_path: Path) -> None:
    assert list(find_gallery_dirs(tmp_path / "nowhere", "shoes")) == []


def test_find_gallery_dirs_without_a_match_is_empty(tmp_path: Path) -> None:
    write_manifest(tmp_path / "bags__a", {"gallery": "bags", "count": 1})

    assert list(find_gallery_dirs(tmp_path, "shoes")) == []
