"""End to end: job events (SSE), pictures, galleries, metrics, JSON logs, the distributed
index build and ``lookalike query``, against real Redis, worker and API processes."""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from api.deps import JOB_NOT_FOUND
from api.pictures import BAD_SIZE, NOT_DONE
from api.thumbnails import NO_GALLERY_IMAGES, NO_SUCH_IMAGE
from api.uploads import BAD_TEXT, FILE_OR_TEXT, MAX_TEXT_CHARS
from lookalike.stack import Stack
from shared.celery_config import INDEX_CHUNK_TASK
from shared.fashion_mnist import CLASS_NAMES, load_gallery
from shared.jobs import JobStore, new_job_id
from shared.schemas import JobStage
from shared.settings import FASHION_MNIST
from tests.stacks import GALLERY_SIZE, make_stack
from tests.support import gallery_png, wait_job
from worker.index import CHUNK, index_dir, plan_chunks

pytestmark = pytest.mark.e2e

T = TypeVar("T")
DISTRIBUTED_SIZE = 300  # the fake Fashion-MNIST's 240 train + 60 test images
NO_WORKER = (
    "lookalike: no worker is ready to take chunks: start workers ('lookalike worker'), "
    "or build here without --distributed"
)


@pytest.fixture
def client(service: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=30) as client:
        yield client


@pytest.fixture
def store(service: Stack) -> Iterator[JobStore]:
    connection = redis.Redis.from_url(service.env["LOOKALIKE_REDIS_URL"])
    yield JobStore(connection, prefix="lookalike", ttl_s=600)
    connection.close()


def submit(client: httpx.Client, data: bytes, **params: str) -> str:
    reply = client.post("/jobs", files={"file": ("upload.png", data, "image/png")}, params=params)
    assert reply.status_code == 202, reply.text
    job_id: str = reply.json()["id"]
    return job_id


