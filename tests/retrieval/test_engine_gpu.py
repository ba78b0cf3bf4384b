"""Shard placement and the GPU query path, with its CPU twin checked against the oracle.

GPU copies of FAISS indexes take no IDSelector, so the planner routes shards by their
``supports_selector`` flag; ``PlannerConfig(use_selectors=False)`` applies that routing
to CPU indexes, which is how this machine (no GPU) checks the GPU path's logic. Tests
marked ``gpu`` open real indexes on a GPU and compare with the CPU results.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from query_fixtures import (
    Oracle,
    build_index,
    encoder,
    mean_recall,
    noisy_queries,
)

from clipsearch.indexer.maintenance import delete
from clipsearch.retrieval.engine import SearchEngine
from clipsearch.retrieval.errors import ConfigError
from clipsearch.retrieval.kernels import flat_codes
from clipsearch.retrieval.placement import (
    Placed,
    ShardPlacer,
    assign_devices,
    faiss_gpu_count,
    gpu_unsupported,
    shard_devices,
)
from clipsearch.retrieval.planner import PlannerConfig, ShardSearcher
from clipsearch.retrieval.store import open_snapshot

TWIN = PlannerConfig(use_selectors=False)
# Every filtered query takes the over-fetch path (no exact-subset shortcut).
TWIN_OVERFETCH = PlannerConfig(
    use_selectors=False, exact_max_rows=0, ivf_exact_max_rows=0, flat_subset_fraction=0
)
FILTERS = [
    "price < 30",
    "category = 'mugs' and in_stock",
    "rating >= 4 or title contains 'red'",
    "rating >= 2",
]
HAS_GPU = faiss_gpu_count() > 0
gpu = pytest.mark.skipif(
    not HAS_GPU, reason="needs a CUDA GPU and a GPU build of faiss (faiss.get_num_gpus() == 0)"
)


# ---------------------------------------------------------------- placement rules


def test_device_names_map_to_gpus() -> None:
    assert shard_devices("cpu", n_gpus=4) == []
    assert shard_devices("mps", n_gpus=4) == []  # encoder-only device: shards on CPU
    assert shard_devices("auto", n_gpus=0) == []
    assert shard_devices("auto", n_gpus=2) == [0, 1]
    assert shard_devices("cuda", n_gpus=2) == [0, 1]
    assert shard_devices("cuda:1", n_gpus=2) == [1]
    with pytest.raises(ConfigError, match="faiss-gpu") as e:
        shard_devices("cuda", n_gpus=0)
    assert 'device="cpu"' in str(e.value)
    with pytest.raises(ConfigError, match="faiss-gpu"):
        shard_devices("cuda:0", n_gpus=0)
    with pytest.raises(ConfigError, match=r"sees 2 GPU\(s\) \(cuda:0..cuda:1\)"):
        shard_devices("cuda:2", n_gpus=2)
    with pytest.raises(ConfigError, match="cuda:N"):
        shard_devices("cuda:first", n_gpus=2)


def test_shards_spread_round_robin_per_modality() -> None:
    shards = [("image", True), ("image", False), ("image", True), ("text", True)]
    shards += [("image", True), ("text", True)]
    assert assign_devices(shards, [0, 1]) == [0, None, 1, 0, 0, 1]
    assert assign_devices(shards, [3]) == [3, None, 3, 3, 3, 3]
    assert assign_devices(shards, []) == [None] * 6


def test_only_classic_index_types_go_to_gpu() -> None:
    import faiss

    supported = ["Flat", "IVF8,Flat", "IVF8,PQ8"]
    cpu_only = ["HNSW16", "IVF8,PQ8x4fs", "IVF8,PQ8x4", "PCA16,IVF8,Flat", "IVF8,SQ8"]
    for factory in supported + cpu_only:
        idx = faiss.index_factory(32, factory, faiss.METRIC_INNER_PRODUCT)  # type only
        reason = gpu_unsupported(idx)
        assert (reason is None) == (factory in supported), (factory, reason)
    assert "8-bit" in str(gpu_unsupported(faiss.index_factory(32, "IVF8,PQ8x4")))
    assert "metric" in str(gpu_unsupported(faiss.IndexFlatL2(32)))


def test_placer_keeps_unsupported_shards_on_cpu(caplog: pytest.LogCaptureFixture) -> None:
    import faiss

    placer = ShardPlacer("cpu")
    assert placer.place([("s0", "image", faiss.IndexFlatIP(8))])[0].placement == "cpu"
    # Pretend two GPUs; the copy itself needs a GPU faiss, so it is replaced by a label.
    placer.devices = [0, 1]
    placer._to_gpu = lambda name, index, gpu: Placed(index, f"cuda:{gpu}")  # type: ignore[method-assign]
    shards = [
        ("s0", "image", faiss.IndexFlatIP(8)),
        ("s1", "image", faiss.IndexHNSWFlat(8, 16, faiss.METRIC_INNER_PRODUCT)),
        ("s2", "image", faiss.index_factory(8, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)),
        ("s3", "text", faiss.index_factory(8, "IVF4,PQ2", faiss.METRIC_INNER_PRODUCT)),
    ]
    with caplog.at_level("INFO", logger="clipsearch.retrieval.placement"):
        placed = placer.place(shards)
    assert [p.placement for p in placed] == ["cuda:0", "cpu", "cuda:1", "cuda:0"]
    assert placed[1].index is shards[1][2] and not placed[1].on_gpu
    assert "1 on cpu, 2 on cuda:0, 1 on cuda:1" in caplog.text
    assert "IndexHNSWFlat has no FAISS GPU implementation" in caplog.text


@pytest.mark.skipif(HAS_GPU, reason="checks the error raised where faiss has no GPU")
def test_cuda_without_gpu_faiss_is_a_clear_error(corpus: Path, tmp_path: Path) -> None:
    root = build_index(tmp_path / "idx", corpus, "flat")
    with pytest.raises(ConfigError, match="pip install faiss-gpu"):
        SearchEngine.open(root, encoder=encoder(), device="cuda")
    for device in ("cpu", "auto"):  # auto falls back to CPU without a GPU faiss
        with SearchEngine.open(root, encoder=encoder(), device=device) as engine:
            assert set(engine.placement.values()) == {"cpu"}
            assert set(engine.placement) == {s.name for s in engine.manifest.shards}


# ---------------------------------------------------------------- the CPU twin


@pytest.mark.parametrize("where", [None, *FILTERS])
def test_twin_matches_the_oracle(index: Path, where: str | None) -> None:
    oracle = Oracle.load(index, "text")
    xq = noisy_queries(oracle, 20)
    expected = oracle.search(xq, 10, where)
    with SearchEngine.open(index, config=TWIN) as engine:
        results = engine.search_batch(list(xq), k=10, where=where, modality="text")
    plans = set(results[0].plans.values())
    if where is None:
        assert plans == {"index"}  # unfiltered queries go through the index
    if index.name.startswith("flat"):
        assert [r.row_ids for r in results] == expected
    else:
        assert mean_recall(results, expected) >= 0.9
    for r in results:
        assert len(r) == 10 and all(np.isfinite(h.score) and h.row_id >= 0 for h in r)


@pytest.mark.parametrize(
    "where",
    [
        "price < 0",  # 0 rows
        "doc_id = 'd0007'",  # 2 text rows
        "doc_id in ('d0001', 'd0002', 'd0003', 'd0004', 'd0005')",  # 10 rows
        "rating >= 2",  # most rows: over-fetch succeeds
        "rating >= 4 or title contains 'red'",
    ],
)
@pytest.mark.parametrize("config", [TWIN, TWIN_OVERFETCH], ids=["twin", "overfetch"])
def test_twin_filtered_queries_return_min_k_matches(
    index: Path, where: str, config: PlannerConfig
) -> None:
    oracle = Oracle.load(index, "text")
    mask = oracle.mask(where)
    matches = int(mask.sum())
    allowed = set(oracle.row_ids[mask].tolist())
    xq = noisy_queries(oracle, 4, seed=2)
    with SearchEngine.open(index, config=config) as engine:
        for k in (1, 10, 11, 150):
            results = engine.search_batch(list(xq), k=k, where=where, modality="text")
            for r in results:
                assert len(r) == min(k, matches) and set(r.row_ids) <= allowed
                assert r.total_matches == matches
            plans = set(results[0].plans.values())
            assert not plans & {"ann", "ann-filtered"}  # no selector-based plan
            if matches and k <= 11:
                assert mean_recall(results, oracle.search(xq, k, where)) >= 0.9
            if config is TWIN_OVERFETCH and k == 10 and matches > 300:
                assert "index-overfetch" in plans


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_twin_never_returns_tombstoned_rows(corpus: Path, tmp_path: Path, kind: str) -> None:
    root = build_index(tmp_path / "idx", corpus, kind)
    oracle = Oracle.load(root, "text")
    xq = oracle.vectors[:5]
    with SearchEngine.open(root, config=TWIN_OVERFETCH) as engine:
        before = engine.search_batch(list(xq), k=5, modality="text")
        victims = sorted({h.doc_id for r in before for h in r})
        delete(root, ids=victims)
        assert engine.reload() is True
        after = engine.search_batch(list(xq), k=5, modality="text")
        after_filtered = engine.search_batch(list(xq), k=5, modality="text", where="price > 0")
    for r in after + after_filtered:
        assert len(r) == 5 and not set(r.doc_ids) & set(victims)
    assert "index-overfetch" in after[0].plans.values()  # tombstones filter like `where`
    expected = Oracle.load(root, "text").search(xq, 5)
    if kind == "flat":
        assert [r.row_ids for r in after] == expected
    else:
        assert mean_recall(after, expected) >= 0.9


def test_twin_concurrent_queries_keep_their_own_nprobe(corpus: Path, tmp_path: Path) -> None:
    """Index parameters are set per call under the shard lock: a broad filter raises
    nprobe, and an unfiltered query running at the same time must not inherit it
    (or lose its own) halfway through."""
    root = build_index(tmp_path / "idx", corpus, "ivf")
    with SearchEngine.open(root, config=TWIN_OVERFETCH) as engine:
        jobs = [("red", None), ("blue", "price < 50"), ("lamp", "rating >= 2")]
        expected = {q: engine.search(q, k=5, where=w).row_ids for q, w in jobs}
        errors: list[BaseException] = []

        def worker(query: str, where: str | None) -> None:
            try:
                for _ in range(15):
                    assert engine.search(query, k=5, where=where).row_ids == expected[query]
            except BaseException as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=job) for job in jobs * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


# ---------------------------------------------------------------- real GPUs


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("where", [None, *FILTERS])
def test_gpu_results_match_cpu(index: Path, where: str | None) -> None:
    oracle = Oracle.load(index, "text")
    xq = noisy_queries(oracle, 20, seed=3)
    with SearchEngine.open(index, device="cpu") as cpu_engine:
        cpu = cpu_engine.search_batch(list(xq), k=10, where=where, modality="text")
    with SearchEngine.open(index, device="cuda") as gpu_engine:
        placement = gpu_engine.placement
        results = gpu_engine.search_batch(list(xq), k=10, where=where, modality="text")
    kind = index.name.rstrip("0123456789")
    on_gpu = {p != "cpu" for p in placement.values()}
    assert on_gpu == ({True} if kind in ("flat", "ivf") else {False})  # hnsw, x4fs: CPU
    for r in results:
        assert len(r) == 10 and all(np.isfinite(h.score) for h in r)
    if kind == "flat":
        assert [r.row_ids for r in results] == [r.row_ids for r in cpu]
    else:
        assert mean_recall(results, [r.row_ids for r in cpu]) >= 0.95


@pytest.mark.gpu
@gpu
def test_gpu_filtered_queries_return_min_k_matches(index: Path) -> None:
    oracle = Oracle.load(index, "text")
    xq = noisy_queries(oracle, 4, seed=4)
    with SearchEngine.open(index, device="cuda", config=TWIN_OVERFETCH) as engine:
        for where in ["price < 0", "doc_id = 'd0007'", *FILTERS]:
            mask = oracle.mask(where)
            for k in (1, 10, 150):
                for r in engine.search_batch(list(xq), k=k, where=where, modality="text"):
                    assert len(r) == min(k, int(mask.sum()))
                    assert set(r.row_ids) <= set(oracle.row_ids[mask].tolist())


def test_fp16_flat_copy_ranks_like_the_cpu_path(corpus: Path, tmp_path: Path) -> None:
    """A float16 GPU copy of a flat shard scores slightly off; the planner fetches 2k
    from it and rescores with the float32 vectors, so the ranking equals the CPU path's.
    Simulated here with a CPU flat index holding perturbed vectors."""
    import faiss

    root = build_index(tmp_path / "idx", corpus, "flat")
    snap = open_snapshot(root)
    shard = snap.shards[0]
    exact = flat_codes(shard.index)
    assert exact is not None
    rng = np.random.default_rng(5)
    lossy = faiss.IndexFlatIP(exact.shape[1])
    lossy.add((exact + rng.normal(0, 2e-3, exact.shape)).astype(np.float32))
    args = (shard.record, shard.index, shard.vectors, shard.metadata, snap.tombstones)
    cpu = ShardSearcher.create(*args)
    gpu_like = ShardSearcher.create(*args, config=TWIN, placed=Placed(lossy, "cpu", fp16=True))
    xq = exact[rng.integers(0, len(exact), 30)] + rng.normal(0, 0.05, (30, exact.shape[1]))
    xq = (xq / np.linalg.norm(xq, axis=1, keepdims=True)).astype(np.float32)
    d1, i1, plan1 = cpu.search(xq, 10, None)
    d2, i2, plan2 = gpu_like.search(xq, 10, None)
    assert (plan1, plan2) == ("exact", "index")
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, atol=1e-5)
