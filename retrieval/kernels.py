"""Search kernels: exact numpy top-k, exact subset search, and faiss defaults for small CPUs.

``exact_search`` is both the oracle of the test suite and the baseline of the
benchmarks; the engine uses it for flat shards and for filtered queries that match few
rows. Scores are inner products (cosine on unit vectors), higher is better. Every kernel
returns ``(D, I)`` with ``D`` float32 ``[nq, k']`` descending per row and ``I`` int64
positions into the searched rows, ``k' = min(k, rows)``: no -1 padding, no -inf scores.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# float32 rows scored per block. 16k x 512 float32 is 32 MiB: large enough that BLAS runs
# at full speed, small enough that a 1M-row shard never needs a 2 GiB copy.
BLOCK_ROWS = 16_384
# Rows gathered / converted from fp16 per step, into per-thread scratch buffers reused
# across calls (see _scratch_buffer): 4 MiB of fp16 + 8 MiB of float32 per searching
# thread at d=512, small enough to stay in cache-friendly, already-mapped memory.
GATHER_ROWS = 4096
# Smaller float16 blocks are cast by numpy: below this size torch's per-call overhead
# (~20 us) exceeds numpy's software cast (2 ns per value).
TORCH_CAST_FROM = 16_384
# Scores computed per block for float32 rows (64 MiB of float32).
SCORE_BLOCK = 1 << 24
# Up to this many queries, subset scans avoid multi-threaded BLAS (see small_scores).
SMALL_NQ = 4
# Candidates at or above which rescore scores in place (see rescore; 16 rows cost the
# same either way on the 2-core benchmark machine).
RESCORE_SCAN_FROM = 16
# faiss >= 1.9 switches its flat search to BLAS when nq * d reaches
# distance_compute_blas_threshold (default 128000, i.e. 250 queries at d=512). On small
# CPUs BLAS already wins from about 8 queries, so the engine sets 8 * d.
BLAS_FROM_QUERIES = 8

_faiss_lock = threading.Lock()
_faiss_configured_dim: int | None = None
# Per-thread scratch buffers and flat indexes of the gathering kernels.
_scratch = threading.local()


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
    f32 = xb.dtype == np.float32
    step = max(BLOCK_ROWS, SCORE_BLOCK // nq) if f32 else GATHER_ROWS
    for start in range(0, n, step):
        block = xb[start : start + step] if f32 else as_float32(xb[start : start + step])
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

    ``xb`` is float32 or float16 ``[n, d]`` (typically memory-mapped). Rows are gathered
    :data:`GATHER_ROWS` at a time. Up to :data:`SMALL_NQ` queries score them in place
    with faiss's SIMD kernels (float16 read as is, never widened in memory); more
    queries widen each block once and score it with BLAS. Measured on 2 shards x 4900
    of 500k fp16 rows of d=512, one query: 1.0-2.3 ms against 2.5-3.2 ms for widening
    first, and 5-13 ms (1% of rows) for numpy's own float16 cast.
    """
    rows = np.asarray(rows, dtype=np.int64)
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    best_d = np.full((xq.shape[0], 0), -np.inf, np.float32)
    best_i = np.zeros((xq.shape[0], 0), np.int64)
    k = min(k, len(rows))
    in_place = xq.shape[0] <= SMALL_NQ and xb.dtype in (np.float16, np.float32)
    for start in range(0, len(rows), GATHER_ROWS):
        chunk = rows[start : start + GATHER_ROWS]
        if in_place:
            d, i = _scan_gathered(xq, xb, chunk, k)
        else:
            d, i = topk(small_scores(xq, gather_float32(xb, chunk)), k)
        best_d, best_i = _merge(best_d, best_i, d, chunk[i], k)
    return best_d, best_i


