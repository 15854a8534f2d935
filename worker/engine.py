"""The heavy resource of a worker process: CLIP and the gallery indexes, loaded once.

``get_engine()`` loads under a lock on first use (or at process start, see worker.main) and
every task reuses the result. Loading is split from predicting: ``Engine`` only answers.

A worker serves its default gallery (``LOOKALIKE_GALLERY``; Fashion-MNIST is built on first
start with ``--build-index``) and every own gallery built for its model under the index root.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch

from shared.errors import IndexMismatch, JobFailed
from shared.galleries import FashionMnistSource, read_manifest
from shared.live import LiveStore
from shared.schemas import Match
from shared.settings import FASHION_MNIST, Settings
from worker.encoder import ClipImageEncoder, index_batch_size, load_encoder
from worker.filters import Mask
from worker.index import (
    GalleryIndex,
    build_index,
    index_dir,
    load_index,
    load_probe_pixels,
    own_gallery_dirs,
    probe_thumbnails,
)
from worker.live import LiveGalleries, embedding_field, start_following
from worker.text_encoder import ClipTextEncoder, load_text_encoder

log = logging.getLogger(__name__)

UNKNOWN_GALLERY = "The gallery {name!r} is not served by this worker."
TEXT_OFF = "Text search is off on this worker (LOOKALIKE_TEXT_SEARCH=off)."


class Searchable(Protocol):
    """A gallery as a search sees it, built (worker.index.GalleryIndex) or live
    (worker.live.LiveGallery): rows of a matrix, each an item with an id and attributes."""

    name: str

    def __len__(self) -> int: ...

    @property
    def kind(self) -> str: ...

    @property
    def matrix(self) -> torch.Tensor: ...

    def candidates(self) -> Mask | None: ...

    def row_of(self, item_id: str) -> int | None: ...

    def item_id(self, row: int) -> str: ...

    def embedding_of(self, row: int) -> npt.NDArray[np.float32]: ...

    def filter_mask(self, conditions: Any, rows: int) -> Mask: ...

    def match(self, row: int, *, rank: int, score: float) -> Match: ...


@dataclass
class Engine:
    encoder: ClipImageEncoder
    galleries: dict[str, GalleryIndex]
    default_gallery: str
    load_seconds: float
    text_encoder: ClipTextEncoder | None = None
    refused: dict[str, str] = field(default_factory=dict)
    live: LiveGalleries | None = None

    @property
    def index(self) -> GalleryIndex:
        """The default gallery's index."""
        return self.galleries[self.default_gallery]

    @property
    def embedding_field(self) -> str:
        """Where a live gallery's item keeps this model's embedding."""
        return embedding_field(self.encoder.model_id, self.encoder.preprocessing_digest)

    def gallery(self, name: str) -> GalleryIndex:
        try:
            return self.galleries[name]
        except KeyError:
            raise JobFailed(UNKNOWN_GALLERY.format(name=name), reason="unknown_gallery") from None

    def searchable(self, name: str, *, version: int | None = None) -> Searchable:
        """A built gallery, or a live one with at least the changes up to ``version`` (the
        version a job was accepted at) applied."""
        built = self.galleries.get(name)
        if built is not None:
            return built
        gallery = self.live.get(name) if self.live is not None else None
        if gallery is None:
            raise JobFailed(UNKNOWN_GALLERY.format(name=name), reason="unknown_gallery")
        if version is not None and gallery.version < version:
            assert self.live is not None
            gallery = self.live.catch_up(gallery, version)
        return gallery

    @property
    def modes(self) -> dict[str, bool]:
        return {"image": True, "text": self.text_encoder is not None}

    def summaries(self) -> list[dict[str, Any]]:
        return [
            index.summary(default=name == self.default_gallery)
            for name, index in self.galleries.items()
        ]


_lock = threading.Lock()
_engine: Engine | None = None


