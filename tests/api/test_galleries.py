"""Live galleries through the in-process API (real Redis, no worker): creating one, refusing
malformed names, items and search options with the sentences of shared.items, pending adds,
empty pages, and API keys owning their galleries."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from api.galleries import BAD_CURSOR, BAD_NAME, NO_ADD_FILE, NO_GALLERY, NO_ITEM
from api.submit import NO_SUCH_ITEM, UNKNOWN_GALLERY
from api.uploads import ONCE
from shared.items import (
    BAD_ATTRIBUTES,
    BAD_EXCLUDE,
    BAD_FILTER,
    BAD_ITEM,
    BAD_ITEM_ID,
    BAD_MIN_SCORE,
)

MakeClient = Callable[..., TestClient]
KEY_A = "key-aaaaaaaaaaaaaaaa"
KEY_B = "key-bbbbbbbbbbbbbbbb"
HUGE = 10**400  # a JSON integer no float holds


def png(shade: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (shade, 255 - shade, 60)).save(buffer, format="PNG")
    return buffer.getvalue()


def image(shade: int = 128) -> dict[str, tuple[str, bytes, str]]:
    return {"file": ("item.png", png(shade), "image/png")}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def refusal(reply: Any) -> tuple[int, Any]:
    return reply.status_code, reply.json()


@pytest.fixture
def client(redis_client: redis.Redis, make_client: MakeClient) -> TestClient:
    return make_client()


@pytest.fixture
def shop(client: TestClient) -> str:
    created = client.put("/galleries/shop")
    assert created.status_code == 201, created.text
    return "shop"


# --- creating -------------------------------------------------------------------------------


def test_put_creates_a_live_gallery_then_answers_200(client: TestClient) -> None:
    created = client.put("/galleries/shop")
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["name"] == "shop" and body["size"] == 0 and body["kind"] == "live"
    assert body["classes"] == [] and body["default"] is False and body["updated_at"]

    again = client.put("/galleries/shop")
    assert again.status_code == 200 and again.json() == body

    listed = {g["name"]: g for g in client.get("/galleries").json()["galleries"]}
    assert listed["shop"]["kind"] == "live" and listed["shop"]["size"] == 0


BAD_NAMES = ["Shop", "-shop", ".shop", "sh op", "sh:op", "x" * 65, "shöp"]


def test_bad_gallery_names_are_422(client: TestClient) -> None:
    for name in BAD_NAMES:
        for reply in (client.put(f"/galleries/{name}"), client.get(f"/galleries/{name}/items")):
            assert refusal(reply) == (422, {"detail": BAD_NAME}), name


def test_a_gallery_named_log_is_created_like_any_other(client: TestClient) -> None:
    statuses = [client.put("/galleries/log").status_code, client.put("/galleries/shop").status_code]
    assert statuses == [201, 201]


# --- adding, reading and deleting items ------------------------------------------------------


BAD_ITEM_IDS = ["bad%20id", "x" * 129, "a%23b", "%C3%A9", "a,b"]


def test_bad_item_ids_are_422(client: TestClient, shop: str) -> None:
    for item_id in BAD_ITEM_IDS:
        path = f"/galleries/{shop}/items/{item_id}"
        for reply in (
            client.put(path, files=image()),
            client.get(path),
            client.delete(path),
            client.get(f"{path}/image.png"),
        ):
            assert refusal(reply) == (422, {"detail": BAD_ITEM_ID}), (item_id, reply.request)


BAD_ATTRIBUTE_FIELDS = [
    "[1]",
    "{not json",
    json.dumps({"nested": {"a": 1}}),
    json.dumps({"bad name": 1}),
    json.dumps({"long": "x" * 257}),
    '{"n": NaN}',
    json.dumps({f"a{n}": n for n in range(33)}),
    json.dumps({"big": "x" * 5000}),  # past the size of a form field
]


def test_bad_attributes_are_422(client: TestClient, shop: str) -> None:
    for attributes in BAD_ATTRIBUTE_FIELDS:
        reply = client.put(
            f"/galleries/{shop}/items/sku-1", files=image(), data={"attributes": attributes}
        )
        assert refusal(reply) == (422, {"detail": BAD_ATTRIBUTES}), attributes[:40]
    assert client.get(f"/galleries/{shop}/items/sku-1").status_code == 404  # nothing accepted


def test_attributes_given_twice_are_422(client: TestClient, shop: str) -> None:
    reply = client.put(
        f"/galleries/{shop}/items/sku-1",
        files=[
            ("file", ("item.png", png(), "image/png")),
            ("attributes", (None, b'{"a": 1}')),
            ("attributes", (None, b'{"a": 2}')),
        ],
    )
    assert refusal(reply) == (422, {"detail": BAD_ATTRIBUTES})


NOT_MULTIPART_ADDS: dict[str, dict[str, Any]] = {
    "json": {"json": {"file": "x"}},
    "raw-png": {"content": png(), "headers": {"Content-Type": "image/png"}},
    "urlencoded": {"data": {"attributes": "{}"}},
    "no-file-field": {"files": {"picture": ("item.png", png(), "image/png")}},
}


def test_an_add_without_a_multipart_file_is_422(client: TestClient, shop: str) -> None:
    for case, request_kwargs in NOT_MULTIPART_ADDS.items():
        reply = client.put(f"/galleries/{shop}/items/sku-1", **request_kwargs)
        assert refusal(reply) == (422, {"detail": NO_ADD_FILE}), case


def test_an_accepted_add_is_pending_until_a_worker_commits_it(
    client: TestClient, shop: str
) -> None:
    reply = client.put(
        f"/galleries/{shop}/items/sku-1", files=image(), data={"attributes": '{"c": "shoes"}'}
    )
    assert reply.status_code == 202, reply.text
    job = reply.json()
    assert reply.headers["location"] == f"/jobs/{job['id']}"
    assert (job["status"], job["kind"], job["item_id"], job["gallery"]) == (
        "queued",
        "add",
        "sku-1",
        shop,
    )

    item = client.get(f"/galleries/{shop}/items/sku-1")
    assert item.status_code == 200, item.text
    assert item.json() == {
        "id": "sku-1",
        "gallery": shop,
        "state": "pending",
        "attributes": {},
        "image_url": None,
        "sha256": None,
        "added_at": None,
        "pending_job": job["id"],
    }
    assert client.get(f"/jobs/{job['id']}").json()["status"] == "queued"
    page = client.get(f"/galleries/{shop}/items").json()
    assert page == {"items": [], "total": 0, "next": None}  # not indexed yet
    image_reply = client.get(f"/galleries/{shop}/items/sku-1/image.png")
    assert refusal(image_reply) == (404, {"detail": NO_ITEM.format(name=shop, item="sku-1")})


def test_deleting_a_pending_add_forgets_it(client: TestClient, shop: str) -> None:
    assert client.put(f"/galleries/{shop}/items/sku-1", files=image()).status_code == 202

    assert client.delete(f"/galleries/{shop}/items/sku-1").status_code == 204

    missing = (404, {"detail": NO_ITEM.format(name=shop, item="sku-1")})
    assert refusal(client.get(f"/galleries/{shop}/items/sku-1")) == missing
    assert refusal(client.delete(f"/galleries/{shop}/items/sku-1")) == missing


def test_unknown_items_are_404(client: TestClient, shop: str) -> None:
    missing = (404, {"detail": NO_ITEM.format(name=shop, item="nothing")})
    assert refusal(client.get(f"/galleries/{shop}/items/nothing")) == missing
    assert refusal(client.delete(f"/galleries/{shop}/items/nothing")) == missing
    assert refusal(client.get(f"/galleries/{shop}/items/nothing/image.png")) == missing


def test_an_unknown_gallery_is_404(client: TestClient) -> None:
    missing = (404, {"detail": NO_GALLERY.format(name="nowhere")})
    assert refusal(client.get("/galleries/nowhere/items")) == missing
    assert refusal(client.get("/galleries/nowhere/items/x")) == missing
    assert refusal(client.delete("/galleries/nowhere/items/x")) == missing
    assert refusal(client.put("/galleries/nowhere/items/x", files=image())) == missing


def test_an_empty_gallery_has_one_empty_page(client: TestClient, shop: str) -> None:
    reply = client.get(f"/galleries/{shop}/items", params={"limit": 10})
    assert reply.status_code == 200
    assert reply.json() == {"items": [], "total": 0, "next": None}
    after = client.get(f"/galleries/{shop}/items", params={"after": "5"})
    assert after.json() == {"items": [], "total": 0, "next": None}


def test_a_bad_cursor_is_422(client: TestClient, shop: str) -> None:
    for after in ("-1", "x", "1.5", "1" * 19, ""):
        reply = client.get(f"/galleries/{shop}/items", params={"after": after})
        assert refusal(reply) == (422, {"detail": BAD_CURSOR}), after


# --- search options ---------------------------------------------------------------------------


BAD_FORM_OPTIONS: list[tuple[dict[str, str], str]] = [
    ({"filter": "{not json"}, BAD_FILTER),
    ({"filter": json.dumps({"price": {"near": 3}})}, BAD_FILTER),
    ({"filter": json.dumps({"price": {"lt": True}})}, BAD_FILTER),
    ({"filter": json.dumps({"brand": {"in": []}})}, BAD_FILTER),
    ({"filter": "{}"}, BAD_FILTER),
    ({"min_score": "2"}, BAD_MIN_SCORE),
    ({"min_score": "nan"}, BAD_MIN_SCORE),
    ({"min_score": "high"}, BAD_MIN_SCORE),
    ({"exclude": '["a b"]'}, BAD_EXCLUDE),
    ({"exclude": "[not json"}, BAD_EXCLUDE),
    ({"exclude": "a/b"}, BAD_EXCLUDE),
    ({"item": "a b"}, BAD_ITEM),
]


def test_bad_search_options_in_a_form_are_422(client: TestClient, shop: str) -> None:
    for fields, sentence in BAD_FORM_OPTIONS:
        files = None if "item" in fields else image()
        reply = client.post("/jobs", params={"gallery": shop}, files=files, data=fields)
        assert refusal(reply) == (422, {"detail": sentence}), fields


BAD_JSON_OPTIONS: list[tuple[dict[str, Any], str]] = [
    ({"item": "a b"}, BAD_ITEM),
    ({"item": "x" * 129}, BAD_ITEM),
    ({"item": "sku-1", "filter": [1]}, BAD_FILTER),
    ({"item": "sku-1", "filter": {"a": {"lt": "3"}}}, BAD_FILTER),
    ({"item": "sku-1", "min_score": True}, BAD_MIN_SCORE),
    ({"item": "sku-1", "min_score": -1.5}, BAD_MIN_SCORE),
    ({"item": "sku-1", "min_score": "0.5x"}, BAD_MIN_SCORE),
    ({"item": "sku-1", "exclude": "a b"}, BAD_EXCLUDE),
    ({"item": "sku-1", "exclude": [1]}, BAD_EXCLUDE),
    ({"item": "sku-1", "exclude": {"a": 1}}, BAD_EXCLUDE),
    ({"text": "shoes", "exclude": ["ok"] * 1001}, BAD_EXCLUDE),
]


def test_bad_search_options_in_json_are_422(client: TestClient, shop: str) -> None:
    for body, sentence in BAD_JSON_OPTIONS:
        reply = client.post("/jobs", json={**body, "gallery": shop})
        assert refusal(reply) == (422, {"detail": sentence}), str(body)[:60]


def test_a_search_option_given_twice_is_422(client: TestClient, shop: str) -> None:
    reply = client.post(
        "/jobs",
        params={"gallery": shop},
        files=[
            ("file", ("q.png", png(), "image/png")),
            ("min_score", (None, b"0.1")),
            ("min_score", (None, b"0.2")),
        ],
    )
    assert refusal(reply) == (422, {"detail": ONCE.format(name="min_score")})


@pytest.mark.parametrize(
    ("body", "sentence"),
    [({"min_score": HUGE}, BAD_MIN_SCORE), ({"filter": {"price": {"lt": HUGE}}}, BAD_FILTER)],
    ids=["min_score", "filter"],
)
def test_an_integer_no_float_holds_is_422(
    client: TestClient, shop: str, body: dict[str, Any], sentence: str
) -> None:
    reply = client.post("/jobs", json={"text": "shoes", "gallery": shop, **body})
    assert reply.status_code == 422, reply.text  # today: 500 Internal Server Error
    assert reply.json() == {"detail": sentence}


def test_good_search_options_are_stored_with_the_job(client: TestClient, shop: str) -> None:
    options = {
        "filter": {"category": "shoes", "price": {"lt": 100}},
        "min_score": 0.25,
        "exclude": ["a", "b:c"],
    }
    reply = client.post("/jobs", json={"text": "shoes", "gallery": shop, **options})
    assert reply.status_code == 202, reply.text
    job = reply.json()
    assert (job["filter"], job["min_score"], job["exclude"]) == (
        options["filter"],
        0.25,
        ["a", "b:c"],
    )
    repeated = client.post(
        "/jobs",
        params={"gallery": shop},
        files=[
            ("file", ("q.png", png(), "image/png")),
            ("exclude", (None, b"a")),
            ("exclude", (None, b"b")),
        ],
    )
    assert repeated.status_code == 202, repeated.text
    assert repeated.json()["exclude"] == ["a", "b"]


def test_an_item_search_of_an_unknown_item_of_a_live_gallery_is_422(
    client: TestClient, shop: str
) -> None:
    reply = client.post("/jobs", json={"item": "nothing", "gallery": shop})
    assert refusal(reply) == (422, {"detail": NO_SUCH_ITEM.format(gallery=shop, item="nothing")})
    client.put(f"/galleries/{shop}/items/pending", files=image())
    reply = client.post("/jobs", json={"item": "pending", "gallery": shop})  # not indexed yet
    assert refusal(reply) == (422, {"detail": NO_SUCH_ITEM.format(gallery=shop, item="pending")})


# --- API keys ---------------------------------------------------------------------------------


@pytest.fixture
def keyed(redis_client: redis.Redis, make_client: MakeClient) -> TestClient:
    return make_client(api_keys=f"{KEY_A},{KEY_B}")


def test_a_gallery_belongs_to_the_key_that_created_it(keyed: TestClient) -> None:
    alice, bob = bearer(KEY_A), bearer(KEY_B)
    assert keyed.put("/galleries/mine", headers=alice).status_code == 201
    added = keyed.put("/galleries/mine/items/x", files=image(), headers=alice)
    assert added.status_code == 202, added.text
    assert keyed.get("/galleries/mine/items/x", headers=alice).json()["state"] == "pending"

    missing = (404, {"detail": NO_GALLERY.format(name="mine")})
    assert refusal(keyed.put("/galleries/mine", headers=bob)) == missing
    assert refusal(keyed.get("/galleries/mine/items", headers=bob)) == missing
    assert refusal(keyed.get("/galleries/mine/items/x", headers=bob)) == missing
    assert refusal(keyed.get("/galleries/mine/items/x/image.png", headers=bob)) == missing
    assert refusal(keyed.delete("/galleries/mine/items/x", headers=bob)) == missing
    assert refusal(keyed.put("/galleries/mine/items/y", files=image(), headers=bob)) == missing
    duplicates = keyed.get("/galleries/mine/duplicates", params={"wait": 0}, headers=bob)
    assert refusal(duplicates) == missing
    names = [g["name"] for g in keyed.get("/galleries", headers=bob).json()["galleries"]]
    assert "mine" not in names
    mine = [g["name"] for g in keyed.get("/galleries", headers=alice).json()["galleries"]]
    assert "mine" in mine
    assert keyed.get("/galleries/mine/items/x", headers=alice).status_code == 200  # still there
    assert keyed.put("/galleries/mine", headers=alice).status_code == 200


def test_another_keys_live_gallery_cannot_be_searched(keyed: TestClient) -> None:
    assert keyed.put("/galleries/mine", headers=bearer(KEY_A)).status_code == 201

    reply = keyed.post("/jobs", params={"gallery": "mine"}, files=image(), headers=bearer(KEY_B))

    assert refusal(reply) == (422, {"detail": UNKNOWN_GALLERY.format(name="mine")})
