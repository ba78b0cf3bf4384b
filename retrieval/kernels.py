"""Search kernels: exact numpy top-k, exact subset search, and faiss defaults for small CPUs.

``exact_search`` is both the oracle of the test suite and the baseline of the
benchmarks; the engine uses it for flat shards and for filtered queries that match few
rows. Scores are inner products (cosine on unit vectors), higher is better. Every kernel
returns ``(D, I)`` with ``D`` float32 ``[nq, k']`` descending per row and ``I`` int64
positions into the searched rows, ``k' = min(k, rows)``: no -1 padding, no -inf scores.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Rows converted from fp16 / scored per block. 16k x 512 float32 is 32 MiB: large enough
# that BLAS runs at full speed, small enough that a 1M-row shard never needs a 2 GiB copy.
BLOCK_ROWS = 16_384
# Scores computed per block for float32 rows (64 MiB of float32).
SCORE_BLOCK = 1 << 24
# Up to this many queries, subset scans avoid multi-threaded BLAS (see small_scores).
SMALL_NQ = 4
# faiss >= 1.9 switches its flat search to BLAS when nq * d reaches
# distance_compute_blas_threshold (default 128000, i.e. 250 queries at d=512). On small
# CPUs BLAS already wins from about 8 queries, so the engine sets 8 * d.
BLAS_FROM_QUERIES = 8

_faiss_lock = threading.Lock()
_faiss_configured_dim: int | None = None


def topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` per row of a float32 ``[nq, n]`` score matrix (descending, ties by index)."""
    nq, n = scores.shape
    k = min(k, n)
    if k <= 0:
        return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
    if k < n:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n), (nq, n))
    part_scores = np.take_along_axis(scores, part, axis=1)
    # lexsort: primary key descending score, secondary ascending position (stable ties).
    order = np.lexsort((part, -part_scores), axis=1)
    idx = np.take_along_axis(part, order, axis=1).astype(np.int64)
    return np.take_along_axis(part_scores, order, axis=1).astype(np.float32), idx


def exact_search(
    xq: np.ndarray, xb: np.ndarray, k: int, *, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of ``xq`` float32 ``[nq, d]`` over ``xb`` ``[n, d]``.

    ``xb`` may be float32 or float16 (converted block by block, never all at once).
    ``mask`` (bool ``[n]``) restricts the search to rows where it is True; then
    ``k' = min(k, mask.sum())``.
    """
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    n = xb.shape[0]
    allowed = n if mask is None else int(np.count_nonzero(mask))
    k = min(k, allowed)
    nq = xq.shape[0]
    if k <= 0:
        return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
    best_d = np.full((nq, 0), -np.inf, np.float32)
    best_i = np.zeros((nq, 0), np.int64)
    # float32 rows need no conversion, so only the score matrix bounds the block: one
    # query scans a whole shard in one BLAS call (many small calls cost up to 2x when
    # BLAS threads have to re-synchronise per call on a busy machine).
    step = BLOCK_ROWS if xb.dtype != np.float32 else max(BLOCK_ROWS, SCORE_BLOCK // nq)
    for start in range(0, n, step):
        block = np.asarray(xb[start : start + step], dtype=np.float32)
        scores = xq @ block.T
        if mask is not None:
            scores[:, ~mask[start : start + step]] = -np.inf
        d, i = topk(scores, k)
        best_d, best_i = _merge(best_d, best_i, d, i + start, k)
    # Masked rows score -inf; with k <= allowed they never survive.
    return best_d, best_i


def subset_search(
    xq: np.ndarray, xb: np.ndarray, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over ``xb[rows]`` only; returned ids are positions in ``xb`` (not in rows).

    The gather costs ``len(rows) * d`` reads: 5k rows of 512 fp16 take about 2 ms.
    """
    rows = np.asarray(rows, dtype=np.int64)
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    best_d = np.full((xq.shape[0], 0), -np.inf, np.float32)
    best_i = np.zeros((xq.shape[0], 0), np.int64)
    k = min(k, len(rows))
    for start in range(0, len(rows), BLOCK_ROWS):
        chunk = rows[start : start + BLOCK_ROWS]
        # np.take gathers from a memory-mapped array about 2x faster than fancy indexing.
        block = np.take(xb, chunk, axis=0).astype(np.float32, copy=False)
        d, i = topk(small_scores(xq, block), k)
        best_d, best_i = _merge(best_d, best_i, d, chunk[i], k)
    return best_d, best_i


def small_scores(xq: np.ndarray, block: np.ndarray) -> np.ndarray:
    """``xq @ block.T`` for the small products of subset scans and rescoring.

    Few queries go through einsum's single-threaded SIMD loop instead of BLAS: a
    multi-threaded BLAS call this small waits for the scheduler to run its helper
    threads, which on a busy 2-core machine turned 0.2 ms into 15 ms at p50.
    """
    if xq.shape[0] <= SMALL_NQ:
        return np.einsum("ij,kj->ik", xq, block)
    return xq @ block.T


def _merge(
    d1: np.ndarray, i1: np.ndarray, d2: np.ndarray, i2: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    if d1.shape[1] == 0:
        return d2, i2
    d = np.concatenate([d1, d2], axis=1)
    i = np.concatenate([i1, i2], axis=1)
    order = np.lexsort((i, -d), axis=1)[:, :k]
    return np.take_along_axis(d, order, axis=1), np.take_along_axis(i, order, axis=1)


def rescore(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Exact scores of candidate ids: ``xq`` ``[nq, d]``, ``ids`` int64 ``[nq, m]`` -> ``[nq, m]``.

    ``xb`` is typically the shard's memory-mapped fp16 vectors: fp16 keeps 3 significant
    digits, enough to reorder the candidates of a compressed (PQ) index correctly.
    """
    out = np.empty(ids.shape, np.float32)
    for qi in range(ids.shape[0]):
        vecs = np.take(xb, ids[qi], axis=0).astype(np.float32, copy=False)
        out[qi] = np.einsum("kj,j->k", vecs, xq[qi])
    return out


def flat_codes(index: Any) -> np.ndarray | None:
    """The float32 ``[ntotal, d]`` vectors of a faiss IndexFlatIP as a zero-copy view.

    Lets the engine scan a flat shard with BLAS (fast from one query) instead of faiss's
    own loop; returns None for any other index type.
    """
    import faiss

    idx = faiss.downcast_index(index)
    if not isinstance(idx, faiss.IndexFlat) or idx.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    if idx.ntotal == 0:
        return np.zeros((0, idx.d), np.float32)
    ptr = idx.get_xb()
    return faiss.rev_swig_ptr(ptr, idx.ntotal * idx.d).reshape(idx.ntotal, idx.d)


def configure_faiss(dim: int) -> None:
    """Make faiss use BLAS from :data:`BLAS_FROM_QUERIES` queries at this dim.

    A process-wide setting (faiss has no per-index one); the last dim configured wins,
    which only shifts the crossover for indexes of other dims.
    """
    global _faiss_configured_dim
    import faiss

    with _faiss_lock:
        if _faiss_configured_dim == dim:
            return
        faiss.cvar.distance_compute_blas_threshold = BLAS_FROM_QUERIES * dim
        _faiss_configured_dim = dim
        log.debug(
            "faiss BLAS threshold set to %d (%d queries at d=%d)",
            BLAS_FROM_QUERIES * dim,
            BLAS_FROM_QUERIES,
            dim,
        )
