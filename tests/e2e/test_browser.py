"""The web page at GET /, driven in a real headless Chromium against the real stack.

The browser is tests/e2e/conftest.py's: Debian's chromium through Playwright's Python package,
never a downloaded one; without either, the browser tests skip and say why.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lookalike.stack import ROOT, Stack
from tests.support import gallery_png

pytestmark = pytest.mark.e2e

SCREENSHOT = ROOT / "artifacts" / "browser" / "result.png"
NOT_AN_IMAGE = "The upload is not a JPEG, PNG, WebP, GIF, BMP or TIFF image."
SCORE = re.compile(r"^-?\d\.\d{3}$")
WAIT_MS = 30_000

# Records every value of #results[data-status], so a test can see the job's status change.
RECORD_STATUSES = """
window.__statuses = [];
document.addEventListener("DOMContentLoaded", () => {
  const results = document.getElementById("results");
  new MutationObserver(() => {
    const status = results.dataset.status;
    if (status && window.__statuses.at(-1) !== status) window.__statuses.push(status);
  }).observe(results, { attributes: true, attributeFilter: ["data-status"] });
});
"""


@pytest.fixture
def page(browser: Any, service: Stack) -> Iterator[Any]:
    """A fresh tab on the page, recording CSP violations and the job's statuses."""
    context = browser.new_context(viewport={"width": 1200, "height": 900}, base_url=service.url)
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    console: list[str] = []
    tab.on("console", lambda message: console.append(message.text))
    tab.add_init_script(RECORD_STATUSES)
    tab.goto("/")
    tab.wait_for_selector("#readiness[data-state='ready']")
    yield tab
    context.close()
    violations = [text for text in console if "Content Security Policy" in text]
    assert violations == [], "the page broke its own Content-Security-Policy"


def wait_for_end(page: Any) -> str:
    page.wait_for_selector("#results[data-status='succeeded'], #results[data-status='failed']")
    return str(page.get_attribute("#results", "data-status"))


def check_matches(page: Any, k: int) -> list[float]:
    """k matches, each with a loaded image, an alt text, a rank, a class name and a score."""
    items = page.locator("#matches > li")
    assert items.count() == k
    page.wait_for_function(
        "() => [...document.querySelectorAll('#matches img')].every(i => i.complete)"
    )
    scores = []
    for index in range(k):
        item = items.nth(index)
        image = item.locator("img")
        assert image.count() == 1, f"match {index + 1} shows no image"
        assert image.evaluate("i => i.naturalWidth") > 0, f"match {index + 1}'s image did not load"
        assert image.get_attribute("alt").startswith(f"Rank {index + 1}: ")
        assert item.locator(".rank").inner_text() == f"#{index + 1}"
        assert item.locator(".label").inner_text().strip()
        score = item.locator(".score").inner_text()
        assert SCORE.match(score), score
        scores.append(float(score))
    assert scores == sorted(scores, reverse=True)
    return scores


def has_route(service: Stack, path: str) -> bool:
    return path in httpx.get(f"{service.url}/openapi.json", timeout=5).json()["paths"]


def upload(page: Any, data: bytes, *, name: str = "shoe.png", mime: str = "image/png") -> None:
    page.set_input_files("#file", files=[{"name": name, "mimeType": mime, "buffer": data}])


def test_page_uploads_an_image_and_shows_its_k_matches(
    page: Any, service: Stack, fake_data_dir: Path
) -> None:
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.fill("#k", "6")
    page.locator("#k").blur()
    upload(page, gallery_png(fake_data_dir, 37))

    assert wait_for_end(page) == "succeeded"
    scores = check_matches(page, 6)
    assert scores[0] >= 0.99  # the gallery image finds itself first
    query = page.locator("#query-view img")
    assert query.get_attribute("src").startswith("blob:")  # the local file, not a re-download
    assert query.evaluate("i => i.naturalWidth") == 28
    statuses = page.evaluate("window.__statuses")
    assert statuses[0] == "uploading" and statuses[-1] == "succeeded", statuses
    assert "queued" in statuses or "running" in statuses, statuses
    assert page.locator("#error").is_hidden()
    assert "fashion-mnist" in page.inner_text("#meta-text")
    assert page.locator("#random-warning").is_hidden()
    if has_route(service, "/jobs/{job_id}/events"):  # followed over SSE, no long poll needed
        assert any(url.endswith("/events") for url in requests), requests
        assert not any("wait=" in url for url in requests), requests

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_page_shows_the_apis_sentence_for_a_bad_upload(page: Any) -> None:
    upload(page, b"hello, not a picture", name="notes.txt", mime="text/plain")

    error = page.locator("#error")
    error.wait_for(state="visible")
    assert error.inner_text() == NOT_AN_IMAGE
    assert page.get_attribute("#results", "data-status") == "error"
    assert page.locator("#matches > li").count() == 0
    assert page.locator("#go").is_enabled()  # ready for the next try


def test_page_long_polls_without_events_and_warns_about_random_weights(
    page: Any, fake_data_dir: Path
) -> None:
    """A broken event stream falls back to ?wait=; a random model's matches carry a warning."""
    polls: list[str] = []

    def as_random_model(route: Any) -> None:
        polls.append(route.request.url)
        reply = route.fetch()
        job = reply.json()
        if job.get("result"):
            job["result"]["model_is_random"] = True
        route.fulfill(response=reply, json=job)

    page.route("**/jobs/*/events", lambda route: route.abort())
    page.route(re.compile(r".*/jobs/[0-9a-f]+\?wait=.*"), as_random_model)
    upload(page, gallery_png(fake_data_dir, 8))

    assert wait_for_end(page) == "succeeded"
    check_matches(page, 5)
    assert polls, "the page never long-polled"
    assert page.locator("#random-warning").is_visible()
    assert "meaningless" in page.inner_text("#random-warning")


def test_page_answers_a_text_query(page: Any, service: Stack) -> None:
    modes = httpx.get(f"{service.url}/readyz", timeout=5).json().get("modes") or {}
    if not modes.get("text"):
        pytest.skip("the service does not offer text queries (/readyz has no modes.text)")
    page.fill("#text", "a red sneaker")
    page.press("#text", "Enter")

    assert wait_for_end(page) == "succeeded"
    check_matches(page, 5)
    assert page.inner_text("#query-view") == "“a red sneaker”"


def test_page_and_its_assets_are_served_offline_and_stay_out_of_the_schema(
    service: Stack,
) -> None:
    with httpx.Client(base_url=service.url, timeout=10) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert "://" not in page.text  # nothing from elsewhere
        for asset, kind in [("app.js", "javascript"), ("app.css", "css"), ("favicon.svg", "svg")]:
            reply = client.get(f"/static/{asset}")
            assert reply.status_code == 200, asset
            assert kind in reply.headers["content-type"]
            if kind != "svg":  # an SVG names its XML namespace with a URL
                assert "://" not in reply.text, asset
        assert client.get("/static/missing.js").status_code == 404
        assert client.get("/static/..%2Fpages.py").status_code == 404
        paths = client.get("/openapi.json").json()["paths"]
        assert "/" not in paths and "/static/{name}" not in paths
