"""``lookalike eval``: precision@k by hand, the pixel baseline, the CLI end to end."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import shared.fashion_mnist as fashion_mnist
import worker.evaluate as evaluate
from lookalike.cli import main
from lookalike.stack import ROOT, stack_env
from shared.errors import IndexMismatch, LookalikeError
from shared.fashion_mnist import CLASS_NAMES, Gallery
from shared.settings import GallerySettings, ModelSettings, Settings
from worker.encoder import ClipImageEncoder, load_encoder
from worker.evaluate import (
    format_eval_report,
    indexed_gallery,
    load_split,
    pixel_baseline,
    pixel_vectors,
    precision_at_k,
    run_eval,
)
from worker.index import gallery_to_images, index_dir

GALLERY_SIZE = 100
QUERIES = 20


def settings_for(model: str, data_dir: Path, index_root: Path) -> Settings:
    return Settings(
        model=ModelSettings(name=model, device="cpu", fast_cpu="off"),
        gallery=GallerySettings(data_dir=data_dir, size=GALLERY_SIZE, index_dir=index_root),
    )


def encoder_named(model_id: str) -> Any:
    """Enough of an encoder for choosing the index: only its model id is read."""
    return SimpleNamespace(model_id=model_id)


def in_unit_range(value: float | None) -> bool:
    return value is None or 0.0 <= value <= 1.0


@pytest.fixture
def eval_env(
    fake_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> pytest.MonkeyPatch:
    """Settings for an in-process ``main(["eval", ...])`` on the fake dataset."""
    monkeypatch.setenv("LOOKALIKE_DATA_DIR", str(fake_data_dir))
    monkeypatch.setenv("LOOKALIKE_INDEX_DIR", str(tmp_path / "index"))
    monkeypatch.setenv("LOOKALIKE_GALLERY_SIZE", str(GALLERY_SIZE))
    return monkeypatch


def test_precision_at_k_averages_hits_per_query_per_class_and_overall() -> None:
    queries = np.array([0, 0, 1, 3])
    matches = np.array([[0, 0, 1], [0, 2, 2], [1, 1, 1], [3, 0, 0]])
    result = precision_at_k(queries, matches, classes=4)
    # per query: 2/3, 1/3, 3/3, 1/3
    assert result.k == 3
    assert result.overall == pytest.approx(7 / 12)
    assert result.queries == (2, 1, 0, 1)
    assert result.per_class[0] == pytest.approx(0.5)
    assert result.per_class[1] == pytest.approx(1.0)
    assert result.per_class[3] == pytest.approx(1 / 3)


def test_precision_at_k_gives_none_for_a_class_with_zero_queries() -> None:
    result = precision_at_k(np.array([7, 7]), np.array([[7, 1], [2, 2]]))
    assert len(result.per_class) == len(CLASS_NAMES)
    assert result.queries[7] == 2 and sum(result.queries) == 2
    assert result.per_class[7] == pytest.approx(0.25)
    assert all(p is None for label, p in enumerate(result.per_class) if label != 7)
    assert result.overall == pytest.approx(0.25)


def test_precision_at_k_is_one_when_every_match_agrees() -> None:
    result = precision_at_k(np.array([2, 5]), np.array([[2] * 5, [5] * 5]))
    assert result.overall == 1.0 and result.per_class[2] == 1.0 and result.per_class[5] == 1.0


def test_precision_at_k_refuses_rows_that_do_not_fit_the_queries() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        precision_at_k(np.array([0, 1, 2]), np.array([[0, 1], [1, 1]]))


def test_pixel_vectors_are_unit_rows_and_a_black_image_stays_zero() -> None:
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    images[0, 3:9, 4:7] = 200
    rows = pixel_vectors(images)
    assert rows.shape == (2, 784) and rows.dtype == np.float32
    assert np.linalg.norm(rows[0]) == pytest.approx(1.0)
    assert not np.any(rows[1])


def test_pixel_baseline_finds_exact_duplicates_at_rank_one() -> None:
    rng = np.random.default_rng(3)
    gallery = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    labels = np.arange(30, dtype=np.uint8) % 10
    picks = np.array([4, 17, 29, 0])
    matches = pixel_baseline(gallery[picks], gallery, labels, k=1)
    assert matches[:, 0].tolist() == labels[picks].tolist()
    assert precision_at_k(labels[picks], matches).overall == 1.0


def test_pixel_baseline_ranks_by_cosine_not_brightness() -> None:
    # Three shapes: a top bar (class 1), a bottom bar (class 2), a left bar (class 3).
    gallery = np.zeros((3, 28, 28), dtype=np.uint8)
    gallery[0, :10, :] = 255
    gallery[1, 18:, :] = 255
    gallery[2, :, :10] = 255
    labels = np.array([1, 2, 3], dtype=np.uint8)
    query = np.zeros((1, 28, 28), dtype=np.uint8)
    query[0, :10, :] = 40  # a dim top bar: same direction as the bright one
    query[0, :, :3] = 40  # plus a sliver of the left bar, none of the bottom one
    assert pixel_baseline(query, gallery, labels, k=3).tolist() == [[1, 3, 2]]


def test_eval_cli_prints_the_table_and_writes_json(
    tiny_clip_dir: Path, fake_data_dir: Path, tmp_path: Path
) -> None:
    env = stack_env(
        model_dir=tiny_clip_dir, data_dir=fake_data_dir, workdir=tmp_path, gallery_size=240
    )
    path = tmp_path / "eval.json"
    argv = ["--queries", str(QUERIES), "--gallery-size", str(GALLERY_SIZE), "--k", "3"]
    done = subprocess.run(
        [sys.executable, "-m", "lookalike", "eval", *argv, "--json", str(path), "--no-progress"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["class", "queries", "CLIP", "P@3", "pixels", "P@3"]
    for label, name in enumerate(CLASS_NAMES):
        assert lines[1 + label].startswith(name)
    overall = lines[1 + len(CLASS_NAMES)].split()
    assert overall[:2] == ["overall", str(QUERIES)]
    assert "WARNING" not in done.stdout
    assert f"the first {GALLERY_SIZE} Fashion-MNIST train images; embedded here" in done.stdout
    assert f"the first {QUERIES} Fashion-MNIST test images; k 3" in done.stdout

    report: dict[str, Any] = json.loads(path.read_text())
    assert report["model_is_random"] is False and report["warning"] is None
    assert report["settings"] | {"data_dir": None, "index_dir": None} == {
        "dataset": "fashion-mnist",
        "data_dir": None,
        "queries": QUERIES,
        "query_split": "test",
        "gallery_size": GALLERY_SIZE,
        "gallery_split": "train",
        "k": 3,
        "batch_size": 32,
        "index_dir": None,
    }
    assert [row["name"] for row in report["classes"]] == list(CLASS_NAMES)
    assert sum(row["queries"] for row in report["classes"]) == QUERIES
    for row in [*report["classes"], report["overall"]]:
        assert in_unit_range(row["clip"]) and in_unit_range(row["pixels"])
        assert (row["clip"] is None) == (row["queries"] == 0)
    assert report["margin"] == pytest.approx(
        report["overall"]["clip"] - report["overall"]["pixels"]
    )
    assert report["winner"] in ("clip", "pixels", "tie")
    assert report["timings"]["total_s"] > 0


def test_random_model_report_carries_a_warning_before_and_after_the_table(
    tiny_clip_dir: Path,
    fake_data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The real random:vit-b-32 is too slow here: the tiny CLIP stands in, flagged random.
    tiny = load_encoder(ModelSettings(name=str(tiny_clip_dir), device="cpu", fast_cpu="off"))
    fake = dataclasses.replace(tiny, model_id="random:vit-b-32", is_random=True)

    def fake_load(settings: ModelSettings, **_: object) -> ClipImageEncoder:
        assert settings.name == "random:vit-b-32"
        return fake

    monkeypatch.setattr(evaluate, "load_encoder", fake_load)
    settings = settings_for("random:vit-b-32", fake_data_dir, tmp_path)
    report = run_eval(settings, queries=10, k=5, gallery_size=50, batch_size=16, progress=False)
    assert report["model_is_random"] is True
    assert "random:vit-b-32" in report["warning"] and "MEANINGLESS" in report["warning"]
    lines = format_eval_report(report).splitlines()
    assert "MEANINGLESS" in lines[0] and "MEANINGLESS" in lines[-1]
    assert lines[2].startswith("class")
    json.dumps(report)


@pytest.fixture
def small_gallery(fake_data_dir: Path) -> Gallery:
    return load_split(fake_data_dir, "train", count=GALLERY_SIZE)


def stub_index(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model_id: str, result: object
) -> list[dict[str, Any]]:
    """A manifest where the index would be, and ``load_index`` answering ``result``.

    The index module's own tests cover building and loading; these cover eval's choice.
    """
    directory = index_dir(tmp_path, gallery="fashion-mnist", size=GALLERY_SIZE, model_id=model_id)
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text("{}")
    calls: list[dict[str, Any]] = []

    def fake_load_index(path: Path, encoder: object, **kwargs: Any) -> object:
        calls.append({"path": path, **kwargs})
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(evaluate, "load_index", fake_load_index)
    return calls


def test_indexed_gallery_reuses_the_index_of_this_gallery_size_and_model(
    small_gallery: Gallery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    matrix = torch.zeros((GALLERY_SIZE, 4), dtype=torch.float16)
    index = SimpleNamespace(labels=small_gallery.labels.astype(np.int32), matrix=matrix)
    calls = stub_index(monkeypatch, tmp_path, "some/model", index)
    settings = settings_for("some/model", tmp_path, tmp_path)
    found, note = indexed_gallery(settings, encoder_named("some/model"), small_gallery)
    assert found is matrix
    assert note.startswith("reused the index at ")
    directory = Path(note.removeprefix("reused the index at "))
    assert calls == [{"path": directory, "gallery": "fashion-mnist", "size": GALLERY_SIZE}]


def test_indexed_gallery_embeds_here_when_no_index_is_built(
    small_gallery: Gallery, tmp_path: Path
) -> None:
    settings = settings_for("some/model", tmp_path, tmp_path)
    found, note = indexed_gallery(settings, encoder_named("some/model"), small_gallery)
    assert found is None
    assert note.startswith("embedded here: no index at ")


def test_indexed_gallery_embeds_here_when_the_index_is_refused(
    small_gallery: Gallery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub_index(monkeypatch, tmp_path, "some/model", IndexMismatch("built by other weights"))
    settings = settings_for("some/model", tmp_path, tmp_path)
    found, note = indexed_gallery(settings, encoder_named("some/model"), small_gallery)
    assert found is None
    assert note.endswith("was refused")


def test_indexed_gallery_embeds_here_when_the_index_has_other_labels(
    small_gallery: Gallery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    labels = (small_gallery.labels.astype(np.int32) + 1) % 10
    index = SimpleNamespace(labels=labels, matrix=torch.zeros((GALLERY_SIZE, 4)))
    stub_index(monkeypatch, tmp_path, "some/model", index)
    settings = settings_for("some/model", tmp_path, tmp_path)
    found, note = indexed_gallery(settings, encoder_named("some/model"), small_gallery)
    assert found is None
    assert note.endswith("has other labels")


def test_eval_with_a_reused_index_gives_the_figures_of_embedding_here(
    tiny_clip_dir: Path,
    small_gallery: Gallery,
    fake_data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_for(str(tiny_clip_dir), fake_data_dir, tmp_path / "empty")
    fresh = run_eval(
        settings, queries=QUERIES, k=5, gallery_size=GALLERY_SIZE, batch_size=32, progress=False
    )
    encoder = load_encoder(settings.model)
    rows = encoder.embed(gallery_to_images(small_gallery.images))
    index = SimpleNamespace(
        labels=small_gallery.labels.astype(np.int32),
        matrix=torch.from_numpy(rows.astype(np.float16)),  # stored as an index stores it
    )
    stub_index(monkeypatch, tmp_path, str(tiny_clip_dir), index)
    reused = run_eval(
        settings.model_copy(
            update={"gallery": settings.gallery.model_copy(update={"index_dir": tmp_path})}
        ),
        queries=QUERIES,
        k=5,
        gallery_size=GALLERY_SIZE,
        batch_size=32,
        progress=False,
    )
    assert fresh["gallery_source"].startswith("embedded here: no index at")
    assert reused["gallery_source"].startswith("reused the index at")
    # float16 rows: the same rankings, give or take a near-tie
    assert reused["overall"]["clip"] == pytest.approx(fresh["overall"]["clip"], abs=0.05)
    assert reused["overall"]["pixels"] == fresh["overall"]["pixels"]


def test_run_eval_refuses_more_queries_than_the_test_split_holds(
    fake_data_dir: Path, tmp_path: Path
) -> None:
    settings = settings_for("unused", fake_data_dir, tmp_path)
    with pytest.raises(LookalikeError, match=r"--queries 61 asks for more .* test split .*\(60\)"):
        run_eval(settings, queries=61, k=5, gallery_size=10, batch_size=8, progress=False)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--k", "0"], "--k must be from 1 to 50"),
        (["--k", "51"], "--k must be from 1 to 50"),
        (["--queries", "0"], "--queries must be from 1 to 10000"),
        (["--queries", "10001"], "--queries must be from 1 to 10000"),
        (["--gallery-size", "0"], "--gallery-size must be from 1 to 60000"),
        (["--gallery-size", "60001"], "--gallery-size must be from 1 to 60000"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--k", "10", "--gallery-size", "5"], "--k (10) cannot exceed the gallery size (5)"),
        (["--json", "/no/such/folder/eval.json"], "--json: the folder of"),
        (["--queries", "61", "--gallery-size", "10"], "--queries 61 asks for more images"),
        (["--queries", "10", "--gallery-size", "241"], "--gallery-size 241 asks for more images"),
    ],
)
def test_eval_cli_refuses_bad_flags_with_one_line_and_exit_2(
    eval_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    assert main(["eval", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"lookalike: {message}")
    assert captured.err.count("\n") == 1


def test_eval_cli_without_the_dataset_says_how_to_get_it(
    eval_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    eval_env.setenv("LOOKALIKE_DATA_DIR", str(tmp_path / "empty"))
    eval_env.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    eval_env.setattr(fashion_mnist, "KERAS_DIR", tmp_path / "no-keras")
    assert main(["eval", "--queries", "5", "--gallery-size", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lookalike: Fashion-MNIST was not found")
    assert "LOOKALIKE_DATA_DIR" in err
