"""How a query's work is scheduled: shards in the caller's thread or the engine's pool
(same answers), an ANN shard asked for more rows than it needs (no wider retry), ANN
scores taken from the index where they are exact (no fp16 rescoring), the
per-call faiss thread count, the shard merge, and the lexical tasks a caller runs itself
when the lexical pool is busy."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from query_fixtures import Oracle, noisy_queries

from clipsearch.retrieval import hybrid
from clipsearch.retrieval.engine import SearchEngine, merge_shard_tops
from clipsearch.retrieval.kernels import one_faiss_thread
from clipsearch.retrieval.planner import ShardSearcher
from clipsearch.retrieval.store import open_snapshot


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
@pytest.mark.parametrize("where", [None, "price < 30"])
def test_shards_in_the_callers_thread_answer_like_the_pool(
    built_index: Callable[[str], Path], kind: str, where: str | None
) -> None:
    index = built_index(kind)
    xq = noisy_queries(Oracle.load(index, "text"), 12, seed=3)
    answers = []
    with SearchEngine.open(index) as engine:
        assert len([s for s in engine.snapshot.shards if s.record.modality == "text"]) > 1
        for pooled in (True, False):
            engine._shard_threads = pooled  # the rule picks one by the machine's cores
            single = [engine.search(q, k=10, where=where, modality="text") for q in xq[:4]]
            batch = engine.search_batch(list(xq), k=10, where=where, modality="text")
            answers.append(
                (
                    [r.row_ids for r in single],
                    [r.row_ids for r in batch],
                    [[h.score for h in r] for r in batch],
                )
            )
    assert answers[0] == answers[1]


def test_an_ann_shard_asked_for_more_rows_than_it_needs_is_not_searched_wider(
    built_index: Callable[[str], Path],
) -> None:
    snap = open_snapshot(built_index("ivf"))
    shard = next(s for s in snap.shards if s.record.modality == "text")
    searcher = ShardSearcher.create(
        shard.record, shard.index, shard.vectors, shard.metadata, snap.tombstones
    )
    # One list probed: it holds a few of the shard's rows.
    searcher = dataclasses.replace(searcher, params={"nprobe": 1, "k_factor": 1})
    assert searcher.kind == "ivf" and searcher.nlist > 2
    exact = np.asarray(shard.vectors, np.float32)
    xq = exact[[3]] + 0.01
    xq = (xq / np.linalg.norm(xq)).astype(np.float32)
    want = searcher.rows  # more than the probed lists hold
    d, i, plan = searcher.search(xq, want, None)
    assert i.shape == (1, want)  # the contract: every row, after a wider search
    d, i, plan = searcher.search(xq, want, None, least=5)
    assert plan == "ann" and 5 <= i.shape[1] < want  # what the probed lists held
    assert len(set(i[0].tolist())) == i.shape[1]
    np.testing.assert_allclose(d[0], exact[i[0]] @ xq[0], atol=1e-5)
    assert np.all(np.diff(d[0]) <= 0)
    # Lists holding k rows still give k: least only spares the wider retry.
    _, i10, _ = searcher.search(xq, 10, None, least=5)
    assert i10.shape == (1, 10)


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_ann_scores_are_the_index_own_where_its_codes_are_the_vectors(
    built_index: Callable[[str], Path], kind: str
) -> None:
    """IVF-Flat and HNSW-Flat hold the shard's vectors: their scores are exact and are
    kept, and the fp16 copy is not read (rescoring would compute the same scores, and on
    a cold page cache read a scattered row per candidate). A PQ index's approximate
    scores are still replaced by the fp16 vectors' exact ones."""
    import faiss

    snap = open_snapshot(built_index(kind))
    shard = next(s for s in snap.shards if s.record.modality == "text")
    searcher = ShardSearcher.create(
        shard.record, shard.index, shard.vectors, shard.metadata, snap.tombstones
    )
    xq = noisy_queries(Oracle.load(built_index(kind), "text"), 4, seed=5)
    if kind == "ivfpq":
        assert not searcher.exact_scores
        d, i, plan = searcher.search(xq, 10, None)
        fp16 = np.asarray(shard.vectors, np.float32)
        np.testing.assert_allclose(d, np.einsum("qkd,qd->qk", fp16[i], xq), atol=1e-5)
        return
    assert searcher.exact_scores
    unreadable = np.full(shard.vectors.shape, np.nan, np.float16)  # any read shows as NaN
    d, i, plan = dataclasses.replace(searcher, vectors=unreadable).search(xq, 10, None)
    assert plan == "ann" and i.shape == (4, 10)
    copy = faiss.clone_index(shard.index)
    if kind == "ivf":
        faiss.extract_index_ivf(copy).make_direct_map()
    stored = copy.reconstruct_n(0, copy.ntotal)  # the float32 vectors the index holds
    np.testing.assert_allclose(d, np.einsum("qkd,qd->qk", stored[i], xq), atol=1e-6)
    assert all(np.all(np.diff(row) <= 0) for row in d)
    assert [r.tolist() for r in i] == [r.tolist() for r in searcher.search(xq, 10, None)[1]]


