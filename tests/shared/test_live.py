"""shared.live against a real Redis: creating live galleries, committing adds once (with their
jobs), deletes and tombstones, the sha256 index, embeddings of other models, listings.

Jobs are accepted the way the API accepts them (shared.jobs.AsyncJobStore.submit) and
committed the way a worker commits them (LiveStore.commit with JobStore.finish_keys).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pytest
import redis
import redis.asyncio as aioredis
from PIL import Image

from lookalike.redis_server import RedisServer
from shared.images import encode_pixels
from shared.jobs import AsyncJobStore, JobRecord, JobStore, NewJob, new_job_id, parse_record
from shared.live import AsyncLiveStore, LiveStore, StoredItem
from shared.schemas import GalleryInfo, JobKind, JobResult, JobStatus, Timings
from shared.watchers import pushed_fields

PREFIX = "lookalike-test"
DIM = 8
FIELD = "emb:test-model"
QUEUE = "test-queue"
T = TypeVar("T")


def vector(seed: int, dim: int = DIM) -> npt.NDArray[np.float32]:
    """A unit vector, the same for the same seed."""
    values = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return values / np.linalg.norm(values)


def pixels(seed: int) -> bytes:
    """A small picture as the pixels a job keeps (shared.images.encode_pixels)."""
    rng = np.random.default_rng(seed)
    return encode_pixels(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))


def sha_of(seed: int) -> str:
    return hashlib.sha256(f"upload {seed}".encode()).hexdigest()


def add_result(gallery: str) -> str:
    """An add's result as a worker writes it (its ``item`` is filled in by the commit)."""
    return JobResult(
        model="tiny",
        model_is_random=False,
        gallery=GalleryInfo(name=gallery, size=0),
        device="cpu (fp32)",
        worker="worker-test",
        timings=Timings(queue_wait_ms=1, decode_ms=1, embed_ms=1, search_ms=1, total_ms=4),
    ).model_dump_json()


class Catalogue:
    """One live gallery, changed like the API (async stores) and a worker (sync ones) do."""

    def __init__(self, client: redis.Redis, url: str, name: str = "shop") -> None:
        self.client, self.url, self.name = client, url, name
        self.store = LiveStore(client, prefix=PREFIX)
        self.jobs = JobStore(client, prefix=PREFIX, ttl_s=600)
        self.keys = self.store.keys

    def api(self, call: Callable[[AsyncLiveStore, AsyncJobStore], Awaitable[T]]) -> T:
        """Run ``call`` with the API's stores on a client of its own event loop."""

        async def run() -> T:
            client = aioredis.Redis.from_url(self.url)
            try:
                live = AsyncLiveStore(client, prefix=PREFIX)
                return await call(live, AsyncJobStore(client, prefix=PREFIX, ttl_s=600))
            finally:
                await client.aclose()

        return asyncio.run(run())

    def create(self, *, owner: str | None = None, name: str | None = None) -> int:
        return self.api(lambda live, _: live.create(name or self.name, owner=owner, model="m"))

    def submit_add(
        self, item_id: str, *, seed: int = 0, attributes: dict[str, Any] | None = None
    ) -> JobRecord:
        """Accept an add as the API does: a job that notes itself as the item's pending add."""
        job = NewJob(
            new_job_id(),
            k=1,
            gallery=self.name,
            upload=pixels(seed),
            kind=JobKind.ADD,
            options={"item_id": item_id, "attributes": attributes or {}, "sha256": sha_of(seed)},
        )

        async def submit(_: AsyncLiveStore, jobs: AsyncJobStore) -> list[JobRecord] | None:
            return await jobs.submit(
                [job], queue=QUEUE, messages=[b"task"], waiting=[QUEUE], max_waiting=1000
            )

        records = self.api(submit)
        assert records is not None
        stored = self.jobs.get(job.job_id)
        assert stored is not None
        return stored

    def commit(self, job: JobRecord, *, seed: int | None = None) -> int:
        """Commit the add as a worker does, with the embedding of its seed."""
        seed = seed if seed is not None else _seed_of(job)
        return self.store.commit(
            gallery=self.name,
            item_id=job.item_id or "",
            job_id=job.id,
            accepted=job.gallery_version,
            add_seq=job.add_seq,
            embedding_field=FIELD,
            embedding=vector(seed).astype(np.float16).tobytes(),
            attributes=json.dumps(job.attributes or {}),
            sha256=job.sha256 or "",
            image=pixels(seed),
            result=add_result(self.name),
            job_keys=self.jobs.finish_keys(job.id),
        )

    def add(
        self, item_id: str, *, seed: int = 0, attributes: dict[str, Any] | None = None
    ) -> JobRecord:
        """Accept and commit an add; the job as it ended."""
        job = self.submit_add(item_id, seed=seed, attributes=attributes)
        assert self.commit(job, seed=seed) == 1
        ended = self.jobs.get(job.id)
        assert ended is not None
        return ended

    def delete(self, item_id: str) -> int:
        return self.api(lambda live, _: live.delete(self.name, item_id))

    def log(self) -> list[dict[str, str]]:
        return [change for _, change in self.store.changes_after(self.name, "0-0")]

    def item_hash(self, item_id: str) -> dict[bytes, bytes]:
        return self.client.hgetall(self.keys.item(self.name, item_id))  # type: ignore[return-value]


