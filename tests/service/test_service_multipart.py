"""POST /search/image (multipart): the photo plus every option /search takes, read from
form fields into the same SearchRequest and SearchOptions as the JSON route; facet
counts checked against a count over the catalog's products."""

from __future__ import annotations

from collections import Counter
from typing import Any

from service_fixtures import COLOURS, Catalog, assert_error, png_bytes, product_image

from clipsearch.retrieval.service.schemas import SearchRequest

RED = png_bytes(product_image(COLOURS["red"], 0))


def _post(client: Any, data: dict[str, Any], image: bytes = RED) -> Any:
    return client.post("/search/image", files={"image": ("q.png", image, "image/png")}, data=data)


def _counts(body: dict[str, Any], column: str) -> dict[Any, int]:
    return {v["value"]: v["count"] for v in body["facets"][column]}


def test_multipart_facets_count_products_matching_the_filter(
    make_client: Any, catalog: Catalog
) -> None:
    client = make_client()
    r = _post(
        client,
        {
            "k": "4",
            "filter": "category = 'shoes' and price < 40",
            "facets": ["category", "colour", "in_stock"],  # a repeated form field
            "group_by_doc": "true",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    keep = [p for p in catalog.products.values() if p["category"] == "shoes" and p["price"] < 40]
    assert body["total_products"] == len(keep) == 4
    assert body["facets_scope"] == "filter"
    assert _counts(body, "category") == {"shoes": 4}
    assert _counts(body, "colour") == dict(Counter(p["colour"] for p in keep))
    assert _counts(body, "in_stock") == dict(Counter(p["in_stock"] for p in keep))
    # A product per hit (grouped), all within the filter, the red shoe first.
    ids = [h["doc_id"] for h in body["hits"]]
    assert ids[0] == "SKU-01" and len(set(ids)) == len(ids) == 4
    assert all(catalog.products[i] in keep for i in ids)


def test_multipart_answers_like_the_json_route(make_client: Any) -> None:
    """The same photo and options over multipart and over JSON (base64): same answer."""
    import base64

    client = make_client()
    options = {
        "k": 5,
        "offset": 1,
        "filter": {"op": "<", "column": "price", "value": 45},
        "group_by_doc": "mean",
        "sort": "price:desc",
        "min_score": 0.1,
        "boosts": {"price": 0.001},
        "facets": ["colour", "price"],
        "mode": "hybrid",
    }
    as_json = client.post(
        "/search", json={"image": base64.b64encode(RED).decode(), **options}
    ).json()
    import json

    form = {
        name: value  # lists: one form field per item
        if isinstance(value, list)
        else json.dumps(value)
        if isinstance(value, dict)
        else str(value)
        for name, value in options.items()
    }
    r = _post(client, form)
    assert r.status_code == 200, r.text
    as_form = r.json()
    for key in ("hits", "facets", "total_products", "facets_scope", "relevance_cutoff"):
        assert as_form[key] == as_json[key], key
    assert as_form["relevance_cutoff"] == 0.1
    prices = [h["metadata"]["price"] for h in as_form["hits"]]
    assert prices == sorted(prices, reverse=True) and len(prices) == 5


def test_multipart_text_refines_the_photo(make_client: Any) -> None:
    """Photo + words ("like this, but blue") is the JSON route's composed terms query."""
    import base64

    client = make_client()
    r = _post(client, {"text": "blue", "k": "3", "mode": "vector"})
    assert r.status_code == 200, r.text
    terms = [{"image": base64.b64encode(RED).decode()}, {"text": "blue"}]
    as_json = client.post("/search", json={"terms": terms, "k": 3, "mode": "vector"}).json()
    assert [h["doc_id"] for h in r.json()["hits"]] == [h["doc_id"] for h in as_json["hits"]]
    photo_only = _post(client, {"k": "3"}).json()["hits"]
    assert [h["doc_id"] for h in photo_only] != [h["doc_id"] for h in r.json()["hits"]]
    # With words, hybrid can match them: blue products hold the word "blue".
    hybrid = _post(client, {"text": "blue", "k": "2", "mode": "hybrid"}).json()["hits"]
    assert {h["doc_id"] for h in hybrid} == {"SKU-10", "SKU-11"}
    assert all(h["explain"]["all_words"] for h in hybrid)


def test_the_form_takes_every_search_option(make_client: Any) -> None:
    """Every field of SearchRequest but the other query kinds is a documented form field,
    so an option added to /search (e.g. min_score "auto") reaches the multipart route."""
    client = make_client()
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/search/image"]["post"]["requestBody"]["content"]
    ref = body["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]
    form = schema["components"]["schemas"][ref]
    expected = set(SearchRequest.model_fields) - {"image_url", "like_doc", "terms"}
    assert set(form["properties"]) == expected
    assert form["required"] == ["image"]
    # A form cannot carry null: optional fields are documented without a null branch.
    assert all(
        b.get("type") != "null"
        for prop in form["properties"].values()
        for b in prop.get("anyOf", [prop])
    )
    assert form["properties"]["facets"]["type"] == "array"
    assert "colour" in form["properties"]["facets"]["items"]["enum"]
    assert form["properties"]["k"]["maximum"] == 200


def test_multipart_errors_name_the_field(make_client: Any) -> None:
    client = make_client()
    err = assert_error(_post(client, {"kk": "3"}), 422, "invalid_request")
    assert err["details"]["field"] == "kk" and "facets" in err["message"]
    err = assert_error(_post(client, {"k": "many"}), 422, "invalid_request")
    assert err["details"]["problems"][0]["location"] == "body.k"
    err = assert_error(_post(client, {"k": "0"}), 422, "k_out_of_range")
    err = assert_error(_post(client, {"facets": "brand"}), 422, "invalid_request")
    assert err["details"]["field"] == "facets"
    for boosts in ("{price", "price"):
        err = assert_error(_post(client, {"boosts": boosts}), 400, "bad_request")
        assert err["details"]["field"] == "boosts" and "JSON" in err["message"]
    err = assert_error(_post(client, {"mode": "words"}), 422, "invalid_request")
    err = assert_error(_post(client, {"k": ["3", "4"]}), 422, "invalid_request")
    assert "twice" in err["message"]
    err = assert_error(_post(client, {"filter": "price <"}), 400, "bad_filter")
    err = assert_error(client.post("/search/image", data={"k": "3"}), 422, "invalid_request")
    assert err["details"]["field"] == "image"
    err = assert_error(_post(client, {"mode": "lexical"}), 400, "bad_query")
    assert "text" in err["message"]
    # Blank inputs (an HTML form's empty fields) mean "not given".
    r = _post(client, {"filter": "", "sort": " ", "k": "2"})
    assert r.status_code == 200 and len(r.json()["hits"]) == 2
