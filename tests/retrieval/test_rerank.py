"""Rerankers on hand-made candidate pools."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from clipsearch.retrieval.errors import QueryError
from clipsearch.retrieval.options import SearchOptions
from clipsearch.retrieval.rerank import (
    MMR,
    Boost,
    Candidates,
    GroupByDoc,
    MinScore,
    SortBy,
    default_pipeline,
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


def test_cutoff_then_sort_nulls_last() -> None:
    c = SortBy.parse("price")(MinScore(0.55)(pool()))
    assert c.metadata.column("price").to_pylist() == [5.0, 30.0, 30.0, None]
    desc = SortBy.parse("price:desc")(pool())
    assert desc.metadata.column("price").to_pylist() == [30.0, 30.0, 10.0, 5.0, None]
    assert desc.row_ids[:2].tolist() == [0, 1]  # ties keep relevance order
    with pytest.raises(QueryError, match="unknown metadata field 'weight'"):
        SortBy.parse("weight")(pool())


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


def test_pagination_is_stable() -> None:
    c = pool()
    pages = [paginate(c, o, 2)[0].row_ids.tolist() for o in (0, 2, 4, 6)]
    assert pages == [[0, 1], [2, 3], [4], []]
    assert [paginate(c, o, 2)[1] for o in (0, 2, 4)] == [1, 3, 5]  # 1-based first rank


def test_default_pipeline_follows_the_options_in_the_documented_order() -> None:
    assert default_pipeline(SearchOptions(), mmr_limit=10) == []
    options = SearchOptions(
        sort="price:desc", mmr=0.5, min_score=0.1, group_by_doc="mean", boosts={"rating": 0.1}
    )
    stages = default_pipeline(options, mmr_limit=7)
    assert stages == [
        Boost({"rating": 0.1}),
        GroupByDoc("mean"),
        MinScore(0.1),
        MMR(0.5, 7),
        SortBy("price", descending=True),
    ]
    assert default_pipeline(SearchOptions(group_by_doc=True), mmr_limit=10) == [GroupByDoc("max")]


def test_min_score_beyond_float32_range_neither_overflows_nor_drops_wrongly() -> None:
    import warnings

    c = Candidates(
        scores=np.array([0.5, -0.2], np.float32),
        row_ids=np.array([1, 2], np.int64),
        metadata=pa.table({"doc_id": ["a", "b"]}),
        vectors=np.zeros((2, 0), np.float32),
        query=np.zeros(0, np.float32),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(MinScore(-2.36e263)(c)) == 2
        assert len(MinScore(1e300)(c)) == 0


def test_default_pipeline_refuses_an_unresolved_auto_min_score() -> None:
    # "auto" is the engine's to turn into the model's calibrated number; a pipeline
    # built from it directly would otherwise compare scores against a string.
    with pytest.raises(QueryError, match="resolved to a number"):
        default_pipeline(SearchOptions(min_score="auto"), mmr_limit=10)
