"""A multipart/form-data reader with the limits an image upload needs, on python-multipart.

Starlette's ``request.form(max_files=, max_fields=, max_part_size=)`` parses with the same
python-multipart parser, but cannot serve here; tests/api/test_multipart.py shows each point
against Starlette itself:

* it keeps python-multipart's cap of about 4 kB on a part's header line, so a legal upload with
  a long filename (10 kB) is refused; this reader allows ``MAX_HEADER_BYTES`` (the name is never
  used: uploads are stored under the server's id);
* its ``max_part_size`` bounds text fields only: a file part is spooled to disk whatever its
  size, so an oversized file in a batch is only refused after the whole body arrived. Here each
  file is refused (``file_too_large``, with its number) as soon as it passes ``max_file_bytes``;
* it accepts a body that ends without its closing delimiter (a truncated upload); here that is
  ``malformed``;
* it reads a part named only with ``filename*=`` (RFC 5987 encoding, which RFC 7578 tells
  senders not to use, but some send) as a text field; here it is a file, as its sender meant.

The other guards stay: a few headers per part, a few small fields, a bounded number of files
(the body itself is capped by api.limits.BodySizeLimit while it arrives). File contents go to
spooled temporary files, in memory up to 1 MB each.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from tempfile import SpooledTemporaryFile

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from shared.errors import FileTooLarge, MultipartRefused

MAX_HEADER_BYTES = 16 * 1024 + 128
MAX_HEADERS = 8
SPOOL_BYTES = 1024 * 1024
_EXTENDED_FILENAME = re.compile(rb"(?:^|;)\s*filename\*\s*=", re.IGNORECASE)


@dataclass
class FilePart:
    field: str
    filename: str
    content: SpooledTemporaryFile[bytes]
    size: int = 0

    def read(self) -> bytes:
        self.content.seek(0)
        return self.content.read()


@dataclass
class Form:
    fields: list[tuple[str, str]] = field(default_factory=list)
    files: list[FilePart] = field(default_factory=list)

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.fields if key == name]

    def close(self) -> None:
        for part in self.files:
            part.content.close()


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class _Reader:
    def __init__(
        self, *, max_files: int, max_fields: int, max_field_bytes: int, max_file_bytes: int
    ) -> None:
        self.max_files = max_files
        self.max_fields = max_fields
        self.max_field_bytes = max_field_bytes
        self.max_file_bytes = max_file_bytes
        self.form = Form()
        self.ended = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._data = bytearray()
        self._file: FilePart | None = None

    def on_part_begin(self) -> None:
        self._disposition, self._data, self._file = b"", bytearray(), None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise MultipartRefused("malformed")
        name = _decode(options[b"name"])
        if b"filename" in options or _EXTENDED_FILENAME.search(self._disposition):
            if len(self.form.files) >= self.max_files:
                raise MultipartRefused("too_many_files")
            # closed by Form.close(), whatever happens to the request
            content: SpooledTemporaryFile[bytes] = SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115
            filename = _decode(options.get(b"filename", b""))
            self._file = FilePart(name, filename, content)
            self.form.files.append(self._file)
        else:
            if len(self.form.fields) >= self.max_fields:
                raise MultipartRefused("too_many_fields")
            self.form.fields.append((name, ""))

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.size += end - start
            if self._file.size > self.max_file_bytes:
                raise FileTooLarge(len(self.form.files))
            self._file.content.write(data[start:end])
            return
        self._data += data[start:end]
        if len(self._data) > self.max_field_bytes:
            raise MultipartRefused("field_too_large")

    def on_part_end(self) -> None:
        if self._file is None and self.form.fields:
            name, _ = self.form.fields[-1]
            self.form.fields[-1] = (name, _decode(bytes(self._data)))

    def on_end(self) -> None:
        self.ended = True  # the closing delimiter was read


async def read_multipart(
    content_type: str,
    stream: AsyncIterator[bytes],
    *,
    max_files: int,
    max_fields: int,
    max_field_bytes: int,
    max_file_bytes: int,
) -> Form:
    """The fields and files of a multipart body; :class:`MultipartRefused` past a limit
    (:class:`FileTooLarge` for a file over ``max_file_bytes``, while it arrives)."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise MultipartRefused("malformed")
    reader = _Reader(
        max_files=max_files,
        max_fields=max_fields,
        max_field_bytes=max_field_bytes,
        max_file_bytes=max_file_bytes,
    )
    callbacks = {
        name: getattr(reader, name)
        for name in (
            "on_part_begin",
            "on_part_data",
            "on_part_end",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
            "on_end",
        )
    }
    try:
        parser = MultipartParser(
            boundary,
            callbacks,  # type: ignore[arg-type]
            max_header_count=MAX_HEADERS,
            max_header_size=MAX_HEADER_BYTES,
        )
        async for chunk in stream:
            parser.write(chunk)
        parser.finalize()
        if not reader.ended:
            raise MultipartRefused("unterminated")
    except FormParserError:
        reader.form.close()
        raise MultipartRefused("malformed") from None
    except BaseException:
        reader.form.close()
        raise
    return reader.form
