"""Search options over HTTP: one SearchOptions behind the API (boosts, 1-based ranks,
error codes of invalid options) and batching by equal options."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from service_fixtures import Catalog, assert_error

from clipsearch.retrieval.options import MAX_K, SearchOptions
from clipsearch.retrieval.results import SearchResults
from clipsearch.retrieval.service.runner import SearchJob, run_jobs
from clipsearch.retrieval.service.schemas import OPTION_FIELDS, SearchRequest

IMAGE_ROWS = 12  # the catalog: 12 products, one photo and one title each


def test_boosts_reorder_hits_as_a_numpy_oracle_predicts(make_client: Any) -> None:
    client = make_client()
    query = {"text": "red", "k": IMAGE_ROWS, "modality": "image"}
    plain = client.post("/search", json=query).json()["hits"]
    assert len(plain) == IMAGE_ROWS
    weight = 0.01
    base = np.array([h["score"] for h in plain], np.float32)
    price = np.array([h["metadata"]["price"] for h in plain], np.float32)
    row_ids = np.array([h["row_id"] for h in plain], np.int64)
    boosted = base + np.float32(weight) * price
    order = np.lexsort((row_ids, -boosted))
    expected = row_ids[order].tolist()
    assert expected != row_ids.tolist()  # the boost must matter for this test to mean much

    r = client.post("/search", json={**query, "boosts": {"price": weight}})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert [h["row_id"] for h in hits] == expected
    np.testing.assert_allclose([h["score"] for h in hits], boosted[order], rtol=0, atol=1e-6)
    assert [h["rank"] for h in hits] == list(range(1, IMAGE_ROWS + 1))


def test_boosts_need_numeric_columns_and_finite_weights(make_client: Any) -> None:
    client = make_client()
    err = assert_error(
        client.post("/search", json={"text": "red", "boosts": {"colour": 1.0}}), 400, "bad_query"
    )
    assert "colour" in err["message"] and "numeric" in err["message"]
    err = assert_error(
        client.post("/search", json={"text": "red", "boosts": {"weight": 1.0}}), 400, "bad_query"
    )
    assert "weight" in err["message"]
    err = assert_error(
        client.post("/search", json={"text": "red", "boosts": {"": 1.0}}), 422, "invalid_request"
    )
    # Refused by the request model (its schema says names are non-empty), naming the key.
    assert err["details"]["problems"][0]["location"].startswith("body.boosts")
    assert_error(
        client.post("/search", json={"text": "red", "boosts": {"price": "lots"}}),
        422,
        "invalid_request",
    )


def test_ranks_are_one_based_across_pages(make_client: Any) -> None:
    client = make_client()
    whole = client.post("/search", json={"text": "blue", "k": 6}).json()["hits"]
    assert [h["rank"] for h in whole] == [1, 2, 3, 4, 5, 6]
    page2 = client.post("/search", json={"text": "blue", "k": 3, "offset": 3}).json()["hits"]
    assert [h["rank"] for h in page2] == [4, 5, 6]
    assert [h["row_id"] for h in page2] == [h["row_id"] for h in whole[3:]]
    grouped = client.post(
        "/search", json={"text": "blue", "k": 2, "offset": 2, "group_by_doc": "mean"}
    ).json()["hits"]
    assert [h["rank"] for h in grouped] == [3, 4]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("group_by_doc", "median"),
        ("min_score", math.inf),
        ("sort", "price:up"),
        ("mmr", -0.1),
        ("modality", "audio"),
    ],
)
def test_invalid_option_values_are_invalid_requests_naming_the_field(
    make_client: Any, option: str, value: Any
) -> None:
    # json.dumps writes inf as Infinity, which the server's JSON parser reads back.
    raw = json.dumps({"text": "red", option: value})
    r = make_client().post("/search", content=raw, headers={"content-type": "application/json"})
    err = assert_error(r, 422, "invalid_request")
    assert err["details"]["field"] == option and option in err["message"]


def test_k_and_offset_errors_keep_their_codes_and_the_tighter_limit(make_client: Any) -> None:
    client = make_client()
    for k in (0, 500):  # rejected by SearchOptions / by the service's max_k (200)
        err = assert_error(
            client.post("/search", json={"text": "red", "k": k}), 422, "k_out_of_range"
        )
        assert err["details"] == {"field": "k", "min": 1, "max": 200}
    err = assert_error(
        client.post("/search", json={"text": "red", "offset": -1}), 422, "offset_out_of_range"
    )
    assert err["details"]["max_depth"] == 1000
    # The documented range (OpenAPI: offset <= max_page_depth - max_k) is the enforced one.
    schema = client.get("/openapi.json").json()["components"]["schemas"]["SearchRequest"]
    assert schema["properties"]["offset"]["maximum"] == 800
    err = assert_error(
        client.post("/search", json={"text": "red", "offset": 801, "k": 10}),
        422,
        "offset_out_of_range",
    )
    assert err["details"]["max"] == 800 and "between 0 and 800" in err["message"]
    assert client.post("/search", json={"text": "red", "offset": 800, "k": 10}).status_code == 200
    assert_error(
        client.post("/search", json={"text": "red", "filter": "price <"}),
        400,
        "bad_filter",
    )
    # An operator limit above the library's: the library's cap is the one reported.
    roomy = make_client(max_k=5000, max_page_depth=50_000)
    err = assert_error(
        roomy.post("/search", json={"text": "red", "k": MAX_K + 1}), 422, "k_out_of_range"
    )
    assert err["details"]["max"] == MAX_K
    assert roomy.post("/search", json={"text": "red", "k": MAX_K}).status_code == 200


def test_image_upload_form_validates_through_search_options(make_client: Any) -> None:
    from service_fixtures import COLOURS, png_bytes, product_image

    client = make_client()
    image = ("q.png", png_bytes(product_image(COLOURS["red"], 0)), "image/png")
    err = assert_error(
        client.post("/search/image", files={"image": image}, data={"modality": "audio"}),
        422,
        "invalid_request",
    )
    assert err["details"]["field"] == "modality"
    assert_error(
        client.post("/search/image", files={"image": image}, data={"k": "0"}),
        422,
        "k_out_of_range",
    )
    ok = client.post("/search/image", files={"image": image}, data={"modality": "", "k": "2"})
    assert ok.status_code == 200 and [h["rank"] for h in ok.json()["hits"]] == [1, 2]


def test_the_request_model_carries_every_search_option() -> None:
    names = {OPTION_FIELDS.get(f.name, f.name) for f in dataclasses.fields(SearchOptions)}
    assert names <= set(SearchRequest.model_fields)
    body = SearchRequest(
        text="red",
        filter="price < 30",
        k=4,
        offset=8,
        modality="text",
        group_by_doc="mean",
        mmr=0.5,
        sort="price:desc",
        min_score=0.2,
        boosts={"price": -0.01},
    )
    assert body.to_options() == SearchOptions(
        where="price < 30",
        k=4,
        offset=8,
        modality="text",
        group_by_doc="mean",
        mmr=0.5,
        sort="price:desc",
        min_score=0.2,
        boosts={"price": -0.01},
    )
    blank = SearchRequest(text="red", filter=" ", sort="", modality="")
    assert blank.to_options(modality="image") == SearchOptions(modality="image")


class _RecordingEngine:
    """Stands in for SearchEngine in the batch runner: records each engine call."""

    def __init__(self) -> None:
        self.encoder = None
        self.manifest = SimpleNamespace(dim=4)
        self.calls: list[tuple[int, SearchOptions]] = []

    def search_batch(
        self,
        queries: list[Any],
        options: SearchOptions,
        texts: list[str | None] | None = None,
    ) -> list[SearchResults]:
        assert texts is None or len(texts) == len(queries)
        self.calls.append((len(queries), options))
        return [SearchResults(hits=(), timings={"total": 1.0}) for _ in queries]


def test_batches_group_queries_by_equal_search_options() -> None:
    engine = _RecordingEngine()
    vectors = np.eye(4, dtype=np.float32)
    same_a = SearchOptions(
        k=3, boosts={"price": 1, "rating": 2}, where={"op": "=", "column": "a", "value": 1}
    )
    same_b = SearchOptions(
        k=3, boosts=[("rating", 2.0), ("price", 1.0)], where={"value": 1, "column": "a", "op": "="}
    )
    other = same_a.replace(k=4)
    jobs = [
        SearchJob(query=vectors[0], options=same_a),
        SearchJob(query=vectors[1], options=other),
        SearchJob(query=vectors[2], options=same_b),
    ]
    answers = run_jobs(engine, jobs)
    assert sorted(n for n, _ in engine.calls) == [1, 2]
    assert {o.k for _, o in engine.calls} == {3, 4}
    assert all(isinstance(a, SearchResults) and "encode" in a.timings for a in answers)


def test_a_batch_encodes_no_lexical_query_unless_mmr_needs_its_vector(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lexical queries are ranked by BM25 alone: the batch's encoder pass leaves them
    out (a SKU lookup runs no text tower), and they are still answered in full."""
    from clipsearch.retrieval.encoders import load_encoder
    from clipsearch.retrieval.engine import SearchEngine

    encoder = load_encoder("fake")
    encoded: list[str] = []
    real = encoder.encode_texts
    monkeypatch.setattr(encoder, "encode_texts", lambda t: encoded.extend(t) or real(t))
    lexical = SearchOptions(k=3, mode="lexical")
    jobs = [
        SearchJob(query="SKU-21", options=lexical),
        SearchJob(query="SKU-10", options=SearchOptions(k=3, mode="hybrid")),
        SearchJob(query="SKU-11", options=lexical.replace(mmr=0.5)),
        SearchJob(query="SKU-20", options=lexical),
    ]
    with SearchEngine.open(catalog.index, encoder=encoder) as engine:
        answers = run_jobs(engine, jobs)
    assert sorted(encoded) == ["SKU-10", "SKU-11"]
    for answer, sku in zip(answers, ("SKU-21", "SKU-10", "SKU-11", "SKU-20"), strict=True):
        assert isinstance(answer, SearchResults), answer
        assert answer.hits[0].doc_id == sku
    assert answers[0].hits[0].explain["vector"] is None  # type: ignore[index]
    assert answers[1].hits[0].explain["vector"] is not None  # type: ignore[index]