def _scan_gathered(
    xq: np.ndarray, xb: np.ndarray, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over ``xb[rows]`` (at most GATHER_ROWS rows), gathered straight into the
    storage of this thread's reusable faiss flat index (see :func:`_flat_index`).

    Returns positions into ``rows``.
    """
    _check_rows(xb, rows)
    indexes: dict[tuple[str, int], Any] = _scratch.__dict__.setdefault("indexes", {})
    key = (xb.dtype.name, xb.shape[1])
    index = indexes.get(key)
    if index is None:
        index = indexes[key] = _flat_index(xb.dtype, xb.shape[1])
    _fill(index, xb, rows, capacity=GATHER_ROWS)
    dist, idx = index.search(xq, min(k, len(rows)))
    return dist, idx


class GatheredRows:
    """``xb[rows]`` copied once into a contiguous faiss flat index, for repeated exact
    scans of the same rows (the allowed rows of a filter that many queries repeat).

    Scanning contiguous memory skips re-gathering scattered rows on every query, which
    is most of an exact subset scan's cost. Safe to search from several threads.
    """

    def __init__(self, xb: np.ndarray, rows: np.ndarray) -> None:
        if xb.dtype not in (np.float16, np.float32):
            raise ValueError(f"GatheredRows takes float16 or float32 rows, got {xb.dtype}")
        self.rows = np.asarray(rows, dtype=np.int64)
        for start in range(0, len(self.rows), GATHER_ROWS):
            _check_rows(xb, self.rows[start : start + GATHER_ROWS])
        self._dtype = xb.dtype
        self._index = _flat_index(xb.dtype, xb.shape[1])
        _fill(self._index, xb, self.rows, capacity=len(self.rows))
        self.nbytes = len(self.rows) * xb.shape[1] * xb.dtype.itemsize

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k like :func:`subset_search`: ids are positions in the original ``xb``."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        m = len(self.rows)
        k = min(k, m)
        if k <= 0:
            return np.zeros((xq.shape[0], 0), np.float32), np.zeros((xq.shape[0], 0), np.int64)
        if xq.shape[0] <= SMALL_NQ:
            dist, idx = self._index.search(xq, k)
            return dist, self.rows[idx]
        # Many queries: widen blocks once and score them with BLAS (faiss's fp16 flat
        # search has no BLAS path). The view lives no longer than self._index.
        view = _codes_view(self._index, m, self._index.d, self._dtype)
        dist, idx = subset_search(xq, view, np.arange(m), k)
        return dist, self.rows[idx]


def _flat_index(dtype: np.dtype, d: int) -> Any:
    """An empty inner-product flat index storing ``dtype`` rows verbatim: IndexFlatIP
    for float32, IndexScalarQuantizer(fp16) for float16 (its kernels widen halves on the
    fly with F16C, so the rows are never widened in memory)."""
    faiss = _faiss()
    if np.dtype(dtype) == np.float32:
        return faiss.IndexFlatIP(d)
    return faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)


def _codes_view(index: Any, m: int, d: int, dtype: np.dtype) -> np.ndarray:
    """The first ``m`` rows of a flat index's storage as a writable ``[m, d]`` array."""
    nbytes = m * d * np.dtype(dtype).itemsize
    view: np.ndarray = _faiss().rev_swig_ptr(index.codes.data(), nbytes)
    return view.view(dtype).reshape(m, d)


def _fill(index: Any, xb: np.ndarray, rows: np.ndarray, *, capacity: int) -> None:
    """Make ``index`` hold exactly ``xb[rows]`` (bounds checked by the caller), growing
    its storage to ``capacity`` rows when it is too small."""
    m, d = len(rows), xb.shape[1]
    if index.codes.size() < m * d * xb.dtype.itemsize:
        index.codes.resize(max(m, capacity) * d * xb.dtype.itemsize)
    view = _codes_view(index, m, d, xb.dtype)
    # mode="clip" writes straight into the index's storage; the default "raise" buffers
    # through a fresh temporary.
    for start in range(0, m, GATHER_ROWS):
        end = min(m, start + GATHER_ROWS)
        np.take(xb, rows[start:end], axis=0, out=view[start:end], mode="clip")
    index.ntotal = m


def _check_rows(xb: np.ndarray, rows: np.ndarray) -> None:
    if len(rows) > GATHER_ROWS:
        raise ValueError(f"at most {GATHER_ROWS} rows per gather, got {len(rows)}")
    if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= xb.shape[0]):
        raise IndexError(f"row ids out of range for {xb.shape[0]} rows")


def _faiss() -> Any:
    import faiss

    return faiss


def small_scores(xq: np.ndarray, block: np.ndarray) -> np.ndarray:
    """``xq @ block.T`` (float32) for the small products of subset scans and rescoring.

    Few queries go through faiss's single-threaded SIMD inner products instead of BLAS:
    a multi-threaded BLAS call this small waits for the scheduler to run its helper
    threads, which on a busy 2-core machine turned 0.2 ms into 15 ms at p50 (and
    einsum's loop is 2.2x slower than faiss's: 0.62 against 0.28 ms for 5000 x 512).
    """
    nq, d = xq.shape
    if nq > SMALL_NQ:
        return xq @ block.T
    faiss = _faiss()
    block = np.ascontiguousarray(block, dtype=np.float32)
    out = np.empty((nq, block.shape[0]), np.float32)
    if block.shape[0] == 0:
        return out
    for qi in range(nq):
        faiss.fvec_inner_products_ny(
            faiss.swig_ptr(out[qi]), faiss.swig_ptr(xq[qi]), faiss.swig_ptr(block), d, len(block)
        )
    return out


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
    From :data:`RESCORE_SCAN_FROM` candidates on, they are scored in place by the exact
    subset scan's kernel (:func:`_scan_gathered`: float16 read as is, no cast): 100 fp16
    rows of d=512 in 31 us instead of 89 us gathered, widened by numpy and scored (an
    IVF-PQ shard rescores ``k * k_factor`` candidates per query). Same scores either way.
    """
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    out = np.empty(ids.shape, np.float32)
    in_place = xb.dtype in (np.float16, np.float32)
    for qi in range(ids.shape[0]):
        for start in range(0, ids.shape[1], GATHER_ROWS):
            chunk = ids[qi, start : start + GATHER_ROWS]
            if in_place and len(chunk) >= RESCORE_SCAN_FROM:
                d, at = _scan_gathered(xq[qi : qi + 1], xb, chunk, len(chunk))
                out[qi, start + at[0]] = d[0]
                continue
            out[qi, start : start + len(chunk)] = small_scores(
                xq[qi : qi + 1], gather_float32(xb, chunk)
            )[0]
    return out


def gather_float32(xb: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``xb[rows]`` as float32 ``[len(rows) <= GATHER_ROWS, d]``, in this thread's scratch.

    The result is overwritten by this thread's next gather or conversion: consume it
    (score it) before calling another kernel.
    """
    _check_rows(xb, rows)
    n, d = len(rows), xb.shape[1]
    if xb.dtype not in (np.float16, np.float32):
        return np.take(xb, rows, axis=0).astype(np.float32)
    kind = "f32" if xb.dtype == np.float32 else "f16"
    out = _scratch_buffer(kind, n, d)
    # mode="clip" (bounds checked above) writes straight into `out`; the default "raise"
    # buffers through a fresh temporary. np.take reads a memory map ~2x faster than
    # fancy indexing.
    np.take(xb, rows, axis=0, out=out, mode="clip")
    return as_float32(out)


