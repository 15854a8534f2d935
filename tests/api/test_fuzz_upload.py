"""Property-based uploads, in process: whatever a client sends, POST /jobs never answers 5xx.

No worker runs: accepted jobs wait in the queue of the session Redis, emptied per test.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from api.limits import TOO_LARGE, TOO_SLOW
from api.uploads import BAD_K, FIELD_TOO_LARGE, MALFORMED, NO_FILE, ONE_FILE, TOO_MANY_FIELDS
from shared.images import CORRUPT, EMPTY, NOT_AN_IMAGE, TOO_MANY_PIXELS

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

IMAGE_REFUSALS = {CORRUPT, EMPTY, NOT_AN_IMAGE, TOO_MANY_PIXELS}
FORM_REFUSALS = {NO_FILE, ONE_FILE, TOO_MANY_FIELDS, FIELD_TOO_LARGE, MALFORMED, BAD_K}


@pytest.fixture
def client(redis_client: redis.Redis, make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


def assert_answered_sanely(reply: Any) -> None:
    """Never a server error; every refusal is FastAPI's shape with one sentence."""
    event(f"status {reply.status_code}")  # shown by --hypothesis-show-statistics
    assert reply.status_code < 500, reply.text
    if reply.status_code >= 400:
        body = reply.json()
        assert isinstance(body, dict), body
        assert isinstance(body.get("detail"), str), body
    else:
        assert reply.status_code == 202, reply.text
        assert reply.json()["status"] == "queued"


def encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


SEED = Image.linear_gradient("L").resize((24, 16)).convert("RGB")
SEEDS = {name: encode(SEED, name) for name in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")}

printable_latin1 = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=60
)


BOUNDARY = b"fuzzboundary"
MULTIPART = b"multipart/form-data; boundary=" + BOUNDARY


def file_form(data: bytes, *, filename: bytes, content_type: bytes) -> bytes:
    """One file part, built by hand: HTTP clients refuse to send odd names and types."""
    return (
        b"--" + BOUNDARY + b"\r\n"
        b'Content-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
        b"Content-Type: " + content_type + b"\r\n\r\n" + data + b"\r\n--" + BOUNDARY + b"--\r\n"
    )


@FUZZ
@given(
    data=st.binary(max_size=4096) | st.sampled_from(sorted(SEEDS.values())),
    filename=st.text(max_size=80).map(lambda text: text.encode("utf-8", "surrogatepass")),
    content_type=st.binary(max_size=60),
)
def test_arbitrary_file_bytes_never_cause_a_server_error(
    client: TestClient, data: bytes, filename: bytes, content_type: bytes
) -> None:
    body = file_form(data, filename=filename, content_type=content_type)
    reply = client.post("/jobs", content=body, headers={"content-type": MULTIPART})
    assert_answered_sanely(reply)
    if reply.status_code == 400:
        assert reply.json()["detail"] in IMAGE_REFUSALS | FORM_REFUSALS


@st.composite
def mutated_image(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        where = draw(st.integers(0, len(data) - 1))
        operation = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if operation == "flip":
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif operation == "set":
            data[where] = draw(st.integers(0, 255))
        elif operation == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=16))
        elif operation == "delete":
            del data[where : where + draw(st.integers(1, 16))]
        else:
            del data[where:]
    return bytes(data)


@FUZZ
@given(data=mutated_image())
def test_mutated_images_are_accepted_or_refused_with_an_image_sentence(
    client: TestClient, data: bytes
) -> None:
    reply = client.post("/jobs", files={"file": ("photo.png", data, "image/png")})
    assert_answered_sanely(reply)
    if reply.status_code != 202:
        assert reply.status_code == 400, reply.text
        assert reply.json()["detail"] in IMAGE_REFUSALS


