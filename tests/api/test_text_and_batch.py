"""Text queries and batch submits against the real service, over HTTP.

Every refusal is asserted with its exact status and sentence, and a refused batch must leave
no trace: no job record, nothing pending, nothing queued.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from api.limits import TOO_LARGE, TOO_LARGE_BATCH, human_size
from api.submit import TEXT_OFF, UNKNOWN_GALLERY
from api.uploads import (
    BAD_GALLERY,
    BAD_JSON,
    BAD_K,
    BAD_TEXT,
    BATCH_FILES,
    BATCH_NO_TEXT,
    FILE_OR_TEXT,
    MAX_TEXT_CHARS,
    NO_FILE,
)
from lookalike.stack import Stack
from shared.fashion_mnist import CLASS_NAMES
from shared.images import CORRUPT, EMPTY, NOT_AN_IMAGE
from shared.jobs import Keys
from shared.settings import FASHION_MNIST, ApiSettings, BrokerSettings, StorageSettings
from tests.api.conftest import MakeClient
from tests.stacks import GALLERY_SIZE, make_stack
from tests.support import gallery_png, wait_job

pytestmark = pytest.mark.e2e

# The service runs with default settings (tests.support.stack_env drops LOOKALIKE_* variables).
MAX_UPLOAD: int = StorageSettings.model_fields["max_upload_bytes"].default
MAX_BATCH: int = ApiSettings.model_fields["max_batch_files"].default
QUEUE: str = BrokerSettings.model_fields["queue"].default
KEYS = Keys(StorageSettings.model_fields["key_prefix"].default)
BAD_TEXT_DETAIL = BAD_TEXT.format(n=MAX_TEXT_CHARS)
# The narrow stack: text search off, batches of 2 at most, 1 MB per file.
NARROW_BATCH = 2
NARROW_UPLOAD = 1024 * 1024


# --- helpers ------------------------------------------------------------------------------


def assert_refused(reply: httpx.Response, status: int, detail: str) -> None:
    assert reply.status_code == status, reply.text
    assert reply.json() == {"detail": detail}


def png_file(data: bytes, name: str = "upload.png") -> tuple[str, tuple[str, bytes, str]]:
    return ("file", (name, data, "image/png"))


def noise_png(side: int, *, seed: int) -> bytes:
    """A PNG of random pixels: it does not compress, so its size is about 3 x side^2 bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def post_text(client: httpx.Client, encoding: str, text: str, **fields: str) -> httpx.Response:
    """POST /jobs with a text query sent as JSON, a urlencoded form or a multipart form."""
    if encoding == "json":
        return client.post("/jobs", json={"text": text, **fields})
    if encoding == "urlencoded":
        return client.post("/jobs", data={"text": text, **fields})
    parts = [("text", (None, text)), *((k, (None, v)) for k, v in fields.items())]
    return client.post("/jobs", files=parts)


def job_traces(client: redis.Redis) -> tuple[int, int, int]:
    """Job records, pending jobs and queued messages: what an accepted job leaves behind."""
    records = sum(1 for _ in client.scan_iter(match=KEYS.job("*"), count=1000))
    return records, int(client.zcard(KEYS.pending)), int(client.llen(QUEUE))


def result_of(client: httpx.Client, job_id: str) -> dict[str, Any]:
    job = wait_job(client, job_id)
    assert job["status"] == "succeeded", job
    result: dict[str, Any] = job["result"]  # type: ignore[assignment]
    return result


