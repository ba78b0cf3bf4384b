"""Fixtures and helpers of the service tests: a small real product index, built with the real indexer and the
deterministic fake encoder (colour-aware: "red" text ranks red photos first)."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from clipsearch.retrieval.encoders import load_encoder

COLOURS = {
    "red": (220, 30, 30),
    "blue": (30, 70, 220),
    "green": (40, 170, 60),
    "yellow": (240, 220, 30),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
}
CATEGORIES = ("shirts", "shoes")


@dataclass(frozen=True)
class Catalog:
    folder: Path
    manifest: Path
    index: Path
    # sku -> metadata row
    products: dict[str, dict[str, Any]]


def product_image(rgb: tuple[int, int, int], variant: int, size: int = 64) -> Any:
    """A mostly solid photo with a small grey stripe pattern that differs per variant."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), rgb)
    draw = ImageDraw.Draw(im)
    for i in range(variant + 1):
        y = 4 + 9 * i
        draw.rectangle((4, y, size - 5, y + 2), fill=(128, 128, 128))
    return im


def png_bytes(im: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_catalog(folder: Path) -> tuple[Path, dict[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "images").mkdir(parents=True)
    rows: list[dict[str, Any]] = []
    products: dict[str, dict[str, Any]] = {}
    for ci, (colour, rgb) in enumerate(COLOURS.items()):
        for vi, category in enumerate(CATEGORIES):
            sku = f"SKU-{ci}{vi}"
            name = f"images/{sku}.png"
            product_image(rgb, vi).save(folder / name)
            row = {
                "sku": sku,
                "image_path": name,
                "title": f"{colour} {category[:-1]} model {ci}{vi}",
                "category": category,
                "colour": colour,
                "price": 10.0 + 7.5 * ci + vi,
                "in_stock": (ci + vi) % 3 != 0,
            }
            rows.append(row)
            products[sku] = row
    manifest = folder / "products.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest, products


def build_index(manifest: Path, out: Path) -> None:
    from clipsearch.indexer.build import BuildOptions, build
    from clipsearch.indexer.sources import SourceOptions

    options = BuildOptions(
        workers=1,
        sources=SourceOptions(image_col="image_path", text_cols=("title",), id_col="sku"),
    )
    build([manifest], out, encoder=load_encoder("fake"), options=options)


@pytest.fixture(scope="session")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    folder = tmp_path_factory.mktemp("catalog")
    manifest, products = write_catalog(folder)
    index = folder / "index"
    build_index(manifest, index)
    return Catalog(folder=folder, manifest=manifest, index=index, products=products)


def wait_until(condition: Any, what: str, timeout_s: float = 30.0) -> None:
    """Poll ``condition()`` until it is true; fail naming ``what`` after ``timeout_s``.

    Tests synchronise with this (or with events), never with a fixed sleep: the
    deadline only bounds a broken run, it is not a timing assumption."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def wait_healthy(client: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError("the service did not become healthy")


@pytest.fixture
def make_client(catalog: Catalog) -> Iterator[Any]:
    """make_client(**config) -> a started TestClient over the catalog index."""
    from fastapi.testclient import TestClient

    from clipsearch.retrieval.service.app import create_app
    from clipsearch.retrieval.service.config import ServiceConfig

    clients: list[Any] = []

    def make(index: Path | None = None, **config: Any) -> Any:
        app = create_app(
            index or catalog.index, ServiceConfig(**config), encoder=load_encoder("fake")
        )
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        wait_healthy(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@contextmanager
def running_server(app: Any, **uvicorn_options: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    import socket
    import threading

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="on",
            **uvicorn_options,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    base = f"http://127.0.0.1:{port}"
    import httpx

    while httpx.get(base + "/health").status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("the index did not load")
        time.sleep(0.02)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(15)


def write_more_products(folder: Path, colours: dict[str, tuple[int, int, int]]) -> Path:
    """A second manifest with one new shirt per colour (SKU-N<i>), for index add."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (colour, rgb) in enumerate(colours.items()):
        sku = f"SKU-N{i}"
        product_image(rgb, 2).save(folder / "images" / f"{sku}.png")
        rows.append(
            {
                "sku": sku,
                "image_path": f"images/{sku}.png",
                "title": f"new {colour} shirt {i}",
                "category": "shirts",
                "colour": colour,
                "price": 99.0,
                "in_stock": True,
            }
        )
    manifest = folder / "more.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest


def add_products(index: Path, manifest: Path) -> None:
    from clipsearch.indexer.build import BuildOptions, add
    from clipsearch.indexer.sources import SourceOptions

    options = BuildOptions(
        workers=1,
        sources=SourceOptions(image_col="image_path", text_cols=("title",), id_col="sku"),
    )
    add(index, [manifest], encoder=load_encoder("fake"), options=options)


def assert_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """Check the stable error shape and return its ``error`` object."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"code", "message", "details"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["details"], dict)
    if code is not None:
        assert err["code"] == code, err
    return err


def later(seconds: float) -> float:
    """A ``time.monotonic()`` deadline ``seconds`` from now."""
    return time.monotonic() + seconds


async def until(condition: Any, timeout_s: float = 10.0) -> None:
    """Yield to the loop until ``condition()`` holds (a deadline bounds a broken run)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.001)
