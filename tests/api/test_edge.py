"""The edge of a real API process (api/edge.py): head limits, the head deadline, keep-alive and
the connection cap, probed over raw sockets as a client (or an attacker) would.

One ``lookalike api`` process (with Redis, no worker) runs under short limits for the module.
"""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from api.edge import (
    HEAD_TOO_LARGE,
    HEAD_TOO_SLOW,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_HEADERS,
    URL_TOO_LONG,
)
from lookalike.stack import Stack, stack_env
from shared.errors import ConfigError
from shared.settings import load_settings

HEADER_TIMEOUT_S = 2.0
KEEPALIVE_S = 0.5
MAX_CONNECTIONS = 20
LOW_OPEN_FILES = 512  # a low soft limit, as many hosts set (1024), to see the API raise it

GET = b"GET /healthz HTTP/1.1\r\nHost: edge\r\n\r\n"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("edge")
    env = stack_env(model_dir=Path("unused"), data_dir=workdir, workdir=workdir, gallery_size=10)
    env.update(
        LOOKALIKE_HEADER_TIMEOUT=str(HEADER_TIMEOUT_S),
        LOOKALIKE_KEEPALIVE_TIMEOUT=str(KEEPALIVE_S),
        LOOKALIKE_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
    )
    stack = Stack(env=env, workdir=workdir)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, LOW_OPEN_FILES), hard))
    try:
        stack.start(workers=0)  # the processes inherit the low limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    yield stack
    stack.stop()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def detail(self) -> object:
        return json.loads(self.body)["detail"]


class Client:
    """A raw connection to the API that reads its replies one by one."""

    def __init__(self, api: Stack) -> None:
        self.sock = socket.create_connection(("127.0.0.1", api.api_port), timeout=10)
        self.unread = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def reply(self) -> Reply:
        """The next HTTP response (with a Content-Length)."""
        while b"\r\n\r\n" not in self.unread:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"the connection closed before a reply: {self.unread!r}")
            self.unread += chunk
        head, self.unread = self.unread.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
        length = int(headers["content-length"])
        while len(self.unread) < length:
            chunk = self.sock.recv(65536)
            assert chunk, "the connection closed in the middle of a reply"
            self.unread += chunk
        body, self.unread = self.unread[:length], self.unread[length:]
        return Reply(int(status_line.split()[1]), headers, body)

    def rest_until_closed(self, *, within: float) -> tuple[bytes, float]:
        """What the server still sends before it closes the connection, and when it closed
        (seconds from now); fails if it is still open ``within`` seconds from now."""
        start = time.monotonic()
        self.sock.settimeout(within)
        rest, self.unread = self.unread, b""
        try:
            while chunk := self.sock.recv(65536):
                rest += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(f"the connection was still open after {within}s") from None
        return rest, time.monotonic() - start


