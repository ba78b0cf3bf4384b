"""Search kernels against a float64 numpy oracle: fp16 and float32 rows, chunk edges,
threads, and the contiguous copies of repeated filters."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from clipsearch.retrieval import kernels
from clipsearch.retrieval.kernels import (
    GatheredRows,
    as_float32,
    exact_search,
    gather_float32,
    rescore,
    single_threaded_worker,
    subset_search,
)

D = 48


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Small gather chunks so that a few hundred rows already cross chunk boundaries.
    monkeypatch.setattr(kernels, "GATHER_ROWS", 64)


def data(dtype: type, n: int = 1000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def oracle(xq: np.ndarray, xb: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Ids (positions in xb) of the exact top-k over xb[rows], in float64."""
    scores = xq.astype(np.float64) @ xb[rows].astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, : min(k, len(rows))]
    return rows[order]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("nq", [1, 4, 9])  # in-place faiss scan up to SMALL_NQ, then BLAS
@pytest.mark.parametrize("n_rows", [0, 1, 7, 64, 65, 300])
def test_subset_search_matches_the_oracle(dtype: type, nq: int, n_rows: int) -> None:
    xb = data(dtype)
    rng = np.random.default_rng(n_rows)
    rows = np.sort(rng.choice(len(xb), n_rows, replace=False))
    xq = data(np.float32, nq, seed=5)
    d, i = subset_search(xq, xb, rows, 10)
    assert i.shape == (nq, min(10, n_rows)) and d.dtype == np.float32 and i.dtype == np.int64
    assert np.array_equal(i, oracle(xq, xb, rows, 10))
    expected = np.take_along_axis(xq.astype(np.float64) @ xb.astype(np.float64).T, i, axis=1)
    assert np.allclose(d, expected, atol=1e-5)
    assert np.all(np.diff(d, axis=1) <= 0)


@pytest.mark.parametrize("nq", [1, 9])
def test_gathered_rows_answer_like_a_subset_scan(nq: int) -> None:
    xb = data(np.float16)
    rows = np.sort(np.random.default_rng(1).choice(len(xb), 200, replace=False))
    xq = data(np.float32, nq, seed=2)
    gathered = GatheredRows(xb, rows)
    assert gathered.nbytes == 200 * D * 2
    d, i = gathered.search(xq, 10)
    d2, i2 = subset_search(xq, xb, rows, 10)
    assert np.array_equal(i, i2) and np.array_equal(i, oracle(xq, xb, rows, 10))
    assert np.allclose(d, d2, atol=1e-6)
    # k larger than the rows, and searches from several threads at once
    assert gathered.search(xq, 500)[1].shape == (nq, 200)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: gathered.search(xq, 10)[1], range(16)))
    assert all(np.array_equal(o, i) for o in outs)


def test_rescore_and_masked_exact_search_match_numpy() -> None:
    xb = data(np.float16)
    xq = data(np.float32, 3, seed=7)
    ids = np.random.default_rng(3).integers(0, len(xb), (3, 150))  # crosses chunks
    expected = np.einsum("qd,qmd->qm", xq.astype(np.float64), xb[ids].astype(np.float64))
    assert np.allclose(rescore(xq, xb, ids), expected, atol=1e-5)
    mask = np.random.default_rng(4).random(len(xb)) < 0.2
    _, i = exact_search(xq, xb, 10, mask=mask)
    assert np.array_equal(i, oracle(xq, xb, np.flatnonzero(mask), 10))


def test_rescore_scores_repeated_ids_alike_in_place_and_gathered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Candidate lists repeat a row where the index returned nothing (the planner
    # rescores row 0 there); both rescoring kernels score every position.
    xb = data(np.float16)
    xq = data(np.float32, 2, seed=5)
    ids = np.random.default_rng(6).integers(0, len(xb), (2, 100))
    ids[:, 60:] = 0
    in_place = rescore(xq, xb, ids)
    monkeypatch.setattr(kernels, "RESCORE_SCAN_FROM", 10**9)
    gathered = rescore(xq, xb, ids)
    expected = np.einsum("qd,qmd->qm", xq.astype(np.float64), xb[ids].astype(np.float64))
    assert np.allclose(in_place, expected, atol=1e-5)
    assert np.allclose(in_place, gathered, atol=1e-6)
    assert np.all(in_place[:, 60:] == in_place[:, 60:61])


def test_out_of_range_rows_raise_instead_of_clipping() -> None:
    xb = data(np.float16, 100)
    xq = data(np.float32, 1)
    for bad in ([0, 100], [-1, 3]):
        with pytest.raises(IndexError, match="out of range"):
            subset_search(xq, xb, np.array(bad), 1)
        with pytest.raises(IndexError, match="out of range"):
            GatheredRows(xb, np.array(bad))
        with pytest.raises(IndexError, match="out of range"):
            gather_float32(xb, np.array(bad))


def test_half_to_float_cast_is_exact_for_every_finite_half() -> None:
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    bits = bits[np.isfinite(bits)]
    block = np.resize(bits, (len(bits) // D, D))  # large enough for the torch path
    assert block.size > kernels.TORCH_CAST_FROM
    assert np.array_equal(as_float32(block), block.astype(np.float32))
    readonly = block.copy()
    readonly.flags.writeable = False  # like a memory-mapped shard
    assert np.array_equal(as_float32(readonly), block.astype(np.float32))


def test_concurrent_kernels_do_not_share_scratch_memory() -> None:
    """Each thread gathers into its own buffers: results never mix between threads."""
    datasets = [data(np.float16, 500, seed=s) for s in range(4)]
    rows = np.arange(0, 500, 3)
    xq = data(np.float32, 2, seed=9)
    expected = [oracle(xq, xb, rows, 5) for xb in datasets]
    barrier = threading.Barrier(4)

    def work(j: int) -> bool:
        barrier.wait()
        return all(
            np.array_equal(subset_search(xq, datasets[j], rows, 5)[1], expected[j])
            and np.array_equal(
                subset_search(xq[:1].repeat(6, 0), datasets[j], rows, 5)[1][0], expected[j][0]
            )
            for _ in range(20)
        )

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(4)))


def test_single_threaded_worker_leaves_other_threads_alone() -> None:
    before = torch.get_num_threads()
    with ThreadPoolExecutor(1, initializer=single_threaded_worker) as pool:
        assert pool.submit(torch.get_num_threads).result() == 1
    assert torch.get_num_threads() == before
