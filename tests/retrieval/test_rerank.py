"""Rerankers on hand-made candidate pools."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from clipsearch.retrieval.errors import QueryError
from clipsearch.retrieval.rerank import (
    MMR,
    Boost,
    Candidates,
    GroupByDoc,
    MinScore,
    SortBy,
    paginate,
)


def pool() -> Candidates:
    vectors = np.array([[1, 0], [1, 0], [0.9, 0.1], [0, 1], [0.5, 0.5]], np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    meta = pa.table(
        {
            "doc_id": ["a", "a", "b", "c", "d"],
            "price": [30.0, 30.0, None, 5.0, 10.0],
            "rating": [1, 1, 5, 2, None],
        }
    )
    return Candidates(
        scores=np.array([0.9, 0.8, 0.7, 0.6, 0.5], np.float32),
        row_ids=np.arange(5, dtype=np.int64),
        metadata=meta,
        vectors=vectors,
        query=np.array([1, 0], np.float32),
    )


def test_group_by_doc_max_and_mean() -> None:
    g = GroupByDoc("max")(pool())
    assert g.metadata.column("doc_id").to_pylist() == ["a", "b", "c", "d"]
    assert g.scores[0] == pytest.approx(0.9)
    mean = GroupByDoc("mean")(pool())
    assert mean.scores[0] == pytest.approx(0.85) and mean.row_ids[0] == 0
    with pytest.raises(QueryError):
        GroupByDoc("median")


def test_cutoff_then_sort_nulls_last() -> None:
    c = SortBy.parse("price")(MinScore(0.55)(pool()))
    assert c.metadata.column("price").to_pylist() == [5.0, 30.0, 30.0, None]
    desc = SortBy.parse("price:desc")(pool())
    assert desc.metadata.column("price").to_pylist() == [30.0, 30.0, 10.0, 5.0, None]
    assert desc.row_ids[:2].tolist() == [0, 1]  # ties keep relevance order
    with pytest.raises(QueryError):
        SortBy.parse("price:up")


def test_boosts_reorder_by_numeric_fields() -> None:
    c = Boost({"rating": 0.1})(pool())
    assert c.row_ids[0] == 2 and c.scores[0] == pytest.approx(1.2)
    with pytest.raises(QueryError, match="numeric"):
        Boost({"doc_id": 1.0})(pool())


def test_mmr_trades_relevance_for_diversity() -> None:
    assert MMR(1.0, 3)(pool()).row_ids[:3].tolist() == [0, 1, 2]
    diverse = MMR(0.3, 3)(pool())
    assert diverse.row_ids[0] == 0 and 3 in diverse.row_ids[:2].tolist()  # orthogonal row second
    assert sorted(diverse.row_ids.tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(QueryError):
        MMR(1.5, 3)


def test_pagination_is_stable() -> None:
    c = pool()
    pages = [paginate(c, o, 2)[0].row_ids.tolist() for o in (0, 2, 4, 6)]
    assert pages == [[0, 1], [2, 3], [4], []]
