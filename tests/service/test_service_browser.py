"""The search page in a real Chromium (Debian's /usr/bin/chromium, driven by Playwright),
as a shopper uses it, at desktop and phone widths.

Covers per-product facet counts that follow the query and the filters, filter chips,
sorting, product counts, paging that ends, "more like this", refining a photo with
words (sent as multipart), the empty, "no good match" and offline states, relevance
labels instead of raw scores, keyboard basics, and the search modes (Smart / Words /
Looks) with "why this result" over an index with a lexical part: brand and SKU
searches find their products. Screenshots go to test-artifacts/ (git-ignored). Never
downloads a browser: CI installs Debian's chromium with apt; where it is missing the
tests are skipped and say so.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from service_fixtures import COLOURS, Catalog, product_image, running_server

from clipsearch.retrieval.encoders import load_encoder
from clipsearch.retrieval.service.app import create_app
from clipsearch.retrieval.service.config import ServiceConfig

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
WIDTHS = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}
# A cosine printed on a card ("0.784") would match this.
RAW_SCORE = re.compile(r"(?<![\d$])-?0\.\d{2,}")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)",
    ),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def _page(browser: Any, viewport: dict[str, int]) -> tuple[Any, list[str]]:
    page = browser.new_page(viewport=viewport)
    # Waits end on events; the bound only stops a broken run (a loaded CI box is slow).
    page.set_default_timeout(120_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page, errors


def _cards(page: Any) -> list[str]:
    return page.eval_on_selector_all(".card", "els => els.map(e => e.dataset.docId)")  # type: ignore[no-any-return]


def _count(page: Any, facet: str, value: str) -> int:
    label = page.locator(f"input[data-facet={facet}][data-value='{value}']").locator("..")
    return int(label.locator(".count").inner_text())


def _open_filters(page: Any) -> None:
    """On a phone the filters sit behind their toggle."""
    toggle = page.locator("#filters-toggle")
    if page.viewport_size["width"] < 760 and toggle.get_attribute("aria-expanded") == "false":
        toggle.click()


def _search(page: Any, text: str) -> None:
    page.fill("#q", text)
    page.press("#q", "Enter")


def _settled(page: Any) -> None:
    page.wait_for_function("!document.body.classList.contains('busy')")


def _shot(page: Any, width: str, name: str) -> None:
    # Load every (lazy) thumbnail, and scroll up so the sticky header sits on top.
    page.evaluate("document.querySelectorAll('.card img').forEach(i => { i.loading = 'eager'; })")
    page.wait_for_function("[...document.querySelectorAll('.card img')].every(i => i.complete)")
    page.evaluate("window.scrollTo(0, 0)")
    # Nothing sticks out sideways (a phone would scroll the whole page horizontally).
    assert page.evaluate("document.documentElement.scrollWidth") <= page.viewport_size["width"]
    page.screenshot(path=str(ARTIFACTS / f"page-{width}-{name}.png"), full_page=True)


def _no_raw_scores(page: Any) -> None:
    text = page.inner_text(".results-area")
    assert not RAW_SCORE.search(text), text


@pytest.mark.parametrize("width", list(WIDTHS))
def test_facets_chips_sort_and_paging(
    browser: Any, catalog: Catalog, width: str, tmp_path: Path
) -> None:
    app = create_app(catalog.index, encoder=load_encoder("fake"))
    with running_server(app) as base:
        page, errors = _page(browser, WIDTHS[width])
        page.goto(base + "/?per_page=5")
        page.wait_for_selector("fieldset[data-facet=category]", state="attached")
        assert "index v1" in page.inner_text("#index-status")

        _search(page, "red")
        page.wait_for_selector(".card")
        _settled(page)
        assert set(_cards(page)[:2]) == {"SKU-00", "SKU-01"}
        first = page.inner_text(".card")
        assert "red" in first and "$" in first
        # Products, not rows or photos: 12 products, 6 per category.
        assert "among 12 products" in page.inner_text("#summary")
        _open_filters(page)
        assert _count(page, "category", "shoes") == 6
        assert _count(page, "colour", "blue") == 2
        _no_raw_scores(page)
        _shot(page, width, "text-query")

        # A filter: chip, counts of the other columns follow, product count follows.
        page.check("input[data-facet=category][data-value=shoes]")
        page.wait_for_selector("#chips .chip")
        _settled(page)
        assert "Category: shoes" in page.inner_text("#chips")
        assert "among 6 products matching these filters" in page.inner_text("#summary")
        assert _count(page, "colour", "blue") == 1
        # Its own column still offers the other value with its count (multi-select).
        assert _count(page, "category", "shirts") == 6
        assert all(c.endswith("1") for c in _cards(page))  # SKU-x1 are the shoes

        # Paging ends: 5 of 6 shoes, then the last one, then no "Show more".
        assert len(_cards(page)) == 5 and page.is_visible("#more")
        page.click("#more")
        page.wait_for_function("document.querySelectorAll('.card').length === 6")
        _settled(page)
        assert not page.is_visible("#more")
        assert "Showing all 6" in page.inner_text("#page-status")
        _shot(page, width, "filtered-last-page")

        # Sort by price, high to low: the cards follow the prices.
        page.select_option("#sort", "price:desc")
        page.wait_for_function(
            "document.querySelector('.card')?.dataset.docId === 'SKU-51'"
        )  # the dearest shoe
        _settled(page)
        prices = [catalog.products[c]["price"] for c in _cards(page)]
        assert prices == sorted(prices, reverse=True)

        # Removing the chip drops the filter.
        page.click("#chips .chip")
        page.wait_for_function("document.querySelector('#chips').hidden")
        _settled(page)
        assert "among 12 products" in page.inner_text("#summary")

        # Keyboard: the search box, photo and search buttons in order; Space toggles a
        # filter box; results are announced (aria-live).
        page.focus("#q")
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "upload"
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "go"
        assert page.get_attribute("#summary", "aria-live") == "polite"
        page.focus("input[data-facet=in_stock]")
        page.keyboard.press("Space")
        page.wait_for_selector("#chips .chip")
        _settled(page)
        assert "In stock" in page.inner_text("#chips")
        assert page.evaluate("document.activeElement.dataset.facet") == "in_stock"
        page.keyboard.press("Space")  # and off again
        page.wait_for_function("document.querySelector('#chips').hidden")
        _settled(page)

        # Empty state: "more like" the only red shoe, within red shoes, leaves nothing.
        page.check("input[data-facet=category][data-value=shoes]")
        _settled(page)
        page.click("label.swatch:has(input[data-value=red])")
        page.wait_for_function("document.querySelectorAll('.card').length === 1")
        _settled(page)
        page.click(".card .more-like")
        page.wait_for_selector("#empty:not([hidden])")
        assert "No products match" in page.inner_text("#empty")
        assert page.is_visible("#empty-clear")
        _shot(page, width, "empty")
        page.click("#empty-clear")
        page.wait_for_selector(".card")
        assert "SKU-01" not in _cards(page)  # more like SKU-01 leaves SKU-01 out
        assert errors == []


class _Recorder:
    """ASGI wrapper keeping the request bodies of one path (the browser's devtools do not
    show a multipart body holding a File)."""

    def __init__(self, app: Any, path: str, bodies: list[bytes]) -> None:
        self.app, self.path, self.bodies = app, path, bodies

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []

        async def recording() -> Any:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                self.bodies.append(b"".join(chunks))
            return message

        await self.app(scope, recording, send)


def _form_field(body: bytes, name: str) -> list[bytes]:
    """The values of a multipart body's text field ``name`` (a repeated field: all)."""
    head = b'name="' + name.encode() + b'"\r\n\r\n'
    out = []
    for part in body.split(head)[1:]:
        out.append(part.split(b"\r\n--", 1)[0])
    return out


