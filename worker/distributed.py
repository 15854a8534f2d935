"""``lookalike index build --distributed``: a build spread over the running workers.

The gallery is cut into the build's chunks (worker.index.CHUNK images); each missing chunk is
one Celery task on the build queue (``<queue>.build``), taken by whichever worker is free. The
worker embeds it with the model it already holds, checks that model is the builder's, and
hands back the embeddings and thumbnails through Redis; the builder saves each chunk where a
local build would (so the build resumes the same way, however it was started) and assembles
the index at the end. At most two chunks per worker are in flight, so the work stays
balanced and a job submitted meanwhile waits for one chunk at most.

Workers need the gallery's files: Fashion-MNIST's IDX files, or the folder at the same path.
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import redis

from shared.celery_config import INDEX_CHUNK_TASK, build_queue, make_celery
from shared.errors import BuildFailed, LookalikeError
from shared.galleries import (
    FashionMnistSource,
    FolderListing,
    FolderSource,
    GallerySource,
)
from shared.jobs import JobStore
from shared.redis_clients import sync_client
from shared.settings import FASHION_MNIST, Settings
from worker.encoder import ClipImageEncoder, index_batch_size, load_encoder
from worker.index import (
    BuildParts,
    Manifest,
    embed_chunk,
    finish_index,
    open_build,
    progress_bar,
)

log = logging.getLogger(__name__)

IN_FLIGHT_PER_WORKER = 2
RESULT_TTL_S = 3600
MAX_SENDS = 3
HEARTBEAT_WINDOW_S = 15.0


@dataclass
class _Chunk:
    start: int
    stop: int
    sent_at: float = 0.0
    sends: int = 0
    task_ids: list[str] = field(default_factory=list)


def chunk_spec(
    source: GallerySource,
    encoder: ClipImageEncoder,
    *,
    build_id: str,
    start: int,
    stop: int,
    batch_size: int | None,
) -> dict[str, Any]:
    """What a worker needs to compute one chunk: plain JSON."""
    spec: dict[str, Any] = {
        "build_id": build_id,
        "kind": source.kind,
        "gallery": source.name,
        "start": start,
        "stop": stop,
        "count": len(source),
        "batch_size": batch_size,
        "model_id": encoder.model_id,
        "preprocessing_digest": encoder.preprocessing_digest,
    }
    if isinstance(source, FolderSource):
        assert source.paths is not None
        spec["root"] = str(source.root.resolve())
        spec["paths"] = source.paths[start:stop]
    return spec


class _Keys:
    def __init__(self, prefix: str, build_id: str) -> None:
        base = f"{prefix}:build:{build_id}"
        self.done = f"{base}:done"
        self.progress = f"{base}:progress"

    def result(self, start: int) -> str:
        return f"{self.done}:{start}"

    def started(self, start: int) -> str:
        return f"{self.done}:{start}:started"


# --- the worker's side -----------------------------------------------------------------------


@lru_cache(maxsize=1)
def _fashion_mnist(data_dir: str | None, size: int) -> FashionMnistSource:
    """The whole gallery of a build, read once per worker (every chunk shares it)."""
    return FashionMnistSource.load(Path(data_dir) if data_dir else None, size=size)


def chunk_source(spec: dict[str, Any], *, data_dir: Path | None, max_pixels: int) -> GallerySource:
    """The images of one chunk as the worker can read them; indices start at 0."""
    if spec["kind"] == FASHION_MNIST:
        gallery = _fashion_mnist(str(data_dir) if data_dir else None, int(spec["count"]))
        return FashionMnistSource(
            gallery.pixels[spec["start"] : spec["stop"]],
            gallery.labels[spec["start"] : spec["stop"]],
        )
    paths = [str(p) for p in spec["paths"]]
    listing = FolderListing(root=Path(spec["root"]), paths=paths, labels=[0] * len(paths))
    return FolderSource(str(spec["gallery"]), listing, max_pixels=max_pixels)


def compute_chunk(
    client: redis.Redis,
    prefix: str,
    spec: dict[str, Any],
    encoder: ClipImageEncoder,
    *,
    data_dir: Path | None,
    max_pixels: int,
    worker_name: str,
) -> None:
    """Embed one chunk and hand the result back through Redis (an error is handed back too)."""
    keys = _Keys(prefix, str(spec["build_id"]))
    start = int(spec["start"])
    client.set(keys.started(start), time.time(), ex=RESULT_TTL_S)
    try:
        if (spec["model_id"], spec["preprocessing_digest"]) != (
            encoder.model_id,
            encoder.preprocessing_digest,
        ):
            raise BuildFailed(
                f"worker {worker_name} holds {encoder.model_id!r}, the build is for "
                f"{spec['model_id']!r}: build where the workers run the same model"
            )
        source = chunk_source(spec, data_dir=data_dir, max_pixels=max_pixels)
        embeddings, thumbnails = embed_chunk(
            encoder,
            source,
            0,
            len(source),
            batch_size=index_batch_size(spec.get("batch_size"), encoder.device),
            on_batch=lambda n: client.incrby(keys.progress, n),
        )
        payload = _pack(embeddings, thumbnails, precision=encoder.precision, worker=worker_name)
    except LookalikeError as error:
        payload = json.dumps({"error": f"{worker_name}: {error}"}).encode()
    except Exception as error:  # handed back too: the builder must not wait for it in vain
        log.exception("chunk %d of build %s failed", start, spec["build_id"])
        payload = json.dumps({"error": f"{worker_name}: {type(error).__name__}: {error}"}).encode()
    with client.pipeline(transaction=True) as pipe:
        pipe.set(keys.result(start), payload, ex=RESULT_TTL_S)
        pipe.rpush(keys.done, start)
        pipe.expire(keys.done, RESULT_TTL_S)
        pipe.execute()


def _pack(embeddings: np.ndarray, thumbnails: list[bytes], *, precision: str, worker: str) -> bytes:
    buffer = io.BytesIO()
    np.savez(
        buffer,
        embeddings=embeddings,
        offsets=np.cumsum([0, *(len(t) for t in thumbnails)]),
        thumbnails=np.frombuffer(b"".join(thumbnails), dtype=np.uint8),
        meta=np.frombuffer(
            json.dumps({"precision": precision, "worker": worker}).encode(), np.uint8
        ),
    )
    return buffer.getvalue()


def _unpack(payload: bytes) -> tuple[np.ndarray, list[bytes], dict[str, Any]]:
    if payload.startswith(b"{"):
        raise BuildFailed(str(json.loads(payload)["error"]))
    with np.load(io.BytesIO(payload)) as loaded:
        offsets = loaded["offsets"]
        blob = loaded["thumbnails"].tobytes()
        thumbnails = [blob[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
        meta = json.loads(loaded["meta"].tobytes())
        return loaded["embeddings"], thumbnails, meta


# --- the builder's side ----------------------------------------------------------------------


def _overdue(client: redis.Redis, keys: _Keys, chunk: _Chunk, *, limit: float) -> bool:
    """A chunk running past ``limit``, or waiting in the queue far longer than its turn."""
    started = client.get(keys.started(chunk.start))
    if started is not None:
        return time.time() - float(started) > limit
    # Not started: behind the chunks the workers hold (IN_FLIGHT_PER_WORKER each).
    return time.monotonic() - chunk.sent_at > limit * (IN_FLIGHT_PER_WORKER + 1)


def ready_workers(client: redis.Redis, prefix: str) -> list[dict[str, Any]]:
    store = JobStore(client, prefix=prefix, ttl_s=RESULT_TTL_S)  # the TTL is not used here
    workers = store.ready_workers(within_s=HEARTBEAT_WINDOW_S)
    return [w for w in workers if w.get("state") == "ready"]


class _Dispatch:
    """The builder's side of one distributed build: chunks out, results in."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        source: GallerySource,
        encoder: ClipImageEncoder,
        parts: BuildParts,
        *,
        batch_size: int | None,
        limit_s: float,
    ) -> None:
        self.client, self.source, self.encoder, self.parts = client, source, encoder, parts
        self.prefix = settings.storage.key_prefix
        self.build_id = uuid.uuid4().hex
        self.keys = _Keys(self.prefix, self.build_id)
        self.celery = make_celery(settings, name="lookalike-builder")
        self.queue = build_queue(settings)
        self.batch_size = batch_size
        self.limit_s = limit_s
        self.in_flight: dict[int, _Chunk] = {}
        self.precisions: set[str] = set()

    def send(self, chunk: _Chunk) -> None:
        self.client.delete(self.keys.started(chunk.start))
        task_id = uuid.uuid4().hex
        spec = chunk_spec(
            self.source,
            self.encoder,
            build_id=self.build_id,
            start=chunk.start,
            stop=chunk.stop,
            batch_size=self.batch_size,
        )
        self.celery.send_task(INDEX_CHUNK_TASK, args=[spec], task_id=task_id, queue=self.queue)
        chunk.sent_at, chunk.sends = time.monotonic(), chunk.sends + 1
        chunk.task_ids.append(task_id)
        self.in_flight[chunk.start] = chunk

    def collect(self, *, wait_s: float) -> None:
        """Save the next finished chunk, if one arrives within ``wait_s``."""
        popped = self.client.blpop([self.keys.done], timeout=wait_s)
        if popped is None:
            return
        start = int(popped[1])
        payload = self.client.get(self.keys.result(start))
        self.client.delete(self.keys.result(start))
        if start in self.in_flight and isinstance(payload, bytes):  # else: a late duplicate
            embeddings, thumbnails, meta = _unpack(payload)
            self.parts.save(start, embeddings, thumbnails)
            self.precisions.add(str(meta.get("precision")))
            del self.in_flight[start]

    def resend_overdue(self) -> None:
        """A chunk whose worker died with it (or that never arrived) is sent again."""
        for chunk in list(self.in_flight.values()):
            if not _overdue(self.client, self.keys, chunk, limit=self.limit_s):
                continue
            if chunk.sends >= MAX_SENDS:
                raise BuildFailed(
                    f"chunk {chunk.start}-{chunk.stop} was sent {chunk.sends} times "
                    "and never came back: are the workers alive?"
                )
            log.warning("chunk %d: no answer in %.0fs, sending it again", chunk.start, self.limit_s)
            self.send(chunk)

    def embedded(self) -> int:
        return int(self.client.get(self.keys.progress) or 0)

    def cleanup(self, chunks: list[_Chunk]) -> None:
        keys = self.keys
        self.client.delete(keys.progress, keys.done, *(keys.started(c.start) for c in chunks))


