"""Reading a submission (image files or a text, ``k``, ``gallery``) with tight limits.

Parsing is done here rather than by FastAPI's ``File()`` so that every refusal is one of our
short sentences and the parser's limits fit an image upload (few files, a few small fields).
A text query may also come as JSON: ``{"text": "a red sneaker", "k": 5}``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from api.limits import TOO_LARGE, human_size
from api.multipart import Form, read_multipart
from shared import items
from shared.errors import FieldRefused, FileTooLarge, MultipartRefused
from shared.settings import GALLERY_NAME, MAX_K

log = logging.getLogger(__name__)

NO_FILE = (
    "The request has no 'file' or 'text' field: send an image as multipart/form-data, "
    "or a text query."
)
ONE_FILE = "Send exactly one file per job (POST /jobs/batch takes several)."
FILE_OR_TEXT = "Send either a file or a text, not both."
ONE_QUERY = "Send one of a file, a text or an item to search like."
BATCH_FILES = "Send 1 to {n} images, each in a 'file' field."
BATCH_NO_TEXT = "POST /jobs/batch takes image files only; send text and item queries to POST /jobs."
TOO_MANY_FIELDS = "The form has too many fields."
FIELD_TOO_LARGE = "A form field is too large."
MALFORMED = "The multipart body is malformed."
UNTERMINATED = "The multipart body ends before its closing boundary: the upload was cut short."
DISCONNECTED = "The client disconnected before the upload arrived."
CONFLICT = "{name} is given twice, with different values: in the query string and in the body."
BAD_JSON = "The JSON body is not an object with a 'text' (or an 'item') field."
ONCE = "{name} may be given once."
BAD_K = f"k must be a whole number from 1 to {MAX_K}."
BAD_WAIT = "wait must be a number of seconds, 0 or more."
BAD_TEXT = "text must be 1 to {n} characters."
BAD_GALLERY = "gallery must be a gallery name (see GET /galleries)."

MAX_FIELDS = 16
MAX_FIELD_BYTES = 16 * 1024
MAX_TEXT_CHARS = 1000

_FORM_PROPERTIES: dict[str, Any] = {
    "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 5},
    "gallery": {
        "type": "string",
        "pattern": f"^{GALLERY_NAME.pattern}$",
        "description": "A gallery name (default: the server's)",
    },
}
_TEXT: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_TEXT_CHARS,
    "pattern": r"\S",  # blank text is refused
    "description": "A text query (CLIP embeds text in the images' space)",
}

# The request bodies, for the OpenAPI schema (parsed by hand, see above).
UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "The image: JPEG, PNG, WebP, GIF, BMP or TIFF",
                        },
                        "text": {**_TEXT, "description": "A text query, instead of a file"},
                        **_FORM_PROPERTIES,
                    },
                    "oneOf": [{"required": ["file"]}, {"required": ["text"]}],
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["text"],
                    "properties": {
                        "text": _TEXT,
                        **_FORM_PROPERTIES,
                    },
                }
            },
        },
    }
}

BATCH_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "minItems": 1,
                            "description": "The images, one job each, in order (at most "
                            "LOOKALIKE_MAX_BATCH_FILES, 16 by default)",
                        },
                        **_FORM_PROPERTIES,
                    },
                }
            }
        },
    }
}


@dataclass(frozen=True)
class Submission:
    files: list[bytes]
    text: str | None
    k: int | None
    gallery: str | None
    item: str | None = None
    filter: dict[str, Any] | None = None
    min_score: float | None = None
    exclude: list[str] = field(default_factory=list)

    @property
    def options(self) -> dict[str, Any]:
        """What a search stores besides its query (shared.jobs.new_record)."""
        return {
            "item_id": self.item,
            "filter": self.filter,
            "min_score": self.min_score,
            "exclude": self.exclude,
        }


def _options(fields: dict[str, list[Any]]) -> dict[str, Any]:
    """The search options of a form: each field once, a JSON text for filter and exclude
    (exclude may also be repeated, one id each); refused with a sentence naming the field."""
    for name in ("item", "filter", "min_score"):
        if len(fields.get(name, [])) > 1:
            raise HTTPException(422, ONCE.format(name=name))
    excluded = fields.get("exclude", [])
    try:
        return {
            "item": items.item_id(fields["item"][0], refusal=items.BAD_ITEM)
            if fields.get("item")
            else None,
            "filter": items.filter_conditions(fields.get("filter", [None])[0]),
            "min_score": items.min_score(fields.get("min_score", [None])[0]),
            "exclude": items.exclude(excluded[0] if len(excluded) == 1 else excluded),
        }
    except FieldRefused as refused:
        raise HTTPException(422, str(refused)) from None


async def read_submission(
    request: Request,
    *,
    max_files: int,
    max_file_bytes: int,
    query_k: str | None = None,
    query_gallery: str | None = None,
) -> Submission:
    """The files, text, ``k`` and ``gallery`` of a request, or an HTTP refusal.

    ``k`` and ``gallery`` may come in the query string or in the body, parsed by the same
    rules; given in both with different values, they are refused.
    """
    try:
        submission = await _read_body(request, max_files=max_files, max_file_bytes=max_file_bytes)
    except ClientDisconnect:
        log.info(
            "%s %s: the client disconnected during the upload", request.method, request.url.path
        )
        raise HTTPException(400, DISCONNECTED) from None
    k = _parse_k([query_k]) if query_k is not None else None
    gallery = _parse_gallery([query_gallery]) if query_gallery is not None else None
    if k is not None and submission.k is not None and k != submission.k:
        raise HTTPException(422, CONFLICT.format(name="k"))
    if gallery is not None and submission.gallery is not None and gallery != submission.gallery:
        raise HTTPException(422, CONFLICT.format(name="gallery"))
    return dataclasses.replace(
        submission, k=k if k is not None else submission.k, gallery=gallery or submission.gallery
    )


async def _read_body(request: Request, *, max_files: int, max_file_bytes: int) -> Submission:
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/json":
        return await _read_json(request)
    if kind == "multipart/form-data":
        form = await _read_multipart(
            request, content_type, max_files=max_files, max_file_bytes=max_file_bytes
        )
        try:
            if any(part.field != "file" for part in form.files):
                raise HTTPException(400, _too_many_files(max_files))
            data = [part.read() for part in form.files]
        finally:
            form.close()
        fields: dict[str, list[Any]] = {}
        for name, value in form.fields:
            fields.setdefault(name, []).append(value)
    else:  # a urlencoded form (a text query), or nothing usable
        try:
            parsed = await request.form(max_files=0, max_fields=MAX_FIELDS)
        except StarletteHTTPException:
            raise HTTPException(400, MALFORMED) from None
        data = []
        fields = {key: parsed.getlist(key) for key in parsed}
    texts = [v for v in fields.get("text", []) if isinstance(v, str)]
    if len(texts) > 1:
        raise HTTPException(422, BAD_TEXT.format(n=MAX_TEXT_CHARS))
    return Submission(
        files=data,
        text=_parse_text(texts[0]) if texts else None,
        k=_parse_k(fields.get("k", [])),
        gallery=_parse_gallery(fields.get("gallery", [])),
        **_options(fields),
    )


async def _read_multipart(
    request: Request, content_type: str, *, max_files: int, max_file_bytes: int
) -> Form:
    try:
        return await read_multipart(
            content_type,
            request.stream(),
            max_files=max_files,
            max_fields=MAX_FIELDS,
            max_field_bytes=MAX_FIELD_BYTES,
            max_file_bytes=max_file_bytes,
        )
    except FileTooLarge as refused:  # refused while it arrives, the rest is never read
        detail = TOO_LARGE.format(limit=human_size(max_file_bytes))
        raise HTTPException(
            413, f"File {refused.number}: {detail}" if max_files > 1 else detail
        ) from None
    except MultipartRefused as refused:
        detail = {
            "too_many_files": _too_many_files(max_files),
            "too_many_fields": TOO_MANY_FIELDS,
            "field_too_large": FIELD_TOO_LARGE,
            "unterminated": UNTERMINATED,
        }.get(refused.kind, MALFORMED)
        raise HTTPException(400, detail) from None


def _too_many_files(max_files: int) -> str:
    return ONE_FILE if max_files == 1 else BATCH_FILES.format(n=max_files)


async def _read_json(request: Request) -> Submission:
    raw = await request.body()
    if len(raw) > MAX_FIELD_BYTES:  # a text query is small: a large body is not one
        raise HTTPException(400, BAD_JSON)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise HTTPException(400, BAD_JSON) from None
    if not isinstance(body, dict):
        raise HTTPException(400, BAD_JSON)
    if isinstance(body.get("item"), int) and not isinstance(body["item"], bool):
        body["item"] = str(body["item"])  # a built gallery's ids are numbers: item=4412
    if not isinstance(body.get("text", body.get("item")), str):
        raise HTTPException(400, BAD_JSON)
    k = body.get("k")
    gallery = body.get("gallery")
    text = body.get("text")
    if text is not None and not isinstance(text, str):
        raise HTTPException(422, BAD_TEXT.format(n=MAX_TEXT_CHARS))
    options = {
        name: [json.dumps(body[name]) if name in ("filter", "exclude") else body[name]]
        for name in ("item", "filter", "min_score", "exclude")
        if body.get(name) is not None
    }
    return Submission(
        files=[],
        text=None if text is None else _parse_text(text),
        k=None if k is None else _parse_k([k if isinstance(k, str) else json.dumps(k)]),
        gallery=None if gallery is None else _parse_gallery([gallery]),
        **_options(options),
    )


def _parse_text(value: str) -> str:
    text = value.strip()
    if not 1 <= len(text) <= MAX_TEXT_CHARS:
        raise HTTPException(422, BAD_TEXT.format(n=MAX_TEXT_CHARS))
    try:
        text.encode("utf-8")  # a lone surrogate (JSON "\ud800") is not text
    except UnicodeEncodeError:
        raise HTTPException(422, BAD_TEXT.format(n=MAX_TEXT_CHARS)) from None
    return text


def _parse_k(values: list[Any]) -> int | None:
    if not values:
        return None
    if len(values) > 1 or not isinstance(values[0], str):
        raise HTTPException(422, BAD_K)
    text = values[0].strip()
    # ASCII digits only ("²".isdigit() is true), and short, before int() sees it
    if re.fullmatch(r"[0-9]{1,2}", text) is None or not 1 <= int(text) <= MAX_K:
        raise HTTPException(422, BAD_K)
    return int(text)


def _parse_gallery(values: list[Any]) -> str | None:
    if not values:
        return None
    if len(values) > 1 or not isinstance(values[0], str):
        raise HTTPException(422, BAD_GALLERY)
    name = values[0].strip()
    if GALLERY_NAME.fullmatch(name) is None:
        raise HTTPException(422, BAD_GALLERY)
    return name
