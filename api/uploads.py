"""Reading one image upload out of a multipart request, with tight limits.

Parsing is done here rather than by FastAPI's ``File()`` so that every refusal is one of our
short sentences and the parser's limits fit an image upload (one file, a few small fields).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

NO_FILE = "The request has no 'file' field: send the image as multipart/form-data."
ONE_FILE = "Send exactly one file per job."
TOO_MANY_FIELDS = "The form has too many fields."
FIELD_TOO_LARGE = "A form field is too large."
MALFORMED = "The multipart body is malformed."
BAD_K = "k must be a whole number from 1 to 50."
BAD_WAIT = "wait must be a number of seconds, 0 or more."

MAX_FIELDS = 16
MAX_FIELD_BYTES = 16 * 1024

# The request body of POST /jobs, for the OpenAPI schema (parsed by hand, see above).
UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "The image: JPEG, PNG, WebP, GIF, BMP or TIFF",
                        },
                        "k": {"type": "integer", "minimum": 1, "maximum": 50, "default": 5},
                    },
                }
            }
        },
    }
}


@dataclass(frozen=True)
class Upload:
    data: bytes
    k: int | None


async def read_upload(request: Request) -> Upload:
    """The single file and the optional ``k`` of a multipart request, or an HTTP refusal."""
    try:
        form = await request.form(max_files=1, max_fields=MAX_FIELDS, max_part_size=MAX_FIELD_BYTES)
    except StarletteHTTPException as error:
        raise HTTPException(400, _parser_detail(str(error.detail))) from None
    files = [v for v in form.getlist("file") if isinstance(v, UploadFile)]
    others = [v for k, v in form.multi_items() if isinstance(v, UploadFile) and k != "file"]
    if others or len(files) > 1:
        raise HTTPException(400, ONE_FILE)
    if not files:
        raise HTTPException(422, NO_FILE)
    data = await files[0].read()
    await form.close()
    return Upload(data=data, k=_parse_k(form.getlist("k")))


def _parse_k(values: list[Any]) -> int | None:
    if not values:
        return None
    if len(values) > 1 or not isinstance(values[0], str):
        raise HTTPException(422, BAD_K)
    text = values[0].strip()
    # ASCII digits only ("²".isdigit() is true), and short, before int() sees it
    if re.fullmatch(r"[0-9]{1,2}", text) is None or not 1 <= int(text) <= 50:
        raise HTTPException(422, BAD_K)
    return int(text)


def _parser_detail(message: str) -> str:
    if message.startswith("Too many files"):
        return ONE_FILE
    if message.startswith("Too many fields"):
        return TOO_MANY_FIELDS
    if "exceeded maximum size" in message:
        return FIELD_TOO_LARGE
    return MALFORMED
