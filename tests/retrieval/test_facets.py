"""Facet counts (retrieval/facets.py) against a brute-force count over matching products.

The index has several shards, two text rows per product (title and description, so a
product must count once, not twice) and tombstoned products; the oracle recounts every
facet from the metadata with plain Python sets.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from query_fixtures import build_index, encoder, write_corpus

from clipsearch.indexer.maintenance import delete
from clipsearch.retrieval.engine import SearchEngine
from clipsearch.retrieval.errors import FilterError, InvalidOptionError
from clipsearch.retrieval.facets import FACET_TOP, Faceter, FacetIndex, nice_edges
from clipsearch.retrieval.filters import compile_filter
from clipsearch.retrieval.store import open_snapshot

COLUMNS = ["category", "in_stock", "rating", "price"]


@pytest.fixture(scope="module")
def facet_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("facets")
    manifest = write_corpus(folder / "corpus", 240, seed=5)
    root = build_index(folder / "idx", manifest, "flat", shard_size=100)
    delete(root, ids=[f"d{i:04d}" for i in range(0, 240, 7)])  # tombstones in every shard
    return root


def _brute(root: Path, where: str | None, modality: str, rows: set[int] | None = None) -> Any:
    """{column: {value: products}}, products, over live rows of ``modality`` passing
    ``where`` (and among ``rows`` when given), counted with sets."""
    snap = open_snapshot(root)
    dead = set(snap.tombstones.tolist())
    docs_by_value: dict[str, dict[Any, set[str]]] = defaultdict(lambda: defaultdict(set))
    products: set[str] = set()
    for shard in snap.shards:
        if shard.record.modality != modality:
            continue
        meta = shard.metadata
        mask = (
            compile_filter(where, snap.schema).mask(meta)
            if where is not None
            else np.ones(meta.num_rows, bool)
        )
        for i, row in enumerate(meta.to_pylist()):
            if not mask[i] or row["row_id"] in dead:
                continue
            if rows is not None and row["row_id"] not in rows:
                continue
            products.add(row["doc_id"])
            for col in COLUMNS:
                if row[col] is not None:
                    docs_by_value[col][row[col]].add(row["doc_id"])
    return docs_by_value, products


def _numeric_expected(values: dict[Any, set[str]], buckets: list[Any]) -> list[int]:
    out = []
    for b in buckets:
        last = b is buckets[-1]
        docs: set[str] = set()
        for v, d in values.items():
            if b.min <= v < b.max or (last and v == b.max):
                docs |= d
        out.append(len(docs))
    return out


@pytest.mark.parametrize(
    "where", [None, "price < 40", "category in ('mugs', 'lamps') and in_stock"]
)
@pytest.mark.parametrize("modality", ["text", "image"])
def test_counts_equal_a_brute_force_count_of_matching_products(
    facet_index: Path, where: str | None, modality: str
) -> None:
    engine = SearchEngine.open(facet_index, encoder())
    got = Faceter().count(engine, COLUMNS, where=where, modality=modality)
    expected, products = _brute(facet_index, where, modality)
    assert got.products == len(products)
    for col in ("category", "in_stock"):
        assert {v.value: v.count for v in got.columns[col]} == {
            k: len(d) for k, d in expected[col].items()
        }
    # Strings: most products first, ties by value.
    counts = [(-v.count, v.value) for v in got.columns["category"]]
    assert counts == sorted(counts)
    for col in ("price", "rating"):
        buckets = got.columns[col]
        assert buckets, col
        assert [b.count for b in buckets] == _numeric_expected(expected[col], buckets)
        assert all(b.min is not None and b.max is not None for b in buckets)


def test_a_product_with_two_rows_counts_once(facet_index: Path) -> None:
    engine = SearchEngine.open(facet_index, encoder())
    got = Faceter().count(engine, ["category"], modality="text")
    # Two text rows per product: the row count is twice the product count.
    assert got.rows == 2 * got.products
    assert sum(v.count for v in got.columns["category"]) == got.products


def test_relevant_rows_narrow_the_counts(facet_index: Path) -> None:
    engine = SearchEngine.open(facet_index, encoder())
    hits = engine.search("red shirt", k=30, modality="text", where="price < 70")
    relevant = np.array(hits.row_ids[:17], np.int64)
    got = Faceter().count(
        engine, COLUMNS, where="price < 70", modality="text", relevant_row_ids=relevant
    )
    expected, products = _brute(facet_index, "price < 70", "text", set(relevant.tolist()))
    assert got.products == len(products) < 17 + 1
    assert {v.value: v.count for v in got.columns["category"]} == {
        k: len(d) for k, d in expected["category"].items()
    }


def test_cached_results_follow_the_filter_and_the_version(
    facet_index: Path, tmp_path: Path
) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(facet_index, root)
    engine = SearchEngine.open(root, encoder())
    faceter = Faceter()
    before = faceter.count(engine, ["category"], where="in_stock", modality="text")
    again = faceter.count(engine, ["category"], where="in_stock", modality="text")
    assert again.columns == before.columns and again.products == before.products
    delete(root, where="category = 'mugs'")
    assert engine.reload()
    after = faceter.count(engine, ["category"], where="in_stock", modality="text")
    assert "mugs" not in {v.value for v in after.columns["category"]}
    assert after.products < before.products


def test_bad_columns_are_refused_with_the_columns_it_has(facet_index: Path) -> None:
    engine = SearchEngine.open(facet_index, encoder())
    with pytest.raises(InvalidOptionError, match=r"unknown column 'colour'.*category"):
        Faceter().count(engine, ["colour"])
    with pytest.raises(InvalidOptionError, match="built-in column"):
        Faceter().count(engine, ["doc_id"])
    with pytest.raises(FilterError):
        Faceter().count(engine, ["category"], where="nope > 3")


def test_numeric_edges_are_round_and_cover_the_range() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(3.17, 97.3, 1000)
    edges = nice_edges(x, 5)
    assert edges[0] == x.min() and edges[-1] == x.max()
    assert list(edges) == sorted(set(edges.tolist()))
    assert all(float(f"{e:.2g}") == e for e in edges[1:-1])
    assert list(nice_edges(np.array([4.0, 4.0]), 5)) == [4.0]
    assert len(nice_edges(np.zeros(0), 5)) == 0


def test_string_facets_are_capped(tmp_path: Path) -> None:
    import pyarrow as pa

    assert FACET_TOP >= 10
    # A FacetIndex over a snapshot stub with a free-text column returns at most FACET_TOP.
    snap = open_snapshot(build_index(tmp_path / "i", write_corpus(tmp_path / "c", 30), "flat"))
    index = FacetIndex(snap)
    got = index.count(["category"], {s.record.name: None for s in snap.shards})
    assert sum(v.count for v in got.columns["category"]) == 30
    assert pa.types.is_string(snap.schema.field("category").type)


class _Shard:
    def __init__(self, name: str, start: int, table: Any) -> None:
        from types import SimpleNamespace

        self.record = SimpleNamespace(name=name, row_id_start=start, modality="image")
        self.metadata = table


class _Snapshot:
    def __init__(self, shards: list[_Shard]) -> None:
        self.version = 1
        self.shards = tuple(shards)
        self.schema = shards[0].metadata.schema


def test_a_product_with_rows_of_different_values_counts_under_each() -> None:
    """Photos of one product in two colours, across shards: the product counts once
    under each colour, and once in the total."""
    import pyarrow as pa

    def table(docs: list[str], colours: list[str | None]) -> Any:
        return pa.table({"doc_id": docs, "colour": pa.array(colours, pa.string())})

    snap = _Snapshot(
        [
            _Shard("s0", 0, table(["a", "a", "b"], ["red", "blue", "red"])),
            _Shard("s1", 3, table(["a", "c", "c"], ["red", None, "green"])),
        ]
    )
    index = FacetIndex(snap)  # type: ignore[arg-type]
    everything = index.count(["colour"], {"s0": None, "s1": None})
    assert everything.products == 3 and everything.rows == 6
    assert {v.value: v.count for v in everything.columns["colour"]} == {
        "red": 2,
        "blue": 1,
        "green": 1,
    }
    # Only a's blue photo and c's colourless one: c counts as a product, under no colour.
    some = index.count(["colour"], {"s0": np.array([1]), "s1": np.array([1])})
    assert some.products == 2
    assert {v.value: v.count for v in some.columns["colour"]} == {"blue": 1}
