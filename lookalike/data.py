"""``lookalike data fetch``: Fashion-MNIST's four IDX files from their publisher, checked.

Zalando Research publishes the four ``.gz`` files at :data:`PUBLISHER_URL` (the links of its
README's "Get the Data" table, with MD5 sums); TensorFlow Datasets records their SHA-256 and
sizes in ``tensorflow_datasets/url_checksums/fashion_mnist.txt``, and those sums are checked
here. Each file is downloaded into ``<name>.part`` beside its final place: a download cut
midway is resumed with an HTTP Range request (in the next attempt, or the next run), and the
file gets its final name only once its SHA-256 is the published one.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from shared.errors import ChecksumMismatch, FetchFailed

if TYPE_CHECKING:  # httpx and numpy (shared.fashion_mnist) load with the command, not the parser
    import httpx

PUBLISHER_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
URL_VARIABLE = "LOOKALIKE_FASHION_MNIST_URL"
# The published files' SHA-256, as TensorFlow Datasets records them (url_checksums/
# fashion_mnist.txt, with sizes 26421880, 29515, 4422102 and 5148 bytes). Debian's package
# holds the same images recompressed: its .gz files have other sums.
SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": (
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"
    ),
    "train-labels-idx1-ubyte.gz": (
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"
    ),
}
RETRY_DELAYS_S = (1.0, 3.0, 10.0)  # pauses between the attempts at one file
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

log = logging.getLogger(__name__)


class _Retry(Exception):
    """This attempt failed in a way the next one may not (a 503, a short body)."""


def add_data_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``lookalike data fetch``, under the ``lookalike`` parser's ``commands``."""
    data = commands.add_parser("data", help="the Fashion-MNIST files")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    fetch = data_commands.add_parser(
        "fetch",
        help="download Fashion-MNIST's four IDX files from Zalando Research, checked",
        description="Download the four IDX files of Fashion-MNIST from their publisher, "
        "check each against its published SHA-256 and keep it only then. A cut download "
        "is resumed; run the command again to resume one it gave up on.",
    )
    fetch.add_argument(
        "--to",
        metavar="DIR",
        type=Path,
        help="where to put them (default: LOOKALIKE_DATA_DIR when it is set, else Keras's "
        "cache, $KERAS_HOME/datasets/fashion-mnist, KERAS_HOME being ~/.keras unless set; "
        "lookalike reads both)",
    )
    fetch.add_argument(
        "--base-url",
        default=os.environ.get(URL_VARIABLE) or PUBLISHER_URL,
        help=f"the folder they are downloaded from, e.g. a mirror (default {URL_VARIABLE}, "
        f"else {PUBLISHER_URL})",
    )
    fetch.add_argument("--no-progress", action="store_true", help="no progress bars")
    fetch.set_defaults(func=cmd_data_fetch)


def cmd_data_fetch(args: argparse.Namespace) -> int | str:
    base_url: str = args.base_url
    if not base_url.startswith(("http://", "https://")):
        return f"--base-url must be an http:// or https:// address, not {base_url!r}"
    from shared.fashion_mnist import keras_dir
    from shared.settings import load_settings

    data_dir = load_settings().gallery.data_dir
    target: Path = args.to or data_dir or keras_dir()
    for line in fetch_dataset(
        base_url=base_url, target=target, checksums=SHA256, progress=not args.no_progress
    ):
        print(line)
    if _reads(target, data_dir):
        print(f"Fashion-MNIST is in {target}, where lookalike reads it.")
    else:
        print(f"Fashion-MNIST is in {target}: set LOOKALIKE_DATA_DIR={target} to use it.")
    return 0


def _reads(target: Path, data_dir: Path | None) -> bool:
    """Whether lookalike looks in ``target`` (with LOOKALIKE_DATA_DIR at ``data_dir``)."""
    from shared.fashion_mnist import candidate_dirs

    return target.resolve() in {path.resolve() for path in candidate_dirs(data_dir)}