@pytest.fixture
def store_redis(service: Stack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(service.env["LOOKALIKE_REDIS_URL"])
    yield client
    client.close()


@pytest.fixture(scope="module")
def narrow(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_clip_dir: Path,
    fake_data_dir: Path,
    built_index: Path,
) -> Iterator[Stack]:
    """One worker with text search off; batches of at most 2 files of at most 1 MB each."""
    stack = make_stack(tmp_path_factory.mktemp("narrow"), tiny_clip_dir, fake_data_dir)
    stack.env.update(
        LOOKALIKE_INDEX_DIR=str(built_index),
        LOOKALIKE_TEXT_SEARCH="off",
        LOOKALIKE_MAX_BATCH_FILES=str(NARROW_BATCH),
        LOOKALIKE_MAX_UPLOAD_BYTES=str(NARROW_UPLOAD),
    )
    stack.start(workers=1)
    yield stack
    stack.stop()


@pytest.fixture
def narrow_http(narrow: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=narrow.url, timeout=30) as client:
        yield client


# --- text queries -------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["json", "urlencoded", "multipart"])
def test_text_job_is_accepted_and_answered(http: httpx.Client, encoding: str) -> None:
    reply = post_text(http, encoding, "a red sneaker", k="3")

    assert reply.status_code == 202, reply.text
    created = reply.json()
    assert reply.headers["location"] == f"/jobs/{created['id']}"
    assert created["status"] == "queued"
    assert created["kind"] == "text"
    assert created["text"] == "a red sneaker"
    assert created["gallery"] == FASHION_MNIST
    assert created["k"] == 3
    assert created["stage"] is None
    job = wait_job(http, created["id"])
    assert job["status"] == "succeeded", job
    assert job["kind"] == "text"
    assert job["stage"] is None
    result: Any = job["result"]
    assert [m["rank"] for m in result["matches"]] == [1, 2, 3]
    scores = [m["score"] for m in result["matches"]]
    assert scores == sorted(scores, reverse=True)
    assert all(m["label_name"] == CLASS_NAMES[m["label"]] for m in result["matches"])
    assert result["gallery"] == {"name": FASHION_MNIST, "size": GALLERY_SIZE}


def test_image_job_says_it_is_an_image_job(http: httpx.Client, fake_data_dir: Path) -> None:
    reply = http.post("/jobs", files=[png_file(gallery_png(fake_data_dir, 2))])

    assert reply.status_code == 202
    created = reply.json()
    assert (created["kind"], created["text"], created["gallery"]) == ("image", None, FASHION_MNIST)
    assert wait_job(http, created["id"])["kind"] == "image"


def test_text_is_stored_without_surrounding_whitespace(http: httpx.Client) -> None:
    reply = post_text(http, "json", "  \n a woollen coat \t ")

    assert reply.status_code == 202
    assert reply.json()["text"] == "a woollen coat"


def test_text_job_takes_k_and_gallery_from_the_query_string(http: httpx.Client) -> None:
    reply = http.post(
        "/jobs", params={"k": "7", "gallery": FASHION_MNIST}, json={"text": "a leather bag"}
    )

    assert reply.status_code == 202
    assert (reply.json()["k"], reply.json()["gallery"]) == (7, FASHION_MNIST)
    assert len(result_of(http, reply.json()["id"])["matches"]) == 7


def test_json_k_may_be_a_number_or_a_digit_string(http: httpx.Client) -> None:
    as_number = http.post("/jobs", json={"text": "a shirt", "k": 4})
    as_string = http.post("/jobs", json={"text": "a shirt", "k": "6"})

    assert (as_number.status_code, as_number.json()["k"]) == (202, 4)
    assert (as_string.status_code, as_string.json()["k"]) == (202, 6)


@pytest.mark.parametrize("encoding", ["json", "urlencoded", "multipart"])
def test_text_of_exactly_1000_characters_is_accepted(http: httpx.Client, encoding: str) -> None:
    text = "é" * MAX_TEXT_CHARS  # characters, not bytes

    reply = post_text(http, encoding, text)

    assert reply.status_code == 202, reply.text
    assert reply.json()["text"] == text


@pytest.mark.parametrize("encoding", ["json", "urlencoded", "multipart"])
@pytest.mark.parametrize(
    "text", ["", "   ", "\n\t", "x" * (MAX_TEXT_CHARS + 1)], ids=["empty", "spaces", "ws", "1001"]
)
def test_blank_or_too_long_text_is_422(http: httpx.Client, encoding: str, text: str) -> None:
    assert_refused(post_text(http, encoding, text), 422, BAD_TEXT_DETAIL)


def test_two_text_fields_are_422(http: httpx.Client) -> None:
    reply = http.post("/jobs", files=[("text", (None, "a shoe")), ("text", (None, "a bag"))])

    assert_refused(reply, 422, BAD_TEXT_DETAIL)


def test_file_and_text_together_are_400(
    http: httpx.Client, fake_data_dir: Path, store_redis: redis.Redis
) -> None:
    before = job_traces(store_redis)

    reply = http.post(
        "/jobs", files=[png_file(gallery_png(fake_data_dir, 1))], data={"text": "a shoe"}
    )

    assert_refused(reply, 400, FILE_OR_TEXT)
    assert job_traces(store_redis) == before


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"data": {"k": "3"}},
        {"files": [("k", (None, "3"))]},
        {},
        {"content": b"", "headers": {"content-type": "application/x-www-form-urlencoded"}},
    ],
    ids=["urlencoded-k-only", "multipart-k-only", "no-body", "empty-form"],
)
def test_neither_file_nor_text_is_422(http: httpx.Client, request_kwargs: dict[str, Any]) -> None:
    assert_refused(http.post("/jobs", **request_kwargs), 422, NO_FILE)


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"",
        b"[1, 2]",
        b'"a shoe"',
        b"null",
        b'{"k": 5}',
        b'{"text": 5}',
        b'{"text": null}',
        b'{"text": ["a shoe"]}',
        b"\xff\xfe",
    ],
    ids=[
        "malformed",
        "empty",
        "array",
        "string",
        "null",
        "no-text",
        "number-text",
        "null-text",
        "list-text",
        "not-utf8",
    ],
)
def test_json_that_is_not_an_object_with_a_text_is_400(http: httpx.Client, body: bytes) -> None:
    reply = http.post("/jobs", content=body, headers={"content-type": "application/json"})

    assert_refused(reply, 400, BAD_JSON)


