"""End to end: real Redis, real Celery worker processes, the real API, over HTTP."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
from celery import Celery

from lookalike.stack import ROOT, Stack
from shared.celery_config import SEARCH_TASK
from shared.fashion_mnist import CLASS_NAMES, load_gallery
from shared.jobs import JobStore
from tests.stacks import GALLERY_SIZE, make_stack, started_stack
from tests.support import gallery_png, wait_job
from worker.search import UPLOAD_GONE

pytestmark = pytest.mark.e2e


@pytest.fixture
def client(service: Stack) -> httpx.Client:
    with httpx.Client(base_url=service.url, timeout=30) as client:
        yield client


def submit(client: httpx.Client, data: bytes, **params: str) -> dict[str, object]:
    reply = client.post("/jobs", files={"file": ("upload.png", data, "image/png")}, params=params)
    assert reply.status_code == 202, reply.text
    return reply.json()


def test_gallery_image_sent_as_png_finds_itself_at_rank_1(
    client: httpx.Client, fake_data_dir: Path
) -> None:
    reply = client.post("/jobs", files={"file": ("shoe.png", gallery_png(fake_data_dir, 37))})
    assert reply.status_code == 202
    created = reply.json()
    assert created["status"] == "queued"
    assert reply.headers["location"] == f"/jobs/{created['id']}"

    job = wait_job(client, created["id"])

    assert job["status"] == "succeeded", job
    result = job["result"]
    matches = result["matches"]
    assert len(matches) == 5
    assert matches[0]["index"] == 37
    assert matches[0]["score"] >= 0.99
    assert [m["rank"] for m in matches] == [1, 2, 3, 4, 5]
    scores = [m["score"] for m in matches]
    assert scores == sorted(scores, reverse=True)
    labels = load_gallery(fake_data_dir, size=GALLERY_SIZE).labels
    for match in matches:
        assert match["label"] == int(labels[match["index"]])
        assert match["label_name"] == CLASS_NAMES[match["label"]]
        assert -1.0 <= match["score"] <= 1.0
    assert result["gallery"] == {"name": "fashion-mnist", "size": GALLERY_SIZE}
    assert result["model_is_random"] is False
    assert set(result["timings"]) >= {"queue_wait_ms", "embed_ms", "search_ms", "total_ms"}
    assert job["attempts"] == 1


@pytest.mark.parametrize("where", ["query", "form"])
def test_k_sets_the_number_of_matches(
    client: httpx.Client, fake_data_dir: Path, where: str
) -> None:
    files = {"file": ("a.png", gallery_png(fake_data_dir, 3))}
    if where == "query":
        reply = client.post("/jobs", files=files, params={"k": "12"})
    else:
        reply = client.post("/jobs", files=files, data={"k": "12"})
    assert reply.status_code == 202
    assert reply.json()["k"] == 12
    job = wait_job(client, reply.json()["id"])
    assert len(job["result"]["matches"]) == 12


@pytest.mark.parametrize("bad_k", ["0", "-1", "51", "abc"])
def test_upload_rejects_bad_k(client: httpx.Client, fake_data_dir: Path, bad_k: str) -> None:
    reply = client.post(
        "/jobs", files={"file": ("a.png", gallery_png(fake_data_dir, 3))}, params={"k": bad_k}
    )
    assert reply.status_code == 422
    assert reply.json() == {"detail": "k must be a whole number from 1 to 50."}


def test_unknown_job_is_404(client: httpx.Client) -> None:
    reply = client.get("/jobs/" + "0" * 32)
    assert reply.status_code == 404
    assert reply.json() == {"detail": "Job not found."}


def test_malformed_job_id_is_404(client: httpx.Client) -> None:
    assert client.get("/jobs/not-a-job").status_code == 404
    assert client.get("/jobs/" + "a" * 5000).status_code == 404


def test_long_poll_answers_as_soon_as_the_job_ends(
    client: httpx.Client, fake_data_dir: Path
) -> None:
    created = submit(client, gallery_png(fake_data_dir, 5))
    started = time.monotonic()
    job = client.get(f"/jobs/{created['id']}", params={"wait": "20"}).json()
    elapsed = time.monotonic() - started
    assert job["status"] == "succeeded"
    assert elapsed < 10


def test_long_poll_gives_up_after_the_wait(service: Stack, client: httpx.Client) -> None:
    store = JobStore(
        redis.Redis.from_url(service.env["LOOKALIKE_REDIS_URL"]), prefix="lookalike", ttl_s=600
    )
    job_id = "f" * 32
    store.create(job_id, upload=b"never enqueued", k=5)  # no task: it stays queued
    started = time.monotonic()
    reply = client.get(f"/jobs/{job_id}", params={"wait": "1.5"})
    elapsed = time.monotonic() - started
    assert reply.status_code == 200
    assert reply.json()["status"] == "queued"
    assert 1.4 <= elapsed < 5


def test_corrupt_upload_is_400(client: httpx.Client, fake_data_dir: Path) -> None:
    png = gallery_png(fake_data_dir, 1)
    reply = client.post("/jobs", files={"file": ("x.png", png[: len(png) // 2])})
    assert reply.status_code == 400
    assert reply.json() == {"detail": "The image is corrupt or truncated."}


def test_text_upload_is_400(client: httpx.Client) -> None:
    reply = client.post("/jobs", files={"file": ("x.png", b"hello, not a picture", "image/png")})
    assert reply.status_code == 400
    assert reply.json() == {
        "detail": "The upload is not a JPEG, PNG, WebP, GIF, BMP or TIFF image."
    }


def test_oversized_upload_is_413(client: httpx.Client) -> None:
    reply = client.post("/jobs", files={"file": ("big.png", b"\0" * (11 * 1024 * 1024))})
    assert reply.status_code == 413
    assert reply.json() == {"detail": "The upload is larger than the 10 MB limit."}


def test_failed_job_records_its_error(service: Stack, client: httpx.Client) -> None:
    url = service.env["LOOKALIKE_REDIS_URL"]
    client_redis = redis.Redis.from_url(url)
    store = JobStore(client_redis, prefix="lookalike", ttl_s=600)
    job_id = "e" * 32
    store.create(job_id, upload=b"", k=5)
    client_redis.delete(store.keys.upload(job_id))  # the upload vanished before the worker ran
    Celery(broker=url).send_task(SEARCH_TASK, args=[job_id], queue="lookalike")
    job = wait_job(client, job_id)
    assert job["status"] == "failed"
    assert job["error"] == UPLOAD_GONE
    assert job["result"] is None


def test_service_keeps_answering_after_bad_input(client: httpx.Client, fake_data_dir: Path) -> None:
    assert (
        client.post("/jobs", files={"file": ("x", b"\x89PNG\r\n\x1a\n garbage")}).status_code == 400
    )
    job = wait_job(client, submit(client, gallery_png(fake_data_dir, 9))["id"])
    assert job["status"] == "succeeded"
    assert job["result"]["matches"][0]["index"] == 9


def test_readyz_reports_the_loaded_worker(client: httpx.Client) -> None:
    reply = client.get("/readyz")
    assert reply.status_code == 200
    (worker,) = reply.json()["workers"]
    assert worker["state"] == "ready"
    assert worker["size"] == GALLERY_SIZE
    assert client.get("/healthz").json() == {"status": "ok"}


def test_openapi_describes_jobs_with_real_models(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    post = schema["paths"]["/jobs"]["post"]
    assert "multipart/form-data" in post["requestBody"]["content"]
    assert post["responses"]["202"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/Job"
    )
    assert {"Job", "JobResult", "Match", "Timings"} <= set(schema["components"]["schemas"])


def test_two_workers_share_the_queue_and_do_each_job_once(
    tmp_path: Path, tiny_clip_dir: Path, fake_data_dir: Path, built_index: Path
) -> None:
    stack = started_stack(tmp_path, tiny_clip_dir, fake_data_dir, built_index, workers=2)
    try:
        with httpx.Client(base_url=stack.url, timeout=30) as client:
            ids = [submit(client, gallery_png(fake_data_dir, i))["id"] for i in range(20)]
            jobs = [wait_job(client, job_id) for job_id in ids]
    finally:
        stack.stop()
    assert [j["status"] for j in jobs] == ["succeeded"] * 20
    assert [j["result"]["matches"][0]["index"] for j in jobs] == list(range(20))
    assert all(j["attempts"] == 1 for j in jobs)
    assert len({j["result"]["worker"] for j in jobs}) == 2, "both workers should have taken jobs"


def test_one_worker_command_runs_several_model_processes(
    tmp_path: Path, tiny_clip_dir: Path, fake_data_dir: Path, built_index: Path
) -> None:
    """``lookalike worker --processes 2``: two processes, each its own model, taking jobs from
    the same queue; stopping the command stops both."""
    stack = make_stack(tmp_path, tiny_clip_dir, fake_data_dir)
    stack.env["LOOKALIKE_INDEX_DIR"] = str(built_index)
    stack.start(workers=0)
    parent = stack.spawn("workers", "worker", "--processes", "2")
    stack.workers.append(parent)
    try:
        stack.wait_ready(workers=2)
        with httpx.Client(base_url=stack.url, timeout=30) as client:
            ids = [submit(client, gallery_png(fake_data_dir, i))["id"] for i in range(24)]
            jobs = [wait_job(client, job_id) for job_id in ids]
    finally:
        stack.stop()
    assert parent.returncode == 0
    assert [j["status"] for j in jobs] == ["succeeded"] * 24
    assert len({j["result"]["worker"] for j in jobs}) == 2, "both processes should take jobs"


def test_worker_exits_with_a_clear_message_when_the_model_cannot_load(
    tmp_path: Path, tiny_clip_dir: Path, fake_data_dir: Path, built_index: Path
) -> None:
    stack = make_stack(tmp_path, tmp_path / "no-such-model", fake_data_dir)
    stack.start_redis()
    try:
        done = stack.run_cli("worker", timeout=120)
    finally:
        stack.stop()
    assert done.returncode == 2
    assert "LOOKALIKE_MODEL" in done.stderr
    assert "no-such-model" in done.stderr


def test_worker_refuses_an_index_of_another_size(
    tmp_path: Path, tiny_clip_dir: Path, fake_data_dir: Path, built_index: Path
) -> None:
    stack = make_stack(tmp_path, tiny_clip_dir, fake_data_dir)
    stack.env["LOOKALIKE_INDEX_DIR"] = str(built_index)
    stack.env["LOOKALIKE_GALLERY_SIZE"] = str(GALLERY_SIZE + 1)
    stack.start_redis()
    try:
        done = stack.run_cli("worker", timeout=120)
    finally:
        stack.stop()
    assert done.returncode == 2
    assert "lookalike index build" in done.stderr


def test_api_never_imports_torch() -> None:
    code = (
        "import sys, api.app; api.app.create_app; "
        "bad = {'torch', 'transformers'} & set(sys.modules); assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
