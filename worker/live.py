"""Live galleries in a worker: the items of each, in memory, kept up to date from Redis.

A worker loads every live gallery (shared.live) at start and follows their change logs in a
thread (``Follower``): an add appears in its matrix within milliseconds of its commit, a delete
disappears as fast. A job on a live gallery carries the gallery's version at its acceptance;
:meth:`LiveGallery.catch_up` reads the log up to it first, so a search never misses an add it
was accepted after, nor sees an item whose delete was answered before it was accepted.

Items are rows of a matrix (float32 on a CPU, where float16 products are slow; float16 copied
to the device on a GPU) with a mask of live rows;
a deleted row is masked and reused only when the matrix is compacted. An item another model's
worker added (no embedding for this worker's model yet) is embedded here from its stored image
and its embedding kept with it, so workers of a new model serve the same catalogue.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import redis
import torch

from shared.errors import ImageRejected
from shared.images import stored_image
from shared.live import LiveStore
from shared.schemas import Embeddings, Match
from worker.filters import Columns, Mask

log = logging.getLogger(__name__)

FIELDS = ("attributes", "sha256")
LOAD_BATCH = 1000
FOLLOW_BLOCK_MS = 1000
COMPACT_AT = 0.5  # compact when this share of rows is dead


def embedding_field(model_id: str, preprocessing_digest: str) -> str:
    """Where an item keeps this model's embedding (one field per model and preprocessing)."""
    digest = hashlib.sha256(f"{model_id}\0{preprocessing_digest}".encode()).hexdigest()[:16]
    return f"emb:{digest}"


def image_url(gallery: str, item_id: str) -> str:
    return f"/galleries/{gallery}/items/{item_id}/image.png"


@dataclass
class LiveGallery:
    """One live gallery's items in this worker."""

    name: str
    dim: int
    device: str
    dtype: torch.dtype
    capacity: int = 1024
    count: int = 0  # rows used (dead ones included)
    version: int = 0  # changes applied
    after: str = "0-0"  # the log entry read last
    lock: threading.RLock = field(default_factory=threading.RLock)
    kind: str = "live"

    def __post_init__(self) -> None:
        self.rows = np.zeros((self.capacity, self.dim), dtype=self._row_dtype)
        self.alive = np.zeros(self.capacity, dtype=bool)
        self.ids: list[str | None] = [None] * self.capacity
        self.attributes: list[dict[str, Any]] = [{} for _ in range(self.capacity)]
        self.position: dict[str, int] = {}
        self.columns = Columns(self.capacity)
        self._matrix: torch.Tensor | None = None

    @property
    def _row_dtype(self) -> type[np.floating[Any]]:
        return np.float32 if self.device == "cpu" else np.float16

    # --- the catalogue ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.position)

    def upsert(self, item_id: str, embedding: npt.NDArray[Any], attributes: dict[str, Any]) -> None:
        with self.lock:
            row = self.position.get(item_id)
            if row is None:
                if self.count == self.capacity:
                    self._grow()
                row, self.count = self.count, self.count + 1
                self.position[item_id] = row
                self.ids[row] = item_id
            self.rows[row] = embedding
            self.alive[row] = True
            self.attributes[row] = attributes
            self.columns.set_row(row, attributes)
            if self._matrix is not None and self.device != "cpu":
                self._matrix[row] = torch.from_numpy(self.rows[row]).to(self.device, self.dtype)

    def remove(self, item_id: str) -> None:
        with self.lock:
            row = self.position.pop(item_id, None)
            if row is None:
                return
            self.alive[row] = False
            self.ids[row] = None
            self.attributes[row] = {}
            self.columns.clear_row(row)
            if self.count > 1024 and len(self.position) < self.count * (1 - COMPACT_AT):
                self._compact()

    def _grow(self) -> None:
        self._resize(self.capacity * 2, list(range(self.count)))

    def _compact(self) -> None:
        self._resize(self.capacity, [r for r in range(self.count) if self.alive[r]])

    def _resize(self, capacity: int, keep: list[int]) -> None:
        rows, alive = np.zeros((capacity, self.dim), self._row_dtype), np.zeros(capacity, bool)
        ids: list[str | None] = [None] * capacity
        attributes: list[dict[str, Any]] = [{} for _ in range(capacity)]
        columns = Columns(capacity)
        for new, old in enumerate(keep):
            rows[new], alive[new] = self.rows[old], self.alive[old]
            ids[new], attributes[new] = self.ids[old], self.attributes[old]
            if alive[new]:
                columns.set_row(new, attributes[new])
        self.rows, self.alive, self.ids, self.attributes = rows, alive, ids, attributes
        self.columns, self.capacity, self.count = columns, capacity, len(keep)
        self.position = {item_id: row for row, item_id in enumerate(ids) if item_id is not None}
        self._matrix = None

    # --- searching (worker.search): the same methods as a built gallery's ------------------

    @property
    def matrix(self) -> torch.Tensor:
        """The rows in use, on the device (a view of ``rows`` on a CPU)."""
        with self.lock:
            if self.device == "cpu":
                return torch.from_numpy(self.rows[: self.count])
            if self._matrix is None or self._matrix.shape[0] != self.capacity:
                self._matrix = torch.from_numpy(self.rows).to(self.device, self.dtype)
            return self._matrix[: self.count]

    def candidates(self) -> Mask | None:
        """Rows that hold an item (deleted ones do not)."""
        return self.alive[: self.count].copy()

    def row_of(self, item_id: str) -> int | None:
        return self.position.get(item_id)

    def item_id(self, row: int) -> str:
        return self.ids[row] or ""

    def embedding_of(self, row: int) -> npt.NDArray[np.float32]:
        return np.asarray(self.rows[row], dtype=np.float32)

    def filter_mask(self, conditions: Any, rows: int) -> Mask:
        return self.columns.mask(conditions, rows)

    def match(self, row: int, *, rank: int, score: float) -> Match:
        item_id = self.ids[row] or ""
        return Match(
            rank=rank,
            item_id=item_id,
            attributes=self.attributes[row],
            score=score,
            image_url=image_url(self.name, item_id),
        )

    def summary(self, *, default: bool) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": len(self),
            "model": "",
            "kind": self.kind,
            "classes": [],
            "default": default,
            "dir": None,
        }


