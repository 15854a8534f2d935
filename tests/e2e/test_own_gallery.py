"""End to end: a gallery of your own images, indexed with ``lookalike index build --images``,
then served by a real worker and the real API next to the default Fashion-MNIST gallery."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from api.thumbnails import NO_SUCH_IMAGE
from lookalike.stack import Stack
from shared.galleries import UNLABELLED
from shared.images import CORRUPT, NOT_AN_IMAGE
from shared.settings import FASHION_MNIST
from tests.stacks import GALLERY_SIZE, make_stack
from tests.support import gallery_png, wait_job
from worker.index import index_dir

pytestmark = pytest.mark.e2e

NAME = "mine"
SIDE = 48  # at most 64 px: the thumbnail is a lossless PNG of the image itself
# The folder, in the order an index build walks it: loose files first, then sub-folders.
IMAGES = [
    "loose.png",
    "bags/0.png",
    "bags/1.png",
    "boots/0.png",
    "boots/1.png",
    "hats/0.png",
    "hats/deep/1.png",
    "hats/deep/2.bmp",
]
CLASSES = [UNLABELLED, "bags", "boots", "hats"]
UNREADABLE = {"bags/broken.png": NOT_AN_IMAGE, "boots/truncated.png": CORRUPT}


def label_of(relative: str) -> str:
    parts = relative.split("/")
    return parts[0] if len(parts) > 1 else UNLABELLED


def block_image(seed: int) -> Image.Image:
    """A colourful 48x48 picture of 6x6 random blocks, unlike any other seed's."""
    blocks = np.random.default_rng(1000 + seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8)))


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    block_image(seed).save(path)


def write_folder(root: Path) -> Path:
    for seed, relative in enumerate(IMAGES):
        write_image(root / relative, seed)
    (root / "bags" / "broken.png").write_bytes(b"this is not a picture")
    whole = (root / "boots" / "0.png").read_bytes()
    (root / "boots" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (root / "notes.txt").write_text("not an image: ignored, not skipped\n")
    return root


def fp32_stack(workdir: Path, model_dir: Path, data_dir: Path, built_index: Path) -> Stack:
    """A stack (not started) on a copy of the Fashion-MNIST index, embedding in fp32.

    The tiny random CLIP's int8 path strays far from fp32 on colourful images (cosine about
    0.97), and each process checks its fast paths on other probes (the worker on
    Fashion-MNIST's), so builder and worker could embed differently; fp32 everywhere keeps
    "an image finds itself" exact.
    """
    shutil.copytree(built_index, workdir / "index")
    stack = make_stack(workdir, model_dir, data_dir)
    stack.env.update(LOOKALIKE_INDEX_DIR=str(workdir / "index"), LOOKALIKE_FAST_CPU="off")
    return stack


def build(stack: Stack, folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return stack.run_cli(
        "index", "build", "--images", str(folder), "--name", NAME, "--no-progress", *extra
    )


@dataclass
class Own:
    stack: Stack
    folder: Path
    built: subprocess.CompletedProcess[str]
    directory: Path


@pytest.fixture(scope="module")
def own(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_clip_dir: Path,
    fake_data_dir: Path,
    built_index: Path,
) -> Iterator[Own]:
    """A folder gallery built with the real CLI, served by one worker beside Fashion-MNIST."""
    workdir = tmp_path_factory.mktemp("own-gallery")
    folder = write_folder(workdir / "photos")
    stack = fp32_stack(workdir, tiny_clip_dir, fake_data_dir, built_index)
    built = build(stack, folder)
    assert built.returncode == 0, built.stderr
    stack.start(workers=1)
    directory = index_dir(workdir / "index", gallery=NAME, model_id=str(tiny_clip_dir))
    yield Own(stack, folder, built, directory)
    stack.stop()


@pytest.fixture
def client(own: Own) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=own.stack.url, timeout=30) as client:
        yield client


def submit(client: httpx.Client, data: bytes, **params: str) -> dict[str, Any]:
    reply = client.post("/jobs", files={"file": ("query.png", data)}, params=params)
    assert reply.status_code == 202, reply.text
    job: dict[str, Any] = wait_job(client, reply.json()["id"])
    assert job["status"] == "succeeded", job
    return job


def shown_pixels(reply: httpx.Response) -> np.ndarray:
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(reply.content)).convert("RGB"))


# --- the build ----------------------------------------------------------------------------


def test_build_lists_unreadable_files_and_skips_them(own: Own) -> None:
    stderr = own.built.stderr.splitlines()

    for relative, reason in UNREADABLE.items():
        assert f"skipped {relative}: {reason}" in stderr
    summary = (
        f"{own.folder}: {len(IMAGES)} images in {len(CLASSES)} classes ({', '.join(CLASSES)}); "
        f"{len(UNREADABLE)} unreadable skipped, 1 other files ignored"
    )
    assert summary in stderr
    assert not any("notes.txt" in line for line in stderr)
    assert own.built.stdout.startswith(f"index built at {own.directory}: {len(IMAGES)} images")


