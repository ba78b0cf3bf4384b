"""HTTP API over a real small index: every route's happy path and error paths."""

from __future__ import annotations

import base64
import threading
from typing import Any

from service_fixtures import (
    COLOURS,
    Catalog,
    assert_error,
    png_bytes,
    product_image,
    wait_until,
)

KEY = "test-key-12345"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image_b64(colour: str, variant: int = 0) -> str:
    return b64(png_bytes(product_image(COLOURS[colour], variant)))


# ---------------------------------------------------------------------------- health, ops


def test_health_metrics_and_version_header(make_client: Any) -> None:
    client = make_client()
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["index_version"] == 1
    assert body["rows_by_modality"] == {"image": 12, "text": 12}
    assert r.headers["x-index-version"] == "1"
    client.post("/search", json={"text": "red"})
    text = client.get("/metrics").text
    assert 'clipsearch_requests_total{route="/search",method="POST",status="200"} 1' in text
    assert (
        'clipsearch_request_duration_seconds_bucket{route="/search",method="POST",le="+Inf"} 1'
        in text
    )
    assert "clipsearch_queue_depth 0" in text
    assert "clipsearch_index_version 1" in text
    assert client.get("/openapi.json").json()["paths"]["/search"]["post"]


def test_health_is_503_until_the_index_has_loaded(catalog: Catalog, monkeypatch: Any) -> None:
    from fastapi.testclient import TestClient

    from clipsearch.retrieval.encoders import load_encoder
    from clipsearch.retrieval.engine import SearchEngine
    from clipsearch.retrieval.service.app import create_app

    gate = threading.Event()
    real_open = SearchEngine.open

    def slow_open(*args: Any, **kwargs: Any) -> Any:
        gate.wait(10)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(SearchEngine, "open", slow_open)
    with TestClient(create_app(catalog.index, encoder=load_encoder("fake"))) as client:
        r = client.get("/health")
        assert_error(r, 503, "not_ready")
        assert_error(client.post("/search", json={"text": "red"}), 503, "not_ready")
        gate.set()
        wait_until(lambda: client.get("/health").status_code == 200, "the index to load")


def test_a_broken_index_keeps_health_503_with_the_reason(tmp_path: Any) -> None:
    from fastapi.testclient import TestClient

    from clipsearch.retrieval.service.app import create_app

    with TestClient(create_app(tmp_path / "nothing-here")) as client:
        state = client.app.state.service  # type: ignore[attr-defined]
        wait_until(lambda: state.load_error is not None, "the failed load")
        r = assert_error(client.get("/health"), 503, "not_ready")
        # The reason, with the server's folder named but not spelled out.
        assert "no such directory" in r["message"] and "<index>" in r["message"]
        assert str(tmp_path) not in r["message"]


# ---------------------------------------------------------------------------- search


