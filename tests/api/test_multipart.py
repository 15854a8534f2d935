"""api.multipart against Starlette's own form parser: why lookalike reads multipart itself.

Each case runs the same body through Starlette's ``request.form(max_files=, max_fields=,
max_part_size=)`` (in a bare Starlette app) and through ``api.multipart.read_multipart``: the
first shows what Starlette does, the second what an image upload needs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from api.multipart import MAX_HEADER_BYTES, Form, read_multipart
from shared.errors import FileTooLarge, MultipartRefused

BOUNDARY = "b0undary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
FILE_LIMIT = 64 * 1024
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 100


def part(disposition: str, data: bytes) -> bytes:
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"


def body(*parts: bytes, closed: bool = True) -> bytes:
    return b"".join(parts) + (f"--{BOUNDARY}--\r\n".encode() if closed else b"")


async def starlette_form(request: Request) -> JSONResponse:
    async with request.form(max_files=16, max_fields=16, max_part_size=16 * 1024) as form:
        files = [
            {"field": key, "size": len(await value.read())}
            for key, value in form.multi_items()
            if not isinstance(value, str)
        ]
        fields = [key for key, value in form.multi_items() if isinstance(value, str)]
    return JSONResponse({"files": files, "fields": fields})


@pytest.fixture(scope="module")
def starlette() -> TestClient:
    return TestClient(Starlette(routes=[Route("/", starlette_form, methods=["POST"])]))


def ours(raw: bytes, *, max_files: int = 16) -> Form:
    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, len(raw), 4096):  # as a server hands the body over: in pieces
            yield raw[start : start + 4096]

    return asyncio.run(
        read_multipart(
            CONTENT_TYPE,
            stream(),
            max_files=max_files,
            max_fields=16,
            max_field_bytes=16 * 1024,
            max_file_bytes=FILE_LIMIT,
        )
    )


def test_a_long_filename_is_refused_by_starlette_and_read_here(starlette: TestClient) -> None:
    raw = body(part(f'form-data; name="file"; filename="{"n" * 10_000}.png"', PNG))
    assert (
        starlette.post("/", content=raw, headers={"content-type": CONTENT_TYPE}).status_code == 400
    )
    form = ours(raw)
    assert [len(f.read()) for f in form.files] == [len(PNG)]
    assert MAX_HEADER_BYTES > 10_000


def test_an_oversized_file_is_read_whole_by_starlette_and_refused_here_while_it_arrives(
    starlette: TestClient,
) -> None:
    large = b"x" * (4 * FILE_LIMIT)
    raw = body(part('form-data; name="file"; filename="a.png"', large))
    reply = starlette.post("/", content=raw, headers={"content-type": CONTENT_TYPE})
    assert reply.status_code == 200  # max_part_size bounds text fields only
    assert reply.json()["files"] == [{"field": "file", "size": len(large)}]
    with pytest.raises(FileTooLarge) as refused:
        ours(raw)
    assert refused.value.number == 1


def test_the_second_file_of_a_batch_is_named_when_it_is_too_large() -> None:
    raw = body(
        part('form-data; name="file"; filename="a.png"', PNG),
        part('form-data; name="file"; filename="b.png"', b"x" * (FILE_LIMIT + 1)),
    )
    with pytest.raises(FileTooLarge) as refused:
        ours(raw)
    assert refused.value.number == 2


def test_a_body_cut_before_its_closing_boundary_is_accepted_by_starlette_and_refused_here(
    starlette: TestClient,
) -> None:
    raw = body(part('form-data; name="file"; filename="a.png"', PNG), closed=False)
    assert (
        starlette.post("/", content=raw, headers={"content-type": CONTENT_TYPE}).status_code == 200
    )
    with pytest.raises(MultipartRefused) as refused:
        ours(raw)
    assert refused.value.kind == "unterminated"


def test_a_part_named_only_with_filename_star_is_a_field_to_starlette_and_a_file_here(
    starlette: TestClient,
) -> None:
    raw = body(part("form-data; name=\"file\"; filename*=UTF-8''x%C3%A9.png", PNG))
    reply = starlette.post("/", content=raw, headers={"content-type": CONTENT_TYPE})
    assert reply.json() == {"files": [], "fields": ["file"]}
    form = ours(raw)
    assert [(f.field, f.read()) for f in form.files] == [("file", PNG)]
    assert form.fields == []


def test_too_many_files_stop_the_reading() -> None:
    raw = body(*(part(f'form-data; name="file"; filename="{i}.png"', PNG) for i in range(3)))
    with pytest.raises(MultipartRefused) as refused:
        ours(raw, max_files=2)
    assert refused.value.kind == "too_many_files"