Embed = Callable[[Sequence[Any]], Embeddings]


@dataclass
class LiveGalleries:
    """Every live gallery of this worker, loaded from and kept in step with Redis."""

    store: LiveStore
    embedding_field: str  # where items keep this model's embedding
    dim: int
    device: str
    dtype: torch.dtype
    embed: Embed  # images to embeddings, for items added by another model's workers
    max_pixels: int
    galleries: dict[str, LiveGallery] = field(default_factory=dict)
    global_after: str = "0-0"
    loading: threading.Lock = field(default_factory=threading.Lock)  # one load at a time

    def load_all(self) -> None:
        newest: Any = self.store.client.xrevrange(self.store.keys.log, count=1)
        self.global_after = _text(newest[0][0]) if newest else "0-0"
        for name in self.store.names():
            self.load(name)

    def get(self, name: str) -> LiveGallery | None:
        """The gallery; one created since this worker started is loaded now."""
        gallery = self.galleries.get(name)
        if gallery is None and name in self.store.names():
            with self.loading:  # the follower may be loading it too
                gallery = self.galleries.get(name) or self.load(name)
        return gallery

    def load(self, name: str) -> LiveGallery:
        gallery = LiveGallery(name, self.dim, self.device, self.dtype)
        with gallery.lock:
            gallery.after = self.store.last_change_id(name)
            gallery.version = self.store.version(name)
            ids = self.store.item_ids(name)
            for low in range(0, len(ids), LOAD_BATCH):
                self._add(gallery, ids[low : low + LOAD_BATCH])
            self.galleries[name] = gallery
            entries = self.store.changes_after(name, gallery.after)
            while entries:  # what changed while it loaded
                self.apply(gallery, entries)
                entries = self.store.changes_after(name, gallery.after)
        log.info("live gallery %s: %d items, version %d", name, len(gallery), gallery.version)
        return gallery

    def _add(self, gallery: LiveGallery, ids: Sequence[str]) -> None:
        """Put these items (as they are now in Redis) in the gallery; embed those that have no
        embedding of this model yet."""
        fields = (*FIELDS, self.embedding_field)
        found = self.store.items(gallery.name, ids, fields)
        missing = [
            (i, f) for i, f in zip(ids, found, strict=True) if f and not f.get(self.embedding_field)
        ]
        if missing:
            self._embed_missing(gallery.name, missing)
            found = self.store.items(gallery.name, ids, fields)
        for item_id, values in zip(ids, found, strict=True):
            embedding = values.get(self.embedding_field) if values else None
            if embedding is None:  # gone meanwhile, or not embeddable: not searchable
                gallery.remove(item_id)
                continue
            vector = np.frombuffer(embedding, dtype=np.float16)
            gallery.upsert(item_id, vector, json.loads(values.get("attributes") or "{}"))

    def _embed_missing(self, name: str, items: Sequence[tuple[str, dict[str, Any]]]) -> None:
        images = self.store.items(name, [item_id for item_id, _ in items], ("image", "sha256"))
        todo = []
        for (item_id, _), values in zip(items, images, strict=True):
            try:
                todo.append(
                    (
                        item_id,
                        values["sha256"],
                        stored_image(values["image"], max_pixels=self.max_pixels),
                    )
                )
            except (KeyError, ImageRejected) as error:
                log.error("live gallery %s: item %s cannot be embedded (%s)", name, item_id, error)
        for low in range(0, len(todo), 64):
            part = todo[low : low + 64]
            rows = self.embed([image for _, _, image in part])
            for (item_id, sha, _), row in zip(part, rows, strict=True):
                embedding = row.astype(np.float16).tobytes()
                self.store.save_embedding(name, item_id, sha, self.embedding_field, embedding)
        if todo:
            log.info("live gallery %s: embedded %d items for this model", name, len(todo))

    def catch_up(self, gallery: LiveGallery, version: int) -> LiveGallery:
        """Apply the gallery's log up to ``version`` at least (all there is, for 0); the
        gallery as it now is (reloaded whole if its log was trimmed past what it had)."""
        with gallery.lock:
            while True:
                entries = self.store.changes_after(gallery.name, gallery.after)
                if not entries:
                    if gallery.version < version:  # the log lost what it would need
                        return self.load(gallery.name)
                    return gallery
                if not self.apply(gallery, entries):
                    return self.load(gallery.name)
                if version and gallery.version >= version:
                    return gallery

    def apply(self, gallery: LiveGallery, entries: Sequence[tuple[str, dict[str, str]]]) -> bool:
        """Apply log entries (those already applied are skipped); False on a gap in the
        versions (entries trimmed from the log: the gallery must be loaded again)."""
        adds: list[str] = []
        with gallery.lock:
            for entry_id, change in entries:
                v = int(change.get("v", 0))
                if v <= gallery.version:
                    gallery.after = max(gallery.after, entry_id, key=_stream_order)
                    continue
                if v != gallery.version + 1:
                    log.warning("live gallery %s: the log skips to %d, reloading", gallery.name, v)
                    return False
                if change.get("op") == "del":
                    if adds:
                        self._add(gallery, adds)
                        adds = []
                    gallery.remove(change["id"])
                elif change.get("op") == "add":
                    adds.append(change["id"])
                gallery.after, gallery.version = entry_id, v
            if adds:
                self._add(gallery, adds)
        return True

    def follow(self, stop: threading.Event) -> None:
        """Apply every gallery's changes as they come (run in a thread until ``stop``)."""
        while not stop.is_set():
            try:
                self._follow_once()
            except redis.RedisError as error:  # Redis away: the next round tries again
                log.warning("live galleries: %s", error)
                stop.wait(1.0)
            except Exception:
                log.exception("live galleries: following the logs failed")
                stop.wait(1.0)

    def _follow_once(self) -> None:
        keys = self.store.keys
        streams = {keys.log: self.global_after}
        streams |= {keys.changes(g.name): g.after for g in list(self.galleries.values())}
        reply: Any = self.store.client.xread(streams, block=FOLLOW_BLOCK_MS)  # type: ignore[arg-type]
        for raw_key, raw_entries in reply or []:
            key = _text(raw_key)
            entries = [
                (_text(i), {_text(k): _text(v) for k, v in f.items()}) for i, f in raw_entries
            ]
            if key == keys.log:
                for entry_id, change in entries:
                    self.global_after = entry_id
                    name = change.get("name")
                    if name:
                        with self.loading:
                            if name not in self.galleries:
                                self.load(name)
                continue
            name = key.removeprefix(keys.gallery("")).removesuffix(":log")
            gallery = self.galleries.get(name)
            if gallery is not None and not self.apply(gallery, entries):
                self.load(name)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _stream_order(entry_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = entry_id.partition("-")
    return int(milliseconds), int(sequence or 0)


def start_following(galleries: LiveGalleries) -> threading.Event:
    stop = threading.Event()
    threading.Thread(target=galleries.follow, args=(stop,), name="live", daemon=True).start()
    return stop
