"""Per-shard search plans: how one shard answers a (possibly filtered) batch of queries.

The plan is chosen from the shard's index type and the measured number of rows that
may be returned (filter matches minus tombstones):

* ``exact``: flat shards are scanned with BLAS over FAISS's own float32 vectors (a
  zero-copy view), which is as fast as numpy from one query on. A filter masks scores.
* ``exact-subset``: few allowed rows (``<= exact_max_rows`` for HNSW; for IVF when a
  cost model says so; a small share of a flat shard; one rule for both routings,
  :meth:`ShardSearcher._scan_allowed_rows`): gather those rows' vectors and scan them
  exactly (recall 1.0). A filter the engine has cached scans a contiguous
  copy of its rows instead (see :class:`AllowedRows`). At 1% of 1M rows: ~0.3 ms per
  500k-row shard from the copy, where HNSW + bitmap often comes back short.
* ``ivf-lists``: filtered CPU IVF. The coarse quantizer picks nprobe lists, nprobe
  raised in proportion to 1 / selectivity (a filter keeping 10% of rows needs ~10x the
  lists to see as many matching rows); the allowed rows of those lists are scored
  exactly from the fp16 vectors (:class:`IvfLists`). Same lists as faiss's own
  bitmap-filtered search, but the lists' codes are never read: 0.4 ms instead of
  1.2-6 ms per 500k-row shard from 1% to 10% selectivity.
* ``ann`` / ``ann-filtered``: the shard's FAISS index with per-call
  ``SearchParameters`` (never mutating the shared index, so concurrent queries are
  safe); with a filter (HNSW, IVF behind a pre-transform), an ``IDSelectorBitmap`` and
  nprobe / efSearch raised in proportion to 1 / selectivity. Candidates are rescored
  exactly from the fp16 vectors, except where the index's own scores are already exact
  (CPU IVF-Flat and HNSW-Flat hold the same vectors; see ``exact_scores``).
* ``ann->exact``: when the index (or the probed lists) return fewer than ``min(k, allowed rows)`` results,
  the shard is re-searched exactly over the allowed rows. A filtered query therefore
  never returns fewer results because of the index.

Shards whose index takes no ``SearchParameters`` (GPU copies: classic FAISS GPU indexes
ignore ``IDSelector``) are routed by their ``supports_selector`` flag, never by their
faiss class, so the CPU twin (``PlannerConfig(use_selectors=False)``) runs exactly the
GPU routing on CPU indexes:

* ``index``: an unfiltered query searches the index itself, with nprobe / efSearch set
  on the index (``GpuParameterSpace`` / ``ParameterSpace``) under the shard's lock, which
  also covers the search, so concurrent queries never see each other's settings.
  Candidates are rescored exactly (flat shards: from the float32 vectors kept on CPU, so
  a float16 GPU copy ranks exactly like the CPU path; it is asked for 2k candidates).
* ``exact-subset`` / ``exact``: a filter (tombstones count as one) that keeps few rows
  scans them exactly on CPU, by the same rule as above (for IVF without its cost model:
  at most ``ivf_exact_max_rows``).
* ``index-overfetch``: a filter keeping more rows fetches ``k / selectivity`` times a
  margin from the index, drops disallowed rows and rescores; when some query keeps fewer
  than ``min(k, allowed rows)``, or the fetch would exceed ``max_index_k`` (FAISS GPU's
  top-k limit), the shard is scanned exactly over the allowed rows (``index->exact``).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from clipsearch.retrieval.kernels import (
    GatheredRows,
    exact_search,
    flat_codes,
    rescore,
    subset_search,
)
from clipsearch.retrieval.manifest import ShardRecord
from clipsearch.retrieval.placement import CPU, Placed

log = logging.getLogger(__name__)

# A search that returns fewer than k rows (a query far from every probed list, a filter
# whose rows cluster elsewhere) is retried with nprobe / efSearch raised by these
# factors before the shard falls back to an exact scan of every allowed row: an
# out-of-distribution query on a 500k-row IVF shard took 70 ms exact, ~1 ms retried.
ESCALATION = (1.0, 8.0, 64.0)


@dataclass(frozen=True, kw_only=True)
class PlannerConfig:
    """Thresholds of the per-shard planner."""

    # Allowed rows at or below which an ANN shard is scanned exactly over those rows;
    # 20k x 512 fp16 is 20 MB, a few ms, still cheaper than a bitmap-filtered ANN search
    # that has to visit ~1/selectivity times more of the index.
    exact_max_rows: int = 20_000
    # IVF shards scan allowed rows exactly at or below this many, whatever the cost model
    # below says (a few thousand rows take well under a millisecond).
    ivf_exact_max_rows: int = 2_000
    # Above that (and up to exact_max_rows) a cost model picks between scanning every
    # allowed row and the filtered IVF search (nprobe raised by 1 / selectivity). Costs
    # are in units of one fp16 row gathered and scored exactly (0.25 us at d=512 on the
    # 2-core benchmark machine); a coarse centroid counts 1. Measured at 500k x 512:
    # - a row id of a probed list checked against the filter ("ivf-lists" plan): 0.04;
    ivf_list_visit_cost: float = 0.04
    # - a row visited by faiss's bitmap-filtered scan (IVF behind a pre-transform): 0.45;
    ivf_scan_visit_cost: float = 0.45
    # - a row of a repeated filter's contiguous copy (gather_cache_bytes): 0.3.
    gathered_row_cost: float = 0.3
    # Share of a flat shard at or below which gathering allowed rows beats a full scan.
    flat_subset_fraction: float = 0.3
    # Caps on the raised search parameters (nprobe is also capped at nlist).
    max_ef_search: int = 4096
    # False routes every shard as if it were on GPU (no IDSelector, no SearchParameters):
    # the CPU twin of the GPU path, which the test suite checks against the oracle.
    use_selectors: bool = True
    # Selector-less filtered search fetches k * k_factor / selectivity * this many rows
    # before dropping disallowed ones: 2x absorbs uneven spread of matches over the
    # ranking, so the exact fallback stays rare.
    overfetch_margin: float = 2.0
    # Largest k (and nprobe) asked of a selector-less index: FAISS GPU's top-k limit
    # (GPU_MAX_SELECTION_K); a bigger fetch scans exactly on CPU instead.
    max_index_k: int = 2048
    # Memory for contiguous copies of the allowed rows of repeated filters (per open
    # index version; 0 disables). A filter's rows are copied on its first exact-subset
    # scan (at most exact_max_rows rows per shard), so later queries with the same
    # filter scan contiguous memory instead of gathering scattered rows again.
    gather_cache_bytes: int = 256 << 20
    # Store flat shards in float16 on GPU (half the memory and scan bandwidth; results
    # are rescored exactly from float32, so rankings equal the CPU path's).
    gpu_flat_fp16: bool = True

    def __post_init__(self) -> None:
        if (
            self.exact_max_rows < 0
            or self.ivf_exact_max_rows < 0
            or not 0.0 <= self.flat_subset_fraction <= 1.0
        ):
            raise ValueError("exact_max_rows must be >= 0 and flat_subset_fraction in [0, 1]")
        costs = (self.ivf_list_visit_cost, self.ivf_scan_visit_cost, self.gathered_row_cost)
        if min(*costs, self.gather_cache_bytes) < 0:
            raise ValueError("planner costs and gather_cache_bytes must be >= 0")
        if self.overfetch_margin < 1.0 or self.max_index_k < 1:
            raise ValueError("overfetch_margin must be >= 1 and max_index_k >= 1")


class GatherBudget:
    """Thread-safe byte budget shared by the :class:`AllowedRows` of one index version."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        with self._lock:
            if self.used + nbytes > self.limit:
                return False
            self.used += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes


