"""Repeated filters: cached allowed rows, their contiguous copies, and the IVF cost model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from query_fixtures import Oracle, build_index, noisy_queries, write_corpus

from retrieval.engine import MASK_CACHE_SIZE, SearchEngine
from retrieval.planner import PlannerConfig


@pytest.fixture(scope="module")
def ivf_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"), 300)
    return build_index(tmp_path_factory.mktemp("ivf"), corpus, "ivf")


def test_repeated_filter_answers_from_a_copy_exactly_like_a_fresh_scan(ivf_index: Path) -> None:
    oracle = Oracle.load(ivf_index, "text")
    xq = noisy_queries(oracle, 6, seed=3)
    where = "category = 'mugs' or price < 20"
    expected = oracle.search(xq, 10, where)
    no_copies = PlannerConfig(gather_cache_bytes=0)
    with (
        SearchEngine.open(ivf_index) as engine,
        SearchEngine.open(ivf_index, config=no_copies) as plain,
    ):
        for _ in range(3):  # the first query makes the copies, the next ones reuse them
            for q, want in zip(xq, expected, strict=True):
                got = engine.search(q, k=10, where=where, modality="text")
                ref = plain.search(q, k=10, where=where, modality="text")
                assert set(got.plans.values()) == {"exact-subset"}
                assert got.row_ids == ref.row_ids == want
                assert np.allclose([h.score for h in got], [h.score for h in ref], atol=1e-5)
        batch = engine.search_batch(list(xq), k=10, where=where, modality="text")
        assert [r.row_ids for r in batch] == expected
        assert engine._state.masks.budget.used > 0
        assert plain._state.masks.budget.used == 0


def test_copies_stay_within_the_budget_and_are_released_on_eviction(ivf_index: Path) -> None:
    oracle = Oracle.load(ivf_index, "text")
    xq = noisy_queries(oracle, 1, seed=4)[0]
    dim = oracle.vectors.shape[1]
    limit = 300 * dim * 2  # room for ~300 fp16 rows of copies, far less than 40 filters
    config = PlannerConfig(gather_cache_bytes=limit)
    with SearchEngine.open(ivf_index, config=config) as engine:
        budget = engine._state.masks.budget
        for i in range(MASK_CACHE_SIZE + 8):
            where = f"price < {10 + 2 * i}"
            got = engine.search(xq, k=5, where=where, modality="text")
            assert got.row_ids == oracle.search(xq[None], 5, where)[0]  # copy or not
            assert 0 <= budget.used <= limit
        held = sum(
            a._gathered.nbytes
            for entry in engine._state.masks.items.values()
            for a in entry
            if a._gathered is not None
        )
        assert budget.used == held  # evicted filters gave their bytes back


def test_ivf_cost_model_scans_selective_filters_and_searches_broad_ones(
    ivf_index: Path,
) -> None:
    """Exact scan when allowed rows x cost <= rows the filtered IVF search would visit.

    Every row passes "rating >= 1", so even a search visiting every list visits no more
    rows than are allowed: a cost above 1 must pick the index, a tiny one the scan.
    """
    oracle = Oracle.load(ivf_index, "text")
    xq = noisy_queries(oracle, 1, seed=5)[0]
    for copies in (256 << 20, 0):

        def plans(where: str, cost: float, copies: int = copies) -> set[str]:
            config = PlannerConfig(
                ivf_exact_max_rows=0,
                ivf_subset_cost=cost,
                ivf_gathered_cost=cost,
                gather_cache_bytes=copies,
            )
            with SearchEngine.open(ivf_index, config=config) as engine:
                got = engine.search(xq, k=5, where=where, modality="text")
            if set(got.plans.values()) <= {"exact-subset", "empty"}:
                assert got.row_ids == oracle.search(xq[None], 5, where)[0]
            return set(got.plans.values()) - {"empty"}  # shards without the document

        assert plans("doc_id = 'd0007'", PlannerConfig().ivf_subset_cost) == {"exact-subset"}
        assert "exact-subset" not in plans("rating >= 1", 1.5)
        assert plans("rating >= 1", 0.01) == {"exact-subset"}
