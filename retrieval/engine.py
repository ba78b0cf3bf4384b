"""The query engine: open a pinned index version, search it, rerank, return typed results.

``SearchEngine`` holds one immutable ``_State`` (the pinned snapshot, per-shard
searchers, the metadata schema). Every query reads ``self._state`` once and works on that
object only, so :meth:`SearchEngine.reload` can swap in a newer version at any time
without disturbing queries in flight. No query mutates shared objects: FAISS search
parameters are passed per call, masks are fresh arrays. The exception is a GPU shard
(:mod:`clipsearch.retrieval.placement`), whose index takes no per-call parameters: nprobe is set on
it and the search run under that GPU's lock.

The query path (DESIGN.md): compile the filter to per-shard masks (tombstones always
removed) -> start a hybrid query's lexical side -> encode -> search every shard of the
target modality with its plan (:mod:`clipsearch.retrieval.planner`; in parallel from
``SHARD_THREADS_FROM_CORES`` cores) -> merge the per-shard top lists -> rerank
(:mod:`clipsearch.retrieval.rerank`) -> page -> :class:`SearchResults`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Unpack

import numpy as np
import pyarrow as pa

from clipsearch.retrieval.arrow_convert import numpy_to_arrow, table_to_pylist
from clipsearch.retrieval.encoders import QUERY_THREADS, Encoder, encoder_from_fingerprint
from clipsearch.retrieval.errors import FingerprintMismatchError, InvalidOptionError, QueryError
from clipsearch.retrieval.filters import CompiledFilter, compile_filter, to_text
from clipsearch.retrieval.hybrid import plan_hybrid, query_vectors
from clipsearch.retrieval.kernels import (
    SMALL_NQ,
    configure_faiss,
    one_faiss_thread,
    single_threaded_worker,
)
from clipsearch.retrieval.manifest import FIXED_COLUMNS, Manifest
from clipsearch.retrieval.options import (
    AUTO,
    MAX_POOL,
    SearchOptions,
    SearchOverrides,
    resolve_options,
)
from clipsearch.retrieval.placement import ShardPlacer, usable_cores
from clipsearch.retrieval.planner import AllowedRows, GatherBudget, PlannerConfig, ShardSearcher
from clipsearch.retrieval.queries import classify, encode_queries
from clipsearch.retrieval.rerank import Candidates, default_pipeline, paginate, run_pipeline
from clipsearch.retrieval.results import Hit, SearchResults
from clipsearch.retrieval.store import Snapshot, open_snapshot

log = logging.getLogger(__name__)

# Rerank stages see at least this many candidates, so pages of a grouped, diversified
# or sorted ranking stay consistent for offset + k up to this size.
RERANK_WINDOW = 100
# Filter masks kept per version (a product site repeats a handful of filters).
MASK_CACHE_SIZE = 32
# Usable cores from which CPU ANN shards are searched in a pool, one thread per shard
# (see search_shards); below, one after the other.
SHARD_THREADS_FROM_CORES = 4


@dataclass(frozen=True, eq=False)
class _State:
    snapshot: Snapshot
    shards: tuple[ShardSearcher, ...]
    schema: pa.Schema
    masks: MaskCache
    # Numeric field -> (min, max) over every row (nulls as 0), filled on first use by a
    # boosted query: bounds how far a boost can lift a row the pool has not fetched.
    field_ranges: dict[str, tuple[float, float]]

    @property
    def version(self) -> int:
        return self.snapshot.version


class MaskCache:
    """Thread-safe LRU: canonical filter text -> what each shard allows (mask, count,
    rows and their gathered vectors; see AllowedRows), sharing one gather budget."""

    def __init__(self, size: int, gather_bytes: int) -> None:
        self.size = size
        self.budget = GatherBudget(gather_bytes)
        self.lock = threading.Lock()
        self.items: OrderedDict[str, tuple[AllowedRows, ...]] = OrderedDict()

    def get(self, key: str) -> tuple[AllowedRows, ...] | None:
        with self.lock:
            hit = self.items.get(key)
            if hit is not None:
                self.items.move_to_end(key)
            return hit

    def put(self, key: str, value: tuple[AllowedRows, ...]) -> None:
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                for allowed in self.items.popitem(last=False)[1]:
                    allowed.release()


class SearchEngine:
    """Search one index directory; safe to share between threads."""

    def __init__(
        self,
        root: Path,
        encoder: Encoder | None,
        state: _State,
        config: PlannerConfig,
        device: str,
        placer: ShardPlacer,
    ) -> None:
        self.root = root
        self.encoder = encoder
        self.config = config
        self.device = device
        self._placer = placer
        self._state = state
        self._reload_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, min(8, os.cpu_count() or 1)),
            thread_name_prefix="clipsearch-shard",
            initializer=single_threaded_worker,
        )
        self._shard_threads = usable_cores() >= SHARD_THREADS_FROM_CORES

    @classmethod
    def open(
        cls,
        path: str | Path,
        encoder: Encoder | None = None,
        device: str = "auto",
        *,
        config: PlannerConfig | None = None,
        threads: int | None = None,
        query_threads: int = QUERY_THREADS,
    ) -> SearchEngine:
        """Pin the live version at ``path`` and load it.

        Args:
            encoder: the encoder for text/image queries; must match the index's
                fingerprint. None re-creates it from the manifest.
            device: "auto", "cpu", "cuda", "cuda:N": the encoder's device (when the
                encoder is created here) and where shards live (:mod:`clipsearch.retrieval.placement`):
                "auto" moves Flat / IVF-Flat / IVF-PQ shards to every GPU a GPU build of
                faiss sees, "cuda" / "cuda:N" require one, "cpu" never touches a GPU.
                See :attr:`placement`.
            threads, query_threads: CPU threads of the encoder created here (ignored
                when ``encoder`` is given): ``query_threads`` (1 by default) for calls
                of up to 4 items, i.e. queries, so latency does not depend on how many
                cores torch or onnxruntime would grab on a busy machine; ``threads``
                (None: the runtime's default, every core) for larger batches. See
                :func:`clipsearch.retrieval.encoders.load_encoder`.
        Raises:
            IndexNotFoundError, IndexFormatError, FingerprintMismatchError;
            ConfigError for "cuda" without a GPU build of faiss (says how to install one).
        """
        root = Path(path)
        config = config or PlannerConfig()
        placer = ShardPlacer(device, fp16_flat=config.gpu_flat_fp16)
        snapshot = open_snapshot(root)
        if encoder is None:
            encoder = encoder_from_fingerprint(
                snapshot.manifest.encoder,
                device=device,
                threads=threads,
                query_threads=query_threads,
            )
        check_fingerprint(snapshot.manifest, encoder)
        configure_faiss(snapshot.dim)
        return cls(root, encoder, _build_state(snapshot, placer, config), config, device, placer)

    # ------------------------------------------------------------------ properties

    @property
    def version(self) -> int:
        return self._state.version

    @property
    def snapshot(self) -> Snapshot:
        """The pinned snapshot (manifest, loaded shards, tombstones) queries run against now."""
        return self._state.snapshot

    @property
    def manifest(self) -> Manifest:
        return self._state.snapshot.manifest

    @property
    def placement(self) -> dict[str, str]:
        """Shard name -> where its index is searched: "cpu" or "cuda:N"."""
        return {s.record.name: s.placement for s in self._state.shards}

    @property
    def schema(self) -> pa.Schema:
        """Metadata schema (fixed columns, then the user's) that filters are checked against."""
        return self._state.schema

    def target_modality(self, modality: str | None = None) -> str:
        """The rows a query with this ``modality`` option searches: ``modality`` itself,
        else "image" when the index has image rows, else "text"."""
        return _target(self._state, modality)

    def relevance_threshold(self, query_modality: str, modality: str | None = None) -> float:
        """What ``min_score="auto"`` resolves to for a ``query_modality`` ("text" or
        "image") query searching the rows ``modality`` selects (:meth:`target_modality`):
        the index model's calibrated threshold for that direction (a cosine).

        Raises:
            InvalidOptionError (option "min_score") when the model has no calibration for
            that direction; the message says which directions it has and how to fix it.
        """
        direction = f"{query_modality}->{self.target_modality(modality)}"
        return relevance_threshold(self.manifest, direction)

    def reload(self) -> bool:
        """Switch to the newest committed version; True when the version changed.

        Queries already running finish on the version they started with.
        """
        with self._reload_lock:
            snapshot = open_snapshot(self.root)
            if snapshot.version == self._state.version:
                return False
            if self.encoder is not None:
                check_fingerprint(snapshot.manifest, self.encoder)
            self._state = _build_state(snapshot, self._placer, self.config)
            log.info("%s: switched to version %d", self.root, snapshot.version)
            return True

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> SearchEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ queries

    def search(
        self,
        query: Any,
        options: SearchOptions | None = None,
        **overrides: Unpack[SearchOverrides],
    ) -> SearchResults:
        """Search with one query; see :meth:`search_batch`."""
        return self.search_batch([query], options, **overrides)[0]

    def search_batch(
        self,
        queries: Sequence[Any],
        options: SearchOptions | None = None,
        *,
        texts: Sequence[str | None] | None = None,
        **overrides: Unpack[SearchOverrides],
    ) -> list[SearchResults]:
        """Search with several queries at once (one encoder pass, one batched scan).

        Args:
            queries: texts (str), images (Path, bytes, PIL), numpy vectors, ComposedQuery.
            options: a :class:`~clipsearch.retrieval.options.SearchOptions` (k, offset,
                where, modality, group_by_doc, mmr, sort, min_score, boosts); None = the
                defaults (top 10 by relevance).
            overrides: any SearchOptions field by keyword, applied on top of ``options``
                (``engine.search("red mug", k=5, where="price < 30")``).
            texts: per query, the text lexical and hybrid modes match (None: none), for
                callers that pass queries already encoded as vectors (the service's
                batcher); default: the queries' own text (clipsearch.retrieval.hybrid).
        Raises:
            QueryError for bad options, FilterError for a filter that does not fit the
            index's schema.
        """
        t0 = time.perf_counter()
        opts = resolve_options(options, overrides)
        state = self._state
        if not queries:
            return []
        target = _target(state, opts.modality)
        if opts.min_score == AUTO:
            manifest = state.snapshot.manifest
            return search_auto(self.search_batch, queries, opts, texts, manifest, target)
        timings: dict[str, float] = {}
        tick = time.perf_counter()
        shards = [s for s in state.shards if s.record.modality == target]
        allowed = self._allowed(state, shards, opts.where)
        total = _allowed_total(shards, allowed)
        timings["filter"] = _ms(tick)
        # Lexical / hybrid queries wrap the search step (clipsearch.retrieval.hybrid);
        # their lexical side starts now and runs while the queries are encoded.
        lexical = {s.record.name: s.lexical for s in state.snapshot.shards}
        if texts is not None and len(texts) != len(queries):
            raise QueryError(f"{len(texts)} texts for {len(queries)} queries")
        words = queries if texts is None else texts
        hybrid = plan_hybrid(opts, words, shards, allowed, lexical, None, timings, target)
        if hybrid is not None:
            hybrid.start(first_pool(opts))
        tick = time.perf_counter()
        dim = state.snapshot.dim
        try:
            xq = query_vectors(
                hybrid, lambda: encode_queries(self.encoder, list(queries), dim), len(queries), dim
            )
        except BaseException:
            if hybrid is not None:
                hybrid.cancel()
            raise
        timings["encode"] = _ms(tick)
        search = functools.partial(self._search_shards, shards, allowed, xq)
        if hybrid is not None:
            search = functools.partial(hybrid.search, search)
        ranked, plans = rank_queries(
            opts,
            total=lambda: total,
            search=search,
            candidates=lambda merged, vectors: [
                _candidates(state, shards, m, xq[qi], vectors) for qi, m in enumerate(merged)
            ],
            headroom=lambda: _boost_headroom(state, opts),
            timings=timings,
        )
        results = page_results(ranked, opts, total, plans, timings, t0, state.version)
        return results if hybrid is None else hybrid.attach(results)

    def classify(self, image: Any, labels: Sequence[str]) -> list[tuple[str, float]]:
        """Zero-shot label probabilities for an image, highest first (CLIP recipe)."""
        if self.encoder is None:
            raise QueryError("classify needs an encoder")
        return classify(self.encoder, image, labels)

    def count(self, where: str | dict[str, Any] | None = None, modality: str | None = None) -> int:
        """Live rows of a modality (default: all) that pass ``where``."""
        state = self._state
        shards = [s for s in state.shards if modality is None or s.record.modality == modality]
        return _allowed_total(shards, self._allowed(state, shards, where))

    def allowed_rows(
        self, where: str | dict[str, Any] | None = None, modality: str | None = None
    ) -> tuple[Snapshot, dict[str, AllowedRows | None]]:
        """The pinned snapshot and, per shard name of the rows a query with ``modality``
        searches (:meth:`target_modality`), what ``where`` allows there: tombstones removed,
        None = every row. Taken from the filter cache queries share (read-only: facet
        counts, :mod:`clipsearch.retrieval.facets`)."""
        state = self._state
        target = _target(state, modality)
        shards = [s for s in state.shards if s.record.modality == target]
        allowed = self._allowed(state, shards, where)
        return state.snapshot, {s.record.name: a for s, a in zip(shards, allowed, strict=True)}

    # ------------------------------------------------------------------ internals

    def _allowed(
        self, state: _State, shards: list[ShardSearcher], where: str | dict[str, Any] | None
    ) -> tuple[AllowedRows | None, ...]:
        """Per shard, the rows the query may return (None: every row). A filter's
        AllowedRows are cached per version (``MASK_CACHE_SIZE``), with the rows' copy."""
        return allowed_rows(shards, where, state.schema, state.masks)

    def _search_shards(
        self,
        shards: list[ShardSearcher],
        allowed: tuple[AllowedRows | None, ...],
        xq: np.ndarray,
        pool: int,
        least: int | None = None,
    ) -> tuple[list[list[tuple[float, int, int]]], dict[str, str]]:
        """Per query, the merged best ``pool`` as (score, shard position, local row);
        ``least``: see :meth:`ShardSearcher.search`."""
        results = search_shards(self._pool, self._shard_threads, shards, allowed, xq, pool, least)
        plans = {s.record.name: r[2] for s, r in zip(shards, results, strict=True)}
        starts = [s.record.row_id_start for s in shards]
        merged = merge_shard_tops(starts, [(r[0], r[1]) for r in results], xq.shape[0], pool)
        return merged, plans


# --------------------------------------------------------------- shared query pieces
# The steps of a query that do not depend on where shards live: the local engine above
# and the distributed coordinator (clipsearch.retrieval.distributed) both run them.

# Per query, the merged best rows as (score, shard position, local row), best first.
Merged = list[list[tuple[float, int, int]]]


def query_modality(query: Any) -> str | None:
    """What a query is, for its relevance direction: "text" for a str or a ComposedQuery
    of texts only, "image" for an image (path, bytes, PIL, file) or a ComposedQuery with
    any non-text term (the service's rule too: "this photo, but red" is an image query);
    None for a bare vector, whose modality is unknown."""
    from clipsearch.retrieval.queries import ComposedQuery

    if isinstance(query, str):
        return "text"
    if isinstance(query, np.ndarray):
        return None
    if isinstance(query, ComposedQuery):
        return "text" if all(isinstance(t, str) for _, t in query.terms) else "image"
    return "image"


def relevance_threshold(manifest: Manifest, direction: str) -> float:
    """The calibrated relevance threshold (a cosine) of the index ``manifest``'s encoder
    for ``direction`` ("text->image", ...): what ``min_score="auto"`` means. The value
    recorded in the manifest at build time wins; else the model card's
    (:meth:`Manifest.relevance_threshold`).

    Raises:
        InvalidOptionError (option "min_score") when there is none: which directions the
        model is calibrated for, and how to fix it (a number, or a calibration).
    """
    from clipsearch.retrieval.models import DIRECTIONS

    value = manifest.relevance_threshold(direction)
    if value is not None:
        return value
    fingerprint = manifest.encoder
    model = f"{fingerprint.arch} (weights {fingerprint.pretrained!r})"
    known = [d for d in DIRECTIONS if manifest.relevance_threshold(d) is not None]
    fix = (
        "pass min_score as a number (a cosine such as 0.3), or calibrate the model on "
        "held-out data: `clipsearch demo-eval --calibration-seed N --write-card PATH` "
        "stores the thresholds it measures in the model card (docs/demo-model.md)"
    )
    if known:
        raise InvalidOptionError(
            "min_score",
            f"min_score 'auto': the index's model {model} has calibrated relevance "
            f"thresholds for {', '.join(known)} only, not for {direction} queries; {fix}",
        )
    raise InvalidOptionError(
        "min_score",
        f"min_score 'auto': the index's model {model} has no calibrated relevance "
        "threshold (only models whose model card holds a calibration for these very "
        f"weights do, such as the bundled clipsearch-demo); {fix}",
    )


def search_auto(
    search_batch: Callable[..., list[SearchResults]],
    queries: Sequence[Any],
    opts: SearchOptions,
    texts: Sequence[str | None] | None,
    manifest: Manifest,
    target: str,
) -> list[SearchResults]:
    """A ``min_score="auto"`` batch: each query runs with its direction's threshold as a
    plain numeric min_score (one ``search_batch`` call per threshold), so pool growth,
    the cutoff before sort and paging are exactly those of a numeric min_score.

    ``target``: the row modality the queries search (pinned for every call).
    Raises InvalidOptionError for a bare vector query (its direction is unknown) or a
    model without a threshold for a query's direction (:func:`relevance_threshold`).
    """
    if texts is not None and len(texts) != len(queries):
        raise QueryError(f"{len(texts)} texts for {len(queries)} queries")
    groups: dict[float, list[int]] = {}
    thresholds: dict[str, float] = {}  # query modality -> threshold (one card read each)
    for i, query in enumerate(queries):
        kind = query_modality(query)
        if kind is None:
            raise InvalidOptionError(
                "min_score",
                "min_score 'auto' needs to know what the query is (text or image) to pick "
                "its calibrated threshold, and a raw vector does not say; pass the threshold "
                "as a number: min_score=engine.relevance_threshold('text' or 'image')",
            )
        if kind not in thresholds:
            thresholds[kind] = relevance_threshold(manifest, f"{kind}->{target}")
        groups.setdefault(thresholds[kind], []).append(i)
    out: list[SearchResults | None] = [None] * len(queries)
    for threshold, members in groups.items():
        log.debug("min_score auto -> %.4f for %d quer(ies)", threshold, len(members))
        answers = search_batch(
            [queries[i] for i in members],
            opts.replace(min_score=threshold, modality=target),
            texts=None if texts is None else [texts[i] for i in members],
        )
        for i, answer in zip(members, answers, strict=True):
            out[i] = answer
    return [r for r in out if r is not None]


def allowed_rows(
    shards: Sequence[ShardSearcher],
    where: str | dict[str, Any] | None,
    schema: pa.Schema,
    masks: MaskCache,
) -> tuple[AllowedRows | None, ...]:
    """Per shard, the rows a query with filter ``where`` may return (None: every row;
    tombstoned rows are never allowed). A filter's AllowedRows are cached in ``masks``
    (keyed by the canonical filter and the shard names), with the rows' copy."""
    if where is None:
        return tuple(s.unfiltered for s in shards)
    compiled: CompiledFilter = compile_filter(where, schema)
    key = to_text(compiled.node) + "|" + ",".join(s.record.name for s in shards)
    cached = masks.get(key)
    if cached is None:
        out = []
        for s in shards:
            m = compiled.mask(s.metadata)
            out.append(AllowedRows(m if s.live is None else m & s.live, masks.budget))
        cached = tuple(out)
        masks.put(key, cached)
    return cached


def search_shards(
    pool: ThreadPoolExecutor,
    threads: bool,
    shards: Sequence[ShardSearcher],
    allowed: Sequence[AllowedRows | None],
    xq: np.ndarray,
    k: int,
    least: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """Every shard's (scores, local rows, plan) for the best ``k`` allowed rows of each
    query (:meth:`ShardSearcher.search`; ``least`` likewise), for the local engine and
    the distributed hosts alike.

    With ``threads`` (``SHARD_THREADS_FROM_CORES`` usable cores or more) and more than
    one of them, CPU ANN shards run in ``pool``, whose threads run faiss with one OpenMP
    thread each (faiss's 2-thread path for one query is 1.6x slower than 1 thread on
    small CPUs; shards give the parallelism instead). Otherwise they run one after the
    other in this thread, faiss on one OpenMP thread for up to ``SMALL_NQ`` queries (a
    batch keeps faiss's threads: they split its queries): on 2 cores, handing 4 shards to
    the pool cost more than the second core gave, and its threads fought a hybrid
    query's lexical side. Flat scans are memory-bound and BLAS already uses every core,
    so they run inline. GPU shards run in the pool: shards on different GPUs search
    concurrently.
    """

    def one(i: int) -> tuple[np.ndarray, np.ndarray, str]:
        return shards[i].search(xq, k, allowed[i], least=least)

    ann = [i for i, s in enumerate(shards) if s.kind != "flat" and s.placement == "cpu"]
    pooled = [i for i, s in enumerate(shards) if s.placement != "cpu"]
    if threads and len(ann) > 1:
        pooled += ann
    futures = {i: pool.submit(one, i) for i in pooled}
    with one_faiss_thread() if xq.shape[0] <= SMALL_NQ else contextlib.nullcontext():
        return [futures[i].result() if i in futures else one(i) for i in range(len(shards))]


def merge_shard_tops(
    row_starts: Sequence[int],
    results: Sequence[tuple[np.ndarray, np.ndarray]],
    n_queries: int,
    pool: int,
) -> Merged:
    """Merge per-shard top lists into the best ``pool`` per query.

    ``results[i]`` is shard i's (scores ``[nq, <=pool]`` descending, local rows); ties
    break on the global row id (``row_starts[i]`` + local row), so the order does not
    depend on which shard answered first. One sort over every shard's rows (a hybrid
    query merges 4 x 100 of them: 40 us, where a heap of Python tuples took 150 us).
    """
    parts = [
        (si, np.asarray(d, np.float32), np.asarray(i, np.int64))
        for si, (d, i) in enumerate(results)
        if np.ndim(d) == 2 and np.shape(d)[1]
    ]
    if not parts:
        return [[] for _ in range(n_queries)]
    scores = np.concatenate([d for _, d, _ in parts], axis=1)
    local = np.concatenate([i for _, _, i in parts], axis=1)
    shard = np.concatenate([np.full(i.shape[1], si, np.int64) for si, _, i in parts])
    gid = np.asarray(row_starts, np.int64)[shard] + local
    merged: Merged = []
    for qi in range(n_queries):
        best = np.lexsort((gid[qi], -scores[qi]))[:pool]
        merged.append(
            list(
                zip(
                    scores[qi, best].astype(np.float64).tolist(),
                    shard[best].tolist(),
                    local[qi, best].tolist(),
                    strict=True,
                )
            )
        )
    return merged


def first_pool(opts: SearchOptions) -> int:
    """The candidates a query's first search fetches (:func:`rank_queries` may grow it):
    the page, or the rerank window when a stage reranks."""
    return max(RERANK_WINDOW, opts.offset + opts.k) if opts.reranks else opts.offset + opts.k


def rank_queries(
    opts: SearchOptions,
    *,
    total: Callable[[], int],
    search: Callable[[int], tuple[Merged, dict[str, str]]],
    candidates: Callable[[Merged, bool], list[Candidates]],
    headroom: Callable[[], float],
    timings: dict[str, float],
) -> tuple[list[Candidates], dict[str, str]]:
    """Search, rerank and grow the candidate pool until no page can change.

    ``search(pool)`` gives the merged best ``pool`` per query and the per-shard plans;
    ``candidates(merged, with_vectors)`` their rows as :class:`Candidates`;
    ``headroom()`` the most boosts can add (:func:`_boost_headroom`); ``total()`` the
    rows the queries may return (asked after the first search, which may count them).
    Adds "search" and "rerank" to ``timings``.
    """
    stages = default_pipeline(opts, mmr_limit=opts.offset + opts.k)
    pool = first_pool(opts)
    while True:
        tick = time.perf_counter()
        merged, plans = search(pool)
        timings["search"] = timings.get("search", 0.0) + _ms(tick)
        tick = time.perf_counter()
        ranked = [run_pipeline(c, stages) for c in candidates(merged, opts.mmr is not None)]
        timings["rerank"] = timings.get("rerank", 0.0) + _ms(tick)
        if pool >= min(total(), MAX_POOL):
            break
        if not _needs_more(ranked, merged, opts, headroom()):
            break
        pool = min(MAX_POOL, pool * 4)
    return ranked, plans


def page_results(
    ranked: list[Candidates],
    opts: SearchOptions,
    total: int,
    plans: dict[str, str],
    timings: dict[str, float],
    t0: float,
    version: int,
) -> list[SearchResults]:
    """The requested page of each ranked list as :class:`SearchResults`."""
    tick = time.perf_counter()
    out = []
    for c in ranked:
        page, first_rank = paginate(c, opts.offset, opts.k)
        out.append(_hits(page, first_rank))
    timings["fetch"] = _ms(tick)
    timings["total"] = _ms(t0)
    return [
        SearchResults(
            hits=hits,
            timings=dict(timings),
            index_version=version,
            total_matches=total if opts.where is not None else None,
            plans=plans,
            min_score=opts.min_score if isinstance(opts.min_score, float) else None,
        )
        for hits in out
    ]


def check_fingerprint(manifest: Manifest, encoder: Encoder) -> None:
    """Raise FingerprintMismatchError naming every field where encoder and index differ."""
    diff = manifest.encoder.diff(encoder.fingerprint)
    if diff:
        fields = "; ".join(f"{k}: index has {a!r}, encoder has {b!r}" for k, (a, b) in diff.items())
        raise FingerprintMismatchError(
            f"the encoder does not match the one the index was built with ({fields}); "
            "open the index with encoder=None (or the CLI without --model) to use its own "
            "encoder, or rebuild the index with this one"
        )


def _build_state(snapshot: Snapshot, placer: ShardPlacer, config: PlannerConfig) -> _State:
    placed = placer.place([(s.record.name, s.record.modality, s.index) for s in snapshot.shards])
    shards = tuple(
        ShardSearcher.create(
            s.record, s.index, s.vectors, s.metadata, snapshot.tombstones, config=config, placed=p
        )
        for s, p in zip(snapshot.shards, placed, strict=True)
    )
    return _State(
        snapshot=snapshot,
        shards=shards,
        # One schema for every shard (the union of their columns; the snapshot pads each
        # shard's table to it), so a filter on a column only newer shards have works.
        schema=snapshot.schema,
        masks=MaskCache(MASK_CACHE_SIZE, config.gather_cache_bytes),
        field_ranges={},
    )


def _candidates(
    state: _State,
    shards: list[ShardSearcher],
    merged: list[tuple[float, int, int]],
    query: np.ndarray,
    vectors: bool,
) -> Candidates:
    """The merged rows of one query with their metadata (and vectors, for MMR), all read
    from ``state``: the version the query started on."""

    def take(si: int, local: np.ndarray) -> tuple[pa.Table, np.ndarray | None]:
        s = shards[si]
        return s.metadata.take(numpy_to_arrow(local)), (
            np.asarray(s.vectors[local], np.float32) if vectors else None
        )

    starts = [s.record.row_id_start for s in shards]
    return build_candidates(merged, query, vectors, starts, take, state.schema)


def build_candidates(
    merged: list[tuple[float, int, int]],
    query: np.ndarray,
    vectors: bool,
    row_starts: Sequence[int],
    take: Callable[[int, np.ndarray], tuple[pa.Table, np.ndarray | None]],
    schema: pa.Schema,
) -> Candidates:
    """One query's merged rows as :class:`Candidates`, in merged order.

    ``take(shard position, local rows)`` returns those rows' metadata (in ``schema``)
    and, when ``vectors``, their float32 vectors; it is called once per shard.
    """
    n = len(merged)
    scores = np.array([m[0] for m in merged], np.float32)
    tables, row_ids, vecs = [], np.empty(n, np.int64), []
    positions = np.arange(n)
    by_shard: dict[int, list[int]] = {}
    for pos, (_, si, _) in enumerate(merged):
        by_shard.setdefault(si, []).append(pos)
    order = []
    for si, poss in by_shard.items():
        local = np.array([merged[p][2] for p in poss], np.int64)
        table, v = take(si, local)
        tables.append(table)
        row_ids[poss] = row_starts[si] + local
        if vectors and v is not None:
            vecs.append(v)
        order.extend(poss)
    dim = query.shape[0]
    if tables:
        meta = pa.concat_tables(tables)
        inverse = np.empty(n, np.int64)
        inverse[np.array(order, np.int64)] = positions
        meta = meta.take(numpy_to_arrow(inverse))
        v = np.concatenate(vecs)[inverse] if vectors else np.zeros((n, 0), np.float32)
    else:
        meta = pa.Table.from_batches([], schema)
        v = np.zeros((0, dim if vectors else 0), np.float32)
    return Candidates(scores=scores, row_ids=row_ids, metadata=meta, vectors=v, query=query)


def _allowed_total(shards: list[ShardSearcher], allowed: tuple[AllowedRows | None, ...]) -> int:
    """Rows the query may return over ``shards``."""
    return sum(s.rows if a is None else a.count for s, a in zip(shards, allowed, strict=True))


def _target(state: _State, modality: str | None) -> str:
    """The rows a query searches: ``modality`` (validated by SearchOptions), else image
    rows when the index has any, else text rows."""
    if modality is not None:
        return modality
    has_images = any(s.record.modality == "image" and s.rows for s in state.shards)
    return "image" if has_images else "text"


def _hits(page: Candidates, first_rank: int) -> tuple[Hit, ...]:
    """The page's rows as Hits ranked from ``first_rank`` (1-based)."""
    rows = table_to_pylist(page.metadata)
    return tuple(
        Hit(
            rank=first_rank + i,
            score=float(page.scores[i]),
            doc_id=str(row["doc_id"]),
            row_id=int(page.row_ids[i]),
            modality=str(row["modality"]),
            source=str(row["source"]),
            metadata={k: v for k, v in row.items() if k not in FIXED_COLUMNS},
        )
        for i, row in enumerate(rows)
    )


def _boost_headroom(state: _State, opts: SearchOptions) -> float:
    """The most that ``opts.boosts`` can add to any row's score: sum over boosted fields
    of max(weight * value) over every row of the version (null counts 0, as in Boost)."""
    return boost_headroom(opts, lambda name: _field_range(state, name))


def boost_headroom(opts: SearchOptions, field_range: Callable[[str], tuple[float, float]]) -> float:
    """The most ``opts.boosts`` can add to a score, given each boosted field's
    ``field_range(name)`` = (min, max) over every row (see :func:`field_range`)."""
    headroom = 0.0
    for name, weight in opts.boosts:
        lo, hi = field_range(name)
        headroom += max(weight * lo, weight * hi)
    return headroom


def _field_range(state: _State, name: str) -> tuple[float, float]:
    """(min, max) of a numeric field over every row (nulls as 0); (0, 0) when the field
    is not numeric (the Boost stage has already refused it)."""
    cached = state.field_ranges.get(name)
    if cached is not None:
        return cached
    lo, hi = field_range(state.shards, name)
    state.field_ranges[name] = (lo, hi)  # idempotent: a racing query computes the same
    return lo, hi


def field_range(shards: Sequence[ShardSearcher], name: str) -> tuple[float, float]:
    """(min, max) of a numeric field over every row of ``shards``, with 0 included (nulls
    count 0); (0, 0) when the field is not numeric. The union of two ranges is the range
    of the union, so hosts of some shards can each report theirs."""
    import pyarrow.compute as pc

    lo = hi = 0.0
    for s in shards:
        if name not in s.metadata.column_names or not s.rows:
            continue
        col = s.metadata.column(name)
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
            continue
        values = np.asarray(pc.fill_null(col, 0).to_numpy(), dtype=np.float64)
        lo, hi = min(lo, float(np.nanmin(values))), max(hi, float(np.nanmax(values)))
    return lo, hi


def _needs_more(
    ranked: list[Candidates],
    merged: list[list[tuple[float, int, int]]],
    opts: SearchOptions,
    headroom: float,
) -> bool:
    """Whether fetching more candidates could change a page: the one place that decides.

    It decides on the scores the stages use: a row the pool has not fetched scores at
    most the pool's last raw score (merged lists are sorted), at most that plus
    ``headroom`` once boosted (:func:`_boost_headroom`), and grouping (max or mean)
    never scores a document above its best row. So, per query:

    * min_score: nothing unfetched can pass the cutoff once that bound is below it;
    * grouping or min_score need ``offset + k`` rows after their stage;
    * "cutoff then sort" needs every row above the cutoff;
    * a boosted relevance ranking (no MMR, no sort) needs its last row on the page to
      beat the bound, else an unfetched row with a large boost could outrank it.
    """
    wanted, min_score = opts.offset + opts.k, resolved_min_score(opts)
    for c, m in zip(ranked, merged, strict=True):
        if not m:
            continue
        bound = m[-1][0] + headroom
        if min_score is not None and bound < min_score:
            continue
        if (opts.group_by_doc or min_score is not None) and len(c) < wanted:
            return True
        if min_score is not None and opts.sort is not None:
            return True
        boosted_ranking = opts.boosts and opts.mmr is None and opts.sort is None
        if boosted_ranking and len(c) >= wanted and bound > float(c.scores[wanted - 1]):
            return True
    return False


def resolved_min_score(opts: SearchOptions) -> float | None:
    """``opts.min_score`` as a number; "auto" must have been resolved (:func:`search_auto`)
    before the rank stages run."""
    if opts.min_score == AUTO:
        raise QueryError(
            "min_score 'auto' reached the rank stages unresolved; run the query through "
            "SearchEngine.search_batch (or search_auto), which resolves it per query"
        )
    return opts.min_score


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000.0, 3)