def succeeded(client: httpx.Client, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = wait_job(client, job_id)
    assert job["status"] == "succeeded", job
    return job


def eventually(probe: Callable[[], T | None], *, timeout: float = 10, what: str = "") -> T:
    """The first truthy answer of ``probe``, polled until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen within {timeout}s: {what}")
        time.sleep(0.2)


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


# --- Server-Sent Events -------------------------------------------------------------------


class EventReader:
    """Reads ``event:``/``data:`` blocks off a streaming response, one block at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.iter_lines()

    def next(self) -> tuple[str, dict[str, Any]] | None:
        """The next event and its JSON data; None when the stream has ended."""
        event, data = "", ""
        for line in self.lines:
            if line.startswith(":"):
                continue  # a keep-alive comment
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = line.removeprefix("data: ")
            elif line == "" and event:
                return event, json.loads(data)
        return None

    def rest(self) -> list[tuple[str, dict[str, Any]]]:
        found = []
        while (item := self.next()) is not None:
            found.append(item)
        return found


def test_events_stream_one_event_per_change_until_the_job_ends(
    client: httpx.Client, store: JobStore
) -> None:
    job_id = new_job_id()
    store.create(job_id, upload=b"never enqueued", k=5)  # no task: the test plays the worker
    stages = list(JobStage)  # a worker starts a job in the first stage, then moves on
    changes: list[Callable[[], object]] = [
        lambda: store.start(job_id, worker="test"),
        *(lambda stage=stage: store.set_stage([job_id], stage) for stage in stages[1:]),
        lambda: store.fail(job_id, "The test ended it."),
    ]
    seen: list[tuple[str, str, str | None]] = []
    started = time.monotonic()
    with client.stream("GET", f"/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        reader = EventReader(response)
        for change in [*changes, None]:
            item = reader.next()
            assert item is not None, f"the stream ended after {seen}"
            event, job = item
            seen.append((event, job["status"], job["stage"]))
            if change is not None:
                change()
        assert reader.rest() == []  # closed after the end, nothing more
        last = job
    assert time.monotonic() - started < 10
    assert seen == [
        ("job", "queued", None),
        *(("job", "running", stage.value) for stage in stages),
        ("job", "failed", None),
    ]
    assert last["id"] == job_id
    assert last["error"] == "The test ended it."


def test_events_follow_a_real_job_to_its_result(client: httpx.Client, fake_data_dir: Path) -> None:
    job_id = submit(client, gallery_png(fake_data_dir, 17))

    with client.stream("GET", f"/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        events = EventReader(response).rest()

    assert events, "the stream gave no event"
    assert {event for event, _ in events} == {"job"}
    jobs = [job for _, job in events]
    order = ["queued", "running", "succeeded"]
    statuses = [order.index(job["status"]) for job in jobs]
    assert statuses == sorted(statuses)
    stages = [stage.value for stage in JobStage]
    seen_stages = [stages.index(job["stage"]) for job in jobs if job["status"] == "running"]
    assert seen_stages == sorted(seen_stages)
    assert all(a != b for a, b in zip(jobs, jobs[1:], strict=False)), "a repeated event"
    assert jobs[-1]["status"] == "succeeded"
    assert jobs[-1]["stage"] is None
    assert jobs[-1]["result"]["matches"][0]["index"] == 17


def test_events_of_a_finished_job_are_one_event_then_the_end(
    client: httpx.Client, fake_data_dir: Path
) -> None:
    job_id = submit(client, gallery_png(fake_data_dir, 4))
    final = succeeded(client, job_id)

    started = time.monotonic()
    with client.stream("GET", f"/jobs/{job_id}/events") as response:
        events = EventReader(response).rest()

    assert time.monotonic() - started < 5
    assert events == [("job", final)]


@pytest.mark.parametrize("job_id", ["0" * 32, "not-a-job", "A" * 32])
def test_events_of_an_unknown_job_are_404(client: httpx.Client, job_id: str) -> None:
    reply = client.get(f"/jobs/{job_id}/events")

    assert reply.status_code == 404
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {"detail": JOB_NOT_FOUND}


# --- the result picture -------------------------------------------------------------------


def test_grid_of_a_succeeded_job_is_a_png_that_grows_with_k(
    client: httpx.Client, fake_data_dir: Path
) -> None:
    sizes = {}
    for k in (5, 12):
        job_id = submit(client, gallery_png(fake_data_dir, 6), k=str(k))
        succeeded(client, job_id)

        reply = client.get(f"/jobs/{job_id}/grid.png")

        assert reply.status_code == 200
        assert reply.headers["content-type"] == "image/png"
        sizes[k] = decode_png(reply.content).size
    assert sizes[12][1] > sizes[5][1]  # more rows of matches
    assert sizes[12][0] >= sizes[5][0]


def test_grid_of_a_text_job_is_a_png(client: httpx.Client) -> None:
    reply = client.post("/jobs", json={"text": "an ankle boot", "k": 3})
    job_id = reply.json()["id"]
    succeeded(client, job_id)

    picture = client.get(f"/jobs/{job_id}/grid.png")

    assert picture.status_code == 200
    width, height = decode_png(picture.content).size
    assert width > height > 0


def test_grid_of_a_job_that_has_not_ended_is_409(client: httpx.Client, store: JobStore) -> None:
    job_id = new_job_id()
    store.create(job_id, upload=b"never enqueued", k=5)
    try:
        queued = client.get(f"/jobs/{job_id}/grid.png")
        store.start(job_id, worker="test")
        running = client.get(f"/jobs/{job_id}/grid.png")
    finally:
        store.fail(job_id, "The test ended it.")  # so the reconciler never picks it up
    failed = client.get(f"/jobs/{job_id}/grid.png")

    for reply in (queued, running, failed):
        assert reply.status_code == 409
        assert reply.json() == {"detail": NOT_DONE}


@pytest.mark.parametrize("job_id", ["0" * 32, "not-a-job"])
def test_grid_of_an_unknown_job_is_404(client: httpx.Client, job_id: str) -> None:
    reply = client.get(f"/jobs/{job_id}/grid.png")

    assert reply.status_code == 404
    assert reply.json() == {"detail": JOB_NOT_FOUND}


# --- gallery images -----------------------------------------------------------------------


def test_gallery_image_is_224_pixels_scaled_by_nearest_neighbour(
    client: httpx.Client, fake_data_dir: Path
) -> None:
    index = 23
    original = load_gallery(fake_data_dir, size=GALLERY_SIZE).images[index]

    reply = client.get(f"/gallery/{index}.png")

    assert reply.status_code == 200
    assert reply.headers["content-type"] == "image/png"
    shown = np.asarray(decode_png(reply.content).convert("RGB"))
    assert shown.shape == (224, 224, 3)
    expected = np.kron(original, np.ones((8, 8), dtype=np.uint8))  # each pixel an 8x8 block
    for channel in range(3):
        np.testing.assert_array_equal(shown[:, :, channel], expected)


def test_gallery_image_names_its_gallery(client: httpx.Client, fake_data_dir: Path) -> None:
    default = client.get("/gallery/7.png")
    named = client.get("/gallery/7.png", params={"gallery": FASHION_MNIST})

    assert named.status_code == 200
    assert named.content == default.content


@pytest.mark.parametrize("size", [16, 56, 100, 1024])
def test_gallery_image_size_sets_its_side(client: httpx.Client, size: int) -> None:
    reply = client.get("/gallery/3.png", params={"size": str(size)})

    assert reply.status_code == 200
    assert decode_png(reply.content).size == (size, size)


@pytest.mark.parametrize("size", ["15", "1025", "0", "-5", "big", "100.5"])
def test_gallery_image_size_out_of_range_is_422(client: httpx.Client, size: str) -> None:
    reply = client.get("/gallery/3.png", params={"size": size})

    assert reply.status_code == 422
    assert reply.json() == {"detail": BAD_SIZE}


@pytest.mark.parametrize("index", [GALLERY_SIZE, GALLERY_SIZE + 1, 10**30])
def test_gallery_image_beyond_the_gallery_is_404(client: httpx.Client, index: int) -> None:
    reply = client.get(f"/gallery/{index}.png")

    assert reply.status_code == 404
    assert reply.json() == {"detail": NO_SUCH_IMAGE.format(name=FASHION_MNIST, index=index)}


@pytest.mark.parametrize("name", ["no-such-gallery", "Not A Name", "../index"])
def test_gallery_image_of_an_unknown_gallery_is_404(client: httpx.Client, name: str) -> None:
    reply = client.get("/gallery/3.png", params={"gallery": name})

    assert reply.status_code == 404
    assert reply.json() == {"detail": NO_GALLERY_IMAGES.format(name=name)}


def test_every_match_image_url_serves_its_gallery_image(
    client: httpx.Client, fake_data_dir: Path
) -> None:
    gallery = load_gallery(fake_data_dir, size=GALLERY_SIZE).images
    job = succeeded(client, submit(client, gallery_png(fake_data_dir, 40), k="10"))

    matches = job["result"]["matches"]
    assert len(matches) == 10
    for match in matches:
        assert match["image_url"] == f"/gallery/{match['index']}.png?gallery={FASHION_MNIST}"
        assert match["path"] is None
        reply = client.get(f"{match['image_url']}&size=28")  # params= would drop its query
        assert reply.status_code == 200
        shown = np.asarray(decode_png(reply.content).convert("L"))
        np.testing.assert_array_equal(shown, gallery[match["index"]])


# --- galleries and readiness --------------------------------------------------------------


def test_galleries_lists_the_default_gallery(client: httpx.Client, tiny_clip_dir: Path) -> None:
    reply = client.get("/galleries")

    assert reply.status_code == 200
    assert reply.json() == {
        "default": FASHION_MNIST,
        "galleries": [
            {
                "name": FASHION_MNIST,
                "size": GALLERY_SIZE,
                "model": str(tiny_clip_dir),
                "kind": FASHION_MNIST,
                "classes": list(CLASS_NAMES),
                "default": True,
                "updated_at": None,
            }
        ],
    }


def test_readyz_reports_modes_and_galleries(client: httpx.Client) -> None:
    ready = client.get("/readyz").json()

    assert ready["status"] == "ready"
    assert ready["modes"] == {"image": True, "text": True}
    assert ready["galleries"] == [FASHION_MNIST]
    (worker,) = ready["workers"]
    assert "galleries" not in worker


# --- metrics ------------------------------------------------------------------------------


def scrape(client: httpx.Client) -> dict[str, float]:
    reply = client.get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in reply.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


SUBMITTED_IMAGE = 'lookalike_jobs_submitted_total{kind="image"}'
SUBMITTED_TEXT = 'lookalike_jobs_submitted_total{kind="text"}'
SUCCEEDED = 'lookalike_jobs_finished_total{reason="",status="succeeded"}'
LATENCY_ALL = 'lookalike_job_latency_seconds_bucket{le="+Inf"}'


def refused(status: int) -> str:
    return f'lookalike_requests_refused_total{{status="{status}"}}'


def test_metrics_count_a_job_from_submit_to_end(client: httpx.Client, fake_data_dir: Path) -> None:
    before = scrape(client)

    succeeded(client, submit(client, gallery_png(fake_data_dir, 12)))

    def counted() -> dict[str, float] | None:
        now = scrape(client)  # the worker adds its counts about once a second
        grown = all(
            now.get(name, 0) >= before.get(name, 0) + 1
            for name in (SUBMITTED_IMAGE, SUCCEEDED, LATENCY_ALL)
        )
        return now if grown else None

    now = eventually(counted, timeout=10, what="the job in /metrics")
    assert now.get(SUBMITTED_TEXT, 0) == before.get(SUBMITTED_TEXT, 0)
    assert now["lookalike_job_latency_seconds_count"] == now[LATENCY_ALL]
    assert now['lookalike_queue_length{queue="lookalike"}'] >= 0
    assert now['lookalike_queue_length{queue="lookalike.text"}'] >= 0
    assert now['lookalike_workers{state="ready"}'] == 1
    assert now['lookalike_workers{state="failed"}'] == 0


def test_metrics_count_a_text_job(client: httpx.Client) -> None:
    before = scrape(client)

    reply = client.post("/jobs", json={"text": "a pullover"})
    succeeded(client, reply.json()["id"])

    now = scrape(client)  # the API's own counts are added when scraped
    assert now[SUBMITTED_TEXT] == before.get(SUBMITTED_TEXT, 0) + 1


def test_metrics_count_a_refused_request(client: httpx.Client, fake_data_dir: Path) -> None:
    before = scrape(client)

    reply = client.post(
        "/jobs", files={"file": ("a.png", gallery_png(fake_data_dir, 1))}, data={"text": "a hat"}
    )

    assert reply.json() == {"detail": FILE_OR_TEXT}
    assert scrape(client)[refused(400)] == before.get(refused(400), 0) + 1


def test_metrics_count_an_upload_refused_for_its_size(client: httpx.Client) -> None:
    before = scrape(client)

    reply = client.post("/jobs", files={"file": ("big.png", b"\0" * (11 * 1024 * 1024))})

    assert reply.status_code == 413
    assert scrape(client).get(refused(413), 0) == before.get(refused(413), 0) + 1


# --- JSON logs ----------------------------------------------------------------------------


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a log file (a worker also prints Celery's banner and warnings)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def test_json_logs_follow_one_job_from_the_api_through_the_worker(
    tmp_path: Path, tiny_clip_dir: Path, fake_data_dir: Path, built_index: Path
) -> None:
    stack = make_stack(tmp_path, tiny_clip_dir, fake_data_dir)
    stack.env.update(
        LOOKALIKE_INDEX_DIR=str(built_index),
        LOOKALIKE_LOG_FORMAT="json",
        LOOKALIKE_LOG_LEVEL="DEBUG",  # the stages between start and end are DEBUG lines
    )
    stack.start(workers=1)
    try:
        with httpx.Client(base_url=stack.url, timeout=30) as http:
            job_id = submit(http, gallery_png(fake_data_dir, 30))
            succeeded(http, job_id)

        def worker_lines() -> list[dict[str, Any]] | None:
            lines = [r for r in json_lines(tmp_path / "worker0.log") if r.get("job_id") == job_id]
            return lines if any(r.get("stage") == "end" for r in lines) else None

        worker = eventually(worker_lines, timeout=10, what="the worker's end line")
        api = [r for r in json_lines(tmp_path / "api.log") if r.get("job_id") == job_id]
    finally:
        stack.stop()

    assert [r["stage"] for r in api] == ["accept"]
    assert api[0]["kind"] == "image"
    assert api[0]["logger"] == "api.submit"
    assert [r["stage"] for r in worker] == ["start", "decode", "embed", "search", "end"]
    assert worker[-1]["status"] == "succeeded"
    assert worker[0]["attempt"] == 1
    for record in [*api, *worker]:
        assert {"time", "level", "logger", "message"} <= set(record)
        assert job_id in record["message"]


# --- the distributed index build ----------------------------------------------------------


def fp32_stack(workdir: Path, model_dir: Path, data_dir: Path, index: Path) -> Stack:
    """A stack whose processes all embed in fp32.

    On a CPU each process picks int8 or bf16 by checking them on its own probe images, so a
    builder and the workers could pick differently and their embeddings would differ by
    rounding; fp32 everywhere makes a distributed build comparable to a local one.
    """
    stack = make_stack(workdir, model_dir, data_dir)
    stack.env.update(LOOKALIKE_INDEX_DIR=str(index), LOOKALIKE_FAST_CPU="off")
    return stack


@pytest.fixture(scope="module")
def two_workers(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_clip_dir: Path,
    fake_data_dir: Path,
    built_index: Path,
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("two-workers")
    shutil.copytree(built_index, workdir / "index")
    stack = fp32_stack(workdir, tiny_clip_dir, fake_data_dir, workdir / "index")
    stack.start(workers=2)
    yield stack
    stack.stop()


def chunk_tasks_received(stack: Stack) -> int:
    """Chunk tasks the workers' Celery logs say they received."""
    return sum(
        1
        for i in range(len(stack.workers))
        for line in (stack.workdir / f"worker{i}.log").read_text().splitlines()
        if f"Task {INDEX_CHUNK_TASK}[" in line and line.endswith("received")
    )


def test_distributed_build_equals_a_local_build(
    two_workers: Stack, tmp_path: Path, tiny_clip_dir: Path, fake_data_dir: Path
) -> None:
    assert len(plan_chunks(DISTRIBUTED_SIZE)) == 2  # one full chunk of CHUNK, one partial
    assert CHUNK < DISTRIBUTED_SIZE
    size = str(DISTRIBUTED_SIZE)
    received = chunk_tasks_received(two_workers)

    distributed = two_workers.run_cli(
        "index", "build", "--distributed", "--size", size, "--no-progress", timeout=300
    )
    local_stack = fp32_stack(tmp_path, tiny_clip_dir, fake_data_dir, tmp_path / "index")
    local = local_stack.run_cli("index", "build", "--size", size, "--no-progress", timeout=300)

    assert distributed.returncode == 0, distributed.stderr + two_workers.logs()
    assert local.returncode == 0, local.stderr
    assert "on 2 worker(s), 2 chunk(s) to embed" in distributed.stdout
    assert "index built at" in distributed.stdout
    found = [
        index_dir(
            Path(stack.env["LOOKALIKE_INDEX_DIR"]),
            gallery=FASHION_MNIST,
            model_id=str(tiny_clip_dir),
            size=DISTRIBUTED_SIZE,
        )
        for stack in (two_workers, local_stack)
    ]
    manifests = [json.loads((d / "manifest.json").read_text()) for d in found]
    assert [m["count"] for m in manifests] == [DISTRIBUTED_SIZE] * 2
    for key in ("gallery", "kind", "model_id", "dim", "class_names", "preprocessing_digest"):
        assert manifests[0][key] == manifests[1][key], key
    embeddings = [np.load(d / "embeddings.npy").astype(np.float32) for d in found]
    assert embeddings[0].shape == embeddings[1].shape == (DISTRIBUTED_SIZE, manifests[0]["dim"])
    np.testing.assert_allclose(embeddings[0], embeddings[1], atol=2e-3)
    labels = [np.load(d / "labels.npy") for d in found]
    np.testing.assert_array_equal(labels[0], labels[1])
    expected = load_gallery(fake_data_dir, size=DISTRIBUTED_SIZE).labels
    np.testing.assert_array_equal(labels[0], expected)
    assert (found[0] / "thumbs.bin").read_bytes() == (found[1] / "thumbs.bin").read_bytes()
    assert not (found[0] / "parts").exists()
    assert chunk_tasks_received(two_workers) == received + 2


def test_distributed_build_refuses_workers_of_another_model(
    two_workers: Stack, tmp_path: Path, tiny_clip_dir: Path
) -> None:
    other = tmp_path / "same-weights-other-name"
    shutil.copytree(tiny_clip_dir, other)
    builder = Stack(env=dict(two_workers.env), workdir=tmp_path)
    builder.env.update(LOOKALIKE_MODEL=str(other), LOOKALIKE_INDEX_DIR=str(tmp_path / "index"))

    done = builder.run_cli(
        "index", "build", "--distributed", "--size", "100", "--no-progress", timeout=300
    )

    assert done.returncode == 2, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("lookalike: ")
    assert f"holds {str(tiny_clip_dir)!r}, the build is for {str(other)!r}" in last
    assert last.endswith("build where the workers run the same model")


def test_distributed_build_without_a_ready_worker_exits_2(
    tmp_path: Path, tiny_clip_dir: Path, fake_data_dir: Path
) -> None:
    stack = fp32_stack(tmp_path, tiny_clip_dir, fake_data_dir, tmp_path / "index")
    stack.start_redis()  # Redis, but no worker
    try:
        done = stack.run_cli(
            "index", "build", "--distributed", "--size", "300", "--no-progress", timeout=300
        )
    finally:
        stack.stop()

    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == NO_WORKER
    assert done.stdout == ""
    assert not any((tmp_path / "index").glob("*/manifest.json"))


# --- lookalike query ----------------------------------------------------------------------


def test_cli_query_prints_the_matches_and_saves_the_picture(
    service: Stack, tmp_path: Path, fake_data_dir: Path
) -> None:
    image = tmp_path / "query.png"
    image.write_bytes(gallery_png(fake_data_dir, 44))
    picture = tmp_path / "out.png"

    done = service.run_cli(
        "query", str(image), "--url", service.url, "--k", "6", "--save", str(picture), timeout=120
    )

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["rank", "index", "class", "score"]
    assert lines[1].split()[:2] == ["1", "44"]
    assert len([line for line in lines[1:] if line[:4].strip().isdigit()]) == 6
    assert lines[-1] == f"picture saved to {picture}"
    width, height = decode_png(picture.read_bytes()).size
    assert width > 0 and height > 0


def test_cli_query_text_prints_the_job_as_json(service: Stack) -> None:
    done = service.run_cli("query", "--text", "a shoe", "--json", "--url", service.url)

    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert (job["status"], job["kind"], job["text"]) == ("succeeded", "text", "a shoe")
    assert job["gallery"] == FASHION_MNIST
    assert len(job["result"]["matches"]) == 5


def test_cli_query_refuses_an_image_and_a_text_together(service: Stack, tmp_path: Path) -> None:
    image = tmp_path / "query.png"
    image.write_bytes(b"unused")

    done = service.run_cli("query", str(image), "--text", "a shoe", "--url", service.url)

    assert done.returncode == 2
    assert done.stderr.strip() == "lookalike: give an IMAGE file or --text, one of them"
    assert done.stdout == ""


def test_cli_query_reports_a_refusal(service: Stack, tmp_path: Path) -> None:
    done = service.run_cli("query", "--text", " ", "--url", service.url)

    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"lookalike: 422: {BAD_TEXT.format(n=MAX_TEXT_CHARS)}"
