"""Hybrid search: the vector list and the lexical (BM25) list of a query, fused.

The engine runs one query path (:func:`clipsearch.retrieval.engine.rank_queries`); for
``mode="lexical"`` or ``"hybrid"`` its ``search(pool)`` step is wrapped by
:class:`HybridSearch`, which returns, per query, rows as (score, shard position, local
row) exactly like the vector search, so grouping, MMR, min_score, sort and paging run
after fusion unchanged. Both lists are taken under the same :class:`AllowedRows` masks
(filter and tombstones), so a filtered hybrid query returns min(k, matching rows)
results: the vector list alone already holds that many.

Fusion (``SearchOptions.fusion``), over each list's best ``max(pool, FUSION_DEPTH)``:

* ``rrf``: score = vector_weight / (rrf_k + vector rank) + lexical_weight /
  (rrf_k + lexical rank); a list a row is absent from adds 0;
* ``weighted``: score = vector_weight * v + lexical_weight * l, where v and l are the
  row's scores min-max normalised over their list (1 when a list's scores are equal),
  0 when absent.

With ``all_words_first`` (default), a row whose text holds every query word (a
misspelt word within its edits) gets ``vector_weight + lexical_weight`` added, more than
any fused score, so complete matches rank first, in fused order ("Northwind mug": the
Northwind mugs, the ones the photos agree on first; a SKU: that product). RRF alone lets
a vector list that cannot read brands or codes outvote an exact match.

A query no row matches lexically keeps its vector ranking and cosine scores (explained
with ``fusion: "none"``).

Ties break on the better of the row's two ranks, then on a lexical match (an exact word
is the stronger evidence of equal rank: a SKU query's product beats the vector list's
first row), then on the row id. Every fused row can explain itself
(:attr:`~clipsearch.retrieval.results.Hit.explain`): its vector score (cosine, also when
outside the vector list) and rank, lexical score and rank, fused score.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsearch.retrieval.errors import QueryError

if TYPE_CHECKING:
    from clipsearch.retrieval.lexical import LexicalIndex, QueryTerms
    from clipsearch.retrieval.options import SearchOptions
    from clipsearch.retrieval.planner import AllowedRows, ShardSearcher
    from clipsearch.retrieval.results import SearchResults

# Each list contributes at least this many rows to the fusion (a k=10 query still fuses
# the best 100 of each side: a product ranked 30th by both beats one ranked 5th by one).
FUSION_DEPTH = 100

# One query's rows, best first: (score, shard position, local row).
Ranked = list[tuple[float, int, int]]
# Per query.
Merged = list[Ranked]


def query_text(query: Any) -> str | None:
    """The text a lexical search matches for ``query``: a str itself, a ComposedQuery's
    positively weighted text terms joined; None for images and vectors."""
    from clipsearch.retrieval.queries import ComposedQuery

    if isinstance(query, str):
        return query
    if isinstance(query, ComposedQuery):
        texts = [t for w, t in query.terms if isinstance(t, str) and w > 0]
        return " ".join(texts) if texts else None
    return None


def resolve_mode(opts: SearchOptions, lexical: Sequence[LexicalIndex | None], modality: str) -> str:
    """The mode a query runs in (see ``SearchOptions.mode``); QueryError when lexical or
    hybrid is asked of shards without a lexical part."""
    if opts.mode is None:
        full = bool(lexical) and all(x is not None for x in lexical)
        return "hybrid" if full and opts.min_score is None else "vector"
    if opts.mode != "vector" and not any(x is not None for x in lexical):
        raise QueryError(
            f"mode {opts.mode!r} needs a lexical index, and the {modality} shards of this "
            "index have none (built before hybrid search, with --text-fields '' or without "
            "tantivy); add one with `clipsearch index add INDEX SOURCES --text-fields "
            "title,brand,...` (or rebuild), or search with mode 'vector'"
        )
    return opts.mode


def fuse(
    vector: Ranked,
    lexical: Ranked,
    opts: SearchOptions,
    row_starts: Sequence[int],
    complete: frozenset[tuple[int, int]] = frozenset(),
) -> tuple[Ranked, dict[tuple[int, int], dict[str, Any]]]:
    """Fuse one query's two lists (see the module docstring): the fused list (best
    first) and, per (shard position, local row), what its score is made of.
    ``complete``: the lexical rows holding every query word."""
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for name, ranked in (("vector", vector), ("lexical", lexical)):
        for rank, (score, si, local) in enumerate(ranked, 1):
            rows.setdefault((si, local), {"vector": None, "lexical": None})[name] = {
                "score": float(score),
                "rank": rank,
            }
    weights = {"vector": opts.vector_weight, "lexical": opts.lexical_weight}
    bounds = {
        side: (min(s for s, _, _ in r), max(s for s, _, _ in r)) if r else (0.0, 0.0)
        for side, r in (("vector", vector), ("lexical", lexical))
    }

    def contrib(side: str, e: dict[str, Any]) -> float:
        if opts.fusion == "rrf":
            return weights[side] / (opts.rrf_k + e["rank"])
        lo, hi = bounds[side]
        return weights[side] * ((e["score"] - lo) / (hi - lo) if hi > lo else 1.0)

    keyed = []
    for (si, local), e in rows.items():
        fused = sum(contrib(side, e[side]) for side in ("vector", "lexical") if e[side])
        e["all_words"] = (si, local) in complete
        if opts.all_words_first and e["all_words"]:
            fused += opts.vector_weight + opts.lexical_weight
        e["fused"] = fused
        e["fusion"] = opts.fusion
        best_rank = min(e[side]["rank"] for side in ("vector", "lexical") if e[side])
        no_lexical = e["lexical"] is None
        keyed.append((-fused, best_rank, no_lexical, row_starts[si] + local, si, local))
    keyed.sort()
    return [(-k[0], k[4], k[5]) for k in keyed], rows


class HybridSearch:
    """The ``search(pool)`` step of a lexical or hybrid query (see the module docstring)."""

    def __init__(
        self,
        *,
        mode: str,
        opts: SearchOptions,
        terms: list[QueryTerms | None],
        shards: Sequence[ShardSearcher],
        lexical: Sequence[LexicalIndex | None],
        allowed: Sequence[AllowedRows | None],
        xq: np.ndarray,
        timings: dict[str, float],
    ) -> None:
        self.mode = mode
        self.opts = opts
        self.terms = terms
        self.shards = shards
        self.lexical = lexical
        self.allowed = allowed
        self.xq = xq
        self.timings = timings
        self.row_starts = [s.record.row_id_start for s in shards]
        # Per query: global row id -> explanation (filled by the last search).
        self.explains: list[dict[int, dict[str, Any]]] = [{} for _ in terms]

    def lexical_lists(self, depth: int) -> tuple[Merged, list[frozenset[tuple[int, int]]]]:
        """Per query, the best ``depth`` allowed rows by BM25 over every shard (scores
        are per shard BM25; ties by row id), and those holding every query word."""
        tick = time.perf_counter()
        out: Merged = []
        complete: list[frozenset[tuple[int, int]]] = []
        whole = self.mode == "hybrid" and self.opts.all_words_first
        for terms in self.terms:
            lists = []
            full: set[tuple[int, int]] = set()
            for si, index in enumerate(self.lexical):
                if index is None or terms is None:
                    continue
                scores, rows, every = index.search(
                    terms, depth, self.allowed[si], with_complete=whole
                )
                full.update((si, int(j)) for j in rows[every])
                start = self.row_starts[si]
                lists.append(
                    [
                        (-float(d), start + int(j), si, int(j))
                        for d, j in zip(scores, rows, strict=True)
                    ]
                )
            best = itertools.islice(heapq.merge(*lists), depth)
            out.append([(-neg, si, j) for neg, _, si, j in best])
            complete.append(frozenset(full))
        self.timings["lexical"] = self.timings.get("lexical", 0.0) + _ms(tick)
        return out, complete

    def search(
        self, vector_search: Callable[[int], tuple[Merged, dict[str, str]]], pool: int
    ) -> tuple[Merged, dict[str, str]]:
        depth = max(pool, FUSION_DEPTH)
        # The lexical lists are searched in another thread while the vector search runs
        # (faiss releases the GIL while it scans).
        pending = _executor().submit(self.lexical_lists, depth)
        names = [s.record.name for s, x in zip(self.shards, self.lexical, strict=True) if x]
        if self.mode == "lexical":
            vector: Merged = [[] for _ in self.terms]
            plans = dict.fromkeys(names, "lexical")
        else:
            vector, plans = vector_search(depth)
        lexical, complete = pending.result()
        out: Merged = []
        for qi, (v, lex) in enumerate(zip(vector, lexical, strict=True)):
            if self.terms[qi] is None:  # an image or vector query in hybrid mode
                out.append(v[:pool])
                self.explains[qi] = {}
                continue
            fused, parts = fuse(v, lex, self.opts, self.row_starts, complete[qi])
            if self.mode == "lexical":
                fused = lex
            elif not lex:  # no row matches a word: the vector ranking, cosine scores kept
                fused = v
                for e in parts.values():
                    e["fused"], e["fusion"] = e["vector"]["score"], "none"
            fused = fused[:pool]
            self.explains[qi] = {
                self.row_starts[si] + local: self._explain(qi, si, local, parts[(si, local)])
                for _, si, local in fused
            }
            out.append(fused)
        return out, plans

    def _explain(self, qi: int, si: int, local: int, parts: dict[str, Any]) -> dict[str, Any]:
        out = dict(parts)
        if out["vector"] is None:  # outside the vector list: its cosine, unranked
            row = np.asarray(self.shards[si].vectors[local], np.float32)
            out["vector"] = {"score": float(row @ self.xq[qi]), "rank": None}
        if self.mode == "lexical":
            out.pop("all_words", None)
            out["fusion"] = "none"
            out["fused"] = out["lexical"]["score"]
        out["mode"] = self.mode
        return out

    def attach(self, results: list[SearchResults]) -> list[SearchResults]:
        """``results`` with each hit's ``explain`` set."""
        out = []
        for qi, r in enumerate(results):
            explains = self.explains[qi]
            hits = tuple(dataclasses.replace(h, explain=explains.get(h.row_id)) for h in r.hits)
            out.append(dataclasses.replace(r, hits=hits))
        return out