def _seed_of(job: JobRecord) -> int:
    for seed in range(1000):
        if sha_of(seed) == job.sha256:
            return seed
    raise AssertionError("no seed made this job's sha256")


@pytest.fixture
def shop(redis_client: redis.Redis, redis_server: RedisServer) -> Catalogue:
    catalogue = Catalogue(redis_client, redis_server.url)
    assert catalogue.create() == 1
    return catalogue


# --- creating -------------------------------------------------------------------------------


def test_create_makes_an_empty_gallery_once(
    redis_client: redis.Redis, redis_server: RedisServer
) -> None:
    shop = Catalogue(redis_client, redis_server.url)

    assert shop.create(owner="alice") == 1
    assert shop.create(owner="alice") == 0
    assert shop.create(owner="bob") == -1
    assert shop.create(owner=None) == -1

    meta = shop.store.meta("shop")
    assert meta["name"] == "shop" and meta["owner"] == "alice" and meta["model"] == "m"
    assert meta["version"] == "0" and meta["created_at"] == meta["updated_at"]
    assert shop.store.names() == ["shop"] and shop.store.version("shop") == 0
    created: Any = redis_client.xrange(shop.keys.log)
    assert [fields for _, fields in created] == [{b"op": b"create", b"name": b"shop"}]
    assert shop.store.last_change_id("shop") == "0-0" and shop.log() == []


def test_a_gallery_without_an_owner_is_not_another_keys(
    redis_client: redis.Redis, redis_server: RedisServer
) -> None:
    shop = Catalogue(redis_client, redis_server.url)
    assert shop.create(owner=None) == 1
    assert shop.create(owner=None) == 0
    assert shop.create(owner="alice") == -1
    assert shop.api(lambda live, _: live.meta("shop"))["owner"] == ""  # type: ignore[index]
    assert shop.api(lambda live, _: live.meta("nothing")) is None
    assert shop.api(lambda live, _: live.names()) == ["shop"]


def test_a_gallery_named_log_does_not_break_creating_galleries(
    redis_client: redis.Redis, redis_server: RedisServer
) -> None:
    shop = Catalogue(redis_client, redis_server.url)

    def create(name: str) -> int | str:
        try:
            return shop.create(name=name)
        except redis.ResponseError as error:  # today: WRONGTYPE, half-way through the script
            return str(error).split()[0]

    assert (create("log"), create("shop")) == (1, 1)
    assert redis_client.type(shop.keys.log) == b"stream"


# --- committing adds ------------------------------------------------------------------------


