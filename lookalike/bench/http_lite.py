"""A small HTTP/1.1 client on asyncio streams, for ``lookalike bench``.

The benchmark runs beside the service it measures (on a 2-core machine, on the same cores):
every millisecond of CPU the client spends per request is taken from the service. A general
client (httpx: h11, anyio, multipart encoding per request) costs several milliseconds per job;
this one sends prepared bytes on kept-alive connections and parses only what the benchmark
reads (status, headers, a Content-Length or chunked body), well under one. Measured on the
same 600 jobs at concurrency 32 (``python -m lookalike.bench.clients``, 2 cores): httpx
8.3-8.7 ms of client CPU per job and 106 jobs/s seen, this client 0.36-0.43 ms and 258-320
jobs/s. Like ``wrk``, it is a load generator, not a general client.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from shared.errors import HttpError


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def multipart(field: str, filename: str, content_type: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with one file, and its Content-Type header."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
        f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), (
        f"multipart/form-data; boundary={boundary}"
    )


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class HttpClient:
    """Kept-alive connections to one origin, at most ``limit`` open at once."""

    def __init__(self, url: str, *, limit: int, headers: dict[str, str] | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.base_path = parts.path.rstrip("/")
        host_header = parts.netloc
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self._common = f"Host: {host_header}\r\n{extra}".encode()
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(limit)

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        content_type: str | None = None,
        timeout: float = 60.0,
    ) -> Reply:
        """Send one request and read its reply; :class:`HttpError` when the connection fails."""
        head = f"{method} {self.base_path}{path} HTTP/1.1\r\n".encode() + self._common
        if content_type is not None:
            head += f"Content-Type: {content_type}\r\n".encode()
        if body or method in ("POST", "PUT", "PATCH"):
            head += f"Content-Length: {len(body)}\r\n".encode()
        message = head + b"\r\n" + body
        async with self._slots:
            for attempt in (1, 2):
                # A retry opens a new connection: the other idle ones may be as stale (a
                # server closes all its idle keep-alive connections at once after a pause).
                from_pool = bool(self._idle) and attempt == 1
                connection = self._idle.pop() if from_pool else await self._open()
                try:
                    exchange = self._exchange(connection, message)
                    reply, keep = await asyncio.wait_for(exchange, timeout)
                except (OSError, asyncio.IncompleteReadError, HttpError, TimeoutError) as error:
                    connection.close()
                    # A kept-alive connection the server had closed: send again on a new one.
                    stale = isinstance(error, asyncio.IncompleteReadError) and not error.partial
                    if from_pool and attempt == 1 and (stale or isinstance(error, ConnectionError)):
                        continue
                    raise HttpError(f"{type(error).__name__}: {error}") from error
                if keep:
                    self._idle.append(connection)
                else:
                    connection.close()
                return reply
        raise HttpError("the connection was closed twice")

    async def _open(self) -> _Connection:
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl)
        except OSError as error:
            raise HttpError(f"ConnectError: {error}") from error
        return _Connection(reader, writer)

    async def _exchange(self, connection: _Connection, message: bytes) -> tuple[Reply, bool]:
        connection.writer.write(message)
        await connection.writer.drain()
        head = await connection.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise HttpError(f"not an HTTP reply: {lines[0][:80]!r}") from None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._chunked(connection.reader)
        else:
            body = await connection.reader.readexactly(int(headers.get("content-length", "0")))
        keep = headers.get("connection", "").lower() != "close"
        return Reply(status, headers, body), keep

    @staticmethod
    async def _chunked(reader: asyncio.StreamReader) -> bytes:
        chunks: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return b"".join(chunks)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)

    async def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()