def test_text_search_ranks_matching_products_and_names_the_version(make_client: Any) -> None:
    client = make_client()
    r = client.post("/search", json={"text": "red", "k": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["index_version"] == 1 and r.headers["x-index-version"] == "1"
    top = body["hits"]
    assert {h["doc_id"] for h in top[:2]} == {"SKU-00", "SKU-01"}
    assert top[0]["modality"] == "image"
    assert top[0]["image_url"].startswith(f"/items/{top[0]['doc_id']}/image")
    assert top[0]["metadata"]["colour"] == "red"
    assert "source" not in top[0]  # server paths are not exposed
    assert body["took_ms"] > 0 and "encode" in body["timings"]


def test_filters_as_string_and_json_ast(make_client: Any) -> None:
    client = make_client()
    as_text = client.post(
        "/search", json={"text": "red", "filter": "category = 'shoes' and in_stock"}
    )
    as_ast = client.post(
        "/search",
        json={
            "text": "red",
            "filter": {
                "op": "and",
                "args": [
                    {"op": "=", "column": "category", "value": "shoes"},
                    {"op": "=", "column": "in_stock", "value": True},
                ],
            },
        },
    )
    assert as_text.status_code == as_ast.status_code == 200
    hits = as_text.json()["hits"]
    assert hits and all(
        h["metadata"]["category"] == "shoes" and h["metadata"]["in_stock"] for h in hits
    )
    assert [h["row_id"] for h in hits] == [h["row_id"] for h in as_ast.json()["hits"]]
    assert as_text.json()["total_matches"] == sum(1 for i in range(6) if (i + 1) % 3 != 0)


def test_bad_filter_unknown_column_and_bad_options(make_client: Any) -> None:
    client = make_client()
    err = assert_error(
        client.post("/search", json={"text": "red", "filter": "price <"}), 400, "bad_filter"
    )
    assert "price" in err["message"] or "end" in err["message"]
    err = assert_error(
        client.post("/search", json={"text": "red", "filter": "colur = 'red'"}), 400, "bad_filter"
    )
    assert "colur" in err["message"] and "colour" in err["message"]  # names it, suggests the fix
    assert_error(
        client.post("/search", json={"text": "red", "filter": {"op": "~"}}), 400, "bad_filter"
    )
    for k in (0, -1, 100_000):
        err = assert_error(
            client.post("/search", json={"text": "red", "k": k}), 422, "k_out_of_range"
        )
        assert err["details"]["max"] == 200
    assert_error(
        client.post("/search", json={"text": "red", "offset": 990, "k": 20}),
        422,
        "offset_out_of_range",
    )
    assert_error(client.post("/search", json={"text": "red", "mmr": 3}), 422, "invalid_request")
    assert_error(
        client.post("/search", json={"text": "red", "modality": "audio"}), 422, "invalid_request"
    )
    assert_error(client.post("/search", json={"text": "red", "sort": "nope"}), 400)


def test_empty_and_ambiguous_queries(make_client: Any) -> None:
    client = make_client()
    assert_error(client.post("/search", json={}), 400, "empty_query")
    assert_error(client.post("/search", json={"text": "   "}), 400, "empty_query")
    assert_error(
        client.post("/search", json={"text": "red", "like_doc": "SKU-00"}), 400, "ambiguous_query"
    )


def test_invalid_json_and_unknown_fields_get_the_error_shape(make_client: Any) -> None:
    client = make_client()
    r = client.post("/search", content=b"{not json", headers={"content-type": "application/json"})
    err = assert_error(r, 422, "invalid_request")
    assert err["details"]["problems"]
    err = assert_error(client.post("/search", json={"txt": "red"}), 422, "invalid_request")
    assert "txt" in err["message"]
    assert_error(client.get("/no/such/route"), 404, "not_found")
    assert_error(client.get("/search"), 405, "method_not_allowed")


def test_image_search_base64_and_upload(make_client: Any) -> None:
    client = make_client()
    r = client.post("/search", json={"image": image_b64("blue", 1), "k": 2})
    assert r.status_code == 200
    assert r.json()["hits"][0]["doc_id"] == "SKU-11"  # the identical photo
    data_url = "data:image/png;base64," + image_b64("green")
    assert client.post("/search", json={"image": data_url}).json()["hits"][0]["doc_id"] == "SKU-20"
    up = client.post(
        "/search/image",
        files={"image": ("q.png", png_bytes(product_image(COLOURS["yellow"], 0)), "image/png")},
        data={"k": "3", "filter": "category = 'shoes'"},
    )
    assert up.status_code == 200
    hits = up.json()["hits"]
    assert hits[0]["doc_id"] == "SKU-31" and all(h["metadata"]["category"] == "shoes" for h in hits)


def test_bad_and_oversized_images(make_client: Any) -> None:
    client = make_client(max_image_bytes=3000, max_body_bytes=64_000, max_image_pixels=10_000)
    assert_error(
        client.post("/search", json={"image": b64(b"definitely not an image")}), 400, "bad_image"
    )
    assert_error(client.post("/search", json={"image": "@@not base64@@"}), 400, "bad_image")
    assert_error(
        client.post(
            "/search/image", files={"image": ("x.png", b"\x89PNG\r\n\x1a\n broken", "image/png")}
        ),
        400,
        "bad_image",
    )
    noisy = product_image((1, 2, 3), 3, size=80)
    import random

    rng = random.Random(0)
    noisy.putdata(
        [(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(80 * 80)]
    )
    big = png_bytes(noisy)
    assert len(big) > 3000
    err = assert_error(client.post("/search", json={"image": b64(big)}), 413, "image_too_large")
    assert err["details"]["limit"] == 3000
    assert_error(
        client.post("/search/image", files={"image": ("b.png", big, "image/png")}),
        413,
        "image_too_large",
    )
    wide = png_bytes(product_image((9, 9, 9), 0, size=128))  # 16k pixels, small file
    assert len(wide) < 3000
    err = assert_error(
        client.post("/search", json={"image": b64(wide)}), 413, "image_too_many_pixels"
    )
    assert err["details"]["width"] == 128


def test_oversized_body_is_refused(make_client: Any) -> None:
    client = make_client(max_body_bytes=4096, max_image_bytes=4096)
    err = assert_error(client.post("/search", json={"text": "red " * 5000}), 413, "body_too_large")
    assert "4,096" in err["message"]


def test_url_fetch_is_off_by_default_and_guarded_when_on(make_client: Any) -> None:
    off = make_client()
    assert_error(
        off.post("/search", json={"image_url": "http://example.com/a.jpg"}),
        403,
        "url_fetch_disabled",
    )
    on = make_client(allow_url_fetch=True)
    err = assert_error(
        on.post("/search", json={"image_url": "http://127.0.0.1:9/a.jpg"}), 400, "url_not_allowed"
    )
    assert "loopback" in err["message"]
    assert_error(
        on.post("/search", json={"image_url": "file:///etc/passwd"}), 400, "url_not_allowed"
    )


def test_more_like_this_and_composed_queries(make_client: Any) -> None:
    client = make_client()
    like = client.post("/search", json={"like_doc": "SKU-00", "k": 3}).json()["hits"]
    assert like[0]["doc_id"] == "SKU-01"  # the other red product, not SKU-00 itself
    assert all(h["doc_id"] != "SKU-00" for h in like)
    filtered = client.post(
        "/search", json={"like_doc": "SKU-00", "filter": "category = 'shirts'"}
    ).json()
    assert all(
        h["metadata"]["category"] == "shirts" and h["doc_id"] != "SKU-00" for h in filtered["hits"]
    )
    assert_error(client.post("/search", json={"like_doc": "SKU-404"}), 404, "unknown_doc")
    composed = client.post(
        "/search",
        json={
            "terms": [
                {"like_doc": "SKU-00"},
                {"text": "red", "weight": -1.0},
                {"text": "green", "weight": 1.5},
            ]
        },
    )
    assert composed.status_code == 200
    assert composed.json()["hits"][0]["metadata"]["colour"] == "green"
    assert_error(
        client.post("/search", json={"terms": [{"text": "a", "image": "b"}]}), 400, "bad_query"
    )


def test_classify(make_client: Any) -> None:
    client = make_client()
    r = client.post(
        "/classify", json={"image": image_b64("red"), "labels": ["blue", "red", "green"]}
    )
    assert r.status_code == 200
    labels = r.json()["labels"]
    assert labels[0]["label"] == "red"
    assert abs(sum(x["probability"] for x in labels) - 1.0) < 1e-4
    assert (
        client.post("/classify", json={"like_doc": "SKU-10", "labels": ["red", "blue"]}).json()[
            "labels"
        ][0]["label"]
        == "blue"
    )
    assert_error(
        client.post("/classify", json={"image": image_b64("red"), "labels": ["red"]}),
        422,
        "invalid_request",
    )


# ---------------------------------------------------------------------------- catalog


def test_items_image_and_facets(make_client: Any, catalog: Catalog) -> None:
    client = make_client()
    item = client.get("/items/SKU-21").json()
    assert item["doc_id"] == "SKU-21" and item["index_version"] == 1
    assert sorted(r["modality"] for r in item["rows"]) == ["image", "text"]
    text_row = next(r for r in item["rows"] if r["modality"] == "text")
    assert text_row["text"] == "green shoe model 21" and text_row["metadata"]["price"] == 26.0
    assert_error(client.get("/items/SKU-99"), 404, "unknown_doc")
    img = client.get("/items/SKU-21/image")
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert img.content == (catalog.folder / "images" / "SKU-21.png").read_bytes()
    assert_error(client.get("/items/SKU-99/image"), 404, "image_not_found")
    facets = client.get("/facets").json()["columns"]
    assert facets["category"]["values"] == ["shirts", "shoes"] and facets["category"]["counts"] == [
        6,
        6,
    ]  # documents, not rows
    assert set(facets["colour"]["values"]) == set(COLOURS)
    assert facets["price"] == {
        "type": "number",
        "min": 10.0,
        "max": 48.5,
        "values": None,
        "counts": None,
    }
    assert facets["in_stock"]["type"] == "bool"
    assert "title" not in facets  # free text (a value per product) is no filter menu


def test_image_root_option_adds_to_the_recorded_roots(
    make_client: Any, catalog: Catalog, tmp_path: Any
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    client = make_client(image_roots=(str(elsewhere),))
    img = client.get("/items/SKU-21/image")
    assert img.status_code == 200
    assert img.content == (catalog.folder / "images" / "SKU-21.png").read_bytes()


def test_resolve_image_refuses_escapes(tmp_path: Any) -> None:
    from clipsearch.retrieval.service.catalog import resolve_image

    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.png").write_bytes(b"x")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"s")
    (root / "img" / "link.png").symlink_to(secret)
    (root / "notes.txt").write_text("t")
    assert resolve_image("img/a.png", (root,)) == ((root / "img" / "a.png").resolve(), "image/png")
    assert resolve_image(str(root / "img" / "a.png"), (root,)) is not None
    assert resolve_image("../secret.png", (root,)) is None
    assert resolve_image(str(secret), (root,)) is None
    assert resolve_image("img/link.png", (root,)) is None  # symlink leading out
    assert resolve_image("notes.txt", (root,)) is None  # not an image type


# ---------------------------------------------------------------------------- auth, errors


def test_api_key(make_client: Any) -> None:
    client = make_client(api_key="s3cret-key-123")
    assert client.get("/health").status_code == 200  # probes need no key
    assert client.get("/").status_code == 200  # the page asks for the key itself
    assert_error(client.post("/search", json={"text": "red"}), 401, "unauthorized")
    assert_error(
        client.post("/search", json={"text": "red"}, headers={"X-API-Key": "wrong"}),
        401,
        "unauthorized",
    )
    assert_error(client.get("/metrics"), 401, "unauthorized")
    assert_error(client.post("/admin/reload"), 401, "unauthorized")
    ok = client.post("/search", json={"text": "red"}, headers={"X-API-Key": "s3cret-key-123"})
    assert ok.status_code == 200


def test_unexpected_errors_are_500_without_internals(make_client: Any, monkeypatch: Any) -> None:
    client = make_client()
    engine = client.app.state.service.engine

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internal detail at /srv/private/path.py")

    monkeypatch.setattr(engine, "search_batch", broken)
    monkeypatch.setattr(engine, "search", broken)
    r = client.post("/search", json={"text": "red"})
    err = assert_error(r, 500, "internal_error")
    assert "secret" not in r.text and "Traceback" not in r.text and "/srv" not in r.text
    assert err["details"] == {}


def test_queue_full_gets_a_fast_429_and_deadline_a_504(make_client: Any, monkeypatch: Any) -> None:
    client = make_client(max_queue=1, max_batch_size=1, request_timeout_s=5.0)
    state = client.app.state.service
    engine = state.engine
    gate = threading.Event()
    real = engine.search_batch

    def blocked(*args: Any, **kwargs: Any) -> Any:
        gate.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "search_batch", blocked)
    first: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: first.setdefault("r", client.post("/search", json={"text": "red"}))
    )
    t.start()
    wait_until(lambda: state.batcher.depth == 1, "the first query to be queued")
    r = client.post("/search", json={"text": "blue"})
    assert "r" not in first  # answered while the first query was still blocked: no waiting
    assert_error(r, 429, "overloaded")
    assert r.headers["retry-after"] == "1"
    # Refused before its body is read or validated: overload costs no parsing.
    assert_error(client.post("/search", json={"text": "red", "k": "many"}), 429, "overloaded")
    gate.set()
    t.join(10)
    assert first["r"].status_code == 200
    assert 'clipsearch_rejected_total{reason="queue_full"} 2' in client.get("/metrics").text

    slow = make_client(request_timeout_s=0.3)
    slow_engine = slow.app.state.service.engine
    gate2 = threading.Event()
    monkeypatch.setattr(
        slow_engine, "search_batch", lambda *a, **k: gate2.wait(3) and real(*a, **k)
    )
    try:
        assert_error(slow.post("/search", json={"text": "red"}), 504, "deadline_exceeded")
    finally:
        gate2.set()


def test_a_failed_reload_keeps_serving_the_pinned_version(
    make_client: Any, catalog: Catalog, tmp_path: Any
) -> None:
    import shutil

    index = tmp_path / "index"
    shutil.copytree(catalog.index, index)
    client = make_client(index=index, api_key=KEY)
    client.headers["x-api-key"] = KEY
    assert client.post("/admin/reload").json() == {
        "previous_version": 1,
        "index_version": 1,
        "changed": False,
    }
    (index / "CURRENT").write_text("v000009.json\n")  # names a manifest that does not exist
    err = assert_error(client.post("/admin/reload"), 503, "index_unavailable")
    assert "v000009" in err["message"] or "version 9" in err["message"]
    r = client.post("/search", json={"text": "red"})
    assert r.status_code == 200 and r.json()["index_version"] == 1
    assert 'clipsearch_reloads_total{outcome="failed"} 1' in client.get("/metrics").text


def test_doc_ids_with_slashes_from_an_image_folder(make_client: Any, tmp_path: Any) -> None:
    from clipsearch.indexer.build import BuildOptions, build
    from clipsearch.retrieval.encoders import load_encoder

    folder = tmp_path / "photos"
    for sub, colour in (("shirts", "red"), ("shoes", "blue")):
        (folder / sub).mkdir(parents=True)
        product_image(COLOURS[colour], 0).save(folder / sub / f"{colour} one.png")
    build(
        [folder], tmp_path / "index", encoder=load_encoder("fake"), options=BuildOptions(workers=1)
    )
    client = make_client(index=tmp_path / "index")
    hit = client.post("/search", json={"text": "blue", "k": 1}).json()["hits"][0]
    assert hit["doc_id"] == "shoes/blue one.png"
    image = client.get(hit["image_url"])
    assert image.status_code == 200
    assert image.content == (folder / "shoes" / "blue one.png").read_bytes()
    item = client.get("/items/shoes/blue%20one.png").json()
    assert item["doc_id"] == "shoes/blue one.png" and item["rows"][0]["modality"] == "image"