def plan_hybrid(
    opts: SearchOptions,
    queries: Sequence[Any],
    shards: Sequence[ShardSearcher],
    allowed: Sequence[AllowedRows | None],
    lexical_by_shard: dict[str, LexicalIndex | None],
    xq: np.ndarray,
    timings: dict[str, float],
    modality: str,
) -> HybridSearch | None:
    """The lexical/hybrid search of a batch of queries, or None for vector mode."""
    lexical = [lexical_by_shard.get(s.record.name) for s in shards if s.rows]
    mode = resolve_mode(opts, lexical, modality)
    if mode == "vector":
        return None
    from clipsearch.retrieval.lexical import analyze

    texts = [query_text(q) for q in queries]
    if mode == "hybrid" and all(t is None for t in texts):
        return None  # images and vectors only: the plain vector search, at its own depth
    if mode == "lexical" and any(t is None for t in texts):
        raise QueryError(
            "mode 'lexical' needs a text query (a string, or a composed query with text "
            "terms); search images and vectors with mode 'vector' or 'hybrid'"
        )
    return HybridSearch(
        mode=mode,
        opts=opts,
        terms=[None if t is None else analyze(t) for t in texts],
        shards=shards,
        lexical=[lexical_by_shard.get(s.record.name) for s in shards],
        allowed=allowed,
        xq=xq,
        timings=timings,
    )


@functools.cache
def _executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(
        max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="clipsearch-lexical"
    )


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000.0, 3)
