"""Concurrency over a real uvicorn server: micro-batching answers each request correctly,
and new index versions are picked up under load without failing a request."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path
from typing import Any

import httpx
from service_fixtures import Catalog, add_products, running_server, write_more_products

from clipsearch.retrieval.encoders import load_encoder
from clipsearch.retrieval.service.app import create_app
from clipsearch.retrieval.service.config import ServiceConfig

QUERIES = [
    {"text": f"{colour} {what}", "k": k, **({"filter": flt} if flt else {})}
    for colour in ("red", "blue", "green", "yellow", "black", "white")
    for what, k, flt in (("shirt", 3, None), ("shoe", 5, "category = 'shoes'"))
] + [{"like_doc": f"SKU-{i}0", "k": 4} for i in range(6)]


def _answer(body: dict[str, Any]) -> list[tuple[int, float]]:
    return [(h["row_id"], round(h["score"], 4)) for h in body["hits"]]


# Admission that only refuses by queue count, with a generous deadline.
_PATIENT: dict[str, Any] = {"max_queue_delay_ms": 0.0, "request_timeout_s": 60.0}


async def _post_all(base: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        return await asyncio.gather(*(client.post("/search", json=b) for b in bodies))


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(catalog: Catalog) -> None:
    # These tests are about batching and reload correctness, not admission: the delay-based
    # 429 and a short deadline would turn a slow (loaded) CI machine into false failures.
    config = ServiceConfig(max_batch_size=16, max_batch_wait_ms=25.0, **_PATIENT)
    app = create_app(catalog.index, config, encoder=load_encoder("fake"))
    with running_server(app) as base:
        expected = [_answer(httpx.post(base + "/search", json=q).json()) for q in QUERIES]
        metrics = app.state.service.metrics
        before = metrics.batches
        responses = asyncio.run(_post_all(base, QUERIES))
        batches = metrics.batches - before
    assert [r.status_code for r in responses] == [200] * len(QUERIES)
    assert [_answer(r.json()) for r in responses] == expected
    assert batches < len(QUERIES)
    # ...and the same answers as the library gives for the query alone, without HTTP.
    from clipsearch.retrieval.engine import SearchEngine

    with SearchEngine.open(catalog.index, encoder=load_encoder("fake")) as engine:
        for q, r in zip(QUERIES, responses, strict=True):
            if "text" in q:
                alone = engine.search(q["text"], k=q["k"], where=q.get("filter"))
                got = r.json()["hits"]
                assert [h["row_id"] for h in got] == alone.row_ids
                assert [round(h["score"], 3) for h in got] == [
                    round(h.score, 3) for h in alone.hits
                ]


def test_reload_under_load_fails_no_request(catalog: Catalog, tmp_path: Path) -> None:
    index = tmp_path / "index"
    shutil.copytree(catalog.index, index)
    more = write_more_products(
        tmp_path / "more", {"purple": (130, 40, 170), "pink": (245, 130, 190)}
    )
    # A loopback server whose operator allowed admin calls without a key.
    config = ServiceConfig(max_batch_wait_ms=2.0, admin_without_key=True, **_PATIENT)
    app = create_app(index, config, encoder=load_encoder("fake"))
    with running_server(app) as base:
        statuses: list[int] = []
        versions: set[int] = set()
        stop = threading.Event()

        async def load() -> None:
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                i = 0
                while not stop.is_set() and i < 2000:
                    batch = [QUERIES[(i + j) % len(QUERIES)] for j in range(8)]
                    i += 8
                    for r in await asyncio.gather(*(client.post("/search", json=b) for b in batch)):
                        statuses.append(r.status_code)
                        if r.status_code == 200:
                            versions.add(r.json()["index_version"])

        loader = threading.Thread(target=lambda: asyncio.run(load()))
        loader.start()
        try:
            add_products(index, more)  # commits version 2 while queries run
            reload = httpx.post(base + "/admin/reload", timeout=30)
            after = httpx.post(base + "/search", json={"text": "purple", "k": 1}).json()
            for _ in range(500):  # let the load run on into the new version
                if 2 in versions:
                    break
                stop.wait(0.01)
        finally:
            stop.set()
            loader.join(60)
    assert reload.status_code == 200
    assert reload.json() == {"previous_version": 1, "index_version": 2, "changed": True}
    assert statuses and set(statuses) == {200}
    assert len(statuses) >= 16 and versions == {1, 2}
    assert after["index_version"] == 2 and after["hits"][0]["doc_id"] == "SKU-N0"


def test_watch_picks_up_a_new_version(catalog: Catalog, tmp_path: Path) -> None:
    index = tmp_path / "index"
    shutil.copytree(catalog.index, index)
    more = write_more_products(tmp_path / "more", {"purple": (130, 40, 170)})
    app = create_app(index, ServiceConfig(watch_interval_s=0.05), encoder=load_encoder("fake"))
    with running_server(app) as base:
        assert httpx.get(base + "/health").json()["index_version"] == 1
        add_products(index, more)
        import time

        deadline = time.monotonic() + 20
        while httpx.get(base + "/health").json()["index_version"] != 2:
            assert time.monotonic() < deadline, "the watcher did not reload"
            time.sleep(0.05)
        hit = httpx.post(base + "/search", json={"text": "purple", "k": 1})
    assert hit.headers["x-index-version"] == "2"
    assert hit.json()["hits"][0]["doc_id"] == "SKU-N0"