def _cosine(hit: dict[str, Any]) -> float:
    """A hit's cosine: its score, or its vector score when it was fused (hybrid)."""
    explain = hit.get("explain") or {}
    return float((explain.get("vector") or {}).get("score", hit["score"]))


def _cutoff(client_base: str) -> float:
    """A relevance cutoff between the second and third cosine of "red": the two red
    products are relevant, the rest is not."""
    import httpx

    hits = httpx.post(
        client_base + "/search", json={"text": "red", "k": 12, "mode": "vector"}
    ).json()["hits"]
    return float((hits[1]["score"] + hits[2]["score"]) / 2)


@pytest.mark.parametrize("width", list(WIDTHS))
def test_relevance_refine_no_good_match_and_offline(
    browser: Any, catalog: Catalog, width: str, tmp_path: Path
) -> None:
    import httpx

    with running_server(create_app(catalog.index, encoder=load_encoder("fake"))) as probe:
        cutoff = _cutoff(probe)
        best_plaid = httpx.post(probe + "/search", json={"text": "plaid"}).json()["hits"][0]
    assert _cosine(best_plaid) < cutoff  # precondition of the "no good match" step
    photo = tmp_path / "blue.png"
    product_image(COLOURS["blue"], 1).save(photo)
    app = create_app(
        catalog.index, ServiceConfig(relevance_cutoff=cutoff), encoder=load_encoder("fake")
    )
    photos: list[bytes] = []  # bodies of POST /search/image as the server received them
    server = running_server(_Recorder(app, "/search/image", photos))
    base = server.__enter__()
    try:
        page, errors = _page(browser, WIDTHS[width])
        page.goto(base + "/")
        page.wait_for_selector("fieldset[data-facet=category]", state="attached")

        # Relevant products only, labelled in words; facets count those products.
        _search(page, "red")
        page.wait_for_selector(".card")
        _settled(page)
        assert "2 products match “red”" in page.inner_text("#summary")
        assert sorted(_cards(page)) == ["SKU-00", "SKU-01"]
        labels = page.eval_on_selector_all(".card .match", "els => els.map(e => e.innerText)")
        assert labels == ["Best match", "Good match"]
        _open_filters(page)
        assert _count(page, "colour", "red") == 2
        assert page.locator("input[data-facet=colour][data-value=blue]").count() == 0
        _no_raw_scores(page)
        # The rest is one click away, marked weak.
        page.click("#weaker")
        page.wait_for_function("document.querySelectorAll('.card').length === 12")
        assert "Weak match" in page.inner_text(".card.weak")
        _shot(page, width, "relevant")

        # No good match: the closest products, said honestly.
        _search(page, "plaid")
        page.wait_for_selector("#notice:not([hidden])")
        _settled(page)
        assert "No good match for “plaid”" in page.inner_text("#summary")
        assert page.locator(".card.weak").count() >= 1
        _shot(page, width, "no-good-match")

        # A photo, then refined with words: "like this, but red".
        page.set_input_files("#file", str(photo))
        page.wait_for_function("document.querySelector('#summary').innerText.includes('photo')")
        _settled(page)
        assert page.is_visible("#query-image")
        assert "Refine" in (page.get_attribute("#q", "placeholder") or "")
        photo_results = _cards(page)
        _search(page, "red")
        page.wait_for_function("document.querySelector('#summary').innerText.includes('but')")
        _settled(page)
        assert "your photo, but “red”" in page.inner_text("#summary")
        # The photo goes up as multipart, its bytes as they are (not base64), the words
        # and options as form fields.
        sent = photos[-1]
        assert photo.read_bytes() in sent and b"base64" not in sent
        assert _form_field(sent, "text") == [b"red"]
        assert b"colour" in _form_field(sent, "facets")
        assert _cards(page) != photo_results
        _shot(page, width, "refined-photo")

        # Offline: the pill turns red, a message instead of "Failed to fetch", the old
        # results stay (dimmed).
        before = _cards(page)
        server.__exit__(None, None, None)
        server = None
        _search(page, "green")
        page.wait_for_selector("#index-status.down")
        assert page.inner_text("#index-status").strip().endswith("offline")
        banner = page.inner_text("#offline")
        assert "Can’t reach the search server" in banner
        assert "Failed to fetch" not in page.inner_text("body")
        assert _cards(page) == before and page.evaluate("document.body.classList.contains('stale')")
        _shot(page, width, "offline")
        assert errors == []
    finally:
        if server is not None:
            server.__exit__(None, None, None)