def test_a_commit_indexes_the_item_and_ends_its_job(shop: Catalogue) -> None:
    job = shop.submit_add("sku-1", seed=1, attributes={"category": "shoes", "price": 80})
    assert job.gallery_version == 0 and job.status == JobStatus.QUEUED
    assert shop.client.hget(shop.keys.pending("shop"), "sku-1") == job.id.encode()
    before = shop.store.meta("shop")["updated_at"]
    events = shop.client.pubsub()  # type: ignore[no-untyped-call]
    events.subscribe(shop.jobs.keys.channel("api"))
    assert events.get_message(timeout=2.0) is not None  # subscribed
    shop.client.hset(shop.jobs.keys.watchers(job.id), shop.jobs.keys.channel("api"), "end")
    time.sleep(0.002)  # updated_at moves on

    assert shop.commit(job) == 1

    stored = {k.decode(): v for k, v in shop.item_hash("sku-1").items()}
    assert json.loads(stored["attributes"]) == {"category": "shoes", "price": 80}
    assert stored["sha256"] == sha_of(1).encode() and stored["image"] == pixels(1)
    assert stored["accepted"] == b"0" and stored["added_at"]
    assert stored[FIELD] == vector(1).astype(np.float16).tobytes()
    assert shop.client.zscore(shop.keys.items("shop"), "sku-1") == 1.0
    assert shop.store.version("shop") == 1
    assert shop.store.meta("shop")["updated_at"] > before
    assert shop.log() == [{"v": "1", "op": "add", "id": "sku-1"}]
    assert shop.client.hget(shop.keys.sha("shop"), sha_of(1)) == b"sku-1"

    ended = shop.jobs.get(job.id)
    assert ended is not None and ended.status == JobStatus.SUCCEEDED and ended.finished_at
    assert ended.computed == 1
    assert ended.result is not None and ended.result.matches == []
    assert ended.result.item is not None
    assert ended.result.item.model_dump() == {
        "id": "sku-1",
        "gallery": "shop",
        "state": "indexed",
        "version": 1,
        "duplicate_of": None,
    }
    raw = json.loads(shop.client.hget(shop.jobs.keys.job(job.id), "result"))  # type: ignore[arg-type]
    assert raw["matches"] == []  # still a list (cjson would have made it an object)
    fields: Any = shop.client.hkeys(shop.jobs.keys.job(job.id))
    assert b"stage" not in fields
    assert shop.jobs.upload(job.id) is None
    assert shop.client.zscore(shop.jobs.keys.pending, job.id) is None
    assert shop.client.hget(shop.keys.pending("shop"), "sku-1") is None
    message = events.get_message(timeout=2.0)  # the ended job, pushed to its watcher
    assert message is not None and parse_record(pushed_fields(message["data"])) == ended
    events.close()


def test_a_redelivered_commit_changes_nothing(shop: Catalogue) -> None:
    job = shop.submit_add("sku-1", seed=1)
    assert shop.commit(job) == 1
    item, ended = shop.item_hash("sku-1"), shop.jobs.get(job.id)

    assert shop.commit(job) == 0
    assert shop.commit(job, seed=2) == 0

    assert shop.item_hash("sku-1") == item
    assert shop.store.version("shop") == 1
    assert shop.log() == [{"v": "1", "op": "add", "id": "sku-1"}]
    again = shop.jobs.get(job.id)
    assert again is not None and ended is not None
    assert again.computed == 3 and again.result == ended.result


def test_a_commit_of_a_job_that_is_gone_changes_nothing(shop: Catalogue) -> None:
    job = shop.submit_add("sku-1", seed=1)
    shop.client.delete(shop.jobs.keys.job(job.id))

    assert shop.commit(job) == -2

    assert shop.item_hash("sku-1") == {} and shop.store.version("shop") == 0
    assert shop.log() == []


