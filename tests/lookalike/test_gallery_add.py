"""``lookalike gallery add``: a folder or a manifest into a live gallery, against a real stack
(Redis, a worker, the API); and the plain parts (ids from paths, manifest lines) alone."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import Any

import httpx
import pytest

from lookalike import catalogue
from lookalike.catalogue import (
    LONG_ID,
    SAME_ID,
    Entry,
    folder_entries,
    item_id_of,
    manifest_entries,
    unique_ids,
)
from lookalike.cli import main
from lookalike.redis_server import free_port
from lookalike.stack import Stack
from shared.images import NOT_AN_IMAGE
from shared.items import BAD_ATTRIBUTES
from tests.support import picture, wait_job

pytestmark = pytest.mark.e2e


# --- the plain parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relative", "expected"),
    [
        ("x.png", "x"),
        ("shoes/red shoe.JPG", "shoes.red_shoe"),
        ("a/b/c.d.tiff", "a.b.c.d"),
        ("2024-01/img:1 (copy).webp", "2024-01.img:1__copy_"),
        ("été/ü.png", "_t_._"),
    ],
)
def test_an_item_id_is_the_path_without_extension_with_dots_and_underscores(
    relative: str, expected: str
) -> None:
    assert item_id_of(PurePath(relative)) == expected


def test_a_folder_gives_its_images_by_extension_in_any_case(tmp_path: Path) -> None:
    for name in ("b.PNG", "a.jpeg", "notes.txt", "sub/c.Tif", "sub/deeper/d.gif", ".png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = [(e.item_id, e.shown) for e in folder_entries(tmp_path)]
    assert found == [
        ("a", "a.jpeg"),
        ("b", "b.PNG"),
        ("sub.c", "sub/c.Tif"),
        ("sub.deeper.d", "sub/deeper/d.gif"),
    ]


def test_two_files_of_one_id_and_a_long_id_are_refused_before_sending() -> None:
    entries = [
        Entry("a", Path("a.jpg"), "a.jpg"),
        Entry("a", Path("a.png"), "a.png"),
        Entry("x" * 129, Path("long.png"), "long.png"),
    ]
    kept, refused = unique_ids(entries)
    assert kept == entries[:1]
    assert refused == [
        ("a.png", SAME_ID.format(item_id="a", other="a.jpg")),
        ("long.png", LONG_ID.format(item_id="x" * 129)),
    ]


def test_manifest_lines_that_are_malformed_say_why(tmp_path: Path) -> None:
    manifest = tmp_path / "items.jsonl"
    lines = [
        json.dumps({"id": "ok", "path": "a.png", "attributes": {"colour": "red"}}),
        "",
        '{"id": "broken"',
        json.dumps(["a list"]),
        json.dumps({"id": "bad id", "path": "a.png"}),
        json.dumps({"id": "x", "path": "a.png", "attributes": [1]}),
        json.dumps({"id": "x", "file": "a.png"}),
        json.dumps({"id": "abs", "path": str(tmp_path / "b.png")}),
    ]
    manifest.write_text("\n".join(lines) + "\n")
    entries, malformed = manifest_entries(manifest)
    assert entries == [
        Entry("ok", tmp_path / "a.png", "a.png", {"colour": "red"}),
        Entry("abs", tmp_path / "b.png", str(tmp_path / "b.png"), {}),
    ]
    assert [where for where, _ in malformed] == [f"items.jsonl line {n}" for n in (3, 4, 5, 6, 7)]
    assert malformed[0][1].startswith("not JSON (")
    assert malformed[1][1].startswith("not a JSON object")
    assert malformed[2][1].startswith("'id' must be 1 to 128")
    assert malformed[3][1] == BAD_ATTRIBUTES
    assert malformed[4][1].startswith("unknown field 'file'")


@pytest.mark.parametrize(
    ("args", "sentence"),
    [
        (["g", "/no/such/folder"], "lookalike: /no/such/folder is not a folder"),
        (["g"], "lookalike: give a FOLDER or --manifest, one of them"),
        (["g", "--manifest", "/no/such.jsonl"], "lookalike: /no/such.jsonl is not a file"),
        (["g", ".", "--concurrency", "0"], "lookalike: --concurrency must be at least 1"),
    ],
)
def test_usage_errors_exit_2_with_a_sentence(
    args: list[str], sentence: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["gallery", "add", *args]) == 2
    assert capsys.readouterr().err.strip() == sentence


def test_a_folder_without_images_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("no pictures here")
    assert main(["gallery", "add", "g", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"lookalike: no image files under {tmp_path} (")


def test_429_503_and_broken_connections_are_retried_and_other_refusals_are_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(catalogue, "FIRST_BACKOFF_S", 0.001)
    answers = iter(
        [
            httpx.Response(429, headers={"Retry-After": "0"}, json={"detail": "full"}),
            httpx.ConnectError("refused"),
            httpx.Response(503, json={"detail": "no worker"}),
            httpx.Response(202, json={"id": "j"}),
            httpx.Response(422, json={"detail": "bad"}),
        ]
    )
    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        reply = next(answers)
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def twice() -> list[int]:
        transport = httpx.MockTransport(answer)
        async with httpx.AsyncClient(base_url="http://test", transport=transport) as client:
            return [(await catalogue.request(client, "PUT", "/x")).status_code for _ in "ab"]

    assert asyncio.run(twice()) == [202, 422]
    assert len(calls) == 5


def test_a_service_out_of_reach_fails_after_the_last_try(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalogue, "FIRST_BACKOFF_S", 0.001)
    calls = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("Connection refused")

    async def put() -> None:
        transport = httpx.MockTransport(refuse)
        async with httpx.AsyncClient(base_url="http://test", transport=transport) as client:
            await catalogue.request(client, "PUT", "/x")

    with pytest.raises(httpx.ConnectError):
        asyncio.run(put())
    assert len(calls) == catalogue.MAX_TRIES


def test_a_file_over_the_limit_is_refused_without_being_read_or_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catalogue, "MAX_FILE_BYTES", 10)
    (tmp_path / "big.png").write_bytes(b"x" * 11)
    sent = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(500)

    async def one() -> tuple[catalogue.Outcome, str | None]:
        transport = httpx.MockTransport(answer)
        async with httpx.AsyncClient(base_url="http://test", transport=transport) as client:
            sender = catalogue.Sender(client, "g", {}, timeout_s=1)
            return await catalogue.send(sender, Entry("big", tmp_path / "big.png", "big.png"))

    assert asyncio.run(one()) == (catalogue.Outcome.REFUSED, catalogue.TOO_LARGE)
    assert catalogue.TOO_LARGE == "it is larger than 64 MB" and sent == []


def test_a_wrong_url_is_said_within_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(catalogue, "FIRST_BACKOFF_S", 0.001)
    (tmp_path / "a.png").write_bytes(picture(1))
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["gallery", "add", "g", str(tmp_path), "--url", url, "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith(f"lookalike: cannot reach the service at {url}: ")


# --- against the real service ------------------------------------------------------------------


@pytest.fixture
def stack(live_service: Stack) -> Stack:
    return live_service


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        yield client


def gallery_add(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return stack.run_cli("gallery", "add", *args, "--url", stack.url, "--no-progress", timeout=120)


def listed(http: httpx.Client, gallery: str) -> dict[str, dict[str, Any]]:
    """Every item of the gallery, by id, through the pages of the listing."""
    found: dict[str, dict[str, Any]] = {}
    params = {"limit": "7"}  # several pages
    while True:
        page = http.get(f"/galleries/{gallery}/items", params=params).json()
        found.update({item["id"]: item for item in page["items"]})
        if page["next"] is None:
            return found
        params["after"] = page["next"]


def first_match(http: httpx.Client, gallery: str, image: bytes) -> str:
    reply = http.post(
        "/jobs", params={"gallery": gallery}, files={"file": ("q.png", image, "image/png")}
    )
    assert reply.status_code == 202, reply.text
    job: dict[str, Any] = wait_job(http, reply.json()["id"])  # type: ignore[assignment]
    assert job["status"] == "succeeded", job
    return str(job["result"]["matches"][0]["item_id"])


def test_a_folder_goes_in_then_a_second_run_sends_only_what_changed(
    stack: Stack, http: httpx.Client, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    (images / "sub" / "deeper").mkdir(parents=True)
    files = [images / f"p{n:02}.png" for n in range(24)]
    files += [images / "sub" / f"s {n}.png" for n in range(4)]
    files += [images / "sub" / "deeper" / f"d{n}.PNG" for n in range(2)]
    for seed, path in enumerate(files):
        path.write_bytes(picture(seed))
    (images / "notes.txt").write_text("not an image: not sent")

    started = time.monotonic()
    first = gallery_add(stack, "folder-shop", str(images))
    took = time.monotonic() - started
    assert first.returncode == 0, first.stdout + first.stderr
    summary = first.stdout.splitlines()[0]
    assert summary.startswith("gallery folder-shop: 30 added, 0 already there, 0 duplicates, ")
    assert "0 refused, 0 failed" in summary
    print(f"\n30 items added by 'lookalike gallery add' in {took:.1f}s (the command's run)")

    items = listed(http, "folder-shop")
    expected = {f"p{n:02}" for n in range(24)} | {f"sub.s_{n}" for n in range(4)}
    assert set(items) == expected | {"sub.deeper.d0", "sub.deeper.d1"}
    assert all(item["state"] == "indexed" and item["attributes"] == {} for item in items.values())
    assert first_match(http, "folder-shop", picture(25)) == "sub.s_1"

    again = gallery_add(stack, "folder-shop", str(images))
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.startswith("gallery folder-shop: 0 added, 30 already there, ")

    files[3].write_bytes(picture(1000))
    changed = gallery_add(stack, "folder-shop", str(images))
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert changed.stdout.startswith("gallery folder-shop: 1 added, 29 already there, ")
    assert first_match(http, "folder-shop", picture(1000)) == "p03"
    assert len(listed(http, "folder-shop")) == 30


def test_a_manifest_sends_attributes_and_lists_what_was_refused(
    stack: Stack, http: httpx.Client, tmp_path: Path
) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(picture(500))
    (tmp_path / "blue.png").write_bytes(picture(501))
    (tmp_path / "copy.png").write_bytes(picture(500))
    (tmp_path / "notes.txt").write_text("not an image")
    lines = [
        {"id": "sku-1", "path": "img/red.png", "attributes": {"colour": "red", "price": 30}},
        {"id": "sku-2", "path": str(tmp_path / "blue.png"), "attributes": {"in_stock": True}},
        {"id": "sku-3", "path": "copy.png"},
        {"id": "sku-4", "path": "notes.txt", "attributes": {"colour": "none"}},
    ]
    manifest = tmp_path / "items.jsonl"
    text = [json.dumps(line) for line in lines]
    text.insert(2, '{"id": "sku-9", "path": ')
    manifest.write_text("\n".join(text) + "\n")

    done = gallery_add(stack, "manifest-shop", "--manifest", str(manifest), "--concurrency", "1")
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    assert out.startswith(
        "gallery manifest-shop: 3 added, 0 already there, 1 duplicates, 2 refused, 0 failed"
    ), out
    assert "duplicates (added, with the same bytes as the item named):\n  copy.png: sku-1\n" in out
    assert "refused:\n  items.jsonl line 3: not JSON (" in out
    assert f"  notes.txt: {NOT_AN_IMAGE}\n" in out

    items = listed(http, "manifest-shop")
    assert {i: item["attributes"] for i, item in items.items()} == {
        "sku-1": {"colour": "red", "price": 30},
        "sku-2": {"in_stock": True},
        "sku-3": {},
    }

    (tmp_path / "notes.txt").unlink()
    manifest.write_text(json.dumps({**lines[0], "attributes": {"colour": "crimson"}}) + "\n")
    retagged = gallery_add(stack, "manifest-shop", "--manifest", str(manifest))
    assert retagged.returncode == 0, retagged.stdout + retagged.stderr
    assert retagged.stdout.startswith("gallery manifest-shop: 1 added, 0 already there, ")
    assert listed(http, "manifest-shop")["sku-1"]["attributes"] == {"colour": "crimson"}