class AllowedRows:
    """The rows one shard may return to a query: the mask, its count, the row ids (made
    on first use) and, with a budget, a contiguous copy of the rows' vectors.

    The engine keeps one per shard for a cached filter (filter AND live, shared by the
    queries that repeat the filter; from its first exact scan on, the rows' vectors are
    copied into one contiguous index while the budget allows) and one per tombstoned
    shard for unfiltered queries (no budget: never copied).

    Measured at 1M x 512 (2 shards, 1% of rows): the contiguous copy scans in about half
    the time of gathering the same 5000 scattered rows per query.
    """

    def __init__(self, mask: np.ndarray, budget: GatherBudget | None = None) -> None:
        # bool [rows]: True for a row the query may return.
        self.mask = mask
        self.count = int(np.count_nonzero(mask))
        self._budget = budget
        self._lock = threading.Lock()
        self._gathered: GatheredRows | None = None
        self._source: np.ndarray | None = None
        self._refused = False

    @functools.cached_property
    def rows(self) -> np.ndarray:
        """Allowed row offsets, made on first use (8 bytes per row: broad filters that
        never take an exact scan never pay for them); racing threads make equal arrays."""
        return np.flatnonzero(self.mask)

    def can_gather(self, source: np.ndarray, max_rows: int) -> bool:
        """Whether :meth:`gathered` would (probably) return a copy of ``source``'s rows."""
        if self._gathered is not None:
            return self._source is source
        if self._budget is None or self._refused or self.count > max_rows:
            return False
        if source.dtype not in (np.float16, np.float32):
            return False
        nbytes = self.count * source.shape[1] * source.dtype.itemsize
        return self._budget.used + nbytes <= self._budget.limit

    def gathered(self, source: np.ndarray, max_rows: int) -> GatheredRows | None:
        """The contiguous copy of ``source[rows]``, made on first call; None when the
        rows are too many, the budget is spent, or a different source was copied."""
        if self.count > max_rows or source.dtype not in (np.float16, np.float32):
            return None
        budget = self._budget
        if budget is None:
            return None
        with self._lock:  # concurrent first queries wait for one copy, not make two
            if self._gathered is None and not self._refused:
                nbytes = self.count * source.shape[1] * source.dtype.itemsize
                if budget.reserve(nbytes):
                    self._gathered, self._source = GatheredRows(source, self.rows), source
                else:
                    self._refused = True
            return self._gathered if self._source is source else None

    def release(self) -> None:
        """Give the copy's bytes back (the filter left the cache). Queries still
        scanning it keep their own reference until they finish."""
        with self._lock:
            if self._gathered is not None and self._budget is not None:
                self._budget.release(self._gathered.nbytes)
            self._gathered, self._source, self._refused = None, None, True