def test_an_add_deleted_after_it_was_accepted_is_dropped(shop: Catalogue) -> None:
    job = shop.submit_add("sku-1", seed=1)
    assert shop.delete("sku-1") == 1  # known as a pending add
    assert shop.client.hget(shop.keys.pending("shop"), "sku-1") is None

    assert shop.commit(job) == 2

    assert shop.item_hash("sku-1") == {}
    assert shop.store.item_ids("shop") == [] and shop.store.version("shop") == 1
    assert shop.log() == [{"v": "1", "op": "del", "id": "sku-1"}]
    assert shop.client.hget(shop.keys.sha("shop"), sha_of(1)) is None
    ended = shop.jobs.get(job.id)
    assert ended is not None and ended.status == JobStatus.SUCCEEDED
    assert ended.result is not None and ended.result.item is not None
    assert (ended.result.item.state, ended.result.item.version) == ("deleted", None)
    assert shop.jobs.upload(job.id) is None


def test_an_add_accepted_after_a_delete_is_committed(shop: Catalogue) -> None:
    shop.add("sku-1", seed=1)
    assert shop.delete("sku-1") == 2
    assert shop.client.hget(shop.keys.gone("shop"), "sku-1") == b"2"

    job = shop.add("sku-1", seed=2)

    assert job.result is not None and job.result.item is not None
    assert (job.result.item.state, job.result.item.version) == ("indexed", 3)
    assert shop.client.hget(shop.keys.gone("shop"), "sku-1") is None  # tombstone lifted
    assert shop.store.item_ids("shop") == ["sku-1"]


def test_an_older_add_committed_after_a_newer_one_is_superseded(shop: Catalogue) -> None:
    older = shop.submit_add("sku-1", seed=1, attributes={"v": "old"})
    shop.add("other", seed=3)  # the gallery moves on to version 1
    newer = shop.submit_add("sku-1", seed=2, attributes={"v": "new"})
    assert (older.gallery_version, newer.gallery_version) == (0, 1)
    assert shop.commit(newer) == 1

    assert shop.commit(older) == 3

    assert json.loads(shop.item_hash("sku-1")[b"attributes"]) == {"v": "new"}
    assert shop.client.zscore(shop.keys.items("shop"), "sku-1") == 2.0
    assert shop.store.version("shop") == 2 and len(shop.log()) == 2
    ended = shop.jobs.get(older.id)
    assert ended is not None and ended.result is not None and ended.result.item is not None
    assert (ended.result.item.state, ended.result.item.version) == ("superseded", None)


def test_an_add_committed_before_a_later_add_of_the_item_leaves_that_one_pending(
    shop: Catalogue,
) -> None:
    first = shop.submit_add("sku-1", seed=1)
    second = shop.submit_add("sku-1", seed=2)
    assert shop.client.hget(shop.keys.pending("shop"), "sku-1") == second.id.encode()

    assert shop.commit(first) == 1
    assert shop.client.hget(shop.keys.pending("shop"), "sku-1") == second.id.encode()
    assert shop.commit(second) == 1
    assert shop.client.hget(shop.keys.pending("shop"), "sku-1") is None
    assert shop.item_hash("sku-1")[b"sha256"] == sha_of(2).encode()


def test_an_older_add_accepted_at_the_same_version_never_overwrites_a_newer_one(
    shop: Catalogue,
) -> None:
    older = shop.submit_add("sku-1", seed=1, attributes={"v": "old"})
    newer = shop.submit_add("sku-1", seed=2, attributes={"v": "new"})
    assert shop.commit(newer) == 1

    assert shop.commit(older) == 3
    assert json.loads(shop.item_hash("sku-1")[b"attributes"]) == {"v": "new"}


# --- the sha256 index -----------------------------------------------------------------------


def test_an_add_with_the_bytes_of_another_item_names_it(shop: Catalogue) -> None:
    shop.add("original", seed=1)

    copy = shop.add("copy", seed=1)

    assert copy.result is not None and copy.result.item is not None
    assert copy.result.item.duplicate_of == "original"
    assert shop.client.hget(shop.keys.sha("shop"), sha_of(1)) == b"original"
    again = shop.add("original", seed=1)  # the same bytes again under its own id
    assert again.result is not None and again.result.item is not None
    assert again.result.item.duplicate_of is None


