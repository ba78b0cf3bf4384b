"""Choosing, training and tuning the FAISS index of one shard.

``build_ann`` turns a shard's vectors into a FAISS index plus the :class:`IndexSpec` the
manifest records. ``auto`` picks from the row count, dim and a memory budget:

* up to ``flat_max_rows`` rows: exact ``Flat`` (a 50k x 512 scan is ~5 ms; nothing to tune);
* larger, when full float32 vectors fit the budget: ``IVF{nlist},Flat``;
* otherwise ``IVF{nlist},PQ{m}x4fs`` (4-bit fast-scan PQ) with exact re-ranking of
  ``k * k_factor`` candidates from the stored fp16 vectors.

Approximate indexes are then tuned: the search knob (``nprobe`` / ``efSearch``) walks up
a doubling ladder until recall@10 against exact search reaches the target; IVF-PQ walks
one ladder per re-ranking depth and keeps the cheapest setting that reaches it (see
``_tune_pq``). The tuning queries are shard rows held out of the training sample, and
each query's own row is removed from both result lists (leave-one-out), so a query that
simply finds itself does not inflate the score.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipsearch.retrieval.errors import ConfigError
from clipsearch.retrieval.manifest import IndexSpec
from clipsearch.retrieval.progress import Progress, ProgressCallback, ignore
from clipsearch.retrieval.store import apply_search_params

log = logging.getLogger(__name__)

NAMED_KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw")
# Re-ranking depth for PQ: fetch k * 32 candidates, rescore exactly (a few hundred fp16
# dot products per query, negligible next to scanning the inverted lists).
PQ_K_FACTOR = 32
# IVF-PQ re-ranking depths tried while tuning (each walks its own nprobe ladder), and the
# smallest recall gain of one nprobe doubling that counts as "probing more still helps".
_PQ_K_FACTORS = (PQ_K_FACTOR, 2 * PQ_K_FACTOR, 4 * PQ_K_FACTOR, 8 * PQ_K_FACTOR)
_PQ_MIN_GAIN = 0.002
_LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_RECALL_AT = 10


@dataclass(frozen=True, kw_only=True)
class IndexOptions:
    """How shard indexes are chosen and tuned."""

    # "auto", "flat", "ivf", "ivfpq", "hnsw", or any FAISS factory string ("IVF64,Flat").
    index: str = "auto"
    # recall@10 the search parameters are tuned to reach.
    target_recall: float = 0.95
    # Budget in bytes for one shard's in-memory FAISS index (None: unlimited); decides
    # between IVF-Flat (4*dim bytes/vector) and IVF-PQ (dim/16 bytes/vector) under auto.
    max_memory: int | None = None
    # auto uses exact search up to this many rows per shard.
    flat_max_rows: int = 50_000
    # Held-out queries used to measure recall while tuning.
    tune_queries: int = 200
    # Seed for the training sample and the held-out queries (builds are reproducible).
    seed: int = 0
    # "auto" (GPU when faiss reports one), "cpu" or "gpu".
    device: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 < self.target_recall <= 1.0:
            raise ConfigError(f"target recall must be in (0, 1], got {self.target_recall}")
        if self.max_memory is not None and self.max_memory <= 0:
            raise ConfigError(f"max memory must be positive, got {self.max_memory}")
        if self.flat_max_rows < 0 or self.tune_queries < 1:
            raise ConfigError("flat_max_rows must be >= 0 and tune_queries >= 1")
        if self.device not in ("auto", "cpu", "gpu") and not self.device.startswith("cuda"):
            raise ConfigError(
                f"index device must be auto, cpu, gpu or cuda[:N], got {self.device!r}"
            )
        if not self.index.strip():
            raise ConfigError(
                "index type is empty; use auto, flat, ivf, ivfpq, hnsw or a factory string"
            )

    def to_dict(self) -> dict[str, Any]:
        """Every option that decides the index a shard gets (recorded per shard in the
        manifest as ``IndexSpec.build_options``); ``device`` is left out: where k-means
        runs does not change what is built."""
        return {
            "index": self.index,
            "target_recall": self.target_recall,
            "max_memory": self.max_memory,
            "flat_max_rows": self.flat_max_rows,
            "tune_queries": self.tune_queries,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, device: str = "auto") -> IndexOptions:
        """The options a shard was built with (``to_dict`` output); unknown keys (from a
        newer clipsearch) are ignored, missing ones take their defaults."""
        names = {"index", "target_recall", "max_memory", "flat_max_rows", "tune_queries", "seed"}
        return cls(**{k: v for k, v in d.items() if k in names}, device=device)

    @classmethod
    def for_shard(cls, spec: IndexSpec, *, device: str = "auto") -> IndexOptions:
        """The options to rebuild a shard with: its recorded build options, or, for a
        manifest that predates them, the index family of the factory it got (so an
        ``IVF..,PQ..x4fs`` shard stays IVF-PQ) and its target recall."""
        if spec.build_options is not None:
            return cls.from_dict(spec.build_options, device=device)
        kind = spec.requested
        if kind in NAMED_KINDS:
            factory = spec.factory
            if factory.startswith("IVF") and "PQ" in factory:
                kind = "ivfpq"
            elif factory.startswith("IVF"):
                kind = "ivf"
            elif factory.startswith("HNSW"):
                kind = "hnsw"
            elif factory == "Flat" and kind != "auto":
                kind = "flat"
        return cls(index=kind, target_recall=spec.target_recall or 0.95, device=device)


def parse_memory(text: str) -> int:
    """``"512M"``, ``"2G"``, ``"1.5GiB"``, ``"1000000"`` -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if t and t[-1] in scale:
            return int(float(t[:-1]) * scale[t[-1]])
        return int(float(t))
    except ValueError as e:
        raise ConfigError(f"cannot read memory size {text!r}; use e.g. 512M or 4G") from e


