"""Every request's memory is bounded, whatever path it takes (real processes, real sockets, the
API's memory read from /proc).

* The result picture is drawn from what the job keeps (its pixels, or their small copy), never
  from a large original, and a few at a time: 100 concurrent pictures of the worst uploads the
  API accepts keep it under 1 GB.
* A batch's oversized file is refused while it arrives, not after the whole body did.
* A client that disconnects mid-upload costs one INFO line, not a traceback.
"""

from __future__ import annotations

import asyncio
import io
import re
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from lookalike.stack import Stack, stack_env
from tests.support import gallery_png, wait_job

pytestmark = pytest.mark.e2e

ONE_GB_KB = 1024 * 1024
CONCURRENT = 100


def rss_peak_kb(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def png_strip(width: int) -> bytes:
    """A 1-pixel-high grey PNG ``width`` wide: a few kB that decode to ``width`` bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, 1, 8, 0, 0, 0, 0)
    row = zlib.compress(b"\x00" + bytes(width), 9)
    return b"".join(
        [b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", header), chunk(b"IDAT", row), chunk(b"IEND", b"")]
    )


def noise_png(side: int) -> bytes:
    rng = np.random.default_rng(5)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_clip_dir: Path,
    fake_data_dir: Path,
    built_index: Path,
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("bounded")
    env = stack_env(
        model_dir=tiny_clip_dir, data_dir=fake_data_dir, workdir=workdir, gallery_size=120
    )
    env["LOOKALIKE_INDEX_DIR"] = str(built_index)
    running = Stack(env=env, workdir=workdir).start(workers=1)
    yield running
    running.stop()


async def get_all(url: str, paths: list[str]) -> list[int]:
    limits = httpx.Limits(max_connections=len(paths))
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        replies = await asyncio.gather(*(client.get(path) for path in paths))
    return [reply.status_code for reply in replies]


def test_pictures_of_the_worst_uploads_keep_the_api_under_a_gigabyte(stack: Stack) -> None:
    # The probe's upload: 48 kB of PNG that decodes to 50,000,000 pixels; and the largest
    # image whose pixels are kept as they are (just under twice CLIP's view, in both sides).
    uploads = [png_strip(50_000_000), noise_png(895)]
    assert len(uploads[0]) < 64 * 1024
    with httpx.Client(base_url=stack.url, timeout=120) as client:
        jobs = []
        for upload in uploads:
            reply = client.post("/jobs", files={"file": ("worst.png", upload, "image/png")})
            assert reply.status_code == 202, reply.text
            jobs.append(wait_job(client, reply.json()["id"], timeout=120))
    assert [job["status"] for job in jobs] == ["succeeded", "succeeded"]
    assert stack.api is not None
    paths = [f"/jobs/{jobs[i % 2]['id']}/grid.png" for i in range(CONCURRENT)]
    paths += [f"/gallery/{i}.png?size=1024" for i in range(CONCURRENT)]
    statuses = asyncio.run(get_all(stack.url, paths))
    assert set(statuses) == {200}
    peak = rss_peak_kb(stack.api.pid)
    print(f"\n{len(paths)} pictures of the worst uploads: API peak RSS {peak / 1024:.0f} MB")
    assert peak < ONE_GB_KB


def whole_response(reply: bytes) -> bool:
    """Whether ``reply`` holds a response's head and all the body its Content-Length says
    (the body may arrive in a later segment than the head)."""
    head, found, body = reply.partition(b"\r\n\r\n")
    if not found:
        return False
    lengths = re.findall(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    return len(body) >= int(lengths[0]) if lengths else True


def test_an_oversized_file_of_a_batch_is_refused_before_the_body_has_arrived(
    stack: Stack, fake_data_dir: Path
) -> None:
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        f"Content-Type: image/png\r\n\r\n"
    ).encode()
    total = 16 * 10 * 1024 * 1024  # what the batch route's body cap allows: 16 files of 10 MB
    request = (
        f"POST /jobs/batch HTTP/1.1\r\nHost: test\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {total}\r\n\r\n"
    ).encode()
    sent = 0
    with socket.create_connection(("127.0.0.1", stack.api_port), timeout=30) as sock:
        sock.sendall(request + head)
        sock.setblocking(False)
        block = b"\0" * 65536
        reply = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not whole_response(reply):
            try:
                reply += sock.recv(65536)
                continue
            except BlockingIOError:
                pass
            try:
                sent += sock.send(block)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                time.sleep(0.01)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"File 1: The upload is larger than the 10 MB limit." in reply
    assert sent < total // 4  # refused once file 1 passed 10 MB, long before 160 MB
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        files = {"file": ("ok.png", gallery_png(fake_data_dir, 2), "image/png")}
        assert client.post("/jobs/batch", files=files).status_code == 202


def test_a_client_that_disconnects_mid_upload_costs_one_info_line(stack: Stack) -> None:
    log = stack.workdir / "api.log"
    before = log.read_text(errors="replace")
    boundary = "b0undary"
    with socket.create_connection(("127.0.0.1", stack.api_port), timeout=10) as sock:
        sock.sendall(
            (
                f"POST /jobs HTTP/1.1\r\nHost: test\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                f"Content-Length: 100000\r\n\r\n--{boundary}\r\n"
                'Content-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
            ).encode()
            + b"\0" * 1000
        )
        time.sleep(0.5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        added = log.read_text(errors="replace")[len(before) :]
        if "disconnected" in added:
            break
        time.sleep(0.1)
    assert "the client disconnected during the upload" in added
    assert "Traceback" not in added and "Exception in ASGI application" not in added
