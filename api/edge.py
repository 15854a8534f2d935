"""Bound each connection at the edge of an API process, before the app sees a request.

``EdgeProtocol`` is uvicorn's httptools protocol (kept: it costs much less CPU per request
than h11) plus what uvicorn's options cannot say:

* **Head limits.** uvicorn's httptools protocol takes a request head of any size (its
  ``h11_max_incomplete_event_size`` is for h11 only) and any number of headers: an
  unterminated 32 MB header was buffered whole. Here a head is measured twice: the bytes fed
  to the parser, which is fed no more than the limit (an unterminated header is refused, not
  buffered), and the fields it parses (so a head measures the same however its bytes are
  split into reads or pipelined). Past a limit the request is answered 431 (414 for a URL).
* **A deadline for the head.** uvicorn's ``timeout_keep_alive`` only runs after a response:
  a connection that never sends a byte, or trickles its headers, was held forever. Here a
  connection has ``LOOKALIKE_HEADER_TIMEOUT`` seconds from its opening to send a complete head
  (after a response, the longer of that and the keep-alive timeout, so that a keep-alive
  timeout set long for a load balancer is honoured). Silent connections are closed; one that
  sent part of a head gets a 408.
* **A JSON refusal at the connection cap.** ``limit_concurrency`` answers plain text
  "Service Unavailable"; here the same refusal is ``{"detail": ...}`` with ``Retry-After``.

Refusals are written with ``Connection: close``, then the connection half-closes and reads
(and drops) what the client still sends for ``LINGER_S`` seconds, as nginx's lingering close
does: closing with unread data would reset the connection, and the client could lose the reply.

This reaches into uvicorn's private parts (``_start_asgi_task``,
``_unset_keepalive_if_required``, ``pipeline``, ``cycle``, ``url``, ``headers``, the parser
callbacks); tests/api/test_edge.py holds the behaviour it adds against uvicorn 0.54.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import resource
from typing import Any

import httptools
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from api.limits import human_size
from shared.errors import HeadRefused
from shared.settings import ApiSettings

log = logging.getLogger(__name__)

# nginx reads a head into 4 buffers of 8 kB (large_client_header_buffers): a request line
# over 8 kB is a 414 there, a head over 32 kB a 400. Taking as much as nginx means nothing a
# proxy in front lets through is refused here; 32 kB x 4096 connections bounds the heads held.
MAX_HEAD_BYTES = 32 * 1024
MAX_URL_BYTES = 8 * 1024
# gunicorn's limit_request_fields; browsers send 10-20, curl 3.
MAX_HEADERS = 100
# Time to deliver a refusal before the connection is closed even if the client still sends.
LINGER_S = 2.0
RETRY_AFTER_S = 5  # as the app's own 503s: idle keep-alive connections are gone by then
# Files besides the connections: Redis pools, logs, the listening socket, and connections
# past the cap, which stay open until their head is read and refused.
FD_HEADROOM = 1024

HEAD_TOO_LARGE = f"The request headers are larger than {human_size(MAX_HEAD_BYTES)}."
TOO_MANY_HEADERS = f"The request has more than {MAX_HEADERS} header fields."
URL_TOO_LONG = f"The request URL is longer than {human_size(MAX_URL_BYTES)}."
HEAD_TOO_SLOW = "The request headers were too slow to arrive."
TOO_MANY_CONNECTIONS = "The server has too many connections; retry later."


def _json(detail: str) -> bytes:
    return json.dumps({"detail": detail}, separators=(",", ":")).encode()


async def refuse_busy(scope: Scope, receive: Receive, send: Send) -> None:
    """ASGI app answering a request past the connection cap (uvicorn's plain one, in JSON)."""
    body = _json(TOO_MANY_CONNECTIONS)
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(RETRY_AFTER_S).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


class EdgeProtocol(HttpToolsProtocol):  # type: ignore[misc]
    """uvicorn's httptools protocol with head limits, a head deadline and a JSON 503."""

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        head_timeout_s: float,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.head_timeout_s = head_timeout_s
        # When the awaited head must be complete (None: none awaited), and the timer that
        # checks it. A response only moves the time: the timer, armed at most once per
        # head timeout, re-arms itself for a later one instead of being replaced per request.
        self.head_due: float | None = None
        self.head_timer: asyncio.TimerHandle | None = None
        self.in_head = True  # the next bytes the parser reads belong to a request head
        self.head_room = MAX_HEAD_BYTES  # how many more bytes the current head may be fed
        self.fields_bytes = 0  # the size of the header fields parsed of the current head
        self.heads_done = 0  # heads parsed on this connection
        self.refused = False  # a refusal was written: what arrives now is dropped
        self.linger: asyncio.TimerHandle | None = None

    # The connection

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._await_head(self.head_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.head_timer, self.linger):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        self._unset_keepalive_if_required()
        while self.in_head and len(data) > self.head_room:
            # Feed only what the head may still take. If it ends in there, the rest is its
            # body or the next request; if not, it is refused without buffering more.
            part, data = data[: self.head_room], data[self.head_room :]
            self.head_room = 0
            done = self.heads_done
            if not self._feed(part):
                return
            if self.heads_done == done:
                self._refuse(HeadRefused(431, HEAD_TOO_LARGE))
                return
        if self.in_head:
            self.head_room -= len(data)
        # A head that starts in a read after the end of a body or of another head is charged
        # from the next read on: what the parser holds of it is bounded by the limit plus one
        # read. The exact limit is checked on the fields themselves (``on_header``).
        self._feed(data)

    def _feed(self, data: bytes) -> bool:
        """Parse ``data`` as uvicorn does; False when the connection is done with."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            refusal = error.__context__
            if isinstance(refusal, HeadRefused):
                self._refuse(refusal)
                return False
            message = "Invalid HTTP request received."
            self.logger.warning(message)
            self.send_400_response(message)
            return False
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False
        return True

    # Parser callbacks: a limit broken inside one is raised through the parser to ``_feed``

    def on_url(self, url: bytes) -> None:
        if len(self.url) + len(url) > MAX_URL_BYTES:
            raise HeadRefused(414, URL_TOO_LONG)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= MAX_HEADERS:
            raise HeadRefused(431, TOO_MANY_HEADERS)
        self.fields_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if len(self.url) + self.fields_bytes > MAX_HEAD_BYTES:
            raise HeadRefused(431, HEAD_TOO_LARGE)
        # uvicorn's on_header, inlined: it runs for every header of every request.
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.heads_done += 1
        self.in_head = False
        self.head_due = None
        self.fields_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.in_head = True
        self.head_room = MAX_HEAD_BYTES
        super().on_message_complete()

    def on_response_complete(self) -> None:
        queued = bool(self.pipeline)  # a pipelined request whose head is already in
        super().on_response_complete()
        if not queued and not self.refused and not self.transport.is_closing():
            self._await_head(max(self.head_timeout_s, self.timeout_keep_alive))

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if app is service_unavailable:  # uvicorn's answer past limit_concurrency
            app = refuse_busy
        super()._start_asgi_task(cycle, app)

    # Deadlines and refusals

    def _await_head(self, seconds: float) -> None:
        self.head_due = self.loop.time() + seconds
        if self.head_timer is None:
            self.head_timer = self.loop.call_at(self.head_due, self._check_head)

    def _check_head(self) -> None:
        self.head_timer = None
        due = self.head_due
        if due is None or self.transport.is_closing():
            return  # the head came (the next response will await another)
        if self.loop.time() < due:  # a response since: the head is due later
            self.head_timer = self.loop.call_at(due, self._check_head)
            return
        self.head_due = None
        if self.in_head and self.head_room < MAX_HEAD_BYTES:
            self._refuse(HeadRefused(408, HEAD_TOO_SLOW))
        else:
            self.transport.close()  # no head begun: no one to answer

    def _refuse(self, refusal: HeadRefused) -> None:
        """Answer ``refusal`` and close, without letting the parser read any further."""
        self.refused = True
        self.head_due = None
        where = "{}:{}".format(*self.client) if self.client else "a client"
        log.info("refused a request from %s: %s", where, refusal.detail)
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head broke a limit while earlier requests are still answered: close
            # after them (as uvicorn's shutdown does) rather than write into their responses.
            self.cycle.keep_alive = False
            return
        body = _json(refusal.detail)
        content = [STATUS_LINE[refusal.status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.append(b"content-type: application/json\r\n")
        content.append(b"content-length: %d\r\n" % len(body))
        content.append(b"connection: close\r\n\r\n")
        content.append(body)
        self.transport.write(b"".join(content))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.linger = self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


def uvicorn_limits(settings: ApiSettings) -> dict[str, Any]:
    """Keyword arguments of ``uvicorn.run`` that put these limits on each API process."""
    return {
        "http": functools.partial(EdgeProtocol, head_timeout_s=settings.header_timeout_s),
        # uvicorn counts the connection being answered too: N + 1 serves N at once.
        "limit_concurrency": settings.max_connections + 1,
        "timeout_keep_alive": settings.keepalive_timeout_s,
    }


def raise_open_files_limit(*, connections: int) -> str | None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit if ``connections`` need more.

    Worker processes started afterwards inherit it. Returns a warning sentence when even the
    hard limit is too low, None otherwise.
    """
    needed = connections + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    target = needed if hard == resource.RLIM_INFINITY else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as error:
        return f"cannot raise the open files limit from {soft} to {target}: {error}"
    if target < needed:
        return (
            f"LOOKALIKE_MAX_CONNECTIONS={connections} needs about {needed} open files, but the "
            f"API may open only {target} (ulimit -Hn): raise it or lower the setting"
        )
    return None