# ------------------------------------------------------------------ search modes

BRANDS = {"0": "Northwind", "1": "Cobalt Lane", "2": "Cobalt Lane", "3": "Northwind"}


def _branded_index(catalog: Catalog, out: Path, text_fields: tuple[str, ...]) -> Path:
    """The catalog with a brand column (Northwind: the red and yellow products), built
    with a lexical part over ``text_fields`` (none when empty)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipsearch.indexer.build import BuildOptions, build
    from clipsearch.indexer.sources import SourceOptions

    rows = [
        {
            **p,
            "image_path": str(catalog.folder / p["image_path"]),
            "brand": BRANDS.get(sku[4], "Acme"),
        }
        for sku, p in catalog.products.items()
    ]
    manifest = out / "branded.parquet"
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    options = BuildOptions(
        workers=1,
        text_fields=text_fields,
        sources=SourceOptions(image_col="image_path", text_cols=("title",), id_col="sku"),
    )
    build([manifest], out / "index", encoder=load_encoder("fake"), options=options)
    return out / "index"


@pytest.fixture(scope="module")
def branded(catalog: Catalog, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("branded")
    return _branded_index(catalog, folder, ("title", "brand", "sku"))


def _choose_mode(page: Any, value: str) -> None:
    """Click a mode of the selector and wait for the search it runs."""
    with page.expect_response(lambda r: r.url.endswith("/search")):
        page.click(f"label.mode-opt:has(input[value='{value}'])")
    _settled(page)


@pytest.mark.parametrize("width", list(WIDTHS))
def test_search_modes_find_brands_and_skus_and_explain_themselves(
    browser: Any, branded: Path, catalog: Catalog, width: str, tmp_path: Path
) -> None:
    import httpx

    app = create_app(branded, encoder=load_encoder("fake"))
    with running_server(app) as base:
        # Precondition: the vector side alone cannot read the code (the fake encoder).
        looks = httpx.post(base + "/search", json={"text": "SKU-21", "mode": "vector"}).json()
        assert looks["hits"][0]["doc_id"] != "SKU-21"
        page, errors = _page(browser, WIDTHS[width])
        sent: list[dict[str, Any]] = []
        page.on(
            "request",
            lambda r: sent.append(r.post_data_json) if r.url.endswith("/search") else None,
        )
        page.goto(base + "/")
        page.wait_for_selector("#mode:not([hidden])")
        labels = page.eval_on_selector_all(".mode-opt", "els => els.map(e => e.innerText.trim())")
        assert [lab.split("\n")[0] for lab in labels] == ["Smart", "Words", "Looks"]
        assert page.is_checked("#mode input[value='']")  # Smart (hybrid) by default
        assert "hybrid" in (
            page.get_attribute("label.mode-opt:has(input[value=''])", "title") or ""
        )

        # A SKU: Smart finds it first; the server's default mode (hybrid) is used.
        _search(page, "SKU-21")
        page.wait_for_selector(".card")
        _settled(page)
        assert _cards(page)[0] == "SKU-21"
        assert "mode" not in sent[-1]
        _no_raw_scores(page)  # the explanation is closed until asked for
        why = page.locator(".card").first.locator("details.why")
        why.locator("summary").click()
        rows = why.evaluate(
            "d => Object.fromEntries([...d.querySelectorAll('dt')].map("
            "dt => [dt.innerText, dt.nextElementSibling.innerText]))"
        )
        assert set(rows) == {"Looks", "Words", "Combined", "All words"}, rows
        assert rows["Words"].endswith("· #1") and rows["All words"] == "yes"
        assert re.fullmatch(r"-?\d\.\d{3} · #\d+", rows["Looks"]), rows
        assert "(RRF)" in rows["Combined"]
        assert "Mode: Smart (hybrid)" in why.inner_text()
        _shot(page, width, "sku-smart-why")

        # Looks (vector): the code means nothing to the photos' vectors.
        _choose_mode(page, "vector")
        assert sent[-1]["mode"] == "vector"
        assert _cards(page)[0] != "SKU-21"
        assert page.locator(".card details.why").count() == 0  # nothing fused to explain

        # Words (lexical): only the product holding those words, ranked by BM25 alone.
        _choose_mode(page, "lexical")
        assert sent[-1]["mode"] == "lexical"
        assert _cards(page) == ["SKU-21"]
        why = page.locator(".card").first.locator("details.why")
        why.locator("summary").click()
        rows = why.evaluate(
            "d => Object.fromEntries([...d.querySelectorAll('dt')].map("
            "dt => [dt.innerText, dt.nextElementSibling.innerText]))"
        )
        assert rows["Looks"] == "not used" and rows["Combined"] == "words only", rows
        assert rows["Words"].endswith("· #1") and "Mode: Words (lexical)" in why.inner_text()

        # A brand and a kind, back in Smart: the Northwind shoes.
        _choose_mode(page, "")
        _search(page, "northwind shoe")
        page.wait_for_function("document.querySelector('#summary').innerText.includes('northwind')")
        _settled(page)
        assert set(_cards(page)[:2]) == {"SKU-01", "SKU-31"}
        assert "mode" not in sent[-1]
        _shot(page, width, "brand-smart")

        # A photo is matched by its looks: the selector does not apply (and says so).
        photo = tmp_path / "green.png"
        product_image(COLOURS["green"], 1).save(photo)
        with page.expect_response(lambda r: r.url.endswith("/search/image")) as answer:
            page.set_input_files("#file", str(photo))
        assert answer.value.ok
        _settled(page)
        assert page.is_disabled("#mode input[value=lexical]")
        assert "photo" in (page.get_attribute("#mode", "title") or "")
        assert _cards(page)[0] == "SKU-21"  # the green shoe
        assert errors == []


def test_without_a_lexical_part_the_mode_selector_is_hidden(
    browser: Any, catalog: Catalog, tmp_path: Path
) -> None:
    index = _branded_index(catalog, tmp_path / "plain", ())
    app = create_app(index, encoder=load_encoder("fake"))
    with running_server(app) as base:
        page, errors = _page(browser, WIDTHS["desktop"])
        sent: list[dict[str, Any]] = []
        page.on(
            "request",
            lambda r: sent.append(r.post_data_json) if r.url.endswith("/search") else None,
        )
        with page.expect_response(lambda r: r.url.endswith("/info")):
            page.goto(base + "/")
        page.wait_for_selector("fieldset[data-facet=category]", state="attached")
        assert not page.is_visible("#mode")
        assert "cannot match words" in (page.get_attribute("#mode", "data-reason") or "")
        _search(page, "SKU-21")
        page.wait_for_selector(".card")
        _settled(page)
        assert "mode" not in sent[-1]
        assert page.locator(".card details.why").count() == 0
        assert errors == []


def test_a_sku_below_the_relevance_cutoff_is_still_a_match(browser: Any, branded: Path) -> None:
    """Under a relevance cutoff (a cosine), the product holding every word of a SKU query
    is listed as a match, not hidden as weak or reported as "no good match"."""
    app = create_app(branded, ServiceConfig(relevance_cutoff=0.99), encoder=load_encoder("fake"))
    with running_server(app) as base:
        page, errors = _page(browser, WIDTHS["desktop"])
        page.goto(base + "/")
        page.wait_for_selector("#mode:not([hidden])")
        _search(page, "SKU-21")
        page.wait_for_selector(".card")
        _settled(page)
        assert _cards(page) == ["SKU-21"]
        assert page.inner_text(".card .match") == "Matches your words"
        assert page.inner_text("#summary").startswith("1 product match")
        assert not page.is_visible("#notice")
        assert errors == []
