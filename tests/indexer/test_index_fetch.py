"""Image URLs in manifests, fetched from a local HTTP server the test starts on
127.0.0.1 (loopback allowed only through FetchOptions(allow_loopback=True))."""

from __future__ import annotations

import io
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipsearch.indexer.build import BuildOptions, build
from clipsearch.indexer.fetch import FetchOptions, UrlFetcher
from clipsearch.indexer.sources import SourceOptions
from clipsearch.retrieval.encoders import FakeEncoder
from clipsearch.retrieval.netguard import NetFetchError, blocked_reason
from tests.indexer.helpers import snapshot_rows

ENC = FakeEncoder(32)


def _jpeg(colour: tuple[int, int, int], size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG")
    return buf.getvalue()


class _Server:
    """Serves /red.jpg, /blue.jpg, /big.jpg (large body), /huge-pixels.png, /missing
    (404), /flaky.jpg (503 on the first request, then the image), /redirect -> /red.jpg."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        buf = io.BytesIO()
        Image.new("L", (3000, 3000)).save(buf, format="PNG")
        self.bodies = {
            "/red.jpg": _jpeg((220, 30, 30)),
            "/blue.jpg": _jpeg((30, 70, 220)),
            "/big.jpg": _jpeg((40, 170, 60), size=400) + b"\0" * 200_000,
            "/huge-pixels.png": buf.getvalue(),
            "/flaky.jpg": _jpeg((240, 220, 30)),
        }
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits[self.path] += 1
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "/red.jpg")
                    self.end_headers()
                    return
                if self.path == "/flaky.jpg" and server.hits[self.path] == 1:
                    self.send_response(503)
                    self.end_headers()
                    return
                body = server.bodies.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.close()


def _catalog(tmp_path: Path, base: str) -> Path:
    rows = ["sku,image_url,title"]
    for sku, path in [("r", "/red.jpg"), ("b", "/blue.jpg"), ("g", "/big.jpg"),
                      ("p", "/huge-pixels.png"), ("m", "/missing"), ("f", "/flaky.jpg"),
                      ("d", "/redirect")]:  # fmt: skip
        rows.append(f"{sku},{base}{path},title {sku}")
    path = tmp_path / "shop.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _opts(tmp_path: Path, **fetch: object) -> BuildOptions:
    return BuildOptions(
        sources=SourceOptions(image_col="image_url", id_col="sku"),
        max_image_bytes=100_000,
        max_image_pixels=1_000_000,
        fetch=FetchOptions(
            cache_dir=tmp_path / "cache", allow_loopback=True, backoff_s=0.0, **fetch
        ),
    )


def test_urls_are_fetched_with_caps_retries_and_reasons(tmp_path: Path, server: _Server) -> None:
    csv = _catalog(tmp_path, server.base)
    summary = build([csv], tmp_path / "idx", encoder=ENC, options=_opts(tmp_path))
    assert (summary.input, summary.indexed, summary.skipped) == (7, 4, 3)
    assert summary.fetch["retried"] == 1 and server.hits["/flaky.jpg"] == 2
    report = {
        r["doc_id"]: r for r in pq.read_table(tmp_path / "idx" / summary.errors_report).to_pylist()
    }
    assert set(report) == {"g", "p", "m"}
    assert report["g"]["stage"] == "fetch" and "the limit is 100,000" in report["g"]["reason"]
    assert "HTTP 404" in report["m"]["reason"]
    assert report["p"]["stage"] == "decode" and "pixels" in report["p"]["reason"]
    rows, vectors = snapshot_rows(tmp_path / "idx")
    by_doc = {r["doc_id"]: (r, v) for r, v in zip(rows, vectors, strict=True)}
    assert by_doc["r"][0]["source"] == f"{server.base}/red.jpg"
    expect = ENC.encode_images([Image.open(io.BytesIO(server.bodies["/red.jpg"]))])[0]
    np.testing.assert_allclose(by_doc["r"][1], expect, atol=2e-3)
    np.testing.assert_allclose(by_doc["d"][1], by_doc["r"][1])  # the redirect's target
    assert read_roots(tmp_path / "idx") == ()  # URLs add no image folder


def read_roots(idx: Path) -> tuple[str, ...] | None:
    from clipsearch.retrieval.manifest import read_current

    return read_current(idx).image_roots


def test_second_build_reads_the_cache(tmp_path: Path, server: _Server) -> None:
    csv = _catalog(tmp_path, server.base)
    build([csv], tmp_path / "idx", encoder=ENC, options=_opts(tmp_path))
    before = sum(server.hits.values())
    summary = build([csv], tmp_path / "idx2", encoder=ENC, options=_opts(tmp_path))
    # r, b, f, d and the too-many-pixels PNG (fetched fine, refused at decode).
    assert summary.fetch["cached"] == 5 and summary.indexed == 4
    # Only the failed fetches are asked again; every fetched body came from the cache.
    assert sum(server.hits.values()) - before == 2
    assert canonical_rows(tmp_path / "idx") == canonical_rows(tmp_path / "idx2")


def canonical_rows(idx: Path) -> list[tuple[str, str]]:
    rows, _ = snapshot_rows(idx)
    return [(r["doc_id"], r["content_hash"]) for r in rows]


def test_loopback_is_refused_without_the_explicit_option(tmp_path: Path, server: _Server) -> None:
    csv = _catalog(tmp_path, server.base)
    opts = _opts(tmp_path)
    opts = replace(opts, fetch=replace(opts.fetch, allow_loopback=False))
    summary = build([csv], tmp_path / "idx", encoder=ENC, options=opts)
    assert summary.indexed == 0 and sum(server.hits.values()) == 0
    report = pq.read_table(tmp_path / "idx" / summary.errors_report).to_pylist()
    assert all("loopback" in r["reason"] for r in report)


def test_private_addresses_stay_refused_even_with_loopback_allowed(tmp_path: Path) -> None:
    import ipaddress

    fetcher = UrlFetcher(FetchOptions(allow_loopback=True, cache_dir=tmp_path), max_bytes=10)
    with pytest.raises(NetFetchError, match="private"):
        fetcher.fetch("http://10.1.2.3/x.jpg")
    assert blocked_reason(ipaddress.ip_address("::ffff:192.168.0.1")) is not None
    with pytest.raises(NetFetchError, match="credentials"):
        fetcher.fetch("http://user:pw@example.com/x.jpg")


def test_retries_give_up_after_the_configured_attempts(tmp_path: Path) -> None:
    waits: list[float] = []
    fetcher = UrlFetcher(
        FetchOptions(allow_loopback=True, cache_dir=tmp_path, retries=2, backoff_s=0.25),
        max_bytes=1000,
        sleep=waits.append,
    )
    # Nothing listens on port 9 (discard) of loopback: connection refused, transient.
    with pytest.raises(NetFetchError, match="after 3 attempts"):
        fetcher.fetch("http://127.0.0.1:9/x.jpg")
    assert waits == [0.25, 0.5] and fetcher.stats.failed == 1