@pytest.mark.parametrize("k", [0, 51, -1, True, 7.5, "abc", "", [5]])
def test_json_bad_k_is_422(http: httpx.Client, k: object) -> None:
    assert_refused(http.post("/jobs", json={"text": "a shoe", "k": k}), 422, BAD_K)


def test_json_null_k_means_the_default(http: httpx.Client) -> None:
    reply = http.post("/jobs", json={"text": "a shoe", "k": None})

    assert reply.status_code == 202
    assert reply.json()["k"] == 5


@pytest.mark.parametrize("name", ["Fashion-MNIST", "../index", "a b", "-dash-first", "x" * 65])
@pytest.mark.parametrize("where", ["json", "urlencoded", "multipart"])
def test_body_gallery_that_is_not_a_gallery_name_is_422(
    http: httpx.Client, name: str, where: str
) -> None:
    assert_refused(post_text(http, where, "a shoe", gallery=name), 422, BAD_GALLERY)


def test_json_gallery_that_is_not_a_string_is_422(http: httpx.Client) -> None:
    assert_refused(http.post("/jobs", json={"text": "a shoe", "gallery": 7}), 422, BAD_GALLERY)


def test_query_gallery_that_is_not_a_gallery_name_is_422(http: httpx.Client) -> None:
    reply = http.post("/jobs", params={"gallery": "../Bad name!"}, json={"text": "a shoe"})

    assert_refused(reply, 422, BAD_GALLERY)


def test_query_gallery_that_is_not_a_gallery_name_is_422_while_no_worker_is_ready(
    make_client: MakeClient, redis_client: redis.Redis
) -> None:
    client: TestClient = make_client()

    reply = client.post("/jobs", params={"gallery": "../Bad name!"}, data={"text": "a shoe"})

    assert reply.status_code == 422, reply.text
    assert reply.json() == {"detail": BAD_GALLERY}


@pytest.mark.parametrize("where", ["json", "urlencoded", "multipart", "query"])
def test_gallery_no_worker_serves_is_422(http: httpx.Client, where: str) -> None:
    if where == "query":
        reply = http.post("/jobs", params={"gallery": "no-such-gallery"}, data={"text": "a shoe"})
    else:
        reply = post_text(http, where, "a shoe", gallery="no-such-gallery")

    assert_refused(reply, 422, UNKNOWN_GALLERY.format(name="no-such-gallery"))


def test_image_for_a_gallery_no_worker_serves_is_422(
    http: httpx.Client, fake_data_dir: Path
) -> None:
    reply = http.post(
        "/jobs",
        files=[png_file(gallery_png(fake_data_dir, 1))],
        data={"gallery": "no-such-gallery"},
    )

    assert_refused(reply, 422, UNKNOWN_GALLERY.format(name="no-such-gallery"))


