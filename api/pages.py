"""The web page at ``GET /``: static HTML, CSS and JS that drive the public HTTP API.

The page is a client like any other: it submits jobs with ``POST /jobs``, follows them over
``/jobs/<id>/events`` (or long polls) and shows the matches. Nothing is built or fetched from
the internet; the assets ship inside the ``api`` package and are served from here.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parent / "static"

# Only these files are served: a fixed list, so no request path ever reaches the filesystem.
ASSETS = {
    "app.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

# Same-origin only: the page works offline and cannot load or send anything elsewhere.
# blob: lets it show the user's own image through an object URL before any upload.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag): a new release shows at once
}
ASSET_NOT_FOUND = "Not found."

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    """The search page."""
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)


@router.get("/static/{name}")
async def asset(name: str) -> FileResponse:
    """One of the page's own assets (stylesheet, script, icon)."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404, ASSET_NOT_FOUND)
    return FileResponse(STATIC / name, media_type=media_type, headers=PAGE_HEADERS)
