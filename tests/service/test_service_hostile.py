"""Hostile input costs bounded memory and time, and every refusal is our JSON error shape:
the shared decode pixel budget, text caps, oversized and malformed bodies, huge declared
image sizes, and server paths that never leak."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import socket
import struct
import threading
import zlib
from typing import Any

import pytest
from service_fixtures import (
    COLOURS,
    assert_error,
    png_bytes,
    product_image,
    running_server,
    wait_until,
)

from clipsearch.retrieval.service.config import ServiceConfig
from clipsearch.retrieval.service.decoding import PixelBudget, decode_image_async
from clipsearch.retrieval.service.errors import ApiError

KEY = "test-key-12345"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def declared_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` (its data is one row)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    idat = zlib.compress(b"\x00" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def red_png() -> bytes:
    return png_bytes(product_image(COLOURS["red"], 0))


# ---------------------------------------------------------------------------- pixel budget


def test_pixel_budget_admits_in_arrival_order_and_releases_from_any_thread() -> None:
    async def main() -> None:
        budget = PixelBudget(100)
        await budget.acquire(60, timeout=5)
        big = asyncio.ensure_future(budget.acquire(60, timeout=5))
        await asyncio.sleep(0)  # let it queue
        small = asyncio.ensure_future(budget.acquire(10, timeout=5))
        await asyncio.sleep(0)
        # 10 would fit, but it may not overtake the 60 that arrived first.
        assert budget.waiting == 2 and budget.in_use == 60
        assert not big.done() and not small.done()
        released = threading.Thread(target=budget.release, args=(60,))
        released.start()
        released.join()
        await asyncio.wait_for(asyncio.gather(big, small), timeout=5)
        assert budget.in_use == 70 and budget.waiting == 0
        budget.release(60)
        budget.release(10)
        assert budget.in_use == 0

    asyncio.run(main())


def test_a_waiter_that_times_out_leaves_nothing_behind() -> None:
    async def main() -> None:
        budget = PixelBudget(100)
        await budget.acquire(100, timeout=5)
        with pytest.raises(TimeoutError):
            await budget.acquire(1, timeout=0)
        assert budget.waiting == 0 and budget.in_use == 100
        budget.release(100)
        assert budget.try_acquire(100)  # everything came back
        with pytest.raises(ValueError, match=r"1\.\.100"):
            await budget.acquire(101, timeout=1)

    asyncio.run(main())


def test_an_idle_budget_hands_memory_back_after_large_images() -> None:
    trimmed = threading.Event()
    budget = PixelBudget(100, on_idle=trimmed.set, trim_after=50)
    assert budget.try_acquire(40) and budget.try_acquire(30)
    budget.release(40)
    assert not trimmed.is_set()  # still in use
    budget.release(30)
    assert trimmed.wait(5)


def test_a_decoded_image_holds_its_pixels_until_it_is_freed() -> None:
    config = ServiceConfig(max_image_pixels=64 * 64, decode_pixel_budget=64 * 64)
    raw = red_png()  # 64 x 64

    async def main() -> None:
        import time

        budget = PixelBudget(config.decode_pixel_budget)
        image = await decode_image_async(
            raw, config, budget, field="image", deadline=time.monotonic() + 5
        )
        assert image.size == (64, 64) and budget.in_use == 64 * 64
        # A second image does not fit while the first is alive: 504 at its deadline.
        with pytest.raises(ApiError) as err:
            await decode_image_async(
                raw, config, budget, field="image", deadline=time.monotonic() + 0.05
            )
        assert err.value.status == 504 and "other large images" in err.value.message
        del image
        gc.collect()
        assert budget.in_use == 0
        again = await decode_image_async(
            raw, config, budget, field="image", deadline=time.monotonic() + 5
        )
        assert again.size == (64, 64)
        # A failed decode gives its pixels back at once.
        with pytest.raises(ApiError):
            await decode_image_async(
                raw[:60], config, budget, field="image", deadline=time.monotonic() + 5
            )
        assert budget.in_use == 64 * 64

    asyncio.run(main())


def test_a_full_pixel_budget_makes_image_queries_wait_then_504(make_client: Any) -> None:
    client = make_client(request_timeout_s=0.3)
    pixels = client.app.state.service.pixels
    assert pixels.try_acquire(pixels.capacity)  # as if other requests held every pixel
    try:
        err = assert_error(
            client.post("/search", json={"image": b64(red_png())}), 504, "deadline_exceeded"
        )
        assert "decoding other large images" in err["message"]
        # Text queries need no pixels and are not held up.
        assert client.post("/search", json={"text": "red"}).status_code == 200
        gauge = [
            line.split()[1]
            for line in client.get("/metrics").text.splitlines()
            if line.startswith("clipsearch_decode_pixels_in_use ")
        ]
        assert [float(v) for v in gauge] == [pixels.capacity]
    finally:
        pixels.release(pixels.capacity)
    assert client.post("/search", json={"image": b64(red_png())}).status_code == 200
    # Once answered, nothing (request, batcher, worker) keeps the decoded image alive.
    wait_until(lambda: pixels.in_use == 0, "the answered query's pixels to come back")
    assert client.post("/search/image", files={"image": ("q.png", red_png())}).status_code == 200
    wait_until(lambda: pixels.in_use == 0, "the upload's pixels to come back")


def test_a_composed_query_cannot_hold_more_than_the_budget(make_client: Any) -> None:
    client = make_client(max_image_pixels=64 * 64, decode_pixel_budget=64 * 64 + 10)
    terms = [{"image": b64(red_png())}, {"image": b64(red_png()), "weight": 0.5}]
    err = assert_error(client.post("/search", json={"terms": terms}), 413, "image_too_many_pixels")
    assert err["details"]["field"] == "terms[1]"


# ---------------------------------------------------------------------------- declared sizes


def test_a_png_declaring_30000_squared_is_413_at_every_entry_point(make_client: Any) -> None:
    client = make_client()
    raw = declared_png(30000, 30000)
    assert len(raw) < 50_000
    answers = [
        client.post("/search", json={"image": b64(raw)}),
        client.post("/search", json={"terms": [{"image": b64(raw)}]}),
        client.post("/classify", json={"image": b64(raw), "labels": ["a", "b"]}),
        client.post("/search/image", files={"image": ("x.png", raw, "image/png")}),
    ]
    for r in answers:
        err = assert_error(r, 413, "image_too_many_pixels")
        assert "not indexed" not in err["message"]
        assert err["details"]["limit"] == 40_000_000
    # Just over the service's own cap (below Pillow's bomb limit): 413 with the size.
    err = assert_error(
        client.post("/search", json={"image": b64(declared_png(6400, 6400))}),
        413,
        "image_too_many_pixels",
    )
    assert err["details"]["width"] == 6400


def test_an_extreme_aspect_ratio_is_refused_before_decoding(make_client: Any) -> None:
    client = make_client()
    err = assert_error(
        client.post("/search", json={"image": b64(declared_png(40000, 1))}), 400, "bad_image"
    )
    assert "40000x1" in err["message"]


# ---------------------------------------------------------------------------- bodies


def test_an_oversized_chunked_body_is_413_in_our_shape(make_client: Any) -> None:
    client = make_client(max_body_bytes=1_000_000, max_image_bytes=500_000)

    def chunks() -> Any:
        for _ in range(5):
            yield b"x" * 500_000

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "body_too_large")
    multipart = client.post(
        "/search/image",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=zzz"},
    )
    assert_error(multipart, 413, "body_too_large")
    # A body within the limit still parses.
    assert client.post("/search", json={"text": "red"}).status_code == 200


@pytest.mark.parametrize("value", [b"-1", b"abc", b"1e3"])
def test_a_malformed_content_length_is_400_json_in_the_app(make_client: Any, value: bytes) -> None:
    app = make_client().app
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/search",
        "headers": [(b"content-type", b"application/json"), (b"content-length", value)],
        "query_string": b"",
    }
    asyncio.run(app.middleware_stack(scope, receive, send))
    assert sent[0]["status"] == 400
    assert (b"content-type", b"application/json") in sent[0]["headers"]
    assert b'"code": "bad_request"' in sent[1]["body"] and b"Content-Length" in sent[1]["body"]


def test_unparseable_requests_get_json_from_the_http_server(catalog: Any) -> None:
    import uvicorn

    from clipsearch.retrieval.encoders import load_encoder
    from clipsearch.retrieval.service.app import create_app
    from clipsearch.retrieval.service.server import http_protocol

    app = create_app(catalog.index, ServiceConfig(), encoder=load_encoder("fake"))
    with running_server(app, http=http_protocol()) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(
                b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: -1\r\n\r\n{}"
            )
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head
    assert b'"code": "bad_request"' in body
    assert uvicorn  # the protocol class is uvicorn's own, subclassed


# ---------------------------------------------------------------------------- text caps


def test_texts_are_capped_per_request_before_tokenizing(make_client: Any, monkeypatch: Any) -> None:
    client = make_client(max_text_chars=100)
    encoder = client.app.state.service.engine.encoder
    seen: list[int] = []
    real = encoder.encode_texts

    def counting(texts: Any) -> Any:
        seen.extend(len(t) for t in texts)
        return real(texts)

    monkeypatch.setattr(encoder, "encode_texts", counting)
    long = "red " * 30  # 120 characters
    err = assert_error(client.post("/search", json={"text": long}), 413, "text_too_long")
    assert err["details"] == {"field": "text", "chars": 120, "limit": 100}
    terms = [{"text": "red " * 13}, {"text": "blue " * 11, "weight": -0.5}]  # 52 + 55
    assert_error(client.post("/search", json={"terms": terms}), 413, "text_too_long")
    labels = ["a red shirt " * 5, "a blue shoe " * 5]  # 60 + 60
    r = client.post("/classify", json={"image": b64(red_png()), "labels": labels})
    assert assert_error(r, 413, "text_too_long")["details"]["field"] == "labels"
    assert seen == []  # nothing reached the tokenizer
    assert client.post("/search", json={"text": "red " * 25}).status_code == 200


# ---------------------------------------------------------------------------- leaks


@pytest.mark.parametrize(
    "filter_",
    [
        "source startswith '/'",
        "category = 'shirts' and not source contains 'x'",
        {"op": "startswith", "column": "source", "value": "/s"},
    ],
)
def test_the_source_column_cannot_be_filtered_over_http(make_client: Any, filter_: Any) -> None:
    client = make_client()
    err = assert_error(
        client.post("/search", json={"text": "red", "filter": filter_}), 400, "bad_filter"
    )
    assert err["details"]["column"] == "source" and "--expose-source" in err["message"]


def test_source_stays_hidden_from_sort_boosts_hits_and_items(make_client: Any) -> None:
    client = make_client()
    r = client.post("/search", json={"text": "red", "sort": "source:asc"})
    assert assert_error(r, 422, "invalid_request")["details"]["field"] == "sort"
    r = client.post("/search", json={"text": "red", "boosts": {"source": 1.0}})
    assert_error(r, 422, "invalid_request")
    hit = client.post("/search", json={"text": "red"}).json()["hits"][0]
    assert "source" not in hit and "source" not in hit["metadata"]
    rows = client.get(f"/items/{hit['doc_id']}").json()["rows"]
    assert all("source" not in row for row in rows)


def test_the_operator_can_expose_sources(make_client: Any, catalog: Any) -> None:
    client = make_client(expose_source=True)
    r = client.post(
        "/search", json={"text": "red", "filter": f"source startswith '{catalog.folder}'"}
    )
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert hits and all(h["source"].startswith(str(catalog.folder)) for h in hits)


def test_error_messages_carry_no_object_reprs_or_paths(make_client: Any, catalog: Any) -> None:
    client = make_client()
    answers = [
        client.post("/search", json={"image": b64(b"this is not an image at all")}),
        client.post("/search/image", files={"image": ("x.png", b"GIF89a garbage", "image/gif")}),
        client.post("/search", json={"text": "red", "filter": "no_such_column = 1"}),
    ]
    for r in answers:
        err = assert_error(r, 400)
        assert " at 0x" not in err["message"] and "object" not in err["message"], err
        assert str(catalog.folder) not in r.text


# ---------------------------------------------------------------------------- admin


def test_admin_routes_need_a_key_or_an_explicit_loopback_opt_in(make_client: Any) -> None:
    from fastapi.testclient import TestClient

    open_client = make_client()
    err = assert_error(open_client.post("/admin/reload"), 403, "admin_disabled")
    assert "--api-key" in err["message"]

    keyed = make_client(api_key=KEY)
    assert_error(keyed.post("/admin/reload"), 401, "unauthorized")
    assert keyed.post("/admin/reload", headers={"x-api-key": KEY}).status_code == 200

    # --admin-without-key: only when both ends of the connection are loopback.
    opted = make_client(admin_without_key=True)
    assert_error(opted.post("/admin/reload"), 403, "admin_disabled")  # "testclient"
    # (Same app, other client addresses; the app's lifespan already runs under `opted`.)
    local = TestClient(opted.app, base_url="http://127.0.0.1", client=("127.0.0.1", 5000))
    assert local.post("/admin/reload").status_code == 200
    lan = TestClient(opted.app, base_url="http://127.0.0.1", client=("10.1.2.3", 5000))
    assert_error(lan.post("/admin/reload"), 403, "admin_disabled")


def test_serve_refuses_admin_without_key_on_a_public_address(catalog: Any) -> None:
    from clipsearch.retrieval.errors import ConfigError
    from clipsearch.retrieval.service.server import serve

    with pytest.raises(ConfigError, match="loopback"):
        serve(catalog.index, ServiceConfig(admin_without_key=True), host="0.0.0.0")


# ---------------------------------------------------------------------------- schema


def test_the_openapi_schema_documents_every_error_status_in_our_shape(make_client: Any) -> None:
    schema = make_client().get("/openapi.json").json()
    search = schema["paths"]["/search"]["post"]["responses"]
    assert {"400", "401", "403", "404", "413", "422", "429", "500", "503", "504"} <= set(search)
    ref = search["413"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/ErrorResponse")
    assert "HTTPValidationError" not in str(schema)
    assert set(schema["paths"]["/admin/reload"]["post"]["responses"]) >= {"401", "403", "503"}


def _png(mode: str, size: tuple[int, int]) -> Any:
    from PIL import Image

    return Image.new(mode, size)


def _image_corpus() -> list[bytes]:
    """Valid images of many formats and modes, from which the fuzz cases are mutated."""
    from PIL import Image, ImageDraw

    base = product_image(COLOURS["blue"], 2)
    out: list[bytes] = []
    variants: list[tuple[Any, str, dict[str, Any]]] = [
        (base, "JPEG", {"quality": 80}),
        (base, "JPEG", {"progressive": True}),
        (base.convert("CMYK"), "JPEG", {}),
        (base.convert("L"), "PNG", {}),
        (base.convert("RGBA"), "PNG", {}),
        (base.convert("P"), "PNG", {"transparency": 0}),
        (base.convert("I;16"), "PNG", {}),
        (base.convert("1"), "PNG", {}),
        (base.convert("P"), "GIF", {}),
        (base, "WEBP", {"quality": 50}),
        (base.convert("RGBA"), "WEBP", {"lossless": True}),
        (base, "BMP", {}),
        (base, "TIFF", {}),
        (base, "ICO", {}),
    ]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate
    variants.append((base, "JPEG", {"exif": exif.tobytes()}))
    frames = [product_image(COLOURS[c], 0).convert("P") for c in ("red", "green")]
    for im, fmt, kwargs in variants:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kwargs)
        out.append(buf.getvalue())
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], loop=0)
    out.append(buf.getvalue())
    draw_im = Image.new("RGB", (40, 30), "white")
    ImageDraw.Draw(draw_im).ellipse((5, 5, 30, 25), fill="red")
    out.append(png_bytes(draw_im))
    return out


def _mutations(corpus: list[bytes], count: int, seed: int) -> list[bytes]:
    """Deterministic byte-level mutations: flips, truncations, spliced and repeated runs,
    header fields set to extremes."""
    import random

    rng = random.Random(seed)
    out: list[bytes] = []
    for i in range(count):
        data = bytearray(corpus[i % len(corpus)])
        kind = i % 5
        if kind == 0:  # flip a few bytes, mostly in the header
            for _ in range(rng.randint(1, 8)):
                pos = rng.randrange(min(len(data), 64 if rng.random() < 0.7 else len(data)))
                data[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncate
            data = data[: rng.randrange(1, len(data))]
        elif kind == 2:  # splice a run from another image
            other = corpus[rng.randrange(len(corpus))]
            a = rng.randrange(len(data))
            data[a : a + 32] = other[: rng.randint(1, 64)]
        elif kind == 3:  # extremes in the header (sizes, counts, lengths)
            for _ in range(3):
                pos = rng.randrange(min(len(data) - 4, 40))
                data[pos : pos + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00"])
        else:  # repeat a segment (markers, chunks) many times
            a = rng.randrange(len(data))
            seg = data[a : a + rng.randint(2, 16)]
            data[a:a] = seg * rng.randint(2, 50)
        out.append(bytes(data))
    return out


def test_no_image_bytes_can_cause_a_5xx(make_client: Any) -> None:
    """Fuzz every image entry point: valid images of many formats and modes, then
    deterministic mutations of them. Each answer is 200 or a 4xx in our shape."""
    client = make_client()
    corpus = _image_corpus()
    cases = corpus + _mutations(corpus, 160, seed=13)
    entry_points = [
        lambda raw: client.post("/search", json={"image": b64(raw), "k": 2}),
        lambda raw: client.post("/search/image", files={"image": ("q", raw, "image/png")}),
        lambda raw: client.post("/classify", json={"image": b64(raw), "labels": ["a", "b"]}),
        lambda raw: client.post(
            "/search", json={"terms": [{"text": "red"}, {"image": b64(raw), "weight": 0.5}]}
        ),
    ]
    statuses: dict[int, int] = {}
    for i, raw in enumerate(cases):
        # Every valid image goes through every entry point; mutations rotate through them.
        targets = entry_points if i < len(corpus) else [entry_points[i % len(entry_points)]]
        for post in targets:
            r = post(raw)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (i, r.status_code, r.text)
            if r.status_code != 200:
                err = assert_error(r, r.status_code)
                assert " at 0x" not in err["message"]
            elif i < len(corpus):
                assert r.json()  # a valid image answers
    assert statuses.get(200, 0) >= 4 * len(corpus) and statuses.get(400, 0) > 20, statuses