def test_the_sha_index_forgets_a_deleted_item(shop: Catalogue) -> None:
    shop.add("original", seed=1)
    assert shop.delete("original") == 2
    assert shop.client.hget(shop.keys.sha("shop"), sha_of(1)) is None

    later = shop.add("later", seed=1)
    assert later.result is not None and later.result.item is not None
    assert later.result.item.duplicate_of is None
    assert shop.client.hget(shop.keys.sha("shop"), sha_of(1)) == b"later"


def test_the_sha_index_follows_a_replaced_image(shop: Catalogue) -> None:
    shop.add("sku-1", seed=1)

    shop.add("sku-1", seed=2)

    assert shop.client.hget(shop.keys.sha("shop"), sha_of(1)) is None
    assert shop.client.hget(shop.keys.sha("shop"), sha_of(2)) == b"sku-1"
    other = shop.add("sku-2", seed=1)  # the old bytes are free again
    assert other.result is not None and other.result.item is not None
    assert other.result.item.duplicate_of is None


def test_deleting_a_duplicate_keeps_the_original_in_the_index(shop: Catalogue) -> None:
    shop.add("original", seed=1)
    shop.add("copy", seed=1)

    shop.delete("copy")

    assert shop.client.hget(shop.keys.sha("shop"), sha_of(1)) == b"original"


# --- deleting -------------------------------------------------------------------------------


def test_delete_removes_the_item_and_leaves_a_tombstone(shop: Catalogue) -> None:
    shop.add("sku-1", seed=1)
    shop.add("sku-2", seed=2)

    assert shop.delete("sku-1") == 3

    assert shop.item_hash("sku-1") == {}
    assert shop.store.item_ids("shop") == ["sku-2"]
    assert shop.client.hget(shop.keys.gone("shop"), "sku-1") == b"3"
    assert shop.log()[-1] == {"v": "3", "op": "del", "id": "sku-1"}
    assert shop.store.version("shop") == 3


def test_delete_of_an_unknown_item_is_0_and_changes_nothing(shop: Catalogue) -> None:
    shop.add("sku-1", seed=1)
    meta = shop.store.meta("shop")

    assert shop.delete("nothing") == 0
    assert shop.delete("sku-1") == 2
    assert shop.delete("sku-1") == 0  # already deleted

    assert shop.store.version("shop") == 2 and len(shop.log()) == 2
    assert shop.client.hget(shop.keys.gone("shop"), "nothing") is None
    assert shop.store.meta("shop")["created_at"] == meta["created_at"]


# --- embeddings of another model --------------------------------------------------------------


def test_save_embedding_keeps_it_only_with_the_same_item(shop: Catalogue) -> None:
    shop.add("sku-1", seed=1)
    other = vector(9).astype(np.float16).tobytes()

    shop.store.save_embedding("shop", "sku-1", sha_of(2), "emb:other", other)  # replaced since
    assert b"emb:other" not in shop.item_hash("sku-1")
    shop.store.save_embedding("shop", "gone", sha_of(1), "emb:other", other)  # no such item
    assert shop.item_hash("gone") == {}

    shop.store.save_embedding("shop", "sku-1", sha_of(1), "emb:other", other)
    assert shop.item_hash("sku-1")[b"emb:other"] == other
    shop.store.save_embedding("shop", "sku-1", sha_of(1), "emb:other", b"later")
    assert shop.item_hash("sku-1")[b"emb:other"] == other  # the first one stays


def test_a_replaced_image_drops_the_embeddings_of_the_old_one(shop: Catalogue) -> None:
    shop.add("sku-1", seed=1)
    shop.store.save_embedding("shop", "sku-1", sha_of(1), "emb:other", b"x" * 16)

    shop.add("sku-1", seed=2)

    assert b"emb:other" not in shop.item_hash("sku-1")


# --- reading, for workers -------------------------------------------------------------------