def test_text_job_and_unknown_gallery_wait_in_the_queue_while_no_worker_is_ready(
    make_client: MakeClient, redis_client: redis.Redis
) -> None:
    client: TestClient = make_client()  # real Redis, no worker: nothing can be checked yet

    text = client.post("/jobs", json={"text": "a shoe"})
    elsewhere = client.post("/jobs", json={"text": "a shoe", "gallery": "my-photos"})

    assert (text.status_code, text.json()["status"], text.json()["kind"]) == (202, "queued", "text")
    assert (elsewhere.status_code, elsewhere.json()["gallery"]) == (202, "my-photos")
    assert redis_client.llen(QUEUE + ".text") == 2  # text jobs wait for text-capable workers
    assert redis_client.llen(QUEUE) == 0


def test_text_is_422_when_no_ready_worker_has_text_search(narrow_http: httpx.Client) -> None:
    for encoding in ("json", "urlencoded", "multipart"):
        assert_refused(post_text(narrow_http, encoding, "a shoe"), 422, TEXT_OFF)


def test_readyz_says_text_search_is_off(narrow_http: httpx.Client) -> None:
    ready = narrow_http.get("/readyz").json()

    assert ready["modes"] == {"image": True, "text": False}
    assert ready["galleries"] == [FASHION_MNIST]


def test_images_are_answered_while_text_search_is_off(
    narrow_http: httpx.Client, fake_data_dir: Path
) -> None:
    reply = narrow_http.post("/jobs", files=[png_file(gallery_png(fake_data_dir, 21))])

    assert reply.status_code == 202
    assert result_of(narrow_http, reply.json()["id"])["matches"][0]["index"] == 21


def test_text_jobs_succeed_when_only_some_workers_have_text_search(
    tmp_path: Path, tiny_clip_dir: Path, fake_data_dir: Path, built_index: Path
) -> None:
    stack = make_stack(tmp_path, tiny_clip_dir, fake_data_dir)
    stack.env["LOOKALIKE_INDEX_DIR"] = str(built_index)
    stack.start_redis()
    try:
        stack.start_worker()
        stack.env["LOOKALIKE_TEXT_SEARCH"] = "off"
        stack.start_worker()
        stack.start_api()
        stack.wait_ready(workers=2)
        with httpx.Client(base_url=stack.url, timeout=30) as client:
            assert client.get("/readyz").json()["modes"] == {"image": True, "text": True}
            jobs = []
            for number in range(6):  # one at a time: each idle worker takes its turn
                reply = client.post("/jobs", json={"text": f"a shoe, take {number}"})
                assert reply.status_code == 202, reply.text
                jobs.append(wait_job(client, reply.json()["id"]))
    finally:
        stack.stop()

    assert [(job["status"], job["error"]) for job in jobs] == [("succeeded", None)] * 6


# --- batches ------------------------------------------------------------------------------


def test_batch_gives_one_job_per_file_in_order(http: httpx.Client, fake_data_dir: Path) -> None:
    indices = [14, 3, 27, 8]

    reply = http.post(
        "/jobs/batch", files=[png_file(gallery_png(fake_data_dir, i), f"{i}.png") for i in indices]
    )

    assert reply.status_code == 202, reply.text
    jobs = reply.json()["jobs"]
    assert len(jobs) == len(indices)
    assert len({job["id"] for job in jobs}) == len(indices)
    assert all(job["status"] == "queued" and job["kind"] == "image" for job in jobs)
    assert all(job["k"] == 5 and job["gallery"] == FASHION_MNIST for job in jobs)
    answered = [result_of(http, job["id"]) for job in jobs]
    assert [result["matches"][0]["index"] for result in answered] == indices
    assert all(result["matches"][0]["score"] >= 0.99 for result in answered)


def test_batch_jobs_can_be_read_and_followed_like_single_jobs(
    http: httpx.Client, fake_data_dir: Path
) -> None:
    reply = http.post("/jobs/batch", files=[png_file(gallery_png(fake_data_dir, 5))])

    assert reply.status_code == 202
    (job,) = reply.json()["jobs"]
    assert result_of(http, job["id"])["matches"][0]["index"] == 5
    assert http.get(f"/jobs/{job['id']}").json()["status"] == "succeeded"
    assert http.get(f"/jobs/{job['id']}/grid.png").headers["content-type"] == "image/png"


