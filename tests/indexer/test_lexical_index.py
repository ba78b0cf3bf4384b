"""The lexical part through the index's life: add gives an older index one, compaction
keeps it consistent with the vectors and collects replaced folders, options are checked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "retrieval"))
from lexical_fixtures import build_catalog, products, write_catalog

from clipsearch.indexer.build import BuildOptions, add
from clipsearch.indexer.maintenance import compact, delete
from clipsearch.indexer.sources import SourceOptions
from clipsearch.retrieval.engine import SearchEngine
from clipsearch.retrieval.errors import ConfigError, QueryError
from clipsearch.retrieval.manifest import read_current, read_manifest
from clipsearch.retrieval.store import verify_index

pytest.importorskip("tantivy")


def test_add_with_text_fields_gives_an_older_index_a_lexical_part(tmp_path: Path) -> None:
    rows = products(40)
    first = write_catalog(tmp_path / "a", rows[:30])
    root = build_catalog(tmp_path / "index", first, text_fields=(), shard_size=20)
    with SearchEngine.open(root) as engine, pytest.raises(QueryError):
        engine.search("Northwind mug", mode="lexical")
    second = write_catalog(tmp_path / "b", rows[30:])
    options = BuildOptions(
        shard_size=20,
        text_fields=("title", "sku"),
        sources=SourceOptions(text_cols=("title",), id_col="sku"),
    )
    summary = add(root, [second], options=options)
    manifest = read_current(root)
    assert summary.indexed == 10 and len(manifest.shards) == 3
    assert all(
        s.lexical is not None and s.lexical.fields == ("title", "doc_id") for s in manifest.shards
    )
    # The base version is untouched (its shards still have no lexical part).
    assert all(s.lexical is None for s in read_manifest(root, 1).shards)
    with SearchEngine.open(root) as engine:
        old = engine.search("SKU-000003", k=1, mode="lexical")
        new = engine.search("SKU-000033", k=1, mode="lexical")
        assert old.doc_ids == ["SKU-000003"] and new.doc_ids == ["SKU-000033"]
    assert verify_index(root).ok


def test_compaction_rewrites_lexical_parts_and_collects_the_old_folders(tmp_path: Path) -> None:
    rows = products(40)
    root = build_catalog(tmp_path / "index", write_catalog(tmp_path, rows), shard_size=20)
    before = {s.name for s in read_current(root).shards}
    delete(root, ids=["SKU-000001", "SKU-000025"])
    summary = compact(root)
    manifest = read_current(root)
    assert summary.shards_rewritten == 2
    folders = {p.name for p in (root / "shards").iterdir() if p.is_dir()}
    assert folders == {f"{s.name}.lex" for s in manifest.shards}
    assert not folders & {f"{n}.lex" for n in before}
    with SearchEngine.open(root) as engine:
        for s in engine.snapshot.shards:
            assert s.lexical is not None and s.lexical.docs == s.record.rows
        for sku in ("SKU-000001", "SKU-000025"):
            assert engine.search(sku, k=5, mode="lexical").doc_ids == []
        for sku in ("SKU-000002", "SKU-000024"):
            assert engine.search(sku, k=1, mode="lexical").doc_ids == [sku]
    assert verify_index(root).ok


def test_text_fields_are_checked_before_any_embedding(tmp_path: Path) -> None:
    catalog = write_catalog(tmp_path, products(5))
    with pytest.raises(ConfigError, match="'price' is a double column"):
        build_catalog(tmp_path / "index", catalog, text_fields=("title", "price"))
    with pytest.raises(ConfigError, match="'nope' is not a column"):
        build_catalog(tmp_path / "index", catalog, text_fields=("nope",))
    for bad in ("title", ("title", "title"), ("",)):
        with pytest.raises(ConfigError, match="text_fields"):
            BuildOptions(text_fields=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "index" / "shards").exists()