def test_the_worker_reads_items_and_changes(shop: Catalogue) -> None:
    shop.add("a", seed=1, attributes={"n": 1})
    shop.add("b", seed=2)
    shop.delete("a")

    assert shop.store.item_ids("shop") == ["b"]
    found = shop.store.items("shop", ["a", "b"], ["attributes", "sha256", "image"])
    assert found[0] == {}
    assert found[1] == {"attributes": "{}", "sha256": sha_of(2), "image": pixels(2)}
    changes = shop.store.changes_after("shop", "0-0")
    assert [c for _, c in changes] == [
        {"v": "1", "op": "add", "id": "a"},
        {"v": "2", "op": "add", "id": "b"},
        {"v": "3", "op": "del", "id": "a"},
    ]
    assert shop.store.last_change_id("shop") == changes[-1][0]
    assert [c for _, c in shop.store.changes_after("shop", changes[0][0], count=1)] == [
        {"v": "2", "op": "add", "id": "b"}
    ]
    assert shop.store.changes_after("shop", changes[-1][0]) == []


# --- reading, for the API -------------------------------------------------------------------


def test_item_is_pending_then_indexed(shop: Catalogue) -> None:
    def read(item_id: str) -> tuple[StoredItem | None, str | None]:
        return shop.api(lambda live, _: live.item("shop", item_id))

    assert read("sku-1") == (None, None)
    job = shop.submit_add("sku-1", seed=1, attributes={"a": True})
    assert read("sku-1") == (None, job.id)

    shop.commit(job)
    stored, pending = read("sku-1")
    assert pending is None and stored is not None
    assert (stored.id, stored.attributes, stored.sha256, stored.version) == (
        "sku-1",
        {"a": True},
        sha_of(1),
        1,
    )
    assert stored.added_at

    replacing = shop.submit_add("sku-1", seed=2)
    stored, pending = read("sku-1")
    assert stored is not None and stored.sha256 == sha_of(1) and pending == replacing.id
    assert shop.api(lambda live, _: live.image("shop", "sku-1")) == pixels(1)
    assert shop.api(lambda live, _: live.image("shop", "nothing")) is None


def test_counts_are_the_items_of_each_gallery(shop: Catalogue) -> None:
    assert shop.create(name="empty") == 1
    shop.add("a", seed=1)
    shop.add("b", seed=2)
    shop.submit_add("c", seed=3)  # pending: not counted

    counts = shop.api(lambda live, _: live.counts(["shop", "empty", "unknown"]))

    assert counts == {"shop": 2, "empty": 0, "unknown": 0}


def test_pages_hold_while_items_come_and_go(shop: Catalogue) -> None:
    for n in range(5):
        shop.add(f"i{n}", seed=n)  # versions 1..5

    def page(after: int, limit: int = 2) -> tuple[list[str], int, int | None]:
        items, total, following = shop.api(
            lambda live, _: live.page("shop", after=after, limit=limit)
        )
        return [i.id for i in items], total, following

    assert page(0) == (["i0", "i1"], 5, 2)
    shop.delete("i2")  # version 6
    shop.delete("i0")  # version 7: on the page already read
    shop.add("i1", seed=11)  # version 8: read, and added again
    shop.add("i5", seed=15)  # version 9

    assert page(2) == (["i3", "i4"], 4, 5)
    assert page(5) == (["i1", "i5"], 4, 9)
    assert page(9) == ([], 4, None)
    assert page(0, limit=10) == (["i3", "i4", "i1", "i5"], 4, None)
    first, *_ = shop.api(lambda live, _: live.page("shop", after=0, limit=1))[0]
    assert first.version == 4 and first.sha256 == sha_of(3)


def test_an_empty_gallery_has_one_empty_page(shop: Catalogue) -> None:
    assert shop.api(lambda live, _: live.page("shop", after=0, limit=50)) == ([], 0, None)
    assert shop.api(lambda live, _: live.page("unknown", after=0, limit=50)) == ([], 0, None)
