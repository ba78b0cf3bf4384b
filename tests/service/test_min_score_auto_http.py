"""POST /search with ``min_score: "auto"``: the server's relevance cutoff (the model's
calibrated threshold per query direction, or ``--relevance-cutoff``), reported as
``relevance_cutoff``. The fake encoder stands in for a calibrated model:
``calibrated_threshold`` is monkeypatched to answer for its fingerprint."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest
from service_fixtures import COLOURS, assert_error, png_bytes, product_image


def _search(client: Any, **body: Any) -> dict[str, Any]:
    r = client.post("/search", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _rows(body: dict[str, Any]) -> list[tuple[int, float]]:
    return [(h["row_id"], h["score"]) for h in body["hits"]]


def _nth_score(client: Any, n: int, **query: Any) -> float:
    hits = _search(client, k=n, mode="vector", **query)["hits"]
    return float(hits[n - 1]["score"])


def test_auto_uses_the_calibrated_threshold_of_each_direction(
    make_client: Any, calibrate: Callable[[dict[str, float]], None]
) -> None:
    photo = base64.b64encode(png_bytes(product_image(COLOURS["blue"], 0))).decode()
    probe = make_client()
    text_cut = _nth_score(probe, 3, text="red shirt")
    image_cut = _nth_score(probe, 5, image=photo)
    assert text_cut != image_cut
    calibrate({"text->image": text_cut, "image->image": image_cut})
    client = make_client()  # a server started with the calibrated model
    for query, cut in (({"text": "red shirt"}, text_cut), ({"image": photo}, image_cut)):
        auto = _search(client, k=12, min_score="auto", **query)
        numeric = _search(client, k=12, min_score=cut, **query)
        assert auto["relevance_cutoff"] == pytest.approx(cut)
        assert _rows(auto) == _rows(numeric) and 1 <= len(auto["hits"]) < 12
        assert all(h["relevant"] and h["score"] >= cut for h in auto["hits"])
    # Facets follow the resolved cutoff: they count the relevant products only.
    faceted = _search(client, text="red shirt", min_score="auto", facets=["colour"])
    assert faceted["facets_scope"] == "relevant"
    assert faceted["total_products"] == len({h["doc_id"] for h in faceted["hits"]})


def test_auto_is_the_servers_relevance_cutoff_when_the_operator_sets_one(
    make_client: Any,
) -> None:
    # The fake model has no calibration; the operator's cutoff is what "relevant" means.
    client = make_client(relevance_cutoff=0.2)
    auto = _search(client, text="green", k=24, min_score="auto")
    assert auto["relevance_cutoff"] == 0.2
    assert _rows(auto) == _rows(_search(client, text="green", k=24, min_score=0.2))


def test_auto_without_any_cutoff_is_a_422_naming_min_score(make_client: Any) -> None:
    r = make_client().post("/search", json={"text": "red", "min_score": "auto"})
    err = assert_error(r, 422, "invalid_request")
    assert err["details"]["field"] == "min_score"
    assert "no calibrated relevance threshold" in err["message"]
    assert "--relevance-cutoff" in err["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"min_score": "high"}, "min_score"),
        ({"min_score": "auto", "mode": "hybrid"}, "min_score"),
    ],
)
def test_bad_min_score_values_are_422(make_client: Any, body: dict[str, Any], field: str) -> None:
    r = make_client(relevance_cutoff=0.1).post("/search", json={"text": "red", **body})
    err = assert_error(r, 422, "invalid_request")
    assert field in str(err["details"]), err


def test_openapi_documents_auto(make_client: Any) -> None:
    schema = make_client().get("/openapi.json").json()
    prop = schema["components"]["schemas"]["SearchRequest"]["properties"]["min_score"]
    variants = prop["anyOf"]
    assert {"type": "number"} in variants and {"type": "null"} in variants
    assert any(v.get("const") == "auto" or v.get("enum") == ["auto"] for v in variants)