def as_float32(block: np.ndarray) -> np.ndarray:
    """A float16 ``[m <= GATHER_ROWS, d]`` block as float32, in this thread's scratch.

    numpy converts half floats one at a time in software (5.5 ms for 5000 x 512);
    torch's cast uses the CPU's F16C instructions (0.2 ms), exactly (every float16 is a
    float32). Float32 input is returned as is, other dtypes are cast by numpy. torch is
    used only when the process has already imported it (a torch encoder): a process
    answering with the ONNX encoder never pays torch's import for a faster cast.
    """
    if block.dtype == np.float32:
        return block
    torch = sys.modules.get("torch")  # only when loaded anyway: importing it costs ~2 s
    if block.dtype != np.float16 or block.size <= TORCH_CAST_FROM or torch is None:
        return block.astype(np.float32)

    m, d = block.shape
    if not (block.flags.writeable and block.flags.c_contiguous):
        # torch refuses read-only (memory-mapped) arrays; copy into the fp16 scratch.
        half = _scratch_buffer("f16", m, d)
        np.copyto(half, block)
        block = half
    out = _scratch_buffer("f32", m, d)
    torch.from_numpy(out).copy_(torch.from_numpy(block))
    return out


def _scratch_buffer(kind: str, rows: int, d: int) -> np.ndarray:
    """This thread's reusable ``[rows, d]`` buffer, ``kind`` "f16" or "f32".

    Reusing memory is the point: the allocator hands large blocks back to the OS on
    free, and page-faulting a fresh one in costs more than filling it (a 4096-row gather
    plus conversion took 1.2 ms into fresh memory, 0.4 ms into a reused buffer).
    """
    buffers: dict[str, np.ndarray] | None = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    need = rows * d
    buf = buffers.get(kind)
    if buf is None or buf.size < need:
        dtype = np.float16 if kind == "f16" else np.float32
        buf = buffers[kind] = np.empty(max(need, GATHER_ROWS * d), dtype)
    return buf[:need].reshape(rows, d)


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


@contextlib.contextmanager
def one_faiss_thread() -> Iterator[None]:
    """faiss runs one OpenMP thread in the calling thread for the block, as in the
    engine's shard workers (:func:`single_threaded_worker`), and the thread's own count
    afterwards. For shard searches run in the caller's thread: a second OpenMP thread
    for one query is slower on small CPUs, and on 2 cores it spins against the lexical
    side of a hybrid query (3.8 ms instead of 4.9 ms p50 at 1M rows)."""
    faiss = _faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def single_threaded_worker() -> None:
    """Make faiss and torch run one OpenMP thread in the calling thread only.

    For the engine's shard workers (a pool initializer): the shards already give the
    parallelism, and a second OpenMP thread per call is slower on small CPUs (faiss's
    2-thread path for one query is 1.6x slower than 1 thread; torch's half-float cast
    leaves a thread spinning that competes with the next gather). OpenMP thread counts
    are per calling thread, so the application's own threads keep their settings.
    ``torch.set_num_threads`` would change every thread, so torch's OpenMP runtime is
    told directly, after torch has initialised this thread (which resets the count).
    torch is touched only when the process has already imported it.
    """
    import faiss

    faiss.omp_set_num_threads(1)
    torch = sys.modules.get("torch")
    if torch is None:  # not loaded (ONNX or fake encoder): nothing to limit, nothing to import
        return
    try:
        torch.get_num_threads()  # runs torch's per-thread init, which sets the count
        lib = _torch_openmp()
        if lib is not None:
            lib.omp_set_num_threads(1)
    except (AttributeError, OSError) as e:  # a partial or unusual torch build
        log.debug("torch OpenMP not limited in shard worker: %s", e)


def _torch_openmp() -> Any:
    """torch's own OpenMP runtime (a different library from faiss's), or None."""
    import ctypes
    from pathlib import Path

    import torch

    libs = sorted((Path(torch.__file__).parent / "lib").glob("lib*omp*.so*"))
    for path in libs:
        lib = ctypes.CDLL(str(path))
        if hasattr(lib, "omp_set_num_threads"):
            return lib
    return None
