"""worker.live: a live gallery's rows in memory, and every live gallery kept in step with
Redis (loaded, caught up to a job's version, followed in a thread, reloaded after a gap).

Items are written as the API and another worker write them (tests.shared.test_live's
Catalogue: jobs accepted by AsyncJobStore.submit, committed by LiveStore.commit).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import redis
import torch
from PIL import Image

from lookalike.redis_server import RedisServer
from shared.live import LiveStore
from tests.shared.test_live import DIM, FIELD, PREFIX, Catalogue, vector
from worker.live import LiveGalleries, LiveGallery

OTHER_FIELD = "emb:another-model"


def gallery(capacity: int = 1024) -> LiveGallery:
    return LiveGallery("shop", DIM, "cpu", torch.float32, capacity=capacity)


def stored(seed: int) -> npt.NDArray[np.float32]:
    """The row a worker holds for an embedding committed from ``vector(seed)`` (float16)."""
    return vector(seed).astype(np.float16).astype(np.float32)


class Embedder:
    """A stand-in for the model: a fixed vector per picture, and a note of every call."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    @staticmethod
    def of(image: Image.Image) -> npt.NDArray[np.float32]:
        seed = int.from_bytes(image.tobytes()[:4], "big")
        return vector(seed + 1000)

    def __call__(self, images: Sequence[Any]) -> npt.NDArray[np.float32]:
        self.calls.append(len(images))
        return np.stack([self.of(image) for image in images])


@pytest.fixture
def shop(redis_client: redis.Redis, redis_server: RedisServer) -> Catalogue:
    catalogue = Catalogue(redis_client, redis_server.url)
    assert catalogue.create() == 1
    return catalogue


def galleries_of(
    client: redis.Redis, *, field: str = FIELD, embed: Callable[..., Any] | None = None
) -> LiveGalleries:
    return LiveGalleries(
        store=LiveStore(client, prefix=PREFIX),
        embedding_field=field,
        dim=DIM,
        device="cpu",
        dtype=torch.float32,
        embed=embed or Embedder(),
        max_pixels=1_000_000,
    )


def rows_of(live: LiveGallery) -> dict[str, npt.NDArray[np.float32]]:
    """Each live item's row, by id, read through the search interface."""
    alive = live.candidates()
    assert alive is not None and alive.shape == (live.count,)
    return {live.item_id(int(r)): live.embedding_of(int(r)) for r in np.flatnonzero(alive)}


def assert_holds(live: LiveGallery, expected: dict[str, int]) -> None:
    """The gallery holds exactly these items, with the embeddings of these seeds."""
    rows = rows_of(live)
    assert sorted(rows) == sorted(expected) and len(live) == len(expected)
    for item_id, seed in expected.items():
        np.testing.assert_array_equal(rows[item_id], stored(seed))
        row = live.row_of(item_id)
        assert row is not None and live.item_id(row) == item_id


