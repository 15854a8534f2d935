"""The web page's gallery view, driven in a real headless Chromium against a real stack.

The page makes a live gallery, adds images to it, deletes one and searches it (with a
filter, a minimum score, "more like this"); it pages through the read-only demo gallery and
filters it by class. These tests change galleries, so they run on a stack of their own rather
than the session's shared one. Like tests/e2e/test_browser.py, they use the browser of
tests/e2e/conftest.py and skip, saying why, without one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lookalike.stack import Stack
from shared.items import BAD_FILTER
from tests.e2e.test_browser import WAIT_MS, check_matches
from tests.support import gallery_png, picture

pytestmark = pytest.mark.e2e

PAGE_ITEMS = 24  # keep in step with PAGE_ITEMS in app.js
ENDED = "#results[data-status='succeeded'], #results[data-status='failed'], " + (
    "#results[data-status='error']"
)


@pytest.fixture
def gallery_stack(live_service: Stack) -> Stack:
    return live_service


@pytest.fixture
def page(browser: Any, gallery_stack: Stack) -> Iterator[Any]:
    """A fresh tab on the page with its gallery view shown, recording CSP violations."""
    context = browser.new_context(
        viewport={"width": 1200, "height": 900}, base_url=gallery_stack.url
    )
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    console: list[str] = []
    tab.on("console", lambda message: console.append(message.text))
    tab.goto("/")
    tab.wait_for_selector("#readiness[data-state='ready']")
    tab.wait_for_selector("#items > li")  # the default gallery's first page
    yield tab
    context.close()
    violations = [text for text in console if "Content Security Policy" in text]
    assert violations == [], "the page broke its own Content-Security-Policy"


@pytest.fixture
def http(gallery_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gallery_stack.url, timeout=30) as client:
        yield client


def png(name: str, data: bytes) -> dict[str, Any]:
    return {"name": name, "mimeType": "image/png", "buffer": data}


def shown_ids(page: Any, selector: str) -> list[str]:
    ids: list[str] = page.eval_on_selector_all(
        selector, "els => els.map(e => e.dataset.itemId ?? e.dataset.id)"
    )
    return ids


def searched(page: Any, start: Callable[[], None]) -> list[str]:
    """Start a search and wait for its end; the item ids of its matches, best first."""
    page.evaluate("document.getElementById('results').dataset.status = ''")
    start()
    page.wait_for_selector(ENDED)
    if page.get_attribute("#results", "data-status") == "succeeded":
        page.wait_for_function(
            "() => [...document.querySelectorAll('#matches img')].every(i => i.complete)"
        )
    return shown_ids(page, "#matches > li")


def labels(page: Any) -> list[str]:
    return [text.strip() for text in page.locator("#matches .label").all_inner_texts()]


def test_page_makes_a_live_gallery_adds_deletes_and_searches_it(
    page: Any, http: httpx.Client
) -> None:
    name = "shop-browser"
    page.fill("#new-gallery", name)
    page.click("#create")
    page.wait_for_function(f"() => document.getElementById('browse-gallery').value === {name!r}")
    assert page.inner_text("#browse-status") == f"Created the live gallery {name}."
    assert page.locator("#add-zone").is_visible()
    page.locator("#page-text", has_text="No items yet: add some images.").wait_for()

    # Two drops: the attributes field applies to the images of the next one.
    page.fill("#add-attributes", json.dumps({"colour": "red"}))
    page.set_input_files(
        "#add-files", files=[png("red one.png", picture(1)), png("red-2.png", picture(2))]
    )
    page.fill("#add-attributes", json.dumps({"colour": "blue", "price": 80}))
    page.set_input_files("#add-files", files=[png("blue-1.png", picture(3))])
    page.wait_for_function(
        "() => document.querySelectorAll('#items li[data-state=\"indexed\"]').length === 3"
    )
    page.wait_for_function(
        "() => [...document.querySelectorAll('#items img')].every(i => i.complete)"
    )
    shown = shown_ids(page, "#items > li")  # in the order the adds were committed
    assert sorted(shown) == ["blue-1", "red-2", "red_one"]  # ids from the names, sanitised
    assert page.locator("#adds > li[data-state='succeeded']").count() == 3
    assert page.locator("#adds .add-text").all_inner_texts() == ["Added"] * 3
    for image in page.locator("#items img").all():
        assert image.evaluate("i => i.naturalWidth") > 0
    assert "colour: blue · price: 80" in page.inner_text("#items li[data-id='blue-1']")
    assert page.locator("#items .delete").count() == 3

    page.click("#items li[data-id='red-2'] .delete")
    page.wait_for_selector("#items li[data-id='red-2']", state="detached")
    assert page.inner_text("#browse-status") == "Deleted item red-2."
    listed = http.get(f"/galleries/{name}/items").json()
    assert [item["id"] for item in listed["items"]] == ["red_one", "blue-1"]

    page.select_option("#gallery", name)
    query = [png("query.png", picture(1))]
    assert searched(page, lambda: page.set_input_files("#file", files=query)) == [
        "red_one",
        "blue-1",
    ]
    assert check_matches(page, 2)[0] >= 0.99  # the item's own image first
    assert "colour: red" in page.inner_text("#matches > li:first-child")

    page.fill("#filter", json.dumps({"colour": "blue"}))
    assert searched(page, lambda: page.click("#go")) == ["blue-1"]
    page.fill("#filter", json.dumps({"colour": {"near": 1}}))
    assert searched(page, lambda: page.click("#go")) == []
    assert page.inner_text("#error") == BAD_FILTER  # the API's sentence
    page.fill("#filter", "")
    page.fill("#min-score", "0.99")
    assert searched(page, lambda: page.click("#go")) == ["red_one"]

    page.fill("#min-score", "")
    assert searched(page, lambda: page.click("#go")) == ["red_one", "blue-1"]
    more = "#matches > li[data-item-id='red_one'] .more"
    assert searched(page, lambda: page.click(more)) == ["blue-1"]  # never the item itself
    assert page.inner_text("#query-caption") == "More like item red_one"
    assert page.locator("#query-view img").evaluate("i => i.naturalWidth") > 0


def test_page_pages_through_the_read_only_demo_gallery_and_filters_it_by_class(
    page: Any, http: httpx.Client, fake_data_dir: Path
) -> None:
    listing = http.get("/galleries").json()
    demo = next(g for g in listing["galleries"] if g["name"] == listing["default"])
    assert page.input_value("#browse-gallery") == demo["name"]
    assert page.inner_text("#browse-kind").startswith("Built from files")
    assert page.locator("#add-zone").is_hidden()
    assert page.locator("#items .delete").count() == 0
    assert shown_ids(page, "#items > li") == [str(i) for i in range(PAGE_ITEMS)]
    assert page.inner_text("#page-text").startswith(f"Page 1 · items 1–{PAGE_ITEMS} of ")
    assert page.locator("#prev-page").is_disabled()
    for line in page.locator("#items .attrs").all_inner_texts():
        assert line.startswith("class: ")

    page.click("#next-page")
    page.wait_for_selector(f"#items > li[data-id='{PAGE_ITEMS}']")
    assert shown_ids(page, "#items > li") == [str(i) for i in range(PAGE_ITEMS, 2 * PAGE_ITEMS)]
    page.click("#prev-page")
    page.wait_for_selector("#items > li[data-id='0']")
    assert page.locator("#prev-page").is_disabled()

    wanted = http.get(f"/galleries/{demo['name']}/items/37").json()["attributes"]["class"]
    page.fill("#filter", json.dumps({"class": wanted}))
    query = [png("shoe.png", gallery_png(fake_data_dir, 37))]
    found = searched(page, lambda: page.set_input_files("#file", files=query))
    assert found[0] == "37"
    assert labels(page) == [wanted] * len(found)
    check_matches(page, len(found))

    like = searched(page, lambda: page.click("#matches > li[data-item-id='37'] .more"))
    assert like and "37" not in like
    assert labels(page) == [wanted] * len(like)  # the filter still applies
