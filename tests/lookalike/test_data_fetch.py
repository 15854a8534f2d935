"""``lookalike data fetch`` against a local HTTP server that serves small IDX files: kept when
their SHA-256 is the expected one, refused by name when not, resumed when cut midway."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import lookalike.data as data
import shared.fashion_mnist as fashion_mnist
from lookalike.cli import main
from shared.fashion_mnist import SPLITS, load_gallery, read_idx
from tests.support import write_fake_fashion_mnist

NAMES = [f"{stem}.gz" for pair in SPLITS.values() for stem in pair]
BIG = "train-images-idx3-ubyte.gz"


@dataclass
class Publisher:
    """What the server serves and what it saw: ``(path, Range header)`` per request."""

    files: dict[str, bytes]
    url: str = ""
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    cut_once: set[str] = field(default_factory=set)  # first reply: half the body, then close
    status: int | None = None  # answer every request with this status instead
    honours_range: bool = True  # False: ignore Range headers, as some servers do

    def ranges(self, name: str) -> list[str | None]:
        return [rng for path, rng in self.requests if path == f"/{name}"]


def handler_for(publisher: Publisher) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            name = self.path.lstrip("/")
            publisher.requests.append((self.path, self.headers.get("Range")))
            if publisher.status is not None or name not in publisher.files:
                self.send_error(publisher.status or 404)
                return
            body = publisher.files[name]
            start = 0
            if self.headers.get("Range") and publisher.honours_range:
                start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            if name in publisher.cut_once:
                publisher.cut_once.discard(name)
                self.wfile.write(body[start : start + (len(body) - start) // 2])
                self.close_connection = True
                return
            self.wfile.write(body[start:])

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def publisher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Publisher]:
    """Small Fashion-MNIST-shaped files on a local server; their sums replace the real ones."""
    source = write_fake_fashion_mnist(tmp_path / "published", train=40, test=10)
    files = {name: (source / name).read_bytes() for name in NAMES}
    monkeypatch.setattr(
        data, "SHA256", {name: hashlib.sha256(body).hexdigest() for name, body in files.items()}
    )
    monkeypatch.setattr(data, "RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    found = Publisher(files=files)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(found))
    found.url = f"http://127.0.0.1:{server.server_address[1]}/"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield found
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No LOOKALIKE_DATA_DIR, KERAS_HOME in this test's folder, no Debian copy."""
    monkeypatch.delenv("LOOKALIKE_DATA_DIR", raising=False)
    monkeypatch.delenv(data.URL_VARIABLE, raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setattr(fashion_mnist, "KERAS_DIR", None)
    return monkeypatch


def fetch(publisher: Publisher, *extra: str) -> int:
    return main(["data", "fetch", "--base-url", publisher.url, "--no-progress", *extra])


def test_fetch_keeps_the_four_files_and_lookalike_reads_them(
    publisher: Publisher,
    settings_env: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = tmp_path / "data"
    settings_env.setenv("LOOKALIKE_DATA_DIR", str(target))

    assert fetch(publisher, "--to", str(target)) == 0

    for name in NAMES:
        assert (target / name).read_bytes() == publisher.files[name]
    assert sorted(p.name for p in target.iterdir()) == sorted(NAMES)
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == [f"{name}: downloaded, SHA-256 checked" for name in NAMES]
    assert out[4] == f"Fashion-MNIST is in {target}, where lookalike reads it."
    gallery = load_gallery(target, size=50)
    np.testing.assert_array_equal(gallery.images[:40], read_idx(tmp_path / "published" / f"{BIG}"))


def test_fetch_shows_a_progress_bar_per_file(
    publisher: Publisher,
    settings_env: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = tmp_path / "data"

    assert main(["data", "fetch", "--base-url", publisher.url, "--to", str(target)]) == 0

    err = capsys.readouterr().err
    for name in NAMES:
        assert name in err
    assert "100%" in err


def test_fetch_goes_to_keras_cache_by_default(
    publisher: Publisher,
    settings_env: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert fetch(publisher) == 0

    keras_cache = tmp_path / "keras-home" / "datasets" / "fashion-mnist"
    assert sorted(p.name for p in keras_cache.iterdir()) == sorted(NAMES)
    assert f"Fashion-MNIST is in {keras_cache}, where lookalike reads it." in (
        capsys.readouterr().out
    )
    assert fashion_mnist.find_dataset(None) == keras_cache


def test_fetch_goes_to_data_dir_when_set(
    publisher: Publisher, settings_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings_env.setenv("LOOKALIKE_DATA_DIR", str(tmp_path / "mine"))

    assert fetch(publisher) == 0

    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == sorted(NAMES)
    assert not (tmp_path / "keras-home").exists()


def test_fetch_to_another_folder_says_how_to_use_it(
    publisher: Publisher,
    settings_env: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert fetch(publisher, "--to", str(tmp_path / "elsewhere")) == 0

    out = capsys.readouterr().out
    assert f"set LOOKALIKE_DATA_DIR={tmp_path / 'elsewhere'} to use it" in out


def test_fetch_reads_the_base_url_from_the_environment(
    publisher: Publisher, settings_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings_env.setenv(data.URL_VARIABLE, publisher.url.rstrip("/"))

    assert main(["data", "fetch", "--to", str(tmp_path / "data"), "--no-progress"]) == 0

    assert len(publisher.requests) == 4


def test_fetch_refuses_a_corrupt_file_by_name_and_keeps_nothing_of_it(
    publisher: Publisher,
    settings_env: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = "train-labels-idx1-ubyte.gz"
    body = bytearray(publisher.files[name])
    body[-5] ^= 0xFF
    publisher.files[name] = bytes(body)
    target = tmp_path / "data"

    assert fetch(publisher, "--to", str(target)) == 2

    err = capsys.readouterr().err
    assert err.startswith(f"lookalike: {name} from {publisher.url}{name} is not the published")
    assert "the download was deleted" in err
    assert err.count("\n") == 1
    assert not (target / name).exists()
    assert not (target / f"{name}.part").exists()
    assert (target / BIG).is_file()  # checked before the bad one: kept


def test_fetch_resumes_a_download_cut_midway(
    publisher: Publisher, settings_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    publisher.cut_once.add(BIG)
    target = tmp_path / "data"

    assert fetch(publisher, "--to", str(target)) == 0

    assert (target / BIG).read_bytes() == publisher.files[BIG]
    half = len(publisher.files[BIG]) // 2
    assert publisher.ranges(BIG) == [None, f"bytes={half}-"]
    assert not (target / f"{BIG}.part").exists()


def test_fetch_resumes_a_part_left_by_an_earlier_run(
    publisher: Publisher, settings_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    target = tmp_path / "data"
    target.mkdir()
    (target / f"{BIG}.part").write_bytes(publisher.files[BIG][:1000])

    assert fetch(publisher, "--to", str(target)) == 0

    assert publisher.ranges(BIG) == ["bytes=1000-"]
    assert (target / BIG).read_bytes() == publisher.files[BIG]


def test_fetch_starts_again_where_the_server_ignores_range(
    publisher: Publisher, settings_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    publisher.honours_range = False
    target = tmp_path / "data"
    target.mkdir()
    (target / f"{BIG}.part").write_bytes(publisher.files[BIG][:1000])

    assert fetch(publisher, "--to", str(target)) == 0

    assert (target / BIG).read_bytes() == publisher.files[BIG]


def test_fetch_keeps_a_part_that_is_already_whole(
    publisher: Publisher, settings_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    target = tmp_path / "data"
    target.mkdir()
    (target / f"{BIG}.part").write_bytes(publisher.files[BIG])

    assert fetch(publisher, "--to", str(target)) == 0

    assert publisher.ranges(BIG) == [f"bytes={len(publisher.files[BIG])}-"]
    assert (target / BIG).read_bytes() == publisher.files[BIG]


def test_fetch_leaves_checked_files_alone(
    publisher: Publisher,
    settings_env: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = tmp_path / "data"
    assert fetch(publisher, "--to", str(target)) == 0
    publisher.requests.clear()
    capsys.readouterr()

    assert fetch(publisher, "--to", str(target)) == 0

    assert publisher.requests == []
    assert f"{BIG}: already there, SHA-256 checked" in capsys.readouterr().out


def test_fetch_replaces_a_copy_that_is_not_the_published_file(
    publisher: Publisher, settings_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    target = tmp_path / "data"
    target.mkdir()
    (target / BIG).write_bytes(b"recompressed elsewhere")

    assert fetch(publisher, "--to", str(target)) == 0

    assert (target / BIG).read_bytes() == publisher.files[BIG]


def test_fetch_gives_up_on_a_failing_server_with_one_line(
    publisher: Publisher,
    settings_env: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    publisher.status = 503

    assert fetch(publisher, "--to", str(tmp_path / "data")) == 2

    *retries, last = capsys.readouterr().err.splitlines()
    assert last.startswith(f"lookalike: could not download {publisher.url}{BIG} (")
    assert "503" in last and "in 4 attempts" in last
    assert len(retries) == 3 and all("trying again" in line for line in retries)
    assert len(publisher.requests) == 4
    assert not (tmp_path / "data").exists()  # nothing arrived: no empty folder left behind


def test_fetch_stops_at_a_missing_file(
    publisher: Publisher,
    settings_env: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    del publisher.files[BIG]

    assert fetch(publisher, "--to", str(tmp_path / "data")) == 2

    assert capsys.readouterr().err == f"lookalike: {publisher.url}{BIG} answered 404 Not Found\n"
    assert len(publisher.requests) == 1


def test_fetch_refuses_a_base_url_that_is_not_http(
    settings_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data", "fetch", "--base-url", "ftp://example.org/"]) == 2

    assert capsys.readouterr().err.startswith("lookalike: --base-url must be an http://")


def test_published_checksums_name_the_four_files() -> None:
    assert list(data.SHA256) == NAMES
    for digest in data.SHA256.values():
        assert len(digest) == 64 and int(digest, 16) >= 0