def wait_until(condition: Callable[[], bool], *, timeout: float = 5.0) -> float:
    """Seconds until ``condition`` held (AssertionError past ``timeout``)."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"not within {timeout}s")
        time.sleep(0.005)
    return time.monotonic() - began


@contextlib.contextmanager
def followed(live: LiveGalleries) -> Iterator[LiveGalleries]:
    """``live`` followed by a thread (LiveGalleries.follow) until the block ends."""
    stop = threading.Event()
    thread = threading.Thread(target=live.follow, args=(stop,), daemon=True)
    thread.start()
    try:
        yield live
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()


@pytest.fixture
def following(redis_client: redis.Redis) -> Iterator[LiveGalleries]:
    """Live galleries loaded at start and followed by a thread, stopped after the test."""
    live = galleries_of(redis_client)
    live.load_all()
    with followed(live):
        yield live


# --- one gallery's rows -----------------------------------------------------------------------


def test_upsert_adds_rows_and_replaces_in_place() -> None:
    live = gallery()
    live.upsert("a", vector(1), {"category": "shoes", "price": 80})
    live.upsert("b", vector(2), {"category": "bags"})

    live.upsert("a", vector(3), {"category": "hats"})

    assert live.count == 2 and len(live) == 2 and live.matrix.shape == (2, DIM)
    assert live.row_of("a") == 0 and live.row_of("b") == 1 and live.row_of("c") is None
    np.testing.assert_allclose(live.matrix[0].numpy(), vector(3))
    assert live.filter_mask({"category": "hats"}, 2).tolist() == [True, False]
    assert live.filter_mask({"category": "shoes"}, 2).tolist() == [False, False]
    assert live.filter_mask({"price": {"gt": 0}}, 2).tolist() == [False, False]
    match = live.match(0, rank=1, score=0.5)
    assert (match.item_id, match.attributes, match.image_url) == (
        "a",
        {"category": "hats"},
        "/galleries/shop/items/a/image.png",
    )
    assert match.index is None and match.label is None


def test_remove_masks_the_row_and_an_add_again_takes_a_new_one() -> None:
    live = gallery()
    for n, item_id in enumerate("abc"):
        live.upsert(item_id, vector(n), {"n": n})

    live.remove("b")
    live.remove("b")  # twice: nothing more
    live.remove("never")

    assert live.count == 3 and len(live) == 2 and live.matrix.shape == (3, DIM)
    assert live.candidates().tolist() == [True, False, True]  # type: ignore[union-attr]
    assert live.row_of("b") is None and live.item_id(1) == ""
    assert live.filter_mask({"n": 1}, 3).tolist() == [False, False, False]
    live.upsert("b", vector(9), {"n": 9})  # again: a new row
    assert live.row_of("b") == 3 and live.count == 4
    assert live.filter_mask({"n": {"gte": 0}}, 4).tolist() == [True, False, True, True]


def test_rows_grow_past_the_capacity() -> None:
    live = gallery(capacity=4)
    for n in range(10):
        live.upsert(f"i{n}", vector(n), {"n": n, "even": n % 2 == 0})

    assert live.capacity == 16 and live.matrix.shape == (10, DIM)
    for n in range(10):
        np.testing.assert_allclose(live.embedding_of(live.row_of(f"i{n}") or 0), vector(n))
    assert live.filter_mask({"even": True, "n": {"gte": 4}}, 10).tolist() == [
        n % 2 == 0 and n >= 4 for n in range(10)
    ]


def test_compaction_keeps_ids_attributes_and_filters_right() -> None:
    live = gallery()
    total = 1200
    for n in range(total):
        live.upsert(f"i{n}", vector(n), {"n": n, "tag": f"t{n % 3}"})
    kept = [n for n in range(total) if n % 4 == 0]
    for n in range(total):
        if n % 4:
            live.remove(f"i{n}")

    assert live.count < total  # compacted on the way
    assert len(live) == len(kept) and live.matrix.shape[0] == live.count
    alive = live.candidates()
    assert alive is not None
    for n in kept:
        row = live.row_of(f"i{n}")
        assert row is not None and alive[row] and live.item_id(row) == f"i{n}"
        assert live.attributes[row] == {"n": n, "tag": f"t{n % 3}"}
        np.testing.assert_allclose(live.embedding_of(row), vector(n))
    mask = live.filter_mask({"tag": "t0", "n": {"lt": 600}}, live.count) & alive
    assert sorted(live.item_id(int(r)) for r in np.flatnonzero(mask)) == sorted(
        f"i{n}" for n in kept if n % 3 == 0 and n < 600
    )
    assert live.filter_mask({"n": 1}, live.count).sum() == 0  # removed before compaction


# --- loading and catching up ------------------------------------------------------------------


def test_load_all_reads_every_gallery_as_it_is(
    shop: Catalogue, redis_client: redis.Redis, redis_server: RedisServer
) -> None:
    shop.add("a", seed=1, attributes={"c": "x"})
    shop.add("b", seed=2)
    shop.add("c", seed=3)
    shop.delete("b")
    shop.add("a", seed=4, attributes={"c": "y"})
    hats = Catalogue(redis_client, redis_server.url, name="hats")
    assert hats.create() == 1
    hats.add("h", seed=5)
    Catalogue(redis_client, redis_server.url, name="empty").create()

    live = galleries_of(redis_client)
    live.load_all()

    assert sorted(live.galleries) == ["empty", "hats", "shop"]
    assert_holds(live.galleries["shop"], {"a": 4, "c": 3})
    assert live.galleries["shop"].version == 5
    row = live.galleries["shop"].row_of("a")
    assert row is not None and live.galleries["shop"].attributes[row] == {"c": "y"}
    assert_holds(live.galleries["hats"], {"h": 5})
    assert len(live.galleries["empty"]) == 0 and live.galleries["empty"].version == 0
    assert live.get("unknown") is None


def test_catch_up_applies_the_log_to_the_version_asked(
    shop: Catalogue, redis_client: redis.Redis
) -> None:
    shop.add("a", seed=1)
    live = galleries_of(redis_client)
    live.load_all()
    loaded = live.galleries["shop"]
    shop.add("b", seed=2, attributes={"k": 1})
    shop.delete("a")
    shop.add("c", seed=3)
    assert_holds(loaded, {"a": 1})  # nobody follows here

    now = live.catch_up(loaded, shop.store.version("shop"))

    assert now is loaded and now.version == 4
    assert_holds(now, {"b": 2, "c": 3})
    shop.add("d", seed=4)
    assert live.catch_up(now, 0) is now and now.version == 5  # 0: all there is
    assert_holds(now, {"b": 2, "c": 3, "d": 4})


def test_an_add_then_a_delete_in_one_read_of_the_log(
    shop: Catalogue, redis_client: redis.Redis
) -> None:
    live = galleries_of(redis_client)
    live.load_all()
    shop.add("a", seed=1)
    shop.add("b", seed=2)
    shop.delete("a")
    shop.add("a", seed=3)
    shop.delete("b")

    entries = shop.store.changes_after("shop", live.galleries["shop"].after)
    assert len(entries) == 5
    assert live.apply(live.galleries["shop"], entries)
    assert live.apply(live.galleries["shop"], entries)  # again: already applied

    assert_holds(live.galleries["shop"], {"a": 3})
    assert live.galleries["shop"].version == 5


@pytest.mark.parametrize("keep", [0, 1], ids=["log-emptied", "log-trimmed"])
def test_a_gap_in_the_log_reloads_the_gallery(
    shop: Catalogue, redis_client: redis.Redis, keep: int
) -> None:
    shop.add("a", seed=1)
    shop.add("b", seed=2)
    live = galleries_of(redis_client)
    live.load_all()
    old = live.galleries["shop"]
    shop.delete("a")
    shop.add("c", seed=3)
    shop.add("d", seed=4)
    redis_client.xtrim(shop.keys.changes("shop"), maxlen=keep, approximate=False)

    now = live.catch_up(old, shop.store.version("shop"))

    assert now is not old and live.galleries["shop"] is now
    assert_holds(now, {"b": 2, "c": 3, "d": 4})
    assert now.version == 5
    shop.add("e", seed=5)  # and it goes on from there
    assert live.catch_up(now, 6) is now
    assert_holds(now, {"b": 2, "c": 3, "d": 4, "e": 5})


def test_items_without_this_models_embedding_are_embedded_and_saved(
    shop: Catalogue, redis_client: redis.Redis
) -> None:
    shop.add("a", seed=1)
    shop.add("b", seed=2)
    embedder = Embedder()
    live = galleries_of(redis_client, field=OTHER_FIELD, embed=embedder)

    live.load_all()

    assert embedder.calls == [2]  # one batch for both
    loaded = live.galleries["shop"]
    for item_id in ("a", "b"):
        saved = shop.item_hash(item_id)[OTHER_FIELD.encode()]
        image = Image.frombytes("RGB", (8, 8), shop.item_hash(item_id)[b"image"][9:])
        expected = Embedder.of(image).astype(np.float16)
        assert saved == expected.tobytes()
        row = loaded.row_of(item_id)
        assert row is not None
        np.testing.assert_array_equal(loaded.embedding_of(row), expected.astype(np.float32))
    assert shop.item_hash("a")[FIELD.encode()] == vector(1).astype(np.float16).tobytes()

    shop.add("c", seed=3)  # added by the other model's worker: embedded here on catch-up
    live.catch_up(loaded, 0)
    assert embedder.calls == [2, 1] and OTHER_FIELD.encode() in shop.item_hash("c")
    again = galleries_of(redis_client, field=OTHER_FIELD, embed=embedder)
    again.load_all()
    assert embedder.calls == [2, 1]  # saved: never embedded twice
    assert len(again.galleries["shop"]) == 3


def test_an_item_whose_image_cannot_be_read_is_left_out(
    shop: Catalogue, redis_client: redis.Redis
) -> None:
    shop.add("a", seed=1)
    shop.add("b", seed=2)
    redis_client.hset(shop.keys.item("shop", "b"), "image", b"not an image")
    embedder = Embedder()
    live = galleries_of(redis_client, field=OTHER_FIELD, embed=embedder)

    live.load_all()

    assert embedder.calls == [1]
    assert sorted(rows_of(live.galleries["shop"])) == ["a"]


# --- following --------------------------------------------------------------------------------


def test_the_follower_applies_adds_and_deletes_within_two_seconds(
    shop: Catalogue, following: LiveGalleries
) -> None:
    loaded = following.galleries["shop"]
    time.sleep(0.1)  # the follower is waiting on the logs

    shop.add("sku-1", seed=1, attributes={"c": "x"})
    committed = time.monotonic()
    wait_until(lambda: following.galleries["shop"].row_of("sku-1") is not None)
    seen_add = time.monotonic() - committed
    shop.delete("sku-1")
    deleted = time.monotonic()
    wait_until(lambda: following.galleries["shop"].row_of("sku-1") is None)
    seen_delete = time.monotonic() - deleted

    assert seen_add < 2.0 and seen_delete < 2.0, (seen_add, seen_delete)
    print(f"\nfollower: add applied {seen_add * 1000:.1f} ms, delete {seen_delete * 1000:.1f} ms")
    assert following.galleries["shop"] is loaded
    assert loaded.version == 2 and len(loaded) == 0


def test_the_follower_picks_up_a_gallery_created_after_start(
    redis_client: redis.Redis, redis_server: RedisServer, following: LiveGalleries
) -> None:
    assert following.galleries == {}
    time.sleep(0.1)
    later = Catalogue(redis_client, redis_server.url, name="later")

    assert later.create() == 1
    wait_until(lambda: "later" in following.galleries, timeout=2.0)
    later.add("x", seed=7)
    wait_until(lambda: following.galleries["later"].row_of("x") is not None, timeout=2.0)

    assert_holds(following.galleries["later"], {"x": 7})


def test_the_follower_reloads_after_a_gap(shop: Catalogue, redis_client: redis.Redis) -> None:
    shop.add("a", seed=1)
    live = galleries_of(redis_client)
    live.load_all()
    old = live.galleries["shop"]
    shop.delete("a")
    shop.add("b", seed=2)
    shop.add("c", seed=3)
    redis_client.xtrim(shop.keys.changes("shop"), maxlen=1, approximate=False)  # v4 only

    with followed(live):
        wait_until(lambda: live.galleries["shop"].version == 4, timeout=2.0)

    assert live.galleries["shop"] is not old
    assert_holds(live.galleries["shop"], {"b": 2, "c": 3})


def test_get_loads_a_gallery_created_since_start(
    redis_client: redis.Redis, redis_server: RedisServer
) -> None:
    live = galleries_of(redis_client)
    live.load_all()
    late = Catalogue(redis_client, redis_server.url, name="late")
    late.create()
    late.add("x", seed=1)

    found = live.get("late")

    assert found is not None and live.galleries["late"] is found
    assert_holds(found, {"x": 1})
    assert live.get("late") is found
