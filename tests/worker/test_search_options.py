"""Search options on a built gallery, run as a worker runs jobs (worker.search): a filter
applied before the top-k, min_score, exclude, "more like this", near-duplicates."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.fashion_mnist import CLASS_NAMES, load_gallery
from shared.jobs import JobRecord, JobStore, new_job_id
from shared.schemas import JobKind
from tests.support import SEARCH_GALLERY, gallery_png
from worker import search
from worker.engine import Engine
from worker.search import run_search_jobs

SIZE = SEARCH_GALLERY


def answered(store: JobStore, engine: Engine, **job: object) -> JobRecord:
    job_id = new_job_id()
    store.create(job_id, **job)  # type: ignore[arg-type]
    run_search_jobs(store, engine, [job_id], worker_name="w", max_pixels=10**6, max_attempts=3)
    found = store.get(job_id)
    assert found is not None
    return found


def test_a_class_filter_applies_before_the_top_k(
    store: JobStore, engine: Engine, fake_data_dir: Path
) -> None:
    labels = load_gallery(fake_data_dir, size=SIZE).labels
    wanted = CLASS_NAMES[int(labels[0]) - 1]  # not the query's own class
    members = sum(1 for label in labels if CLASS_NAMES[int(label)] == wanted)

    job = answered(
        store,
        engine,
        k=50,
        upload=gallery_png(fake_data_dir, 0),
        options={"filter": {"class": wanted}},
    )

    assert job.result is not None
    matches = job.result.matches
    assert len(matches) == min(50, members)  # every member qualifies, however far away
    assert {m.attributes["class"] for m in matches} == {wanted}
    assert all(m.item_id == str(m.index) for m in matches)


def test_min_score_and_exclude_drop_matches(
    store: JobStore, engine: Engine, fake_data_dir: Path
) -> None:
    image = gallery_png(fake_data_dir, 7)
    plain = answered(store, engine, k=5, upload=image)
    assert plain.result is not None and plain.result.matches[0].item_id == "7"

    strict = answered(store, engine, k=5, upload=image, options={"min_score": 0.999})
    without = answered(store, engine, k=5, upload=image, options={"exclude": ["7", "nope"]})

    assert strict.result is not None and [m.item_id for m in strict.result.matches] == ["7"]
    assert without.result is not None
    assert [m.item_id for m in without.result.matches] == [
        m.item_id for m in plain.result.matches[1:]
    ] + [without.result.matches[-1].item_id]


def test_more_like_an_item_leaves_the_item_out(store: JobStore, engine: Engine) -> None:
    job = answered(store, engine, k=5, kind=JobKind.ITEM, options={"item_id": "12"})

    assert job.result is not None
    assert len(job.result.matches) == 5 and "12" not in [m.item_id for m in job.result.matches]


def test_more_like_an_item_the_gallery_lacks_fails_naming_it(
    store: JobStore, engine: Engine
) -> None:
    job = answered(store, engine, k=5, kind=JobKind.ITEM, options={"item_id": "100"})

    assert job.status == "failed"
    assert job.error == "Gallery 'fashion-mnist' has no item '100'."


def test_duplicates_pairs_every_item_with_its_twins(
    store: JobStore, engine: Engine, fake_data_dir: Path
) -> None:
    job = answered(store, engine, k=1, kind=JobKind.DUPLICATES, options={"min_score": -1.0})

    assert job.result is not None and job.result.duplicates is not None
    found = job.result.duplicates
    assert len(found.pairs) == SIZE * (SIZE - 1) // 2  # every pair reaches -1
    scores = [pair.score for pair in found.pairs]
    assert scores == sorted(scores, reverse=True)
    assert found.groups == [sorted((str(i) for i in range(SIZE)), key=str)]


def test_duplicates_of_a_gallery_too_large_for_the_device_fail_with_a_sentence(
    store: JobStore, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(search.MAX_DUPLICATE_ROWS, "cpu", SIZE - 1)

    job = answered(store, engine, k=1, kind=JobKind.DUPLICATES, options={"min_score": 0.9})

    assert job.status == "failed"
    assert job.error == (
        "Gallery 'fashion-mnist' has 100 items: near-duplicates are found among at most 99 "
        "on this worker's cpu."
    )
