"""``lookalike bench --model-only`` on the tiny CLIP: every figure is there and positive."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lookalike.bench.model import format_model_report, run_model_bench, synthetic_rows
from lookalike.cli import main
from shared.fashion_mnist import load_gallery
from shared.galleries import FashionMnistSource
from shared.settings import GallerySettings, ModelSettings, Settings
from worker.encoder import load_encoder
from worker.index import build_index, index_dir

SIZES = (100, 1000)
GALLERY_SIZE = 50


def settings_for(model_dir: Path, data_dir: Path, index_root: Path) -> Settings:
    return Settings(
        model=ModelSettings(name=str(model_dir), device="cpu"),
        gallery=GallerySettings(data_dir=data_dir, size=GALLERY_SIZE, index_dir=index_root),
    )


def positive(report: dict[str, Any], *keys: str) -> None:
    for key in keys:
        assert report[key] > 0, key


@pytest.fixture(scope="module")
def report(
    tiny_clip_dir: Path, fake_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    settings = settings_for(tiny_clip_dir, fake_data_dir, tmp_path_factory.mktemp("index"))
    return run_model_bench(settings, batch_size=4, repeats=2, sizes=SIZES, compare_images=8)


def test_model_bench_reports_encoder_figures(report: dict[str, Any]) -> None:
    assert report["kind"] == "model-only"
    assert report["model"]["is_random"] is False
    encoder = report["encoder"]
    assert encoder["batch_size"] == 4
    positive(encoder, "batch1_ms", "batch1_preprocess_ms", "batch_ms", "batch_images_per_s")


def test_model_bench_compares_fp32_with_the_fast_path(report: dict[str, Any]) -> None:
    compared = report["fp32_vs_fast"]
    assert compared["fp32_precision"] == "fp32"
    assert compared["fast_precision"] == report["model"]["precision"]
    assert compared["cosine_images"] == 8
    positive(compared, "fp32_ms", "fast_ms", "speedup", "fp32_images_per_s", "fast_images_per_s")
    assert 0.9 < compared["min_cosine"] <= 1.0 + 1e-5


def test_model_bench_searches_synthetic_rows_when_no_index_is_built(
    report: dict[str, Any],
) -> None:
    search = report["search"]
    assert search["source"] == "synthetic"
    assert search["rows"] == GALLERY_SIZE
    assert search["dtype"] == "float16"
    positive(search, "batch1_ms", "batch_per_query_ms", "matrix_mb")


def test_model_bench_times_search_at_each_size(report: dict[str, Any]) -> None:
    assert [row["rows"] for row in report["scaling"]] == list(SIZES)
    for row in report["scaling"]:
        positive(row, "batch1_ms", "batch_per_query_ms", "matrix_mb")
    assert report["scaling"][1]["matrix_mb"] == pytest.approx(1000 * 32 * 2 / 2**20)


def test_model_bench_times_a_fresh_process_start(report: dict[str, Any]) -> None:
    start = report["startup"]
    assert start["mode"] == "fresh subprocess"
    assert start["index_loaded"] is False
    positive(start, "process_s", "load_s")
    assert start["process_s"] > start["load_s"]


def test_model_report_prints_every_section(report: dict[str, Any]) -> None:
    text = format_model_report(report)
    for needle in ("batch 1:", "images/s", "speed-up", "min ", "top-5", "1,000", "fresh process"):
        assert needle in text
    assert "compute only" not in text  # the tiny model is loaded from a directory
    json.dumps(report)


def test_model_bench_uses_a_built_index(
    tiny_clip_dir: Path, fake_data_dir: Path, tmp_path: Path
) -> None:
    settings = settings_for(tiny_clip_dir, fake_data_dir, tmp_path)
    gallery = load_gallery(fake_data_dir, size=GALLERY_SIZE)
    build_index(
        load_encoder(settings.model),
        FashionMnistSource(gallery.images, gallery.labels),
        directory=index_dir(
            tmp_path, gallery="fashion-mnist", size=GALLERY_SIZE, model_id=str(tiny_clip_dir)
        ),
        batch_size=16,
        progress=False,
    )
    result = run_model_bench(
        settings, batch_size=4, repeats=1, sizes=(10,), compare_images=4, startup=False
    )
    assert result["search"]["source"] == "index"
    assert result["search"]["rows"] == GALLERY_SIZE
    assert result["startup"] is None


def test_bench_cli_writes_json(
    tiny_clip_dir: Path,
    fake_data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LOOKALIKE_MODEL", str(tiny_clip_dir))
    monkeypatch.setenv("LOOKALIKE_DATA_DIR", str(fake_data_dir))
    monkeypatch.setenv("LOOKALIKE_GALLERY_SIZE", str(GALLERY_SIZE))
    monkeypatch.setenv("LOOKALIKE_INDEX_DIR", str(tmp_path / "index"))
    monkeypatch.setenv("LOOKALIKE_DEVICE", "cpu")
    path = tmp_path / "model.json"
    argv = ["bench", "--model-only", "--batch-size", "4", "--repeats", "1", "--sizes", "20,40"]
    assert main([*argv, "--json", str(path)]) == 0
    written = json.loads(path.read_text())
    assert [row["rows"] for row in written["scaling"]] == [20, 40]
    assert "speed-up" in capsys.readouterr().out


def test_synthetic_rows_are_unit_float16() -> None:
    rows = synthetic_rows(70_000, 8, seed=1)
    assert rows.dtype == np.float16 and rows.shape == (70_000, 8)
    norms = np.linalg.norm(rows.astype(np.float32), axis=1)
    assert np.allclose(norms, 1.0, atol=2e-3)


def test_model_bench_times_preprocessing_both_ways_and_a_build(report: dict[str, Any]) -> None:
    pre = report["preprocessing"]
    assert pre["path"] == "torch"
    for path in ("processor", "pil+torch", "torch"):
        positive(pre[path], "gallery_28px_per_s", "jpeg_640x480_per_s")
    build = report["build"]
    assert build["images"] == GALLERY_SIZE
    positive(build, "build_images_per_s", "forward_images_per_s")
    text = format_model_report(report)
    assert "preprocess   one process" in text and "build        " in text
    assert "torch (used)" in text
