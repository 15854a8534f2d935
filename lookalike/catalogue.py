"""``lookalike gallery add``: put a folder of images, or a manifest's items, into a live gallery.

Each item is one ``PUT /galleries/{name}/items/{id}`` of its image (and attributes) and a long
poll of the add's job, ``--concurrency`` items in flight over one connection pool. 429 and 503
answers and broken connections are retried with backoff (the server's Retry-After when it gives
one); any other 4xx is a refusal, listed with the API's sentence. A run is resumable: the
gallery's items are listed first, and an item indexed with the same bytes (and, from a
manifest, the same attributes) is not sent again. A file is read when its turn comes, so at
most ``--concurrency`` files are held at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePath
from types import SimpleNamespace
from typing import Any

import httpx

from lookalike.bench.service import retry_after_seconds
from lookalike.query import detail
from shared.errors import FieldRefused, GalleryError
from shared.items import ITEM_ID, Scalar, attributes

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
NOT_ID_CHARACTER = re.compile(r"[^A-Za-z0-9_.:-]")
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_TRIES = 8  # ~1 minute of backoff before an item is given up
FIRST_TRIES = 3  # the gallery's creation: a wrong --url is said within seconds
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
RETRIED = (429, 503)
POLL_WAIT_S = 20
PAGE = 200
LISTED = 20
MANIFEST_FIELDS = {"id", "path", "attributes"}
FINAL = ("succeeded", "failed")

TOO_LARGE = f"it is larger than {MAX_FILE_BYTES // (1024 * 1024)} MB"
BAD_ID = "'id' must be 1 to 128 letters, digits, '-', '_', '.' or ':'"
LONG_ID = "its item id {item_id!r} is not 1 to 128 characters: name it in a manifest"
SAME_ID = "its item id {item_id!r} is also that of {other}"


class Outcome(StrEnum):
    ADDED = "added"
    ALREADY = "already there"
    REFUSED = "refused"
    FAILED = "failed"
    UNKEPT = "not kept"  # deleted or replaced by another add while this one was embedded


@dataclass(frozen=True)
class Entry:
    """One item to send: its id, its file, how the summary names it, and its attributes
    (None from a folder: the stored ones are kept when the image is already there)."""

    item_id: str
    path: Path
    shown: str
    attributes: dict[str, Scalar] | None = None


@dataclass
class Tally:
    """What a run did: a count per outcome, and the notes of the items to list: (file, why)
    for the refused, failed and not kept; (file, the item with its bytes) for duplicates."""

    counts: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))
    notes: dict[Outcome, list[tuple[str, str]]] = field(
        default_factory=lambda: {outcome: [] for outcome in Outcome}
    )

    def record(self, shown: str, outcome: Outcome, note: str | None = None) -> None:
        self.counts[outcome] += 1
        if note is not None:
            self.notes[outcome].append((shown, note))

    @property
    def complete(self) -> bool:
        """Nothing was refused and nothing failed."""
        return not self.counts[Outcome.REFUSED] and not self.counts[Outcome.FAILED]


# --- what to send ------------------------------------------------------------------------------


def item_id_of(relative: PurePath) -> str:
    """The item id of an image at ``relative`` under the folder: its path without the extension,
    folders joined by '.', any character an id cannot hold turned into '_'
    (``shoes/red shoe.JPG`` -> ``shoes.red_shoe``)."""
    return NOT_ID_CHARACTER.sub("_", ".".join([*relative.parent.parts, relative.stem]))


def folder_entries(folder: Path) -> list[Entry]:
    """Every image file under ``folder`` (by extension, any case), in a stable order."""
    found = []
    for root, folders, files in os.walk(folder):
        folders.sort()
        for name in sorted(files):
            path = Path(root, name)
            if path.suffix.lower() in IMAGE_SUFFIXES:
                relative = path.relative_to(folder)
                found.append(Entry(item_id_of(relative), path, relative.as_posix()))
    return found


def manifest_entries(manifest: Path) -> tuple[list[Entry], list[tuple[str, str]]]:
    """The items of a JSON-lines manifest (``{"id", "path", "attributes"}``, a path relative to
    the manifest's folder), and each malformed line as (where, why)."""
    entries, malformed = [], []
    with manifest.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                entries.append(_manifest_entry(raw, manifest.parent))
            except ValueError as why:
                malformed.append((f"{manifest.name} line {number}", str(why)))
    return entries, malformed


def _manifest_entry(raw: bytes, base: Path) -> Entry:
    try:
        line = json.loads(raw)
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(line, dict):
        raise ValueError('not a JSON object such as {"id": ..., "path": ...}')
    unknown = sorted(set(line) - MANIFEST_FIELDS)
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (a line has id, path and attributes)")
    item_id = line.get("id")
    if not isinstance(item_id, str) or ITEM_ID.fullmatch(item_id) is None:
        raise ValueError(BAD_ID)
    path = line.get("path")
    if not isinstance(path, str) or not path:
        raise ValueError("'path' must be the image file's path (text)")
    try:
        given = attributes(line.get("attributes"))  # the API's own check, and its sentence
    except FieldRefused as refused:
        raise ValueError(str(refused)) from None
    return Entry(item_id, base / path, path, given)


def unique_ids(entries: list[Entry]) -> tuple[list[Entry], list[tuple[str, str]]]:
    """The entries to send, and a refusal for each with an id that is not valid or not the
    first with that id (two files of one id would race each other)."""
    first: dict[str, Entry] = {}
    refused = []
    for entry in entries:
        if ITEM_ID.fullmatch(entry.item_id) is None:
            refused.append((entry.shown, LONG_ID.format(item_id=entry.item_id)))
        elif entry.item_id in first:
            other = first[entry.item_id].shown
            refused.append((entry.shown, SAME_ID.format(item_id=entry.item_id, other=other)))
        else:
            first[entry.item_id] = entry
    return list(first.values()), refused


# --- sending -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sender:
    """One connection pool to one gallery, and the run's limits."""

    client: httpx.AsyncClient
    gallery: str
    known: dict[str, tuple[str, dict[str, Any]]]  # indexed id -> (sha256, attributes)
    timeout_s: float


async def request(
    client: httpx.AsyncClient, method: str, url: str, *, tries: int = MAX_TRIES, **kw: Any
) -> httpx.Response:
    """The reply to a request, retried on 429, 503 and broken connections with backoff (the
    reply's Retry-After when given); after the last try, its reply or its error."""
    for attempt in range(1, tries + 1):
        backoff = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (attempt - 1))
        backoff *= random.uniform(0.5, 1.0)  # clients turned away together come back apart
        try:
            reply = await client.request(method, url, **kw)
        except httpx.TransportError:
            if attempt == tries:
                raise
        else:
            if reply.status_code not in RETRIED or attempt == tries:
                return reply
            given = retry_after_seconds(reply.headers.get("retry-after"), default=backoff)
            backoff = min(MAX_BACKOFF_S, given)
        await asyncio.sleep(backoff)
    raise AssertionError("unreachable: the last try returns or raises")


