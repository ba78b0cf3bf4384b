"""Repeated filters: cached allowed rows, their contiguous copies, and the IVF cost model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from query_fixtures import Oracle, noisy_queries

from clipsearch.retrieval.engine import MASK_CACHE_SIZE, SearchEngine
from clipsearch.retrieval.planner import AllowedRows, PlannerConfig


@pytest.fixture
def ivf_index(built_index: Callable[[str], Path]) -> Path:
    return built_index("ivf")


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
    oracle = Oracle.load(ivf_index, "text")
    xq = noisy_queries(oracle, 1, seed=5)[0]

    def plans(where: str, **costs: float) -> set[str]:
        config = PlannerConfig(ivf_exact_max_rows=0, **costs)
        with SearchEngine.open(ivf_index, config=config) as engine:
            got = engine.search(xq, k=5, where=where, modality="text")
        matches = oracle.row_ids[oracle.mask(where)].tolist()
        assert len(got) == min(5, len(matches)) and set(got.row_ids) <= set(matches)
        return set(got.plans.values()) - {"empty"}  # shards without the document

    assert plans("doc_id = 'd0007'") == {"exact-subset"}
    # Every row passes: probing lists visits no fewer rows than scanning them all...
    assert plans("rating >= 1", ivf_list_visit_cost=1.0) == {"exact-subset"}
    # ...unless scanning them all is priced out.
    assert plans("rating >= 1", exact_max_rows=0) == {"ivf-lists"}


def test_ivf_lists_probe_the_same_lists_as_the_index(ivf_index: Path) -> None:
    """Candidates = allowed rows of exactly the lists faiss would probe."""
    import faiss

    oracle = Oracle.load(ivf_index, "text")
    xq = noisy_queries(oracle, 3, seed=6)
    with SearchEngine.open(ivf_index) as engine:
        shard = next(s for s in engine._state.shards if s.record.modality == "text")
        assert shard.lists is not None
        allowed = np.random.default_rng(0).random(shard.rows) < 0.5
        ivf = faiss.extract_index_ivf(shard.index)
        for nprobe in (1, 2, ivf.nlist):
            probes = shard.lists.probe(xq, nprobe)
            for q, lists in zip(xq, probes, strict=True):
                expected = [
                    int(
                        faiss.rev_swig_ptr(
                            ivf.invlists.get_ids(int(ln)), ivf.invlists.list_size(int(ln))
                        )[j]
                    )
                    for ln in lists
                    if ln >= 0
                    for j in range(ivf.invlists.list_size(int(ln)))
                ]
                want = sorted(r for r in expected if allowed[r])
                assert shard.lists.allowed_rows(lists, allowed).tolist() == want
                # and the index itself, searched with this nprobe, only returns these lists' rows
                params = faiss.SearchParametersIVF()
                params.nprobe = nprobe
                _, ids = shard.index.search(q[None], 20, params=params)
                assert set(ids[0][ids[0] >= 0].tolist()) <= set(expected)


def test_short_ivf_results_retry_with_more_lists_before_scanning_everything(
    ivf_index: Path,
) -> None:
    """A query whose probed lists hold fewer than k (allowed) rows raises nprobe and
    stays on the index, instead of scanning the whole shard exactly."""
    import dataclasses

    import faiss

    from clipsearch.retrieval.kernels import exact_search

    with SearchEngine.open(ivf_index) as engine:
        shard = next(s for s in engine._state.shards if s.kind == "ivf")
        ivf = faiss.extract_index_ivf(shard.index)
        assert ivf.nlist > 2
        config = PlannerConfig(exact_max_rows=0, ivf_exact_max_rows=0)
        one_list = dataclasses.replace(shard, params={**shard.params, "nprobe": 1}, config=config)
        sizes = sorted((ivf.invlists.list_size(i) for i in range(ivf.nlist)), reverse=True)
        k = sizes[0] + sizes[1] + 1  # one or two lists (filter boost ~1.2) are short
        xq = noisy_queries(Oracle.load(ivf_index, shard.record.modality), 2, seed=8)
        vectors = np.asarray(shard.vectors, np.float32)
        allowed = np.ones(shard.rows, bool)
        allowed[::7] = False
        assert k <= allowed.sum()
        for mask, plan in ((None, "ann"), (allowed, "ivf-lists")):
            rows = None if mask is None else AllowedRows(mask)
            _, i, got_plan = one_list.search(xq, k, rows)
            assert got_plan == plan and i.shape == (2, k)
            if ivf.nlist <= 8:  # one retry probes every list: exact over the shard
                assert np.array_equal(i, exact_search(xq, vectors, k, mask=mask)[1])