def test_lexical_and_hybrid_modes_rank_exact_words_over_http(make_client: Any) -> None:
    """A SKU is found by its exact words: lexical and hybrid put it first over HTTP (the
    fake encoder's vectors cannot read it), and every hit explains its scores."""
    client = make_client()
    for mode in ("lexical", "hybrid"):
        body = client.post("/search", json={"text": "SKU-21", "k": 3, "mode": mode}).json()
        assert body["hits"][0]["doc_id"] == "SKU-21", (mode, body["hits"])
        explain = body["hits"][0]["explain"]
        assert explain["mode"] == mode and explain["lexical"]["rank"] == 1
    plain = client.post("/search", json={"text": "SKU-21", "k": 3, "mode": "vector"}).json()
    assert all("explain" not in h for h in plain["hits"])


def test_fusion_depth_over_http_bounds_the_fused_lists(make_client: Any) -> None:
    client = make_client()
    r = client.post("/search", json={"text": "SKU-21", "k": 3, "fusion_depth": 0})
    err = assert_error(r, 422, "invalid_request")
    assert "fusion_depth" in str(err["details"]), err
    body = client.post(
        "/search", json={"text": "red mug", "k": 3, "mode": "hybrid", "fusion_depth": 4}
    ).json()
    explains = [h["explain"] for h in body["hits"]]
    ranks = [(e[side] or {}).get("rank") for e in explains for side in ("vector", "lexical")]
    assert all(rank is None or rank <= 4 for rank in ranks), body["hits"]