async def send(sender: Sender, entry: Entry) -> tuple[Outcome, str | None]:
    """Send one item and wait for its job: what became of it, and a note (a refusal's or a
    failure's sentence, the item it duplicates)."""
    try:
        accepted = await _put(sender, entry)
        if isinstance(accepted, tuple):
            return accepted
        return await _wait(sender, accepted)
    except httpx.TransportError as error:
        return Outcome.FAILED, f"the service could not be reached: {str(error) or repr(error)}"


async def _put(sender: Sender, entry: Entry) -> dict[str, Any] | tuple[Outcome, str | None]:
    """The accepted add's job, or why there is none (its bytes are let go on return)."""
    try:
        if entry.path.stat().st_size > MAX_FILE_BYTES:
            return Outcome.REFUSED, TOO_LARGE
        data = await asyncio.to_thread(entry.path.read_bytes)
    except OSError as error:
        return Outcome.REFUSED, f"it cannot be read: {error.strerror or error}"
    if _already_there(sender.known.get(entry.item_id), data, entry.attributes):
        return Outcome.ALREADY, None
    form = None if entry.attributes is None else {"attributes": json.dumps(entry.attributes)}
    reply = await request(
        sender.client,
        "PUT",
        f"/galleries/{sender.gallery}/items/{entry.item_id}",
        files={"file": (entry.path.name, data)},
        data=form,
    )
    if reply.status_code == 202:
        job: dict[str, Any] = reply.json()
        return job
    if 400 <= reply.status_code < 500 and reply.status_code != 429:
        return Outcome.REFUSED, detail(reply)
    return Outcome.FAILED, f"{reply.status_code}: {detail(reply)}"