def build_index_distributed(
    settings: Settings,
    source: GallerySource,
    *,
    directory: Path,
    batch_size: int | None,
    progress: bool = True,
    chunk_timeout_s: float | None = None,
) -> Manifest:
    """Build ``source``'s index with the running workers; resumes like a local build."""
    started = time.perf_counter()
    client = sync_client(settings.broker.redis_url)
    prefix = settings.storage.key_prefix
    try:
        workers = ready_workers(client, prefix)
    except redis.RedisError as error:
        raise BuildFailed(f"Redis at LOOKALIKE_REDIS_URL is unreachable ({error})") from error
    if not workers:
        raise BuildFailed(
            "no worker is ready to take chunks: start workers ('lookalike worker'), "
            "or build here without --distributed"
        )
    encoder = load_encoder(settings.model, probe_images=source.images(0, 8))
    parts, missing = open_build(encoder, source, directory)
    limit_s = chunk_timeout_s or float(settings.broker.task_time_limit_s)
    dispatch = _Dispatch(
        settings, client, source, encoder, parts, batch_size=batch_size, limit_s=limit_s
    )
    chunks = [_Chunk(start, stop) for start, stop in missing]
    waiting = list(chunks)
    to_embed = sum(c.stop - c.start for c in chunks)
    bar = progress_bar(total=len(source), initial=len(source) - to_embed, enabled=progress)
    print(
        f"indexing {len(source)} images of {source.name} on {len(workers)} worker(s), "
        f"{len(missing)} chunk(s) to embed",
        flush=True,
    )
    shown = 0
    try:
        while waiting or dispatch.in_flight:
            capacity = IN_FLIGHT_PER_WORKER * max(1, len(ready_workers(client, prefix)))
            while waiting and len(dispatch.in_flight) < capacity:
                dispatch.send(waiting.pop(0))
            dispatch.collect(wait_s=1)
            dispatch.resend_overdue()
            done = min(dispatch.embedded(), to_embed)  # resent chunks count twice: capped
            bar.update(max(0, done - shown))
            shown = max(shown, done)
    finally:
        bar.close()
        dispatch.cleanup(chunks)
    if len(dispatch.precisions) == 1:
        encoder.precision = dispatch.precisions.pop()
    elif dispatch.precisions:
        encoder.precision = "mixed: " + ", ".join(sorted(dispatch.precisions))
    return finish_index(encoder, source, parts, directory=directory, started=started)
