"""Lexical and hybrid queries on the distributed engine.

The local engine's hybrid step (:func:`clipsearch.retrieval.hybrid.plan_hybrid` and
:class:`~clipsearch.retrieval.hybrid.HybridSearch`) runs unchanged on the coordinator: it
decides the mode, fuses the lists and explains the hits. It reads shards through two
small interfaces, which are given stand-ins here:

* a shard's ``LexicalIndex.search(terms, depth, allowed, with_complete)``: answered from
  one fan-out per search step that runs every query's BM25 search on the hosts, under
  the same filter (the hosts build the same ``AllowedRows``);
* a shard's ``vectors[row]`` (the cosine of a row only the lexical list found, for its
  explanation): fetched from the row's host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence

    from clipsearch.retrieval.distributed.coordinator import DistributedSearchEngine, _Layout
    from clipsearch.retrieval.manifest import ShardRecord
    from clipsearch.retrieval.options import SearchOptions


@dataclass(eq=False)
class _LexicalBatch:
    """The hosts' BM25 lists of every query, per (depth, with_complete) asked."""

    engine: DistributedSearchEngine
    layout: _Layout
    records: list[ShardRecord]
    terms: list[Any]
    where: Any
    answers: dict[tuple[int, bool], dict[str, list[Any]]] = field(default_factory=dict)

    def get(self, name: str, depth: int, with_complete: bool) -> list[Any]:
        key = (depth, with_complete)
        if key not in self.answers:
            version = self.layout.version
            got = self.engine._fanout(
                self.layout,
                self.records,
                lambda h, names: h.lexical.remote(
                    version, names, self.terms, depth, self.where, with_complete
                ),
            )
            per_shard: dict[str, list[Any]] = {}
            for names, answer in got:
                for n, lists in zip(names, answer, strict=True):
                    per_shard[n] = lists
            self.answers[key] = per_shard
        return self.answers[key][name]


@dataclass(eq=False)
class _RemoteLexical:
    """Stands in for a shard's LexicalIndex in HybridSearch."""

    batch: _LexicalBatch
    name: str

    def search(
        self, terms: Any, limit: int, allowed: Any = None, *, with_complete: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        del allowed  # the host applies the same filter and tombstones itself
        lists = self.batch.get(self.name, limit, with_complete)
        empty = np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, bool)
        if lists is None:  # no lexical index on the host (tantivy missing there)
            return empty
        qi = self.batch.terms.index(terms)
        return empty if lists[qi] is None else lists[qi]


@dataclass(eq=False)
class _RemoteVectors:
    engine: DistributedSearchEngine
    layout: _Layout
    record: ShardRecord

    def __getitem__(self, row: Any) -> np.ndarray:
        local = np.atleast_1d(np.asarray(row, np.int64))
        version, name = self.layout.version, self.record.name
        [(_, [(_, vecs)])] = self.engine._fanout(
            self.layout,
            [self.record],
            lambda h, names: h.rows.remote(version, [(name, local)], True),
        )
        return vecs[0] if np.ndim(row) == 0 else vecs


@dataclass(eq=False)
class _RemoteShard:
    """What HybridSearch reads of a ShardSearcher: its record, rows and vectors."""

    record: ShardRecord
    vectors: _RemoteVectors

    @property
    def rows(self) -> int:
        return self.record.rows


def remote_hybrid(
    engine: DistributedSearchEngine,
    layout: _Layout,
    opts: SearchOptions,
    queries: Sequence[Any],
    records: list[ShardRecord],
    timings: dict[str, float],
) -> Any:
    """``plan_hybrid`` over the hosts' shards; None for vector mode. The caller sets
    its ``xq`` once the queries are encoded."""
    from clipsearch.retrieval.hybrid import plan_hybrid, query_text
    from clipsearch.retrieval.lexical import analyze, have_tantivy

    has_lexical = have_tantivy() and any(r.lexical is not None for r in records)
    if opts.mode in (None, "vector") and not has_lexical:
        return None  # vector mode without asking the hosts anything
    texts = [query_text(q) for q in queries]
    terms = [None if t is None else analyze(t) for t in texts] if has_lexical else []
    batch = _LexicalBatch(engine, layout, records, terms, opts.where)
    shards: list[Any] = [_RemoteShard(r, _RemoteVectors(engine, layout, r)) for r in records]
    lexical: dict[str, Any] = {
        r.name: _RemoteLexical(batch, r.name)
        for r in records
        if has_lexical and r.lexical is not None
    }
    target = records[0].modality if records else "image"
    return plan_hybrid(opts, queries, shards, [None] * len(shards), lexical, None, timings, target)