def test_build_writes_the_manifest_paths_and_skipped_files(own: Own, tiny_clip_dir: Path) -> None:
    manifest = json.loads((own.directory / "manifest.json").read_text())
    paths = json.loads((own.directory / "paths.json").read_text())
    skipped = json.loads((own.directory / "skipped.json").read_text())

    assert manifest["gallery"] == NAME
    assert manifest["kind"] == "folder"
    assert manifest["model_id"] == str(tiny_clip_dir)
    assert manifest["count"] == len(IMAGES)
    assert manifest["class_names"] == CLASSES
    assert manifest["skipped"] == len(UNREADABLE)
    assert manifest["source"] == str(own.folder.resolve())
    assert paths == IMAGES
    assert {s["path"]: s["reason"] for s in skipped} == UNREADABLE
    labels = np.load(own.directory / "labels.npy")
    assert [CLASSES[label] for label in labels] == [label_of(p) for p in IMAGES]


@pytest.mark.parametrize(
    "name", ["Mine!", FASHION_MNIST, "../mine"], ids=["not-a-name", "reserved", "path"]
)
def test_build_refuses_a_name_that_is_not_a_folder_gallery_name(
    own: Own, tmp_path: Path, name: str
) -> None:
    builder = Stack(env=dict(own.stack.env), workdir=tmp_path)
    builder.env["LOOKALIKE_INDEX_DIR"] = str(tmp_path / "index")

    done = builder.run_cli("index", "build", "--images", str(own.folder), "--name", name)

    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"lookalike: {name!r} is not a gallery name for a folder: give --name with lower-case "
        "letters, digits, '.', '_' and '-' (and not fashion-mnist)"
    )
    assert not (tmp_path / "index").exists()