@pytest.mark.parametrize("where", ["form", "query"])
def test_batch_takes_k_and_gallery(http: httpx.Client, fake_data_dir: Path, where: str) -> None:
    fields = {"k": "9", "gallery": FASHION_MNIST}
    files = [png_file(gallery_png(fake_data_dir, i)) for i in (1, 2)]
    if where == "form":
        reply = http.post("/jobs/batch", files=files, data=fields)
    else:
        reply = http.post("/jobs/batch", files=files, params=fields)

    assert reply.status_code == 202, reply.text
    jobs = reply.json()["jobs"]
    assert [(job["k"], job["gallery"]) for job in jobs] == [(9, FASHION_MNIST)] * 2
    assert [len(result_of(http, job["id"])["matches"]) for job in jobs] == [9, 9]


def test_batch_of_the_maximum_number_of_files_is_accepted(
    http: httpx.Client, fake_data_dir: Path
) -> None:
    files = [png_file(gallery_png(fake_data_dir, i)) for i in range(MAX_BATCH)]

    reply = http.post("/jobs/batch", files=files)

    assert reply.status_code == 202
    jobs = reply.json()["jobs"]
    assert [result_of(http, job["id"])["matches"][0]["index"] for job in jobs] == list(
        range(MAX_BATCH)
    )


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"data": {"k": "3"}},
        {"files": [("k", (None, "3"))]},
        {},
    ],
    ids=["urlencoded-k-only", "multipart-k-only", "no-body"],
)
def test_batch_without_a_file_is_400(
    http: httpx.Client, store_redis: redis.Redis, request_kwargs: dict[str, Any]
) -> None:
    before = job_traces(store_redis)

    reply = http.post("/jobs/batch", **request_kwargs)

    assert_refused(reply, 400, BATCH_FILES.format(n=MAX_BATCH))
    assert job_traces(store_redis) == before


def test_batch_of_too_many_files_is_400(
    http: httpx.Client, fake_data_dir: Path, store_redis: redis.Redis
) -> None:
    before = job_traces(store_redis)
    png = gallery_png(fake_data_dir, 1)

    reply = http.post("/jobs/batch", files=[png_file(png)] * (MAX_BATCH + 1))

    assert_refused(reply, 400, BATCH_FILES.format(n=MAX_BATCH))
    assert job_traces(store_redis) == before


def test_batch_file_in_another_field_is_400(http: httpx.Client, fake_data_dir: Path) -> None:
    png = gallery_png(fake_data_dir, 1)

    reply = http.post("/jobs/batch", files=[png_file(png), ("image", ("b.png", png))])

    assert_refused(reply, 400, BATCH_FILES.format(n=MAX_BATCH))


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"data": {"text": "a shoe"}},
        {"files": [("text", (None, "a shoe"))]},
        {"json": {"text": "a shoe"}},
        {"with_file": True},
    ],
    ids=["urlencoded", "multipart", "json", "text-and-file"],
)
def test_batch_with_a_text_is_400(
    http: httpx.Client,
    fake_data_dir: Path,
    store_redis: redis.Redis,
    request_kwargs: dict[str, Any],
) -> None:
    if request_kwargs.pop("with_file", False):
        request_kwargs = {
            "files": [png_file(gallery_png(fake_data_dir, 1))],
            "data": {"text": "a shoe"},
        }
    before = job_traces(store_redis)

    reply = http.post("/jobs/batch", **request_kwargs)

    assert_refused(reply, 400, BATCH_NO_TEXT)
    assert job_traces(store_redis) == before