def test_one_faiss_thread_restores_the_callers_count() -> None:
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        with one_faiss_thread():
            assert faiss.omp_get_max_threads() == 1
        assert faiss.omp_get_max_threads() == 2
        with pytest.raises(RuntimeError), one_faiss_thread():
            raise RuntimeError("a failed search")
        assert faiss.omp_get_max_threads() == 2
    finally:
        faiss.omp_set_num_threads(before)


def test_merge_shard_tops_breaks_ties_by_row_id_and_keeps_the_pool() -> None:
    starts = [0, 100, 200]
    shard0 = (np.array([[0.9, 0.5], [0.7, 0.1]], np.float32), np.array([[5, 7], [1, 2]]))
    shard1 = (np.array([[0.9, 0.8], [0.7, 0.6]], np.float32), np.array([[3, 4], [0, 9]]))
    empty = (np.zeros((2, 0), np.float32), np.zeros((2, 0), np.int64))
    merged = merge_shard_tops(starts, [shard0, shard1, empty], 2, 3)
    # Equal scores: the lower global row id first (row 5 of shard 0 before row 103).
    assert merged[0] == [
        (pytest.approx(0.9), 0, 5),
        (pytest.approx(0.9), 1, 3),
        (pytest.approx(0.8), 1, 4),
    ]
    assert merged[1] == [
        (pytest.approx(0.7), 0, 1),
        (pytest.approx(0.7), 1, 0),
        (pytest.approx(0.6), 1, 9),
    ]
    assert merge_shard_tops(starts, [empty, empty, empty], 2, 3) == [[], []]


def test_the_caller_runs_lexical_tasks_the_busy_pool_has_not_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1)
    monkeypatch.setattr(hybrid, "_executor", lambda: pool)
    busy, release = threading.Event(), threading.Event()

    def other_query() -> None:  # holds the pool's one thread until released
        busy.set()
        release.wait()

    pool.submit(other_query)
    assert busy.wait(30)
    ran_in: dict[int, str] = {}

    def run(ids: Sequence[int]) -> hybrid.ShardLists:
        ran_in[ids[0]] = threading.current_thread().name
        return [(si, [None]) for si in ids], 0.0

    tasks = hybrid._Lexical(run, [[0, 1], [2], [3]])
    out: list[list[hybrid.ShardLists]] = []
    collector = threading.Thread(target=lambda: out.append(tasks.collect()), name="caller")
    collector.start()
    collector.join(30)  # a watchdog: waiting on the busy pool would never return
    release.set()
    collector.join()
    pool.shutdown(wait=True)
    assert out, "collect waited for the busy pool instead of running the queued tasks"
    done = out[0]
    assert [[si for si, _ in d[0]] for d in done] == [[0, 1], [2], [3]]
    assert set(ran_in.values()) == {"caller"}


def test_a_query_heavy_on_postings_is_split_for_the_caller_to_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tantivy")
    from concurrent.futures import ThreadPoolExecutor

    from lexical_fixtures import build_catalog, products, write_catalog

    index = build_catalog(tmp_path / "index", write_catalog(tmp_path, products(120)), shard_size=30)
    pool = ThreadPoolExecutor(max_workers=1)
    submitted: list[int] = []

    class Recording:
        def submit(self, fn: Callable[..., object], *args: object) -> object:
            submitted.append(1)
            return pool.submit(fn, *args)

    monkeypatch.setattr(hybrid, "_executor", lambda: Recording())
    monkeypatch.setattr(hybrid, "_lexical_threads", lambda: 1)
    answers = []
    try:
        with SearchEngine.open(index) as engine:
            for split in (10**9, 0):  # never / always heavy
                monkeypatch.setattr(hybrid, "SPLIT_POSTINGS", split)
                submitted.clear()
                res = engine.search("red mug", k=8, mode="hybrid")
                answers.append((res.row_ids, [h.score for h in res], len(submitted)))
    finally:
        pool.shutdown(wait=True)
    (light_rows, light_scores, light_tasks), (heavy_rows, heavy_scores, heavy_tasks) = answers
    assert (light_tasks, heavy_tasks) == (1, 2)  # 4 shards: one task, or two halves
    assert heavy_rows == light_rows and heavy_scores == light_scores
