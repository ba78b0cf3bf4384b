"""The search page in a real Chromium (Debian's /usr/bin/chromium, driven by Playwright).

Types a query, applies a filter, uploads an image, follows "more like this", and saves
a screenshot to test-artifacts/. Never downloads a browser: CI installs Debian's
chromium with apt; where it is missing the test is skipped and says so.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from service_fixtures import COLOURS, Catalog, product_image, running_server

from clipsearch.retrieval.encoders import load_encoder
from clipsearch.retrieval.service.app import create_app

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)",
    ),
]


def _card_ids(page: object) -> list[str]:
    return page.eval_on_selector_all(".card", "els => els.map(e => e.dataset.docId)")  # type: ignore[attr-defined]


def test_search_page_text_filter_upload_and_more_like_this(
    catalog: Catalog, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    query_photo = tmp_path / "blue.png"
    product_image(COLOURS["blue"], 1).save(query_photo)
    ARTIFACTS.mkdir(exist_ok=True)
    app = create_app(catalog.index, encoder=load_encoder("fake"))
    with running_server(app) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base + "/")
            page.wait_for_selector("select[data-facet=category]")
            assert "index v1" in page.inner_text("#index-status")

            # A text query shows the red products first, with titles, prices, scores, time.
            page.fill("#q", "red")
            page.press("#q", "Enter")
            page.wait_for_selector(".card")
            assert set(_card_ids(page)[:2]) == {"SKU-00", "SKU-01"}
            first = page.inner_text(".card")
            assert "red shirt model 00" in first or "red shoe model 01" in first
            assert "$" in first
            assert "ms" in page.inner_text("#summary")
            page.wait_for_function("document.querySelector('.card img').naturalWidth > 0")

            # Filtering to shoes re-runs the search: only shoes (SKU-x1) remain.
            page.select_option("select[data-facet=category]", "shoes")
            page.wait_for_function(
                "[...document.querySelectorAll('.card')].every(c => c.dataset.docId.endsWith('1'))"
            )
            assert _card_ids(page)[0] == "SKU-01"

            # Uploading a photo searches by image (the filter stays on).
            page.set_input_files("#file", str(query_photo))
            page.wait_for_function("document.querySelector('.card')?.dataset.docId === 'SKU-11'")
            assert page.is_visible("#query-image")
            page.screenshot(path=str(ARTIFACTS / "service-search-page.png"), full_page=True)

            # "More like this" on the top result: image->image from that product.
            page.click(".card .more-like")
            page.wait_for_function("document.querySelector('#summary').innerText.includes('like')")
            assert "SKU-11" not in _card_ids(page)

            # A query with no match shows the empty state, not a broken grid.
            page.select_option("select[data-facet=category]", "")
            page.fill("input[data-facet=price][data-kind=min]", "1000")
            page.dispatch_event("input[data-facet=price][data-kind=min]", "change")
            page.wait_for_selector("#empty:not([hidden])")
            assert "No products match" in page.inner_text("#empty")
            assert errors == []
        finally:
            browser.close()
