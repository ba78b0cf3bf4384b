"""One metadata schema across shards: a catalog that gains or loses columns between adds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from clipsearch.indexer.ann import IndexOptions
from clipsearch.indexer.build import BuildOptions, add, build
from clipsearch.indexer.commit import commit, next_version
from clipsearch.indexer.maintenance import delete
from clipsearch.indexer.sources import SourceOptions
from clipsearch.indexer.writer import write_shard
from clipsearch.retrieval.encoders import FakeEncoder
from clipsearch.retrieval.encoders.base import TextEncoding
from clipsearch.retrieval.engine import SearchEngine
from clipsearch.retrieval.errors import IndexFormatError, SourceError
from clipsearch.retrieval.manifest import read_current, shard_name
from clipsearch.retrieval.schema import check_add_schema, conform, unified_schema
from clipsearch.retrieval.store import open_snapshot, verify_index

OPTIONS = BuildOptions(
    workers=1, sources=SourceOptions(text_cols=("title",), id_col="id"), shard_size=1000
)


def _csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def evolving(tmp_path: Path) -> Path:
    """v1 from a CSV with rating and price; v2 adds a CSV without rating, with season."""
    first = _csv(
        tmp_path / "a.csv",
        "id,title,rating,price",
        [f"a{i},red mug number {i},{i % 5},{i}.5" for i in range(20)],
    )
    second = _csv(
        tmp_path / "b.csv",
        "id,title,price,season",
        [f"b{i},blue cup {i},{i}.0,{'summer' if i % 2 else 'winter'}" for i in range(10)],
    )
    root = tmp_path / "idx"
    build([first], root, encoder=FakeEncoder(16), options=OPTIONS)
    add(root, [second], encoder=FakeEncoder(16), options=OPTIONS)
    return root


def test_filters_see_every_column_of_every_shard(evolving: Path) -> None:
    with SearchEngine.open(evolving) as engine:
        assert {"rating", "price", "season"} <= set(engine.schema.names)
        q = np.ones(16, np.float32) / 4.0
        summer = engine.search(q, k=50, where="season = 'summer'")
        assert sorted(h.doc_id for h in summer) == [f"b{i}" for i in (1, 3, 5, 7, 9)]
        assert summer.total_matches == 5
        # rows of the first catalog have no season: null, so neither = nor != matches
        assert engine.count("season != 'summer'") == 5
        rated = engine.search(q, k=50, where="rating >= 3")
        assert sorted(h.doc_id for h in rated) == sorted(f"a{i}" for i in range(20) if i % 5 >= 3)
        priced = engine.search(q, k=50, where="price > 8", sort="price:desc")
        prices = [h.metadata["price"] for h in priced]
        assert prices == sorted(prices, reverse=True) and len(prices) == 12 + 1
        boosted = engine.search(q, k=30, boosts={"rating": 0.5})
        assert len(boosted) == 30
        b_hit = next(h for h in boosted if h.doc_id == "b1")
        assert b_hit.metadata["rating"] is None and b_hit.metadata["season"] == "summer"


def test_snapshot_pads_each_shard_to_the_unified_schema(evolving: Path) -> None:
    snap = open_snapshot(evolving)
    assert all(s.metadata.schema.equals(snap.schema) for s in snap.shards)
    first, second = snap.shards
    assert first.metadata.column("season").null_count == first.metadata.num_rows
    assert second.metadata.column("rating").null_count == second.metadata.num_rows


def test_delete_where_and_verify_across_evolving_shards(evolving: Path) -> None:
    assert verify_index(evolving).ok
    summary = delete(evolving, where="season = 'winter' or rating = 0")
    assert summary.deleted_rows == 5 + 4
    with SearchEngine.open(evolving) as engine:
        assert engine.count() == 30 - 9


def test_unify_widens_numbers_and_pads_with_nulls() -> None:
    a = pa.table({"row_id": pa.array([1], pa.int64()), "n": pa.array([1], pa.int32())})
    b = pa.table({"row_id": pa.array([2], pa.int64()), "n": [2.5], "t": ["x"]})
    schema = unified_schema([a.schema, b.schema])
    assert schema.field("n").type == pa.float64() and schema.field("t").type == pa.string()
    padded = conform(a, schema)
    assert padded.column_names == ["row_id", "n", "t"]
    assert padded.column("n").to_pylist() == [1.0] and padded.column("t").to_pylist() == [None]


def test_conflicting_types_are_named_with_both_types() -> None:
    a = pa.schema([("rating", pa.int64())])
    b = pa.schema([("rating", pa.string())])
    with pytest.raises(IndexFormatError, match=r"'rating' is a number \(int64\).*text \(string\)"):
        unified_schema([a, b], ["shard s000000", "shard s000001"])


def test_add_with_a_clashing_column_type_is_refused(evolving: Path) -> None:
    incoming = pa.schema([("rating", pa.string()), ("colour", pa.string())])
    with pytest.raises(SourceError) as e:
        check_add_schema(evolving, read_current(evolving), incoming, where="c.csv")
    message = str(e.value)
    assert "'rating'" in message and "a number (int64)" in message and "text (string)" in message
    assert "s000000" in message and "c.csv" in message
    # new and missing columns are fine, and widening int -> float is not a conflict
    ok = pa.schema([("rating", pa.float64()), ("colour", pa.string())])
    assert (
        check_add_schema(evolving, read_current(evolving), ok).field("rating").type == pa.float64()
    )


def test_index_add_refuses_a_clashing_column_before_embedding(
    evolving: Path, tmp_path: Path
) -> None:
    clash = _csv(tmp_path / "c.csv", "id,title,rating", ["c1,green mug,good", "c2,grey mug,bad"])
    before = read_current(evolving).version

    class Counting(FakeEncoder):
        calls = 0

        def encode_texts_detailed(self, texts: Sequence[str]) -> TextEncoding:
            Counting.calls += 1
            return super().encode_texts_detailed(texts)

    with pytest.raises(SourceError, match=r"'rating'.*a number.*text"):
        add(evolving, [clash], encoder=Counting(16), options=OPTIONS)
    assert Counting.calls == 0
    assert read_current(evolving).version == before


def _commit_text_shard(root: Path, metadata: pa.Table) -> None:
    """Append one shard with ``metadata`` the way an add without the schema check would."""
    base = read_current(root)
    rows = metadata.num_rows
    vectors = np.random.default_rng(0).standard_normal((rows, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    record = write_shard(
        root,
        name=shard_name(base.next_shard),
        modality="text",
        row_id_start=base.next_row_id,
        vectors=vectors,
        metadata=metadata,
        index_options=IndexOptions(index="flat"),
    )
    commit(
        root,
        replace(
            base,
            version=next_version(root),
            parent_version=base.version,
            operation="add",
            shards=(*base.shards, record),
            next_row_id=record.row_id_end,
            next_shard=base.next_shard + 1,
        ),
    )


def test_verify_reports_a_type_conflict_and_search_still_works(evolving: Path) -> None:
    _commit_text_shard(
        evolving,
        pa.table(
            {
                "doc_id": ["c1", "c2"],
                "modality": ["text", "text"],
                "source": ["green bowl", "pink bowl"],
                "content_hash": ["h1", "h2"],
                "rating": ["cheap", "dear"],
            }
        ),
    )
    report = verify_index(evolving)
    assert not report.ok
    (problem,) = report.problems["schema"]
    assert "'rating'" in problem and "int64" in problem and "string" in problem
    assert "s000002" in problem
    with SearchEngine.open(evolving) as engine:  # readable; the clashing column reads as null
        assert engine.count("rating >= 0") == 20
        assert engine.count() == 32