def _already_there(
    stored: tuple[str, dict[str, Any]] | None, data: bytes, given: dict[str, Scalar] | None
) -> bool:
    """The item is indexed with these bytes, and the attributes to send (if any) are its."""
    if stored is None or stored[0] != hashlib.sha256(data).hexdigest():
        return False
    return given is None or given == stored[1]


async def _wait(sender: Sender, job: dict[str, Any]) -> tuple[Outcome, str | None]:
    deadline = time.monotonic() + sender.timeout_s
    while job["status"] not in FINAL:
        if time.monotonic() > deadline:
            return Outcome.FAILED, f"job {job['id']} did not end within {sender.timeout_s:g}s"
        params = {"wait": str(POLL_WAIT_S)}
        reply = await request(sender.client, "GET", f"/jobs/{job['id']}", params=params)
        if reply.status_code != 200:
            return Outcome.FAILED, f"job {job['id']}: {reply.status_code}: {detail(reply)}"
        job = reply.json()
    if job["status"] == "failed":
        return Outcome.FAILED, f"job {job['id']} failed: {job.get('error')}"
    item = job["result"]["item"]
    if item["state"] != "indexed":
        return Outcome.UNKEPT, f"{item['state']} while it was being added"
    return Outcome.ADDED, item.get("duplicate_of")


async def open_gallery(client: httpx.AsyncClient, gallery: str) -> None:
    """Create the live gallery unless it exists; a refusal is a GalleryError."""
    reply = await request(client, "PUT", f"/galleries/{gallery}", tries=FIRST_TRIES)
    if reply.status_code not in (200, 201):
        raise GalleryError(f"gallery {gallery!r}: {reply.status_code}: {detail(reply)}")


async def indexed_items(
    client: httpx.AsyncClient, gallery: str
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every indexed item of the gallery: id -> (sha256 of its bytes, attributes)."""
    known: dict[str, tuple[str, dict[str, Any]]] = {}
    params = {"limit": str(PAGE)}
    while True:
        reply = await request(client, "GET", f"/galleries/{gallery}/items", params=params)
        if reply.status_code != 200:
            raise GalleryError(f"listing {gallery!r}: {reply.status_code}: {detail(reply)}")
        page = reply.json()
        for item in page["items"]:
            if item["state"] == "indexed":
                known[item["id"]] = (item.get("sha256") or "", item.get("attributes") or {})
        if page["next"] is None:
            return known
        params["after"] = page["next"]


async def add_all(
    entries: list[Entry],
    tally: Tally,
    *,
    url: str,
    gallery: str,
    api_key: str | None,
    concurrency: int,
    timeout_s: float,
    progress: bool,
) -> None:
    """Create the gallery, list what it holds, then send every entry, ``concurrency`` at once."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(POLL_WAIT_S + 40, connect=10)  # a long poll answers within 20 s
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=timeout
    ) as client:
        try:
            await open_gallery(client, gallery)
            known = await indexed_items(client, gallery)
        except httpx.TransportError as error:
            raise GalleryError(f"cannot reach the service at {url}: {error}") from None
        sender = Sender(client, gallery, known, timeout_s)
        slots = asyncio.Semaphore(concurrency)
        with _bar(gallery, len(entries), progress) as bar:

            async def one(entry: Entry) -> None:
                try:
                    outcome, note = await send(sender, entry)
                finally:
                    slots.release()
                tally.record(entry.shown, outcome, note)
                bar.set_postfix_str(_postfix(tally), refresh=False)
                bar.update(1)

            async with asyncio.TaskGroup() as group:
                for entry in entries:  # a task per item in flight, not one per item to send
                    await slots.acquire()
                    group.create_task(one(entry))


