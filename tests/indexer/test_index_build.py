"""build/add end to end with the fake encoder: round trip, bad inputs, summaries."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipsearch.indexer.build import BuildOptions, build
from clipsearch.indexer.maintenance import info
from clipsearch.indexer.sources import SourceOptions
from clipsearch.retrieval.encoders import FakeEncoder
from clipsearch.retrieval.images import load_image
from clipsearch.retrieval.manifest import read_current
from clipsearch.retrieval.progress import Progress
from tests.indexer.helpers import make_images, snapshot_rows, write_products

ENC = FakeEncoder(32, context_length=16)


def test_round_trip_every_input_in_exactly_one_aligned_row(tmp_path: Path) -> None:
    csv = write_products(tmp_path, 23)
    opts = BuildOptions(
        shard_size=5,
        sources=SourceOptions(image_col="image_path", text_cols=("title",), id_col="sku"),
    )
    seen: list[Progress] = []
    summary = build([csv], tmp_path / "idx", encoder=ENC, options=opts, progress=seen.append)
    assert (summary.input, summary.indexed, summary.skipped) == (46, 46, 0)
    assert seen[-1].stage == "commit" and any(p.stage == "embed" and p.done == 46 for p in seen)
    rows, vectors = snapshot_rows(tmp_path / "idx")
    keys = [(r["doc_id"], r["modality"]) for r in rows]
    assert len(keys) == len(set(keys)) == 46
    assert [r["row_id"] for r in rows] == list(range(46))
    by_key = {k: i for i, k in enumerate(keys)}
    for i in (0, 7, 22):
        sku = f"SKU{i:04d}"
        img = rows[by_key[(sku, "image")]]
        assert img["price"] == 10.5 + i and img["title"].endswith(f"number {i}")
        expect = ENC.encode_images([load_image(tmp_path / "photos" / f"img{i:04d}.jpg")])[0]
        np.testing.assert_allclose(vectors[by_key[(sku, "image")]], expect, atol=2e-3)
        text = rows[by_key[(sku, "text")]]
        np.testing.assert_allclose(
            vectors[by_key[(sku, "text")]], ENC.encode_texts([text["source"]])[0], atol=2e-3
        )
    shards = read_current(tmp_path / "idx").shards
    assert [s.modality for s in shards] == ["image"] * 5 + ["text"] * 5
    assert all(s.rows <= 5 for s in shards)


def _png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` (a decompression-bomb shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    idat = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_bad_images_are_skipped_and_reported_never_abort(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    good = make_images(root, 6)
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.png").write_text("definitely not a png")
    data = good[0].read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    png = bytearray(_png_with_size(8, 8))
    png[-20] ^= 0xFF  # break the IDAT checksum
    (root / "corrupt.png").write_bytes(bytes(png))
    (root / "bomb.png").write_bytes(_png_with_size(10_000, 10_000))  # Pillow's warning band
    (root / "wide.png").write_bytes(_png_with_size(70_000, 1))
    os.symlink(root / "gone.jpg", root / "dangling.jpg")
    summary = build([root], tmp_path / "idx", encoder=ENC)
    assert summary.indexed == 6 and summary.skipped == 7 and summary.input == 13
    assert summary.indexed + summary.skipped == summary.input
    report = pq.read_table(tmp_path / "idx" / summary.errors_report).to_pylist()
    by_doc = {r["doc_id"]: r for r in report}
    assert set(by_doc) == {
        "zero.jpg",
        "text.png",
        "truncated.jpg",
        "corrupt.png",
        "bomb.png",
        "wide.png",
        "dangling.jpg",
    }
    assert "empty" in by_doc["zero.jpg"]["reason"]
    assert (
        "decompression bomb" in by_doc["bomb.png"]["reason"]
        or "exceeds" in by_doc["bomb.png"]["reason"]
    )
    assert "absurd dimensions" in by_doc["wide.png"]["reason"]
    assert by_doc["dangling.jpg"]["stage"] == "read"
    assert all(r["action"] == "skipped" for r in report)
    assert info(tmp_path / "idx")["errors"] == 7


def test_texts_empty_skipped_overlong_truncated_and_flagged(tmp_path: Path) -> None:
    path = tmp_path / "docs.csv"
    long_text = " ".join(f"word{i}" for i in range(40))
    path.write_text(f"id,title\na,red shirt\nb,   \nc,{long_text}\n")
    opts = BuildOptions(sources=SourceOptions(text_cols=("title",), id_col="id"))
    summary = build([path], tmp_path / "idx", encoder=ENC, options=opts)
    assert (summary.indexed, summary.skipped, summary.flagged, summary.input) == (2, 1, 1, 3)
    report = pq.read_table(tmp_path / "idx" / summary.errors_report).to_pylist()
    flagged = [r for r in report if r["action"] == "kept"]
    assert len(flagged) == 1 and flagged[0]["doc_id"] == "c" and "truncated" in flagged[0]["reason"]
    rows, _ = snapshot_rows(tmp_path / "idx")
    assert {r["doc_id"] for r in rows} == {"a", "c"}


def test_duplicates_and_wrong_types_counted_in_summary(tmp_path: Path) -> None:
    path = tmp_path / "docs.csv"
    path.write_text("id,title,price\na,one,1.5\nb,two,2.5\na,three,3.5\nd,four,oops\ne,five,5\n")
    opts = BuildOptions(
        sources=SourceOptions(text_cols=("title",), id_col="id", on_duplicate="last")
    )
    summary = build([path], tmp_path / "idx", encoder=ENC, options=opts)
    assert (summary.input, summary.indexed, summary.skipped) == (5, 3, 2)
    rows, _ = snapshot_rows(tmp_path / "idx")
    assert {r["doc_id"]: r["source"] for r in rows} == {"a": "three", "b": "two", "e": "five"}
    assert {r["doc_id"]: r["price"] for r in rows}["e"] == 5.0


def test_build_over_existing_index_replaces_rows_and_never_reuses_row_ids(tmp_path: Path) -> None:
    make_images(tmp_path / "a", 4)
    make_images(tmp_path / "b", 3, seed=5, prefix="b")
    build([tmp_path / "a"], tmp_path / "idx", encoder=ENC)
    build([tmp_path / "b"], tmp_path / "idx", encoder=ENC)
    rows, _ = snapshot_rows(tmp_path / "idx")
    assert [r["doc_id"] for r in rows] == ["b0000.jpg", "b0001.jpg", "b0002.jpg"]
    assert [r["row_id"] for r in rows] == [4, 5, 6]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "IVF4,Flat"])
def test_index_types_are_recorded(tmp_path: Path, kind: str) -> None:
    make_images(tmp_path / "a", 300)
    from clipsearch.indexer.ann import IndexOptions

    opts = BuildOptions(index=IndexOptions(index=kind, tune_queries=50))
    build([tmp_path / "a"], tmp_path / "idx", encoder=ENC, options=opts)
    spec = read_current(tmp_path / "idx").shards[0].index
    assert spec.requested == kind
    assert spec.factory == {"flat": "Flat", "hnsw": "HNSW32"}.get(kind, kind)
    if kind != "flat":
        assert spec.measured_recall is not None and spec.measured_recall >= 0.95