def test_build_of_a_folder_without_a_readable_image_fails(own: Own, tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a picture")
    (folder / "readme.txt").write_text("hello")
    builder = Stack(env=dict(own.stack.env), workdir=tmp_path)
    builder.env["LOOKALIKE_INDEX_DIR"] = str(tmp_path / "index")

    done = builder.run_cli("index", "build", "--images", str(folder), "--name", "empty")

    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert f"skipped broken.png: {NOT_AN_IMAGE}" in lines
    assert lines[-1] == f"lookalike: {folder} holds no readable image (1 skipped, 1 other files)."


# --- serving it ---------------------------------------------------------------------------


def test_galleries_lists_the_default_and_the_own_gallery(
    client: httpx.Client, tiny_clip_dir: Path
) -> None:
    listed = client.get("/galleries").json()

    assert listed["default"] == FASHION_MNIST
    assert [g["name"] for g in listed["galleries"]] == [FASHION_MNIST, NAME]
    assert listed["galleries"][1] == {
        "name": NAME,
        "size": len(IMAGES),
        "model": str(tiny_clip_dir),
        "kind": "folder",
        "classes": CLASSES,
        "default": False,
        "updated_at": None,
    }
    assert listed["galleries"][0]["default"] is True


def test_readyz_lists_both_galleries(client: httpx.Client) -> None:
    ready = client.get("/readyz").json()

    assert ready["galleries"] == [FASHION_MNIST, NAME]
    assert ready["workers"][0]["refused_galleries"] == {}


@pytest.mark.parametrize("relative", IMAGES)
def test_own_image_finds_itself_at_rank_1_with_its_path_and_label(
    own: Own, client: httpx.Client, relative: str
) -> None:
    job = submit(client, (own.folder / relative).read_bytes(), gallery=NAME)

    assert job["gallery"] == NAME
    result = job["result"]
    assert result["gallery"] == {"name": NAME, "size": len(IMAGES)}
    best = result["matches"][0]
    assert best["index"] == IMAGES.index(relative)
    assert best["score"] >= 0.99
    assert best["path"] == relative
    assert best["label_name"] == label_of(relative)
    assert best["label"] == CLASSES.index(label_of(relative))
    assert best["image_url"] == f"/gallery/{best['index']}.png?gallery={NAME}"
    assert all(m["path"] in IMAGES for m in result["matches"])


def test_own_match_image_url_serves_its_thumbnail(own: Own, client: httpx.Client) -> None:
    relative = "hats/deep/1.png"
    original = np.asarray(Image.open(own.folder / relative).convert("RGB"))
    job = submit(client, (own.folder / relative).read_bytes(), gallery=NAME)
    url = job["result"]["matches"][0]["image_url"]  # it has a query: add to it, not params=

    default = shown_pixels(client.get(url))
    doubled = shown_pixels(client.get(f"{url}&size={2 * SIDE}"))
    actual = shown_pixels(client.get(f"{url}&size={SIDE}"))

    assert default.shape == (224, 224, 3)
    np.testing.assert_array_equal(doubled, np.kron(original, np.ones((2, 2, 1), dtype=np.uint8)))
    np.testing.assert_array_equal(actual, original)


def test_own_gallery_image_beyond_its_size_is_404(client: httpx.Client) -> None:
    reply = client.get(f"/gallery/{len(IMAGES)}.png", params={"gallery": NAME})

    assert reply.status_code == 404
    assert reply.json() == {"detail": NO_SUCH_IMAGE.format(name=NAME, index=len(IMAGES))}


def test_k_beyond_the_own_gallery_gives_every_image_once(own: Own, client: httpx.Client) -> None:
    job = submit(client, (own.folder / "loose.png").read_bytes(), gallery=NAME, k="50")

    assert job["k"] == 50
    matches = job["result"]["matches"]
    assert sorted(m["path"] for m in matches) == sorted(IMAGES)
    assert [m["rank"] for m in matches] == list(range(1, len(IMAGES) + 1))


def test_text_job_searches_the_own_gallery(client: httpx.Client) -> None:
    reply = client.post("/jobs", json={"text": "a straw hat", "gallery": NAME, "k": 3})
    job = wait_job(client, reply.json()["id"])

    assert job["status"] == "succeeded", job
    assert job["result"]["gallery"] == {"name": NAME, "size": len(IMAGES)}
    assert all(m["path"] in IMAGES for m in job["result"]["matches"])
    assert len(job["result"]["matches"]) == 3


def test_batch_searches_the_own_gallery(own: Own, client: httpx.Client) -> None:
    chosen = ["boots/1.png", "loose.png"]
    files = [("file", (p, (own.folder / p).read_bytes())) for p in chosen]

    reply = client.post("/jobs/batch", files=files, data={"gallery": NAME})

    assert reply.status_code == 202, reply.text
    jobs = [wait_job(client, job["id"]) for job in reply.json()["jobs"]]
    assert [job["result"]["matches"][0]["path"] for job in jobs] == chosen


def test_job_without_a_gallery_searches_fashion_mnist(
    client: httpx.Client, fake_data_dir: Path
) -> None:
    job = submit(client, gallery_png(fake_data_dir, 19))

    assert job["gallery"] == FASHION_MNIST
    assert job["result"]["gallery"] == {"name": FASHION_MNIST, "size": GALLERY_SIZE}
    assert job["result"]["matches"][0]["index"] == 19
    assert job["result"]["matches"][0]["path"] is None


def test_grid_of_an_own_gallery_job_is_a_png(own: Own, client: httpx.Client) -> None:
    job = submit(client, (own.folder / "bags/1.png").read_bytes(), gallery=NAME)

    reply = client.get(f"/jobs/{job['id']}/grid.png")

    assert reply.status_code == 200
    assert Image.open(io.BytesIO(reply.content)).format == "PNG"


# --- rebuilding it ------------------------------------------------------------------------


def restart_worker(stack: Stack, index: int) -> None:
    """Stop a worker as a supervisor would (SIGTERM: it leaves no heartbeat), start another."""
    os.killpg(stack.workers[index].pid, signal.SIGTERM)
    stack.workers[index].wait(timeout=30)
    stack.replace_worker(index)
    stack.wait_ready()


def test_rebuilt_own_gallery_serves_its_new_images(
    tmp_path: Path, tiny_clip_dir: Path, fake_data_dir: Path, built_index: Path
) -> None:
    folder = tmp_path / "photos"
    for seed in range(3):
        write_image(folder / "shirts" / f"{seed}.png", seed)
    stack = fp32_stack(tmp_path / "stack", tiny_clip_dir, fake_data_dir, built_index)
    assert build(stack, folder).returncode == 0
    stack.start(workers=1)
    try:
        with httpx.Client(base_url=stack.url, timeout=30) as client:
            assert client.get("/gallery/1.png", params={"gallery": NAME}).status_code == 200
            write_image(folder / "socks" / "new.png", 99)  # sorted last: a new index
            rebuilt = build(stack, folder, "--force")
            assert rebuilt.returncode == 0, rebuilt.stderr
            restart_worker(stack, 0)
            sizes = {g["name"]: g["size"] for g in client.get("/galleries").json()["galleries"]}
            assert sizes[NAME] == 4

            job = submit(client, (folder / "socks" / "new.png").read_bytes(), gallery=NAME)
            best = job["result"]["matches"][0]
            assert (best["path"], best["index"], best["label_name"]) == (
                "socks/new.png",
                3,
                "socks",
            )
            shown = client.get(f"{best['image_url']}&size={SIDE}")
    finally:
        stack.stop()

    assert shown.status_code == 200, shown.text
    expected = np.asarray(block_image(99).convert("RGB"))
    np.testing.assert_array_equal(shown_pixels(shown), expected)