def fetch_dataset(
    *, base_url: str, target: Path, checksums: Mapping[str, str], progress: bool
) -> list[str]:
    """Download each file of ``checksums`` from ``base_url`` into ``target`` unless a copy
    with the right SHA-256 is there; one line per file says what was done."""
    import httpx

    base_url = base_url if base_url.endswith("/") else base_url + "/"
    lines = []
    timeout = httpx.Timeout(30.0, connect=10.0)
    with httpx.Client(timeout=timeout, follow_redirects=True) as client:
        for name, expected in checksums.items():
            final = target / name
            if final.is_file() and sha256_of(final) == expected:
                lines.append(f"{name}: already there, SHA-256 checked")
                continue
            url = base_url + name
            part = target / f"{name}.part"
            try:
                download(client, url, part, name=name, progress=progress)
                actual = sha256_of(part)
                if actual != expected:
                    part.unlink()
                    raise ChecksumMismatch(
                        f"{name} from {url} is not the published file (its SHA-256 is "
                        f"{actual}, the published one {expected}); the download was deleted",
                        name=name,
                    )
                os.replace(part, final)
            except OSError as error:
                raise FetchFailed(f"cannot write {part}: {error.strerror or error}") from error
            lines.append(f"{name}: downloaded, SHA-256 checked")
    return lines


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, in hex."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def download(client: httpx.Client, url: str, part: Path, *, name: str, progress: bool) -> None:
    """Download ``url`` into ``part``, resuming whatever an earlier attempt (or run) left
    there; a failed attempt is retried after each of :data:`RETRY_DELAYS_S`."""
    import httpx

    for attempt, delay in enumerate((*RETRY_DELAYS_S, None), start=1):
        try:
            _attempt(client, url, part, name=name, progress=progress)
            return
        except (httpx.TransportError, _Retry) as error:
            why = str(error) or type(error).__name__
            if delay is None:
                raise FetchFailed(
                    f"could not download {url} ({why}) in {attempt} attempts; run the command "
                    "again to resume, or give a mirror with --base-url"
                ) from error
            log.warning("%s: %s; trying again in %gs", name, why, delay)
            time.sleep(delay)


def _attempt(client: httpx.Client, url: str, part: Path, *, name: str, progress: bool) -> None:
    """One GET of ``url``: from byte ``len(part)`` on where the part has some already."""
    offset = part.stat().st_size if part.is_file() else 0
    # identity: the bytes as published (a .gz must not be decoded), and Range counts them
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with client.stream("GET", url, headers=headers) as reply:
        status = reply.status_code
        if status == 416:  # nothing after offset: the part is whole, or longer than the file
            if _content_range_total(reply.headers.get("content-range")) == offset:
                return
            part.unlink()
            raise _Retry(f"cannot resume after {offset} bytes: starting again")
        if status in RETRY_STATUSES:
            raise _Retry(f"answered {status} {reply.reason_phrase}")
        if status == 206 and offset:
            if _content_range_start(reply) != offset:
                part.unlink()
                raise _Retry(f"resumed at another byte than {offset}: starting again")
            mode = "ab"
        elif status == 200:
            mode, offset = "wb", 0  # the server sent the whole file
        else:
            raise FetchFailed(f"{url} answered {status} {reply.reason_phrase}")
        length = reply.headers.get("content-length")
        total = offset + int(length) if length and length.isdigit() else None
        received = offset
        part.parent.mkdir(parents=True, exist_ok=True)  # not before: no empty folder on failure
        with part.open(mode) as out, _bar(name, total, offset, progress) as bar:
            for chunk in reply.iter_raw():  # as it comes: a cut keeps what arrived
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received < total:
        raise _Retry(f"the connection ended after {received} of {total} bytes")


def _content_range_start(reply: httpx.Response) -> int | None:
    """The first byte of a 206 reply's ``Content-Range: bytes START-END/TOTAL``."""
    value = reply.headers.get("content-range", "")
    unit, _, span = value.partition(" ")
    start = span.partition("-")[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


def _content_range_total(value: str | None) -> int | None:
    """The length of the file in a 416 reply's ``Content-Range: bytes */TOTAL``."""
    total = (value or "").rpartition("/")[2]
    return int(total) if total.isdigit() else None


def _bar(name: str, total: int | None, initial: int, enabled: bool) -> Any:
    """A tqdm bar in bytes; none when disabled, or where tqdm (the worker extra) is absent."""
    try:
        from tqdm import tqdm
    except ImportError:
        return contextlib.nullcontext(SimpleNamespace(update=lambda _: None))
    return tqdm(
        total=total,
        initial=initial,
        desc=name,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled,
        dynamic_ncols=True,
    )
