"""Galleries: where their images come from, and the small copies the API shows.

Two kinds of gallery:

* ``fashion-mnist``: the first N images of Fashion-MNIST's IDX files (train, then test);
* ``folder``: a folder of your own images, read recursively, labelled by their top-level
  sub-folder (``shoes/red/1.jpg`` is a "shoes"); images at the top are "unlabelled".
  Unreadable files are listed and skipped, never fatal.

Both hand out RGB images made by :func:`shared.images.to_rgb`, the conversion uploads get.

An index folder keeps a thumbnail pack beside its embeddings: every gallery image encoded once
(PNG for small images, JPEG of at most 256 px for photos) in ``thumbs.bin``, with offsets in
``thumbs.offsets.npy``. The API reads it for ``/gallery/<i>.png`` and the result picture
without the source files, and without torch.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from shared.errors import GalleryError, ImageRejected
from shared.fashion_mnist import CLASS_NAMES, load_gallery
from shared.images import decode_upload, to_rgb
from shared.settings import FASHION_MNIST

FOLDER = "folder"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
UNLABELLED = "unlabelled"
THUMB_MAX = 256
THUMBS = "thumbs"  # thumbs.bin + thumbs.offsets.npy in an index folder


@dataclass(frozen=True)
class Skipped:
    """A file of a folder gallery that could not be used, and why."""

    path: str
    reason: str


class GallerySource(ABC):
    """The images of a gallery, in index order, with their labels."""

    name: str
    kind: str
    labels: npt.NDArray[np.int32]
    class_names: tuple[str, ...]
    paths: list[str] | None = None
    skipped: list[Skipped]
    location: str | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @abstractmethod
    def images(self, start: int, stop: int) -> list[Image.Image]:
        """RGB images ``start`` to ``stop`` (excluded)."""

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """Changes when the gallery's content changes: a half-done build of another
        content is not resumed."""


class FashionMnistSource(GallerySource):
    def __init__(self, pixels: npt.NDArray[np.uint8], labels: npt.NDArray[np.generic]) -> None:
        self.name = FASHION_MNIST
        self.kind = FASHION_MNIST
        self.pixels = pixels
        self.labels = np.asarray(labels, dtype=np.int32)
        self.class_names = CLASS_NAMES
        self.skipped = []

    @classmethod
    def load(cls, data_dir: Path | None, *, size: int) -> FashionMnistSource:
        gallery = load_gallery(data_dir, size=size)
        return cls(gallery.images, gallery.labels)

    def images(self, start: int, stop: int) -> list[Image.Image]:
        return [to_rgb(Image.fromarray(p, mode="L")) for p in self.pixels[start:stop]]

    @property
    def fingerprint(self) -> str:
        return f"{FASHION_MNIST}-{len(self)}"


@dataclass
class FolderListing:
    root: Path
    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    ignored: int = 0


def scan_folder(
    root: Path,
    *,
    max_pixels: int,
    on_file: Callable[[], object] | None = None,
) -> FolderListing:
    """Every readable image under ``root``, labelled by its top-level sub-folder.

    The order is stable: a folder's own files (sorted by name), then its sub-folders' (sorted).

    Files whose names are not image names are ignored (counted); image files that do not
    decode (corrupt, too many pixels, another format in disguise) are listed in ``skipped``.
    """
    root = root.expanduser()
    if not root.is_dir():
        raise GalleryError(f"{root} is not a folder.")
    listing = FolderListing(root=root)
    classes: dict[str, int] = {}
    for path in _walk(root):
        relative = path.relative_to(root).as_posix()
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            listing.ignored += 1
            continue
        if on_file is not None:
            on_file()
        try:
            decode_upload(path.read_bytes(), max_pixels=max_pixels)
        except ImageRejected as error:
            listing.skipped.append(Skipped(relative, str(error)))
            continue
        except OSError as error:
            listing.skipped.append(Skipped(relative, f"Unreadable: {error.strerror or error}."))
            continue
        parts = path.relative_to(root).parts
        label_name = parts[0] if len(parts) > 1 else UNLABELLED
        label = classes.setdefault(label_name, len(classes))
        listing.paths.append(relative)
        listing.labels.append(label)
    listing.class_names = list(classes)
    return listing


def _walk(root: Path) -> Iterable[Path]:
    """Files under ``root`` in a stable order, without following links out of it."""
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        for name in sorted(files):
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                yield path


class FolderSource(GallerySource):
    def __init__(self, name: str, listing: FolderListing, *, max_pixels: int) -> None:
        if not listing.paths:
            raise GalleryError(
                f"{listing.root} holds no readable image "
                f"({len(listing.skipped)} skipped, {listing.ignored} other files)."
            )
        self.name = name
        self.kind = FOLDER
        self.root = listing.root
        self.paths = listing.paths
        self.labels = np.asarray(listing.labels, dtype=np.int32)
        self.class_names = tuple(listing.class_names)
        self.skipped = listing.skipped
        self.location = str(listing.root.resolve())
        self.max_pixels = max_pixels

    def images(self, start: int, stop: int) -> list[Image.Image]:
        assert self.paths is not None
        loaded = []
        for relative in self.paths[start:stop]:
            try:
                data = (self.root / relative).read_bytes()
                loaded.append(decode_upload(data, max_pixels=self.max_pixels).image)
            except (OSError, ImageRejected) as error:
                raise GalleryError(
                    f"{relative} changed while the gallery was being indexed ({error}); "
                    "run the build again."
                ) from error
        return loaded

    @property
    def fingerprint(self) -> str:
        assert self.paths is not None
        digest = hashlib.sha256()
        for relative in self.paths:
            stat = (self.root / relative).stat()
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:32]


# --- thumbnails ------------------------------------------------------------------------------


def encode_thumbnail(image: Image.Image, *, quick: bool = False) -> bytes:
    """A small copy to show: lossless PNG for small images, JPEG of <= 256 px for photos.

    ``quick`` shrinks by a whole factor (a box filter: 128 to 256 px) rather than to 256 px
    with Lanczos: for a 400x300 image, 0.25 ms with the JPEG encoding against 3.5 ms."""
    buffer = io.BytesIO()
    if max(image.size) <= 64:
        image.save(buffer, format="PNG", optimize=False)
    elif quick:
        factor = -(-max(image.size) // THUMB_MAX)
        (image.reduce(factor) if factor > 1 else image).save(buffer, format="JPEG", quality=85)
    else:
        small = image.copy()
        small.thumbnail((THUMB_MAX, THUMB_MAX), Image.Resampling.LANCZOS)
        small.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def pack_files(stem: Path) -> tuple[Path, Path]:
    """The data file and the offsets file of the pack named ``stem`` (e.g. ``dir/thumbs``)."""
    return Path(f"{stem}.bin"), Path(f"{stem}.offsets.npy")


def write_thumbnail_pack(stem: Path, thumbnails: Iterable[bytes]) -> int:
    """Write the pack ``stem`` (data, then offsets, each atomically); return its length."""
    data_path, offsets_path = pack_files(stem)
    offsets = [0]
    tmp = data_path.with_name(data_path.name + ".tmp")
    with tmp.open("wb") as handle:
        for thumb in thumbnails:
            handle.write(thumb)
            offsets.append(offsets[-1] + len(thumb))
    tmp.replace(data_path)
    tmp_offsets = offsets_path.with_name(offsets_path.name + ".tmp.npy")
    np.save(tmp_offsets, np.asarray(offsets, dtype=np.int64))
    tmp_offsets.replace(offsets_path)
    return len(offsets) - 1


class ThumbnailPack:
    """Read-only access to a thumbnail pack (an index folder's ``thumbs``).

    The data file is opened once, so offsets and data come from the same build even if the
    pack is replaced meanwhile (a rebuild replaces files atomically); :attr:`stamp` tells a
    reader when to open the new one.
    """

    def __init__(self, stem: Path) -> None:
        self.path, offsets_path = pack_files(stem)
        self.stamp = pack_stamp(stem)
        self.offsets: npt.NDArray[np.int64] = np.load(offsets_path, mmap_mode="r")
        self._fd = os.open(self.path, os.O_RDONLY)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    @staticmethod
    def exists(stem: Path) -> bool:
        return all(path.is_file() for path in pack_files(stem))

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def get(self, index: int) -> bytes:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        return os.pread(self._fd, stop - start, start)

    def iter_all(self) -> Iterable[bytes]:
        for index in range(len(self)):
            yield self.get(index)

    def image(self, index: int) -> Image.Image:
        """Thumbnail ``index``, decoded: at most ``THUMB_MAX`` pixels a side, checked before
        anything is decompressed (a damaged pack cannot make it large)."""
        with Image.open(io.BytesIO(self.get(index))) as image:
            if max(image.size) > THUMB_MAX:
                raise GalleryError(f"Thumbnail {index} of {self.path} is damaged.")
            return image.convert("RGB")


def pack_stamp(stem: Path) -> tuple[int, int]:
    """Changes when the pack ``stem`` is replaced (inode and time of its offsets file)."""
    stat = pack_files(stem)[1].stat()
    return stat.st_ino, stat.st_mtime_ns


def read_manifest(directory: Path) -> dict[str, object] | None:
    """An index folder's manifest as plain JSON (no torch needed), or None."""
    try:
        loaded = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def built_indexes(root: Path) -> list[tuple[Path, dict[str, object]]]:
    """Every index folder under ``root`` with its manifest, by folder name."""
    if not root.is_dir():
        return []
    found = [(directory, read_manifest(directory)) for directory in sorted(root.iterdir())]
    return [(directory, manifest) for directory, manifest in found if manifest is not None]


def find_gallery_dirs(root: Path, name: str) -> Sequence[Path]:
    """Index folders under ``root`` whose manifest names gallery ``name``, largest first."""

    def count(manifest: dict[str, object]) -> int:
        value = manifest.get("count")
        return value if isinstance(value, int) else 0

    found = [(d, m) for d, m in built_indexes(root) if m.get("gallery") == name]
    return [d for d, _ in sorted(found, key=lambda item: -count(item[1]))]