@FUZZ
@given(k=st.text(max_size=12) | st.integers(-5, 60).map(str) | st.integers().map(str))
def test_arbitrary_k_in_the_query_is_a_number_or_bad_k(client: TestClient, k: str) -> None:
    reply = client.post(
        "/jobs", files={"file": ("a.png", SEEDS["PNG"], "image/png")}, params={"k": k}
    )
    assert_answered_sanely(reply)
    if reply.status_code == 202:
        assert 1 <= reply.json()["k"] <= 50
    else:
        assert (reply.status_code, reply.json()["detail"]) == (422, BAD_K)


@FUZZ
@given(k=st.text(max_size=12) | st.integers(-5, 60).map(str) | st.integers().map(str))
@example(k="²")
@example(k="9" * 5000)
def test_arbitrary_k_in_the_form_is_a_number_or_bad_k(client: TestClient, k: str) -> None:
    reply = client.post(
        "/jobs", files={"file": ("a.png", SEEDS["PNG"], "image/png")}, data={"k": k}
    )
    assert_answered_sanely(reply)
    if reply.status_code == 202:
        assert 1 <= reply.json()["k"] <= 50
    else:
        assert (reply.status_code, reply.json()["detail"]) in {(422, BAD_K), (400, MALFORMED)}


PIECES = [
    b"--" + BOUNDARY,
    b"--" + BOUNDARY + b"--",
    b"\r\n",
    b'Content-Disposition: form-data; name="file"; filename="a.png"',
    b'Content-Disposition: form-data; name="k"',
    b'Content-Disposition: form-data; name="other"; filename="b.png"',
    b"Content-Disposition: form-data",
    b"Content-Type: image/png",
    b"Content-Type: text/plain; charset=nonsense",
    b"X-Junk: " + b"a" * 5000,
    b"5",
    SEEDS["PNG"],
    SEEDS["JPEG"][:40],
]
CONTENT_TYPES = [
    b"multipart/form-data; boundary=" + BOUNDARY,
    b'multipart/form-data; boundary="' + BOUNDARY + b'"',
    b"multipart/form-data; boundary=" + BOUNDARY + b"; charset=nonsense",
    b"multipart/form-data",
    b"multipart/form-data; boundary=",
    b"multipart/form-data; boundary=" + b"x" * 300,
    b"application/x-www-form-urlencoded",
    b"text/plain",
    b"image/png",
]


@st.composite
def form_parts(draw: st.DrawFn) -> list[bytes]:
    """Parts that are mostly well formed, so that the parser gets past the first line."""
    pieces: list[bytes] = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from([b"file", b"k", b"other", b"", b'fi"le']))
        head = b'Content-Disposition: form-data; name="' + name + b'"'
        if draw(st.booleans()):
            head += b'; filename="' + draw(st.binary(max_size=12)) + b'"'
        value = draw(st.sampled_from([SEEDS["PNG"], SEEDS["GIF"], b"7", b""]) | st.binary())
        pieces += [b"--" + BOUNDARY + b"\r\n", head, b"\r\n\r\n", value, b"\r\n"]
    pieces.append(b"--" + BOUNDARY + b"--\r\n")
    for _ in range(draw(st.integers(0, 2))):  # a little damage here and there
        pieces.insert(draw(st.integers(0, len(pieces))), draw(st.sampled_from(PIECES)))
    return pieces


@FUZZ
@given(
    pieces=form_parts() | st.lists(st.sampled_from(PIECES) | st.binary(max_size=64), max_size=24),
    content_type=st.sampled_from(CONTENT_TYPES)
    | printable_latin1.map(lambda text: text.encode("latin-1")),
)
def test_multipart_ish_bodies_never_cause_a_server_error(
    client: TestClient, pieces: list[bytes], content_type: bytes
) -> None:
    reply = client.post("/jobs", content=b"".join(pieces), headers={"content-type": content_type})
    assert_answered_sanely(reply)
    assert reply.json().get("detail") not in (TOO_LARGE, TOO_SLOW)