def default_index_dir(settings: Settings) -> Path:
    gallery = settings.gallery
    return index_dir(
        gallery.index_dir,
        gallery=gallery.name,
        model_id=settings.model.name,
        size=gallery.size if gallery.name == FASHION_MNIST else None,
    )


def load_engine(settings: Settings, *, build_missing: bool = False) -> Engine:
    """Load the model and the indexes; with ``build_missing``, build an absent default index
    first (Fashion-MNIST only: an own gallery is built from its folder by the user)."""
    started = time.perf_counter()
    gallery = settings.gallery
    directory = default_index_dir(settings)
    needs_build = build_missing and not (directory / "manifest.json").exists()
    if needs_build and gallery.name != FASHION_MNIST:
        raise IndexMismatch(
            f"No index for the gallery {gallery.name!r} at {directory}: build it with "
            f"'lookalike index build --images FOLDER --name {gallery.name}'."
        )
    source = FashionMnistSource.load(gallery.data_dir, size=gallery.size) if needs_build else None
    extras = own_gallery_dirs(gallery.index_dir, model_id=settings.model.name, exclude=gallery.name)
    # The start check of the faster CPU paths runs on real gallery images: the gallery's own
    # when it is built now, else the probes stored with every index this worker will serve.
    served = ([] if source else [directory]) + extras
    stored = [load_probe_pixels(d) for d in served]
    probes = [p for p in stored if p is not None]
    encoder = load_encoder(
        settings.model,
        probe_images=source.images(0, 8) if source is not None else (),
        probe_pixels=torch.cat(probes) if probes else None,
        preprocess_probes=[image for d in served for image in probe_thumbnails(d)],
    )
    if source is not None:
        log.info("no index at %s: building it (%d images)", directory, len(source))
        batch_size = index_batch_size(settings.model.batch_size, encoder.device)
        build_index(encoder, source, directory=directory, batch_size=batch_size)
    size = gallery.size if gallery.name == FASHION_MNIST else None
    galleries = {gallery.name: load_index(directory, encoder, gallery=gallery.name, size=size)}
    refused: dict[str, str] = {}
    for extra in extras:
        try:
            index = load_index(extra, encoder, gallery=_gallery_name(extra))
        except IndexMismatch as error:
            refused[extra.name] = str(error)
            log.error("not serving the gallery in %s: %s", extra, error)
            continue
        if index.name in galleries:
            log.warning("gallery %s: two indexes, keeping %s", index.name, galleries[index.name])
            continue
        galleries[index.name] = index
    text_encoder = None
    if settings.model.text_search == "on":
        text_encoder = load_text_encoder(encoder.model_id, device=encoder.device)
    return Engine(
        encoder=encoder,
        galleries=galleries,
        default_gallery=gallery.name,
        load_seconds=time.perf_counter() - started,
        text_encoder=text_encoder,
        refused=refused,
    )


def attach_live(engine: Engine, store: LiveStore, *, max_pixels: int) -> threading.Event:
    """Load every live gallery into ``engine`` and follow their changes in a thread (set the
    returned event to stop it)."""
    encoder = engine.encoder
    galleries = LiveGalleries(
        store=store,
        embedding_field=engine.embedding_field,
        dim=encoder.dim,
        device=encoder.device,
        dtype=torch.float32 if encoder.device == "cpu" else encoder.dtype,
        embed=encoder.embed,
        max_pixels=max_pixels,
    )
    galleries.load_all()
    engine.live = galleries
    return start_following(galleries)


def _gallery_name(directory: Path) -> str:
    manifest = read_manifest(directory) or {}
    return str(manifest.get("gallery", directory.name))


def get_engine(settings: Settings, *, build_missing: bool = False) -> Engine:
    """The process's engine, loaded on first call under a lock."""
    global _engine
    if _engine is None:
        with _lock:
            if _engine is None:
                _engine = load_engine(settings, build_missing=build_missing)
    return _engine
