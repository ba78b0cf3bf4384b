"""POST /search with ``facets``: per-product counts for the query and filter, checked
against a count over the catalog's products; relevance cutoff and its labels."""

from __future__ import annotations

from collections import Counter
from typing import Any

from service_fixtures import Catalog, assert_error


def _counts(body: dict[str, Any], column: str) -> dict[Any, int]:
    return {v["value"]: v["count"] for v in body["facets"][column]}


def _expected(catalog: Catalog, column: str, keep: Any = lambda p: True) -> dict[Any, int]:
    return dict(Counter(p[column] for p in catalog.products.values() if keep(p)))


def test_facets_count_products_matching_the_filter(make_client: Any, catalog: Catalog) -> None:
    client = make_client()
    r = client.post(
        "/search",
        json={"text": "red", "facets": ["category", "colour", "in_stock", "price"]},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["facets_scope"] == "filter" and "relevance_cutoff" not in body
    # Each product has a photo and a title row: counted once, not twice.
    assert body["total_products"] == len(catalog.products) == 12
    assert _counts(body, "category") == _expected(catalog, "category")
    assert _counts(body, "colour") == _expected(catalog, "colour")
    assert _counts(body, "in_stock") == _expected(catalog, "in_stock")
    prices = body["facets"]["price"]
    assert sum(b["count"] for b in prices) == 12
    assert prices[0]["min"] == 10.0 and prices[-1]["max"] == 48.5

    # Another filter changes every count with it.
    r = client.post(
        "/search",
        json={
            "text": "red",
            "filter": "category = 'shoes' and price < 40",
            "facets": ["category", "colour"],
        },
    )
    body = r.json()
    keep = lambda p: p["category"] == "shoes" and p["price"] < 40  # noqa: E731
    assert body["total_products"] == sum(map(keep, catalog.products.values())) == 4
    assert _counts(body, "category") == {"shoes": 4}
    assert _counts(body, "colour") == _expected(catalog, "colour", keep)


def test_a_relevance_cutoff_counts_only_relevant_products(make_client: Any) -> None:
    client = make_client()
    # The cutoff is a cosine: take it from a vector-mode ranking (hybrid scores are fused).
    everything = client.post("/search", json={"text": "red", "k": 12, "mode": "vector"}).json()[
        "hits"
    ]
    cutoff = (everything[1]["score"] + everything[2]["score"]) / 2  # the two red ones
    r = client.post(
        "/search",
        json={"text": "red", "min_score": cutoff, "facets": ["colour", "category"]},
    )
    body = r.json()
    assert body["facets_scope"] == "relevant" and body["relevance_cutoff"] == cutoff
    assert body["total_products"] == 2
    assert _counts(body, "colour") == {"red": 2}
    assert _counts(body, "category") == {"shirts": 1, "shoes": 1}
    assert all(h["relevant"] for h in body["hits"])

    # The server's cutoff applies when the query gives none; hits say which pass it.
    client = make_client(relevance_cutoff=cutoff)
    body = client.post("/search", json={"text": "red", "k": 5, "facets": ["colour"]}).json()
    assert [h["relevant"] for h in body["hits"]] == [True, True, False, False, False]
    assert body["total_products"] == 2 and _counts(body, "colour") == {"red": 2}


def test_bad_facet_columns_are_422_naming_the_field(make_client: Any) -> None:
    client = make_client()
    err = assert_error(
        client.post("/search", json={"text": "red", "facets": ["brand"]}), 422, "invalid_request"
    )
    assert err["details"]["field"] == "facets" and "category" in err["message"]
    err = assert_error(
        client.post("/search", json={"text": "red", "facets": ["source"]}), 422, "invalid_request"
    )
    assert err["details"]["column"] == "source"
    schema = client.get("/openapi.json").json()["components"]["schemas"]["SearchRequest"]
    facets = [b for b in schema["properties"]["facets"]["anyOf"] if b.get("type") == "array"]
    assert set(facets[0]["items"]["enum"]) == {"category", "colour", "price", "in_stock", "title"}


def test_word_matches_are_counted_under_a_relevance_cutoff(
    make_client: Any, catalog: Catalog
) -> None:
    """A SKU search lists the product holding the words even when no photo reaches the
    cutoff; the facets and the product count must count what is listed (hybrid: rows
    holding every word; lexical: the word matches), and a vector answer only photos."""
    client = make_client(relevance_cutoff=0.99)  # no photo is that close to a text
    colour = catalog.products["SKU-21"]["colour"]
    for mode in ("hybrid", "lexical"):
        r = client.post("/search", json={"text": "SKU-21", "facets": ["colour"], "mode": mode})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["hits"][0]["doc_id"] == "SKU-21", (mode, body["hits"])
        assert body["facets_scope"] == "relevant"
        assert body["total_products"] == 1, mode
        assert _counts(body, "colour") == {colour: 1}, mode
    body = client.post(
        "/search", json={"text": "SKU-21", "facets": ["colour"], "mode": "vector"}
    ).json()
    assert body["total_products"] == 0