@pytest.mark.parametrize(
    ("bad", "sentence"),
    [(b"hello, not a picture", NOT_AN_IMAGE), (b"", EMPTY), ("truncated", CORRUPT)],
    ids=["not-an-image", "empty", "truncated"],
)
@pytest.mark.parametrize("position", [1, 2, 3])
def test_batch_with_one_bad_file_is_400_naming_it_and_creates_no_job(
    http: httpx.Client,
    fake_data_dir: Path,
    store_redis: redis.Redis,
    bad: bytes | str,
    sentence: str,
    position: int,
) -> None:
    if bad == "truncated":
        whole = gallery_png(fake_data_dir, 9)
        bad = whole[: len(whole) // 2]
    assert isinstance(bad, bytes)
    files = [png_file(gallery_png(fake_data_dir, i)) for i in range(3)]
    files[position - 1] = png_file(bad)
    before = job_traces(store_redis)

    reply = http.post("/jobs/batch", files=files)

    assert_refused(reply, 400, f"File {position}: {sentence}")
    assert job_traces(store_redis) == before


def test_batch_with_a_file_over_the_size_cap_is_413_naming_it_and_creates_no_job(
    http: httpx.Client, fake_data_dir: Path, store_redis: redis.Redis
) -> None:
    small = gallery_png(fake_data_dir, 1)
    files = [png_file(small), png_file(b"\0" * (MAX_UPLOAD + 1)), png_file(small)]
    before = job_traces(store_redis)

    reply = http.post("/jobs/batch", files=files)

    detail = TOO_LARGE.format(limit=human_size(MAX_UPLOAD))
    assert_refused(reply, 413, f"File 2: {detail}")
    assert job_traces(store_redis) == before


def test_service_answers_after_refused_batches(http: httpx.Client, fake_data_dir: Path) -> None:
    http.post("/jobs/batch", files=[png_file(b"junk"), png_file(b"junk")])

    reply = http.post("/jobs/batch", files=[png_file(gallery_png(fake_data_dir, 33))])

    assert reply.status_code == 202
    assert result_of(http, reply.json()["jobs"][0]["id"])["matches"][0]["index"] == 33


def test_batch_limit_follows_lookalike_max_batch_files(
    narrow_http: httpx.Client, fake_data_dir: Path
) -> None:
    files = [png_file(gallery_png(fake_data_dir, i)) for i in range(NARROW_BATCH + 1)]

    reply = narrow_http.post("/jobs/batch", files=files)

    assert_refused(reply, 400, BATCH_FILES.format(n=NARROW_BATCH))


def test_batch_body_may_reach_max_files_times_the_upload_cap(narrow_http: httpx.Client) -> None:
    # Two files of about 0.87 MB each: together more than one job's body may be.
    files = [png_file(noise_png(540, seed=seed)) for seed in range(NARROW_BATCH)]
    assert all(len(f[1][1]) < NARROW_UPLOAD for f in files)
    assert sum(len(f[1][1]) for f in files) > NARROW_UPLOAD + 64 * 1024

    single = narrow_http.post("/jobs", files=files)
    batch = narrow_http.post("/jobs/batch", files=files)

    assert_refused(single, 413, TOO_LARGE.format(limit=human_size(NARROW_UPLOAD)))
    assert batch.status_code == 202, batch.text
    jobs = batch.json()["jobs"]
    assert [wait_job(narrow_http, job["id"])["status"] for job in jobs] == ["succeeded"] * 2


def test_batch_body_over_max_files_times_the_upload_cap_is_413(
    narrow_http: httpx.Client, narrow: Stack
) -> None:
    files = [png_file(noise_png(540, seed=seed)) for seed in range(NARROW_BATCH + 1)]
    client = redis.Redis.from_url(narrow.env["LOOKALIKE_REDIS_URL"])
    before = job_traces(client)

    reply = narrow_http.post("/jobs/batch", files=files)

    detail = TOO_LARGE_BATCH.format(count=NARROW_BATCH, limit=human_size(NARROW_UPLOAD))
    assert_refused(reply, 413, detail)
    assert job_traces(client) == before
    client.close()


def test_openapi_describes_text_and_batch_bodies(http: httpx.Client) -> None:
    paths = http.get("/openapi.json").json()["paths"]

    single = paths["/jobs"]["post"]["requestBody"]["content"]
    batch = paths["/jobs/batch"]["post"]["requestBody"]["content"]
    assert set(single) == {"multipart/form-data", "application/json"}
    assert single["application/json"]["schema"]["required"] == ["text"]
    assert single["multipart/form-data"]["schema"]["properties"]["text"]["maxLength"] == 1000
    assert batch["multipart/form-data"]["schema"]["properties"]["file"]["type"] == "array"
    accepted = paths["/jobs/batch"]["post"]["responses"]["202"]["content"]["application/json"]
    assert accepted["schema"]["$ref"].endswith("/BatchAccepted")