class IvfLists:
    """The row ids of every inverted list of a CPU IVF index, as CSR arrays built on
    first use (8 bytes per row), and the index's coarse quantizer.

    A filtered query probes lists like the index would, then scores only the allowed
    rows of those lists, exactly, from the fp16 vectors: the lists' codes are never
    scanned. faiss's bitmap-filtered scan reads every code of every probed list (10
    lists at 10% selectivity: ~1.2 ms per 500k-row shard); this reads their ids and
    gathers a tenth of their rows (~0.3 ms), with the same lists and exact scores.
    """

    def __init__(self, ivf: Any) -> None:
        self._ivf = ivf
        self._lock = threading.Lock()
        self._csr: tuple[np.ndarray, np.ndarray] | None = None

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            if self._csr is None:
                import faiss

                lists = self._ivf.invlists
                sizes = np.array([lists.list_size(i) for i in range(lists.nlist)], np.int64)
                offsets = np.concatenate([[0], np.cumsum(sizes)])
                ids = np.empty(int(offsets[-1]), np.int64)
                for i in np.flatnonzero(sizes):
                    ptr = lists.get_ids(int(i))
                    ids[offsets[i] : offsets[i + 1]] = faiss.rev_swig_ptr(ptr, int(sizes[i]))
                    lists.release_ids(int(i), ptr)
                self._csr = (offsets, ids)
            return self._csr

    def probe(self, xq: np.ndarray, nprobe: int) -> np.ndarray:
        """The ``nprobe`` lists each query visits (int64 ``[nq, nprobe]``, -1 = none)."""
        _, lists = self._ivf.quantizer.search(xq, nprobe)
        return np.asarray(lists, dtype=np.int64)

    def allowed_rows(self, lists: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """Sorted allowed row offsets in ``lists`` (one query's probe)."""
        offsets, ids = self._arrays()
        lists = lists[lists >= 0]
        starts, ends = offsets[lists], offsets[lists + 1]
        sizes = ends - starts
        total = int(sizes.sum())
        if total == 0:
            return np.zeros(0, np.int64)
        # positions starts[j] .. ends[j] - 1 of every probed list, without a Python loop
        shift = np.repeat(starts - np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes)
        rows = ids[np.arange(total) + shift]
        return np.sort(rows[allowed[rows]])


@dataclass(frozen=True, eq=False)
class ShardSearcher:
    """An immutable, thread-safe view of one loaded shard."""

    record: ShardRecord
    # faiss index to search: the CPU index (never mutated when searched with selectors)
    # or its GPU copy.
    index: Any
    # float16 [rows, dim], memory-mapped: exact vectors for rescoring and subset scans.
    vectors: np.ndarray
    # float32 [rows, dim] view of a flat index's vectors, or None for ANN indexes.
    codes: np.ndarray | None
    # Contiguous metadata table (one chunk per column).
    metadata: pa.Table
    # bool [rows]: False for tombstoned rows; None when no row is tombstoned.
    live: np.ndarray | None
    # The rows an unfiltered query may return (``live`` as AllowedRows, so its row ids
    # are made once per version); None when every row may be returned.
    unfiltered: AllowedRows | None
    # The planner thresholds this shard is searched with.
    config: PlannerConfig
    # "flat", "ivf", "hnsw" or "other" (searched with FAISS defaults + exact fallback).
    kind: str
    # Manifest search parameters (nprobe / efSearch / k_factor).
    params: dict[str, int]
    # nlist of an IVF index (0 otherwise).
    nlist: int
    # "cpu" or "cuda:N" (see clipsearch.retrieval.placement).
    placement: str = "cpu"
    # Whether the index takes SearchParameters with an IDSelector (False on GPU).
    supports_selector: bool = True
    # Guards set-parameters-then-search on a selector-less index (shared per GPU).
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Whether the index stores flat vectors in float16 (over-fetch, rescore from codes).
    fp16: bool = False
    # Inverted lists of a CPU IVF index searched directly (not behind a pre-transform).
    lists: IvfLists | None = None
    # Whether the ANN index's scores are exact inner products (a CPU IVF-Flat or
    # HNSW-Flat: its codes are the shard's vectors, which the writer builds it from after
    # rounding them to fp16), so its top k is taken as is: no over-fetch, and no
    # rescoring, which would read the fp16 copy to compute the same scores. 1M rows in
    # 4 IVF-Flat shards: 0.28 ms of a 2.2 ms query.
    exact_scores: bool = False

    @classmethod
    def create(
        cls,
        record: ShardRecord,
        index: Any,
        vectors: np.ndarray,
        metadata: pa.Table,
        tombstones: np.ndarray,
        *,
        config: PlannerConfig | None = None,
        placed: Placed | None = None,
    ) -> ShardSearcher:
        """A searcher over the CPU ``index``; ``placed`` holds its GPU copy, if any;
        ``config`` (default ``PlannerConfig()``) sets the planner's thresholds."""
        import faiss

        codes = flat_codes(index)
        kind, nlist = "other", 0
        if codes is not None:
            kind = "flat"
        else:
            try:
                ivf = faiss.extract_index_ivf(index)
                kind, nlist = "ivf", int(ivf.nlist)
            except RuntimeError:
                if hasattr(faiss.downcast_index(index), "hnsw"):
                    kind = "hnsw"
        live = None
        if len(tombstones):
            dead = (tombstones >= record.row_id_start) & (tombstones < record.row_id_end)
            if dead.any():
                live = np.ones(record.rows, dtype=bool)
                live[tombstones[dead] - record.row_id_start] = False
        where = placed or Placed(index=index, placement=CPU)
        lists = None
        top = faiss.downcast_index(index)
        if kind == "ivf" and not where.on_gpu and isinstance(top, faiss.IndexIVF):
            lists = IvfLists(top)
        exact_scores = (
            not where.on_gpu
            and isinstance(top, (faiss.IndexIVFFlat, faiss.IndexHNSWFlat))
            and top.metric_type == faiss.METRIC_INNER_PRODUCT
        )
        return cls(
            record=record,
            index=where.index,
            vectors=vectors,
            codes=codes,
            metadata=metadata.combine_chunks(),
            live=live,
            unfiltered=AllowedRows(live) if live is not None else None,
            config=config or PlannerConfig(),
            kind=kind,
            params=dict(record.index.search_params),
            nlist=nlist,
            placement=where.placement,
            supports_selector=not where.on_gpu,
            lock=where.lock,
            fp16=where.fp16,
            lists=lists,
            exact_scores=exact_scores,
        )

    @property
    def rows(self) -> int:
        return self.record.rows

    def search(
        self, xq: np.ndarray, k: int, allowed: AllowedRows | None, *, least: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """Top-``k`` of every query over the allowed rows of this shard.

        Args:
            xq: float32 ``[nq, dim]`` query vectors.
            allowed: the rows the query may return (filter AND live; the engine's cached
                form for a repeated filter, whose exact subset scans reuse its rows and
                their contiguous copy), or None for every row.
            least: the rows per query the caller needs (default ``k``): an ANN search
                (``ann``, ``ann-filtered``) whose probed lists hold at least that many
                (but fewer than ``k``) is not retried wider (:data:`ESCALATION`). A
                hybrid query asks for ``fusion_depth`` rows to fuse but needs only its
                page's: 13% of 100-row searches on 250k-row IVF shards at nprobe 2
                came back short, each retry a second search.
        Returns:
            ``(D, I, plan)``: exact float32 scores ``[nq, k']`` descending and int64 local
            row offsets ``[nq, k']`` with ``k' = min(k, allowed rows)`` (with ``least``,
            ``min(least, allowed rows) <= k'``); the plan name.
        """
        n_allowed = self.rows if allowed is None else allowed.count
        k = min(k, n_allowed)
        if k <= 0:
            empty = np.zeros((xq.shape[0], 0))
            return empty.astype(np.float32), empty.astype(np.int64), "empty"
        if allowed is not None and self._scan_allowed_rows(allowed):
            d, i = self._subset(xq, allowed, k)
            return d, i, "exact-subset"
        mask = None if allowed is None else allowed.mask
        if not self._uses_selectors:
            return self._search_selectorless(xq, k, mask, n_allowed)
        if self.codes is not None:
            d, i = self._exact(xq, k, mask)
            return d, i, "exact"
        if mask is not None and self.lists is not None:
            result = self._ivf_lists(xq, k, mask, n_allowed)
        else:
            result = self._ann(xq, k, mask, n_allowed, least=least)
        if result is None:
            d, i = self._exact(xq, k, mask)
            return d, i, "ann->exact"
        return result

    @property
    def _uses_selectors(self) -> bool:
        """Whether filters go to the index as IDSelectors (CPU), else the GPU routing."""
        return self.supports_selector and self.config.use_selectors

    def _scan_allowed_rows(self, allowed: AllowedRows) -> bool:
        """The one rule for "few allowed rows -> exact scan of just those rows", for both
        routings (with and without selectors).

        Flat shards: a small share of the shard (``flat_subset_fraction``). HNSW and
        other ANN shards: at most ``exact_max_rows``. IVF shards: always at or below
        ``ivf_exact_max_rows``, never above ``exact_max_rows``; in between, with
        selectors, a cost model compares the scan with the filtered IVF search; without
        selectors (GPU) the index is over-fetched instead (its cost is not modelled).
        """
        config, n_allowed = self.config, allowed.count
        if self.codes is not None:
            return n_allowed <= self.rows * config.flat_subset_fraction
        if self.kind != "ivf":
            return n_allowed <= config.exact_max_rows
        if n_allowed <= config.ivf_exact_max_rows:
            return True
        if n_allowed > config.exact_max_rows or not self._uses_selectors:
            return False
        knob = self._knob(self.rows / max(1, n_allowed), 0)
        probed = knob[1] if knob is not None else self.nlist
        visited = min(self.rows, probed * self.rows / max(1, self.nlist))
        if self.lists is not None:  # centroids scored, ids checked, allowed rows gathered
            selectivity = n_allowed / max(1, self.rows)
            search = self.nlist + visited * (config.ivf_list_visit_cost + selectivity)
        else:
            search = visited * config.ivf_scan_visit_cost
        gathered = allowed.can_gather(self.vectors, config.exact_max_rows)
        return n_allowed * (config.gathered_row_cost if gathered else 1.0) <= search

    def _exact(
        self, xq: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the allowed rows: a flat shard's float32 codes, masked, or
        the fp16 vectors of the allowed rows (the fallback of every index plan)."""
        if self.codes is not None:
            return exact_search(xq, self.codes, k, mask=allowed)
        rows = np.arange(self.rows) if allowed is None else np.flatnonzero(allowed)
        return subset_search(xq, self.vectors, rows, k)

    def _subset(
        self, xq: np.ndarray, allowed: AllowedRows, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the allowed rows of the shard's exact vectors (a flat
        shard's float32 codes, else the fp16 vectors), from their contiguous copy when
        ``allowed`` has or can make one."""
        source = self.codes if self.codes is not None else self.vectors
        gathered = allowed.gathered(source, self.config.exact_max_rows)
        if gathered is not None:
            return gathered.search(xq, k)
        return subset_search(xq, source, allowed.rows, k)

    def _ivf_lists(
        self,
        xq: np.ndarray,
        k: int,
        allowed: np.ndarray,
        n_allowed: int,
    ) -> tuple[np.ndarray, np.ndarray, str] | None:
        """Filtered IVF through :class:`IvfLists`; None when some query stays short."""
        lists = self.lists
        assert lists is not None  # only called for shards that have them
        boost = self.rows / max(1, n_allowed)
        knob = self._knob(boost, k)
        probes = lists.probe(xq, knob[1] if knob else self.nlist)  # one call per batch
        ds, ids = [], []
        for qi in range(xq.shape[0]):
            rows = lists.allowed_rows(probes[qi], allowed)
            query_knob = knob
            for raise_by in ESCALATION[1:]:  # a short query alone probes more lists
                if len(rows) >= k or not self._can_raise(query_knob):
                    break
                query_knob = self._knob(boost * raise_by, k)
                nprobe = query_knob[1] if query_knob else self.nlist
                rows = lists.allowed_rows(lists.probe(xq[qi : qi + 1], nprobe)[0], allowed)
            if len(rows) < k:
                return None
            d, i = subset_search(xq[qi : qi + 1], self.vectors, rows, k)
            ds.append(d)
            ids.append(i)
        return np.concatenate(ds), np.concatenate(ids), "ivf-lists"

    def _ann(
        self,
        xq: np.ndarray,
        k: int,
        allowed: np.ndarray | None,
        n_allowed: int,
        *,
        least: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, str] | None:
        """ANN search + exact rescoring; None when some query stays short (see
        ESCALATION): fewer than ``least`` (default ``k``) rows, whatever the knob."""
        need = k if least is None else max(1, min(least, k))
        selectivity = n_allowed / max(1, self.rows)
        k_factor = 1 if self.exact_scores else max(1, self.params.get("k_factor", 1))
        fetch = min(n_allowed, k * k_factor)
        bitmap = None
        selector = None
        if allowed is not None:
            import faiss

            bitmap = np.packbits(allowed, bitorder="little")
            selector = faiss.IDSelectorBitmap(self.rows, faiss.swig_ptr(bitmap))
        for raise_by in ESCALATION:
            search_params, keep, knob = self._search_params(selector, selectivity, fetch, raise_by)
            try:
                scores, ids = self.index.search(xq, fetch, params=search_params)
            except RuntimeError as e:  # an index type that rejects selectors / parameters
                log.debug("shard %s: ANN search failed (%s); exact fallback", self.record.name, e)
                return None
            del search_params, keep  # the search is done; they only had to outlive it
            valid = ids >= 0
            found = int(valid.sum(axis=1).min())
            if found >= need:
                break
            if not self._can_raise(knob):
                return None
        else:
            return None
        del bitmap, selector
        k = min(k, found)  # every query's best k are valid rows
        safe = np.where(valid, ids, 0)
        if not self.exact_scores:  # approximate (PQ) scores: the fp16 vectors' exact ones
            scores = rescore(xq, self.vectors, safe)
        d, i = _best(scores, safe, valid, k)
        return d, i, "ann" if allowed is None else "ann-filtered"

    def _search_params(
        self,
        selector: Any,
        selectivity: float,
        fetch: int,
        raise_by: float = 1.0,
    ) -> tuple[Any, Any, tuple[str, int] | None]:
        """(SearchParameters, an object to keep alive while they are used, the knob)."""
        import faiss

        boost = 1.0 / max(selectivity, 1e-9) if selector is not None else 1.0
        knob = self._knob(boost * raise_by, fetch)
        if knob is not None and knob[0] == "nprobe":
            inner: Any = faiss.SearchParametersIVF()
            inner.nprobe = knob[1]
        elif knob is not None:
            inner = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
            inner.efSearch = knob[1]
        else:
            inner = faiss.SearchParameters()
        if selector is not None:
            inner.sel = selector
        top = faiss.downcast_index(self.index)
        if isinstance(top, faiss.IndexPreTransform):
            outer = faiss.SearchParametersPreTransform()
            outer.index_params = inner
            if selector is not None:
                outer.sel = selector
            return outer, inner, knob  # the caller keeps `inner` alive while `outer` is used
        return inner, None, knob

    def _can_raise(self, knob: tuple[str, int] | None) -> bool:
        """Whether a search that came back short can be retried with a larger knob."""
        if knob is None:
            return False
        cap = self.nlist if knob[0] == "nprobe" else self.config.max_ef_search
        return knob[1] < cap

    def _knob(self, boost: float, fetch: int) -> tuple[str, int] | None:
        """The search parameter for ``fetch`` results, raised by ``boost`` (1 / selectivity)."""
        if self.kind == "ivf":
            nprobe = self.params.get("nprobe", 1)
            return "nprobe", int(min(self.nlist, max(nprobe, math.ceil(nprobe * boost))))
        if self.kind == "hnsw":
            ef = max(self.params.get("efSearch", 16), fetch)
            ef = min(self.config.max_ef_search, max(ef, math.ceil(ef * boost)))
            return "efSearch", int(max(ef, fetch))
        return None

    # -------------------------------------------------- selector-less (GPU) routing

    def _search_selectorless(
        self, xq: np.ndarray, k: int, allowed: np.ndarray | None, n_allowed: int
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """The GPU routing of :meth:`search` (module docstring): no selector, ever.
        Few allowed rows were already scanned exactly (:meth:`_scan_allowed_rows`)."""
        result = self._index_search(xq, k, allowed, n_allowed)
        if result is not None:
            return result
        d, i = self._exact(xq, k, allowed)
        return d, i, "index->exact"

    def _index_search(
        self,
        xq: np.ndarray,
        k: int,
        allowed: np.ndarray | None,
        n_allowed: int,
    ) -> tuple[np.ndarray, np.ndarray, str] | None:
        """Search the index without selector, post-filter, rescore exactly.

        None when the fetch would exceed ``config.max_index_k``, the index fails, or
        some query keeps fewer than ``k`` allowed rows (the caller scans exactly).
        """
        config = self.config
        selectivity = n_allowed / max(1, self.rows)
        per_k = max(1, self.params.get("k_factor", 1), 2 if self.fp16 else 1)
        want = k * per_k
        if allowed is not None:
            want = math.ceil(want / max(selectivity, 1e-9) * config.overfetch_margin)
        fetch = min(self.rows, want)
        if fetch > config.max_index_k:
            return None
        boost = 1.0 / max(selectivity, 1e-9) if allowed is not None else 1.0
        knob = self._knob(boost, fetch)
        if knob is not None and knob[0] == "nprobe":  # GPU IVF caps nprobe like k
            knob = ("nprobe", min(knob[1], config.max_index_k))
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        try:
            # Parameters live on the index, so setting them and searching is one step.
            with self.lock:
                if knob is not None:
                    self._parameter_space().set_index_parameter(self.index, *knob)
                _, ids = self.index.search(xq, fetch)
        except RuntimeError as e:
            log.debug("shard %s: index search failed (%s); exact fallback", self.record.name, e)
            return None
        valid = ids >= 0
        safe = np.where(valid, ids, 0)
        if allowed is not None:
            valid &= allowed[safe]
        if (valid.sum(axis=1) < k).any():
            return None
        source = self.codes if self.codes is not None else self.vectors
        d, i = _best(rescore(xq, source, safe), safe, valid, k)
        return d, i, "index" if allowed is None else "index-overfetch"

    def _parameter_space(self) -> Any:
        import faiss

        if self.placement == CPU:
            return faiss.ParameterSpace()
        return faiss.GpuParameterSpace()


def _best(
    scores: np.ndarray, safe: np.ndarray, valid: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` candidates per query by ``scores`` (``[nq, m]``, one per row of
    ``safe``; rows where ``valid`` is False are dropped), ties broken by row: as float32
    scores and int64 rows."""
    scores = np.where(valid, scores, -np.inf)
    order = np.lexsort((safe, -scores), axis=1)[:, :k]
    return (
        np.take_along_axis(scores, order, axis=1).astype(np.float32),
        np.take_along_axis(safe, order, axis=1).astype(np.int64),
    )