def _postfix(tally: Tally) -> str:
    return ", ".join(f"{n} {outcome}" for outcome, n in tally.counts.items() if n)


def _bar(gallery: str, total: int, enabled: bool) -> Any:
    """A tqdm bar on stderr; none when disabled, or where tqdm (the worker extra) is absent."""
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        quiet = SimpleNamespace(update=lambda _: None, set_postfix_str=lambda *_, **__: None)
        return contextlib.nullcontext(quiet)
    return tqdm(total=total, desc=gallery, unit="item", file=sys.stderr, dynamic_ncols=True)


# --- the command -------------------------------------------------------------------------------


def format_summary(tally: Tally, *, gallery: str, seconds: float) -> str:
    counts, notes = tally.counts, tally.notes
    lines = [
        f"gallery {gallery}: {counts[Outcome.ADDED]} added, {counts[Outcome.ALREADY]} already "
        f"there, {len(notes[Outcome.ADDED])} duplicates, {counts[Outcome.REFUSED]} refused, "
        f"{counts[Outcome.FAILED]} failed, in {seconds:.1f}s"
    ]
    for outcome, title in (
        (Outcome.ADDED, "duplicates (added, with the same bytes as the item named)"),
        (Outcome.REFUSED, "refused"),
        (Outcome.FAILED, "failed"),
        (Outcome.UNKEPT, "not kept (deleted or replaced by another client meanwhile)"),
    ):
        listed = notes[outcome]
        if listed:
            lines.append(f"{title}:")
            lines.extend(f"  {shown}: {note}" for shown, note in listed[:LISTED])
            if len(listed) > LISTED:
                lines.append(f"  and {len(listed) - LISTED} more")
    return "\n".join(lines)


def cmd_gallery_add(args: argparse.Namespace) -> int | str:
    """Send a folder or a manifest into a live gallery; 0 when every item is there, 1 when
    some were refused or failed, a sentence (exit 2) when the command cannot start."""
    if (args.folder is None) == (args.manifest is None):
        return "give a FOLDER or --manifest, one of them"
    if args.concurrency < 1:
        return "--concurrency must be at least 1"
    if args.timeout <= 0:
        return "--timeout must be more than 0"
    tally = Tally()
    if args.folder is not None:
        folder = Path(args.folder)
        if not folder.is_dir():
            return f"{folder} is not a folder"
        found = folder_entries(folder)
        if not found:
            return f"no image files under {folder} ({', '.join(IMAGE_SUFFIXES)})"
    else:
        manifest = Path(args.manifest)
        if not manifest.is_file():
            return f"{manifest} is not a file"
        found, malformed = manifest_entries(manifest)
        if not found and not malformed:
            return f"{manifest} lists no items"
        for where, why in malformed:
            tally.record(where, Outcome.REFUSED, why)
    entries, clashes = unique_ids(found)
    for shown, why in clashes:
        tally.record(shown, Outcome.REFUSED, why)
    started = time.monotonic()
    asyncio.run(
        add_all(
            entries,
            tally,
            url=args.url,
            gallery=args.name,
            api_key=args.api_key,
            concurrency=args.concurrency,
            timeout_s=args.timeout,
            progress=not args.no_progress,
        )
    )
    print(format_summary(tally, gallery=args.name, seconds=time.monotonic() - started))
    return 0 if tally.complete else 1
