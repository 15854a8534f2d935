"""Gallery images as the API host finds them: the thumbnail pack of each index folder.

Packs are found under ``LOOKALIKE_INDEX_DIR`` (the same volume as the workers', mounted
read-only in docker-compose.yml), opened once per API process and reopened when a gallery is
rebuilt or its workers advertise another index folder. No torch, no model.
"""

from __future__ import annotations

import pathlib
import threading
import time

import numpy as np
import numpy.typing as npt
from fastapi import HTTPException
from PIL import Image

from shared.errors import GalleryError
from shared.galleries import THUMBS, ThumbnailPack, find_gallery_dirs, pack_stamp, read_manifest

NO_GALLERY_IMAGES = "The images of gallery {name!r} are not available on this API host."
NO_SUCH_IMAGE = "Gallery {name!r} has no image {index}."
MISSING_CACHE_S = 5.0


class GalleryImages:
    """Thumbnail packs by gallery name, opened once per API process and reopened when the
    gallery is rebuilt (or its workers now advertise another index folder)."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self._packs: dict[str, ThumbnailPack] = {}
        self._missing: dict[str, float] = {}  # not found, and when: asked again only later
        self._lock = threading.Lock()

    def pack(self, name: str, *, advertised_dir: str | None = None) -> ThumbnailPack:
        with self._lock:
            cached = self._packs.get(name)
            missing_since = self._missing.get(name)
        if cached is not None and self._current(cached, advertised_dir):
            return cached
        if missing_since is not None and time.monotonic() - missing_since < MISSING_CACHE_S:
            raise HTTPException(404, NO_GALLERY_IMAGES.format(name=name))
        # Looked for outside the lock: a scan of the index folder must not hold up the rest.
        candidates = [self.root / advertised_dir] if advertised_dir else []
        candidates += list(find_gallery_dirs(self.root, name))
        for directory in candidates:
            if ThumbnailPack.exists(directory / THUMBS):
                pack = ThumbnailPack(directory / THUMBS)
                with self._lock:
                    self._packs[name] = pack
                    self._missing.pop(name, None)
                return pack
        with self._lock:
            self._packs.pop(name, None)
            self._missing[name] = time.monotonic()
        raise HTTPException(404, NO_GALLERY_IMAGES.format(name=name))

    def _current(self, pack: ThumbnailPack, advertised_dir: str | None) -> bool:
        stem = pack.path.with_suffix("")
        if advertised_dir and stem.parent != self.root / advertised_dir:
            return False
        try:
            return pack_stamp(stem) == pack.stamp
        except OSError:  # removed
            return False

    def labels(
        self, name: str, *, advertised_dir: str | None = None
    ) -> tuple[npt.NDArray[np.int32], list[str]]:
        """A built gallery's labels (memory-mapped) and class names, from its index folder."""
        directory = self.pack(name, advertised_dir=advertised_dir).path.parent
        manifest = read_manifest(directory) or {}
        labels: npt.NDArray[np.int32] = np.load(directory / "labels.npy", mmap_mode="r")
        classes = manifest.get("class_names")
        return labels, [str(c) for c in classes] if isinstance(classes, list) else []

    def image(self, name: str, index: int, *, advertised_dir: str | None = None) -> Image.Image:
        pack = self.pack(name, advertised_dir=advertised_dir)
        if not 0 <= index < len(pack):
            raise HTTPException(404, NO_SUCH_IMAGE.format(name=name, index=index))
        try:
            return pack.image(index)
        except GalleryError:
            raise HTTPException(404, NO_SUCH_IMAGE.format(name=name, index=index)) from None
