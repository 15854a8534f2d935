"""Cap request bodies while they are read, not after.

A declared ``Content-Length`` over the cap is refused before a byte of the body is read; a
body without one (chunked) is counted as it streams and refused as soon as it passes the cap.
A body that takes longer than the deadline to arrive (a client trickling bytes) gets a 408.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import BodyRefused

TOO_LARGE = "The upload is larger than the {limit} limit."
TOO_LARGE_BATCH = "The upload is larger than {count} files of the {limit} limit."
TOO_SLOW = "The upload was too slow to arrive."


def human_size(size: int) -> str:
    if size % (1024 * 1024) == 0:
        return f"{size // (1024 * 1024)} MB"
    if size % 1024 == 0:
        return f"{size // 1024} kB"
    return f"{size} bytes"


class BodySizeLimit:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        max_files: dict[str, int] | None = None,
        timeout_s: float = 60.0,
        on_refuse: Callable[[int], object] | None = None,
    ) -> None:
        self.app = app
        self.on_refuse = on_refuse  # counts the refusals (metrics)
        self.max_bytes = max_bytes
        # Multipart framing and a small form field or two ride on top of the file itself.
        self.max_body = max_bytes + 64 * 1024
        # Paths that take several files (POST /jobs/batch) take as many times the cap.
        self.max_bodies = {
            path: count * max_bytes + 64 * 1024 for path, count in (max_files or {}).items()
        }
        self.timeout_s = timeout_s
        self.too_large = BodyRefused(413, TOO_LARGE.format(limit=human_size(max_bytes)))
        self.batch_too_large = {
            path: BodyRefused(413, TOO_LARGE_BATCH.format(count=count, limit=human_size(max_bytes)))
            for path, count in (max_files or {}).items()
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        max_body = self.max_bodies.get(path, self.max_body)
        too_large = self.batch_too_large.get(path, self.too_large)
        declared = _content_length(scope)
        if declared is not None and declared > max_body:
            await self._refuse(send, too_large)
            return
        received = 0
        refused: BodyRefused | None = None
        started = False
        deadline = asyncio.get_running_loop().time() + self.timeout_s

        async def counted_receive() -> Message:
            nonlocal received, refused
            try:
                async with asyncio.timeout_at(deadline):  # (wait_for: a task per call)
                    message = await receive()
            except TimeoutError:
                refused = BodyRefused(408, TOO_SLOW)
                raise refused from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_body:
                    refused = too_large
                    raise refused
            return message

        async def guarded_send(message: Message) -> None:
            # The app may answer its own error once the body read failed: ours replaces it.
            nonlocal started
            if refused is not None:
                if not started:
                    started = True
                    await self._refuse(send, refused)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyRefused as error:
            if not started:
                await self._refuse(send, error)

    async def _refuse(self, send: Send, refusal: BodyRefused) -> None:
        if self.on_refuse is not None:
            self.on_refuse(refusal.status)
        body = json.dumps({"detail": refusal.detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": refusal.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
