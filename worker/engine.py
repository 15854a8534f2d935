"""The heavy resource of a worker process: CLIP and the gallery index, loaded once.

``get_engine()`` loads under a lock on first use (or at process start, see worker.celery_app)
and every task reuses the result. Loading is split from predicting: ``Engine`` only answers.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from shared.fashion_mnist import CLASS_NAMES, load_gallery
from shared.settings import Settings
from worker.encoder import ClipImageEncoder, load_encoder
from worker.index import GalleryIndex, build_index, gallery_to_images, index_dir, load_index

log = logging.getLogger(__name__)


@dataclass
class Engine:
    encoder: ClipImageEncoder
    index: GalleryIndex
    gallery: str
    class_names: tuple[str, ...]
    load_seconds: float


_lock = threading.Lock()
_engine: Engine | None = None


def load_engine(settings: Settings, *, build_missing: bool = False) -> Engine:
    """Load the model and the index; with ``build_missing``, build an absent index first."""
    started = time.perf_counter()
    gallery_settings = settings.gallery
    directory = index_dir(
        gallery_settings.index_dir,
        gallery=gallery_settings.name,
        size=gallery_settings.size,
        model_id=settings.model.name,
    )
    needs_build = build_missing and not (directory / "manifest.json").exists()
    gallery = None
    if needs_build:
        gallery = load_gallery(gallery_settings.data_dir, size=gallery_settings.size)
    # The int8 start check runs on real gallery images: the gallery's own, or the probes
    # stored with a built index.
    stored_probes = directory / "probes.npy"
    if gallery is not None:
        probes = gallery_to_images(gallery.images[:8])
    elif stored_probes.exists():
        probes = gallery_to_images(np.load(stored_probes))
    else:
        probes = []
    encoder = load_encoder(settings.model, probe_images=probes)
    if needs_build:
        assert gallery is not None
        log.info("no index at %s: building it (%d images)", directory, len(gallery))
        build_index(
            encoder,
            gallery.images,
            gallery.labels,
            gallery=gallery_settings.name,
            directory=directory,
            batch_size=settings.model.batch_size,
        )
    index = load_index(
        directory, encoder, gallery=gallery_settings.name, size=gallery_settings.size
    )
    return Engine(
        encoder=encoder,
        index=index,
        gallery=gallery_settings.name,
        class_names=CLASS_NAMES,
        load_seconds=time.perf_counter() - started,
    )


def get_engine(settings: Settings, *, build_missing: bool = False) -> Engine:
    """The process's engine, loaded on first call under a lock."""
    global _engine
    if _engine is None:
        with _lock:
            if _engine is None:
                _engine = load_engine(settings, build_missing=build_missing)
    return _engine