def send_in_background(sock: socket.socket, data: bytes) -> threading.Thread:
    """Send ``data`` from a thread (the server may stop reading, or close, on the way)."""

    def send() -> None:
        with contextlib.suppress(OSError):  # refused and closed before the client was done
            sock.sendall(data)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    return sender


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def server_connections(port: int) -> int:
    """Established TCP connections whose local end is ``port`` (the server's side)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
            count += 1
    return count


def wait_until(condition: object, *, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"not true after {timeout}s")


def assert_serves(api: Stack) -> None:
    assert httpx.get(f"{api.url}/healthz", timeout=10).status_code == 200


def assert_refusal(reply: Reply, status: int, detail: str) -> None:
    assert reply.status == status, reply.body
    assert reply.detail == detail
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["connection"] == "close"


def test_a_1mb_header_is_431_but_a_body_is_not_counted_as_head(api: Stack) -> None:
    with Client(api) as client:
        big = b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
        send_in_background(client.sock, big)
        assert_refusal(client.reply(), 431, HEAD_TOO_LARGE)
        assert client.rest_until_closed(within=5)[0] == b""
    with Client(api) as client:  # a large cookie is still a head we take
        client.sock.sendall(b"GET /healthz HTTP/1.1\r\nCookie: " + b"c" * 20_000 + b"\r\n\r\n")
        assert client.reply().status == 200
    with Client(api) as client:  # a small head and a large body arrive in the same reads
        body = b"b" * 300_000
        client.sock.sendall(b"GET /healthz HTTP/1.1\r\nContent-Length: 300000\r\n\r\n" + body)
        assert client.reply().status == 200
    assert_serves(api)


def test_10000_headers_are_431(api: Stack) -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))
    with Client(api) as client:
        send_in_background(client.sock, b"GET /healthz HTTP/1.1\r\n" + headers + b"\r\n")
        assert_refusal(client.reply(), 431, TOO_MANY_HEADERS)
    assert_serves(api)


def test_a_url_over_8kb_is_414(api: Stack) -> None:
    with Client(api) as client:
        client.sock.sendall(b"GET /healthz?q=" + b"q" * 9000 + b" HTTP/1.1\r\nHost: edge\r\n\r\n")
        assert_refusal(client.reply(), 414, URL_TOO_LONG)
    assert_serves(api)


def test_unterminated_32mb_headers_are_refused_without_being_buffered(api: Stack) -> None:
    assert api.api is not None
    before = rss_bytes(api.api.pid)
    head = b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * (32 << 20)  # never ends
    clients = [Client(api) for _ in range(8)]
    senders = [send_in_background(client.sock, head) for client in clients]
    for sender in senders:
        sender.join(30)
    growth = rss_bytes(api.api.pid) - before
    for client in clients:
        with client:
            rest, _ = client.rest_until_closed(within=5)
        assert rest == b"" or rest.startswith(b"HTTP/1.1 431 ")  # a reset may eat the reply
    print(f"\n8 unterminated 32 MB headers: the API grew by {growth / (1 << 20):.1f} MB")
    assert growth < 8 << 20, f"the API grew by {growth >> 20} MB"
    assert_serves(api)


def test_a_silent_connection_is_closed_at_the_head_deadline(api: Stack) -> None:
    with Client(api) as client:
        rest, closed_after = client.rest_until_closed(within=HEADER_TIMEOUT_S + 1.5)
    assert rest == b""  # nothing was asked: nothing is answered
    print(f"\na silent connection closed after {closed_after:.1f} s")
    assert closed_after > HEADER_TIMEOUT_S - 0.3
    assert_serves(api)


def test_a_trickled_header_gets_408_at_the_head_deadline(api: Stack) -> None:
    stop = threading.Event()
    with Client(api) as client:

        def trickle() -> None:
            for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"s" * 1000:
                if stop.wait(0.2):
                    return
                try:
                    client.sock.send(bytes([byte]))
                except OSError:
                    return

        start = time.monotonic()
        threading.Thread(target=trickle, daemon=True).start()
        try:
            client.sock.settimeout(HEADER_TIMEOUT_S + 1.5)
            assert_refusal(client.reply(), 408, HEAD_TOO_SLOW)
            assert client.rest_until_closed(within=1)[0] == b""
            closed_after = time.monotonic() - start
        finally:
            stop.set()
    assert HEADER_TIMEOUT_S - 0.3 < closed_after < HEADER_TIMEOUT_S + 1.5
    assert_serves(api)


def test_an_idle_keepalive_connection_is_closed_after_the_keepalive_timeout(api: Stack) -> None:
    with Client(api) as client:
        client.sock.sendall(GET)
        assert client.reply().status == 200
        time.sleep(KEEPALIVE_S / 2)
        client.sock.sendall(GET)  # kept alive: the same connection serves a second request
        assert client.reply().status == 200
        rest, closed_after = client.rest_until_closed(within=HEADER_TIMEOUT_S)
    assert rest == b""
    assert KEEPALIVE_S - 0.1 < closed_after < KEEPALIVE_S + 1.0  # the keep-alive, not the head
    assert_serves(api)


def test_pipelined_requests_are_answered_before_an_oversized_head_closes(api: Stack) -> None:
    oversized = b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"
    with Client(api) as client:
        client.sock.sendall(GET + GET + oversized)
        statuses = [client.reply().status, client.reply().status]
        rest, _ = client.rest_until_closed(within=5)
    assert statuses == [200, 200]
    # The refusal is written if the earlier replies were done when the head was read.
    assert rest == b"" or rest.startswith(b"HTTP/1.1 431 ")
    assert_serves(api)


def test_past_the_connection_cap_a_request_gets_a_json_503(api: Stack) -> None:
    wait_until(lambda: server_connections(api.api_port) == 0)
    idle = [Client(api) for _ in range(MAX_CONNECTIONS - 1)]
    try:
        wait_until(lambda: server_connections(api.api_port) == MAX_CONNECTIONS - 1)
        with Client(api) as client:  # the last one the cap allows
            client.sock.sendall(GET)
            assert client.reply().status == 200
        idle.append(Client(api))
        with Client(api) as client:
            client.sock.sendall(GET)
            reply = client.reply()
        assert_refusal(reply, 503, TOO_MANY_CONNECTIONS)
        assert reply.headers["retry-after"] == "5"
    finally:
        for client in idle:
            client.sock.close()
    wait_until(lambda: httpx.get(f"{api.url}/healthz", timeout=10).status_code == 200)


def test_the_api_raises_its_open_files_limit_to_the_hard_one(api: Stack) -> None:
    assert api.api is not None
    limits = Path(f"/proc/{api.api.pid}/limits").read_text().splitlines()
    soft, hard = next(line for line in limits if line.startswith("Max open files")).split()[3:5]
    assert soft == hard


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LOOKALIKE_MAX_CONNECTIONS", "0"),
        ("LOOKALIKE_HEADER_TIMEOUT", "0"),
        ("LOOKALIKE_KEEPALIVE_TIMEOUT", "-1"),
    ],
)
def test_nonsense_edge_settings_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=f"{variable}={value}"):
        load_settings()
