"""Rerankers: small, pluggable stages applied to a pool of exactly scored candidates.

The engine fetches a candidate pool (the best ``max(window, offset + k)`` rows that pass
the filter), scores them exactly, then runs the stages of :func:`default_pipeline` in
this order:

1. :class:`Boost` - ``score += sum(weight * field)`` for numeric fields (null counts 0);
2. :class:`GroupByDoc` - one row per ``doc_id``, scored by the max or mean of its rows;
3. :class:`MinScore` - drop candidates below a relevance cutoff;
4. :class:`MMR` - maximal marginal relevance: trade relevance for diversity with lambda;
5. :class:`SortBy` - order by a metadata field (nulls last), relevance breaking ties.

Pagination (``offset``/``k``) slices the final order. Every stage is deterministic and
breaks ties by ``row_id``, so the same query over the same version always pages the
same way. A stage is any callable ``Candidates -> Candidates``.

Option values (weights, lambda, grouping, sort spelling) are validated once, by
:class:`~clipsearch.retrieval.options.SearchOptions`; the stages only check what needs
the candidates' data (a field that is missing, not numeric or not sortable).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsearch.retrieval.arrow_convert import numpy_to_arrow
from clipsearch.retrieval.errors import QueryError

if TYPE_CHECKING:
    from clipsearch.retrieval.options import Grouping, SearchOptions


@dataclass(frozen=True, eq=False)
class Candidates:
    """A ranked pool of rows. Arrays are aligned; order is the current ranking."""

    # float32 [n]: current score (cosine, possibly boosted / grouped).
    scores: np.ndarray
    # int64 [n]: row ids.
    row_ids: np.ndarray
    # n rows of metadata (fixed columns + user columns), aligned with the arrays.
    metadata: pa.Table
    # float32 [n, d]: the rows' exact vectors (for MMR).
    vectors: np.ndarray
    # float32 [d]: the query vector.
    query: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    def take(self, order: np.ndarray, scores: np.ndarray | None = None) -> Candidates:
        """Subset / reorder by positions; optionally with new scores (aligned with order)."""
        order = np.asarray(order, dtype=np.int64)
        return replace(
            self,
            scores=self.scores[order] if scores is None else np.asarray(scores, np.float32),
            row_ids=self.row_ids[order],
            metadata=self.metadata.take(numpy_to_arrow(order)),
            vectors=self.vectors[order],
        )

    def by_score(self) -> Candidates:
        """Reorder by descending score, ties by ascending row id."""
        return self.take(np.lexsort((self.row_ids, -self.scores)))


Reranker = Callable[[Candidates], Candidates]


def _numeric_column(c: Candidates, name: str, stage: str) -> np.ndarray:
    if name not in c.metadata.column_names:
        raise QueryError(
            f"{stage}: unknown metadata field {name!r}; fields are {', '.join(c.metadata.column_names)}"
        )
    col = c.metadata.column(name)
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise QueryError(f"{stage}: field {name!r} has type {col.type}; it must be numeric")
    return np.asarray(pc.fill_null(col, 0).to_numpy(), dtype=np.float32)


@dataclass(frozen=True)
class Boost:
    """Linear boosts: ``score += sum(weight * value)`` over numeric fields (null = 0)."""

    # field -> finite weight; e.g. {"rating": 0.01} adds 0.05 for a five-star product.
    weights: Mapping[str, float]

    def __call__(self, c: Candidates) -> Candidates:
        scores = c.scores.astype(np.float32).copy()
        for name, weight in self.weights.items():
            scores += np.float32(weight) * _numeric_column(c, name, "boost")
        return replace(c, scores=scores).by_score()


@dataclass(frozen=True)
class GroupByDoc:
    """One candidate per ``doc_id``: its best row, scored by the max or mean of its rows."""

    # "max" (a product is as good as its best photo) or "mean".
    how: Grouping = "max"

    def __call__(self, c: Candidates) -> Candidates:
        if len(c) == 0:
            return c
        c = c.by_score()
        doc_ids = c.metadata.column("doc_id").to_pylist()
        first: dict[str, int] = {}
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for pos, doc in enumerate(doc_ids):
            first.setdefault(doc, pos)
            sums[doc] = sums.get(doc, 0.0) + float(c.scores[pos])
            counts[doc] = counts.get(doc, 0) + 1
        order = np.array(list(first.values()), dtype=np.int64)
        if self.how == "max":
            scores = c.scores[order]
        else:
            scores = np.array([sums[d] / counts[d] for d in first], dtype=np.float32)
        return c.take(order, scores).by_score()


@dataclass(frozen=True)
class MinScore:
    """Drop candidates whose score is below ``threshold``."""

    threshold: float

    def __call__(self, c: Candidates) -> Candidates:
        # Compared in float64: a threshold beyond float32's range (any finite float is a
        # valid option) must not overflow a cast of it to the scores' float32.
        return c.take(np.flatnonzero(c.scores.astype(np.float64) >= self.threshold))


@dataclass(frozen=True)
class MMR:
    """Maximal marginal relevance (Carbonell & Goldstein, 1998).

    Greedily picks ``argmax lambda * sim(q, d) - (1 - lambda) * max_{s picked} sim(d, s)``;
    lambda 1 is plain relevance order, lambda 0 maximal diversity. Selection is
    prefix-stable, so paging through an MMR ranking never repeats a row.
    """

    # Weight of relevance against diversity, in [0, 1].
    lambda_: float
    # Rows to select; the rest follow in relevance order.
    limit: int

    def __call__(self, c: Candidates) -> Candidates:
        n = len(c)
        if n == 0:
            return c
        c = c.by_score()
        relevance = c.vectors @ c.query
        sims = c.vectors @ c.vectors.T
        chosen: list[int] = []
        left = np.ones(n, dtype=bool)
        max_sim = np.full(n, -np.inf, dtype=np.float32)
        for _ in range(min(self.limit, n)):
            redundancy = np.where(np.isfinite(max_sim), max_sim, 0.0)
            value = self.lambda_ * relevance - (1.0 - self.lambda_) * redundancy
            value[~left] = -np.inf
            pick = int(np.argmax(value))  # ties -> lowest position (best relevance)
            chosen.append(pick)
            left[pick] = False
            max_sim = np.maximum(max_sim, sims[pick])
        order = np.concatenate([np.array(chosen, np.int64), np.flatnonzero(left)])
        return c.take(order)


@dataclass(frozen=True)
class SortBy:
    """Stable sort by a metadata field; nulls last; relevance order breaks ties."""

    field: str
    descending: bool = False

    @classmethod
    def parse(cls, spec: str) -> SortBy:
        """``"price"``, ``"price:asc"`` or ``"added:desc"`` (a spec SearchOptions has
        already validated)."""
        name, _, direction = spec.partition(":")
        return cls(name, direction == "desc")

    def __call__(self, c: Candidates) -> Candidates:
        if self.field not in c.metadata.column_names:
            raise QueryError(
                f"sort: unknown metadata field {self.field!r}; fields are {', '.join(c.metadata.column_names)}"
            )
        if len(c) == 0:
            return c
        col = c.metadata.column(self.field)
        keys = pa.table({"v": col, "pos": pa.array(np.arange(len(c)), pa.int64())})
        direction = "descending" if self.descending else "ascending"
        try:
            order = _sort_indices(keys, direction)
        except pa.ArrowNotImplementedError as e:
            raise QueryError(
                f"sort: field {self.field!r} of type {col.type} is not sortable"
            ) from e
        return c.take(order.to_numpy())


def _sort_indices(keys: pa.Table, direction: str) -> pa.Array:
    """Indices sorting ``keys.v`` (nulls last) then ``keys.pos``; across pyarrow versions."""
    try:  # pyarrow >= 25: null placement per sort key
        return pc.sort_indices(
            keys, sort_keys=[("v", direction, "at_end"), ("pos", "ascending", "at_end")]
        )
    except (TypeError, ValueError):
        return pc.sort_indices(
            keys, sort_keys=[("v", direction), ("pos", "ascending")], null_placement="at_end"
        )


def default_pipeline(options: SearchOptions, *, mmr_limit: int) -> list[Reranker]:
    """The stages ``options`` asks for, in the documented order (empty: plain relevance).

    ``mmr_limit``: rows MMR selects greedily (the engine passes ``offset + k``).
    """
    stages: list[Reranker] = []
    if options.boosts:
        stages.append(Boost(dict(options.boosts)))
    if options.group_by_doc:
        stages.append(GroupByDoc(options.group_by_doc))
    if options.min_score == "auto":
        # The engine resolves "auto" to the model's calibrated number before ranking.
        raise QueryError("min_score 'auto' must be resolved to a number before reranking")
    if options.min_score is not None:
        stages.append(MinScore(options.min_score))
    if options.mmr is not None:
        stages.append(MMR(options.mmr, mmr_limit))
    if options.sort is not None:
        stages.append(SortBy.parse(options.sort))
    return stages


def run_pipeline(c: Candidates, stages: Sequence[Reranker]) -> Candidates:
    for stage in stages:
        c = stage(c)
    return c


def paginate(c: Candidates, offset: int, limit: int) -> tuple[Candidates, int]:
    """``(page, 1-based rank of its first row)``: rows ``offset .. offset + limit - 1``,
    so the first page starts at rank 1 and the page at offset 10 at rank 11."""
    end = min(len(c), offset + limit)
    return c.take(np.arange(min(offset, end), end)), offset + 1