def choose_factory(n: int, dim: int, options: IndexOptions) -> str:
    """The FAISS factory string for ``n`` vectors of ``dim`` under ``options``."""
    kind = options.index.strip()
    if kind not in NAMED_KINDS:
        return kind  # a factory string, validated when FAISS builds it
    if kind == "flat" or n == 0:
        return "Flat"
    nlist = _nlist(n)
    if kind == "auto":
        if n <= options.flat_max_rows:
            return "Flat"
        if options.max_memory is None or n * (4 * dim + 8) <= options.max_memory:
            return f"IVF{nlist},Flat"
        kind = "ivfpq"
    if kind == "ivf":
        return f"IVF{nlist},Flat"
    if kind == "hnsw":
        return "HNSW32"
    m = _pq_m(dim)
    return f"IVF{nlist},PQ{m}x4fs"


def _nlist(n: int) -> int:
    """~4*sqrt(n) lists, a power of two, with >= 39 training points per list (FAISS's floor)."""
    target = 4 * math.sqrt(n)
    nlist = 2 ** max(2, round(math.log2(max(target, 1))))
    while nlist > 4 and n < 39 * nlist:
        nlist //= 2
    return min(nlist, 65536)


def _pq_m(dim: int) -> int:
    """PQ sub-quantizers: dim/8 (64 for 512-d; 16 at least for small dims), even, dividing dim."""
    for m in range(max(2, dim // 8, min(dim // 2, 16)), 1, -1):
        if dim % m == 0 and m % 2 == 0:
            return m
    raise ConfigError(f"cannot product-quantize dim {dim}; use --index flat, ivf or hnsw")


def build_ann(
    vectors: np.ndarray, options: IndexOptions, progress: ProgressCallback | None = None
) -> tuple[Any, IndexSpec]:
    """Build, train, fill and tune the FAISS index of one shard.

    Args:
        vectors: float32 ``[n, dim]``, L2-normalised (the stored fp16 values, upcast, so
            that FAISS and exact rescoring see the same numbers).
        progress: gets stages "train index" (vectors in the training sample; only for
            indexes that need training), "fill index" (vectors added; the graph build of
            HNSW) and "tune index" (search settings tried; only for approximate indexes).
    Returns:
        (CPU faiss index with ids 0..n-1, the spec to record in the manifest).
    """
    import faiss

    xb = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = xb.shape
    factory = choose_factory(n, dim, options)
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ConfigError(
            f"FAISS cannot build index {factory!r} for dim {dim}: {e}; "
            "use auto, flat, ivf, ivfpq, hnsw or a valid factory string"
        ) from e
    report = progress or ignore
    trained_on = _train(index, xb, options, report) if not index.is_trained else None
    if n:
        report(Progress("fill index", 0, n, "vectors", detail={"index": factory}))
        index.add(xb)
        report(Progress("fill index", n, n, "vectors", detail={"index": factory}))
    spec = _tune(index, xb, factory, options, trained_on, report)
    return index, spec


def _train(
    index: Any, xb: np.ndarray, options: IndexOptions, report: ProgressCallback
) -> np.ndarray | None:
    """Train on a seeded sample; returns the sampled row ids (None: trained on all rows)."""
    import faiss

    ivf = faiss.extract_index_ivf(index) if _is_ivf(index) else None
    nlist = ivf.nlist if ivf is not None else 1
    if len(xb) < nlist:
        raise ConfigError(
            f"cannot train an index with {nlist} lists on {len(xb)} vectors; "
            "use a larger shard size or --index flat"
        )
    # 48 points per list is inside FAISS's recommended 39..256 and keeps k-means on 1M x 512
    # with 4096 lists to a few minutes on 2 cores; 16 iterations instead of 25 cost <1% recall.
    n_train = min(len(xb), max(48 * nlist, 10_000))
    rng = np.random.default_rng(options.seed)
    rows = np.sort(rng.choice(len(xb), n_train, replace=False)) if n_train < len(xb) else None
    sample = xb[rows] if rows is not None else xb
    if ivf is not None:
        ivf.cp.seed = options.seed + 1234
        ivf.cp.niter = 16
    # FAISS trains in one call: the stage opens at 0 and closes when training returns.
    detail = {"lists": nlist} if ivf is not None else {}
    report(Progress("train index", 0, len(sample), "vectors", detail=detail))
    if _use_gpu(options) and ivf is not None:
        _train_gpu(index, ivf, sample)
    else:
        log.info("training %s on %d vectors", type(index).__name__, len(sample))
        index.train(sample)
    report(Progress("train index", len(sample), len(sample), "vectors", detail=detail))
    return rows


def _use_gpu(options: IndexOptions) -> bool:
    import faiss

    if options.device == "cpu":
        return False
    has_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if options.device != "auto" and not has_gpu:
        raise ConfigError(
            f"index device {options.device!r} asked for, but faiss sees no GPU "
            "(install faiss-gpu or use --device cpu)"
        )
    return has_gpu


def _train_gpu(index: Any, ivf: Any, sample: np.ndarray) -> None:
    """Train the coarse quantizer with GPU k-means; the index itself stays in CPU form."""
    import faiss

    log.info("training %d-list coarse quantizer on GPU with %d vectors", ivf.nlist, len(sample))
    clus = faiss.Clustering(ivf.d, ivf.nlist, ivf.cp)
    gpu_quantizer = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
    clus.train(sample, gpu_quantizer)
    centroids = faiss.vector_float_to_array(clus.centroids).reshape(ivf.nlist, ivf.d)
    ivf.quantizer.reset()
    ivf.quantizer.add(centroids)
    ivf.quantizer_trains_alone = 0
    ivf.cp.niter = 0
    index.train(sample)  # trains the PQ (if any) on CPU; the quantizer is already set


def _is_ivf(index: Any) -> bool:
    import faiss

    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return True


def _is_hnsw(index: Any) -> bool:
    return hasattr(index, "hnsw")


def _tune(
    index: Any,
    xb: np.ndarray,
    factory: str,
    options: IndexOptions,
    trained_on: np.ndarray | None,
    report: ProgressCallback,
) -> IndexSpec:
    """Measure recall@10 of search settings (see the module docstring); ``report`` gets a
    "tune index" event per setting tried (total unknown until tuning stops)."""
    import faiss

    n = len(xb)
    is_pq = "PQ" in factory
    k_factor = PQ_K_FACTOR if is_pq else 1
    if _is_ivf(index):
        knob, top = "nprobe", faiss.extract_index_ivf(index).nlist
        ladder = list(_LADDER)
    elif _is_hnsw(index):
        knob, top = "efSearch", 4096
        ladder = [v for v in _LADDER if v >= 16]
    else:
        params = {"k_factor": k_factor} if k_factor > 1 else {}
        return IndexSpec(
            requested=options.index,
            factory=factory,
            search_params=params,
            build_options=options.to_dict(),
        )
    nq = min(options.tune_queries, n)
    if n <= _RECALL_AT + 1 or nq == 0:
        params = {knob: top, "k_factor": k_factor}
        return IndexSpec(
            requested=options.index,
            factory=factory,
            search_params=params,
            build_options=options.to_dict(),
        )
    report(Progress("tune index", 0, None, "settings", detail={"queries": nq}))
    qids = _tuning_queries(n, nq, trained_on, options.seed)
    truth = _exact_neighbours(xb, qids, _RECALL_AT)
    tried = 0

    def measure(p: dict[str, int]) -> float:
        nonlocal tried
        r = _recall(index, xb, qids, truth, p)
        tried += 1
        report(Progress("tune index", tried, None, "settings", detail={**p, "recall@10": r}))
        return r

    values = [v for v in ladder if v < top] + [top]
    if is_pq:
        nlist = faiss.extract_index_ivf(index).nlist
        recall, params = _tune_pq(
            measure, values, len(xb) / nlist, xb.shape[1], options.target_recall
        )
    else:
        recall, params = -1.0, {}
        for value in values:
            p = {knob: value, "k_factor": k_factor}
            r = measure(p)
            log.info("tuning %s: %s=%d recall@10=%.3f", factory, knob, value, r)
            if r > recall:
                recall, params = r, p
            if r >= options.target_recall:
                break
    report(Progress("tune index", tried, tried, "settings", detail={**params, "recall@10": recall}))
    if recall < options.target_recall:
        log.warning(
            "%s reaches only recall@10=%.3f < target %.3f at %s; consider --index flat",
            factory,
            recall,
            options.target_recall,
            params,
        )
    return IndexSpec(
        requested=options.index,
        factory=factory,
        search_params=params,
        measured_recall=round(recall, 4),
        target_recall=options.target_recall,
        build_options=options.to_dict(),
    )


def _tune_pq(
    measure: Callable[[dict[str, int]], float],
    nprobes: list[int],
    per_list: float,
    dim: int,
    target: float,
) -> tuple[float, dict[str, int]]:
    """The cheapest (nprobe, k_factor) of IVF-PQ + exact re-ranking that reaches ``target``.

    With coarse 4-bit codes recall is not monotonic in nprobe at a fixed re-ranking depth:
    probing more lists brings the true neighbours into reach but also more PQ-noise
    candidates that push them out of the top ``k * k_factor``. So every depth in
    ``_PQ_K_FACTORS`` walks its own nprobe ladder; a walk ends when it reaches the target
    (deeper walks then only try fewer probes), when recall has not improved for two
    steps, or when it has fallen well below the walk's best. Of the settings that reach
    the target the one with the lowest modelled search cost wins, else the best recall.
    ``measure`` returns the recall@10 of a setting; ``per_list`` is the mean list length.
    """
    best: tuple[float, dict[str, int]] = (-1.0, {})
    reached: list[tuple[float, float, dict[str, int]]] = []
    limit = nprobes[-1]
    for kf in _PQ_K_FACTORS:
        walk_best, stale = -1.0, 0
        for value in [v for v in nprobes if v <= limit]:
            params = {"nprobe": value, "k_factor": kf}
            recall = measure(params)
            log.info("tuning IVF-PQ: nprobe=%d k_factor=%d recall@10=%.3f", value, kf, recall)
            if recall > best[0]:
                best = (recall, params)
            if recall >= target:
                reached.append((_pq_cost(value, kf, per_list, dim), recall, params))
                limit = value  # a deeper re-rank is only worth it with fewer probes
                break
            if recall > walk_best + _PQ_MIN_GAIN:
                walk_best, stale = max(walk_best, recall), 0
            else:
                walk_best, stale = max(walk_best, recall), stale + 1
                if stale >= 2 or recall < walk_best - 0.01:
                    break  # this depth is saturated: the next, deeper one takes over
    if reached:
        _, recall, params = min(reached, key=lambda c: c[0])
        return recall, params
    return best


def _pq_cost(nprobe: int, k_factor: int, per_list: float, dim: int) -> float:
    """Modelled per-query cost, in units of one fast-scan PQ code: the probed lists plus
    the exact rescoring of ``10 * k_factor`` fp16 vectors. Measured on 100k x 512 (2-core
    x86, faiss 1.15): a fast-scan code costs ~0.04 us, gathering + upcasting + scoring one
    fp16 vector 2-10 us (more once the candidates outgrow the cache), so ~dim/2 codes."""
    return nprobe * per_list + _RECALL_AT * k_factor * dim / 2


def _tuning_queries(n: int, nq: int, trained_on: np.ndarray | None, seed: int) -> np.ndarray:
    """Rows to tune on: when the index was trained on a sample, rows outside it (held out
    of training, as a real query is); each query's own row is dropped from the results."""
    rng = np.random.default_rng(seed + 1)
    pool = np.arange(n)
    if trained_on is not None:
        rest = np.setdiff1d(pool, trained_on, assume_unique=True)
        if len(rest) >= nq:
            pool = rest
    return np.sort(rng.choice(pool, nq, replace=False))


def _exact_neighbours(xb: np.ndarray, qids: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids of each query row (its own id excluded), by blocked matmul."""
    xq = xb[qids]
    best_s = np.full((len(qids), k + 1), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(qids), k + 1), dtype=np.int64)
    for start in range(0, len(xb), 65536):
        block = xb[start : start + 65536]
        scores = xq @ block.T
        scores[qids[:, None] - start == np.arange(len(block))[None, :]] = -np.inf
        s = np.concatenate([best_s, scores], axis=1)
        i = np.concatenate(
            [best_i, np.broadcast_to(np.arange(start, start + len(block)), scores.shape)], axis=1
        )
        top = np.argpartition(-s, k, axis=1)[:, : k + 1]
        best_s = np.take_along_axis(s, top, axis=1)
        best_i = np.take_along_axis(i, top, axis=1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_i, order, axis=1)[:, :k]


def _recall(
    index: Any, xb: np.ndarray, qids: np.ndarray, truth: np.ndarray, params: dict[str, int]
) -> float:
    """recall@k of ``index`` searched with ``params`` (incl. exact re-ranking)."""
    k = truth.shape[1]
    apply_search_params(index, params)
    fetch = (k + 1) * params.get("k_factor", 1)
    _, ids = index.search(xb[qids], fetch)
    hits = 0
    for row, qid in enumerate(qids):
        cand = ids[row][(ids[row] >= 0) & (ids[row] != qid)]
        if params.get("k_factor", 1) > 1 and len(cand):
            scores = xb[cand] @ xb[qid]
            cand = cand[np.argsort(-scores, kind="stable")]
        hits += len(np.intersect1d(cand[:k], truth[row]))
    return hits / truth.size
