"""Typed, frozen search results.

A :class:`SearchResults` is what every query returns: the page of :class:`Hit` s in rank
order plus how long each stage took. Construction rejects FAISS sentinels (row id -1,
infinite or NaN scores, the -3.4e38 "no result" distance), so a caller never has to
filter them out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

# FAISS pads short result lists with id -1 and distance -FLT_MAX (inner product).
_FAISS_EMPTY = -3.0e38


@dataclass(frozen=True, kw_only=True)
class Hit:
    """One result row."""

    # 1-based position in the full ranked list (offset included): the first hit of the
    # first page is 1, and page 2 of k=10 (offset 10) starts at 11.
    rank: int
    # Relevance: cosine similarity of query and row (after boosts, when boosts were given;
    # the group's max or mean with group_by_doc).
    score: float
    # The user's document key; several rows (photos, title) may share one.
    doc_id: str
    # Internal row id, unique and never reused within an index.
    row_id: int
    # "image" or "text".
    modality: str
    # Image path / URI, or the text itself for text rows.
    source: str
    # The user's metadata columns (price, category, ...) as plain Python values.
    metadata: dict[str, Any] = field(default_factory=dict)
    # Lexical and hybrid queries: what the score is made of (clipsearch.retrieval.hybrid):
    # {"mode", "fusion", "fused", "vector": {"score", "rank"}, "lexical": {"score",
    # "rank"} or None}; a rank is None outside that list. None for vector queries.
    explain: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.row_id < 0:
            raise ValueError(f"Hit with invalid row_id {self.row_id} (a FAISS sentinel leaked)")
        if self.rank < 1:
            raise ValueError(f"Hit {self.row_id} has rank {self.rank}; ranks start at 1")
        if not math.isfinite(self.score) or self.score <= _FAISS_EMPTY:
            raise ValueError(f"Hit {self.row_id} has non-finite score {self.score}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "score": self.score,
            "doc_id": self.doc_id,
            "row_id": self.row_id,
            "modality": self.modality,
            "source": self.source,
            "metadata": dict(self.metadata),
            **({} if self.explain is None else {"explain": self.explain}),
        }


@dataclass(frozen=True, kw_only=True)
class SearchResults:
    """A page of ranked hits for one query."""

    hits: tuple[Hit, ...]
    # Stage name -> milliseconds ("encode", "filter", "search", "rerank", "fetch", "total").
    timings: dict[str, float] = field(default_factory=dict)
    # The index version the query ran against.
    index_version: int = 0
    # Rows that passed the filter (tombstones excluded), when a filter was given.
    total_matches: int | None = None
    # How each shard was searched: shard name -> "exact", "exact-subset", "ann", ...
    plans: dict[str, str] = field(default_factory=dict)
    # The relevance cutoff applied (a cosine): the numeric min_score, or the model's
    # calibrated threshold that min_score="auto" resolved to; None without a cutoff.
    min_score: float | None = None

    def __len__(self) -> int:
        return len(self.hits)

    def __iter__(self) -> Any:
        return iter(self.hits)

    def __getitem__(self, i: int) -> Hit:
        return self.hits[i]

    @property
    def row_ids(self) -> list[int]:
        return [h.row_id for h in self.hits]

    @property
    def doc_ids(self) -> list[str]:
        return [h.doc_id for h in self.hits]

    def to_dicts(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per hit."""
        return [h.to_dict() for h in self.hits]

    def to_dict(self) -> dict[str, Any]:
        """Hits plus timings, version, match count, plans and the cutoff (the CLI's ``--json``)."""
        return {
            "hits": self.to_dicts(),
            "timings": dict(self.timings),
            "index_version": self.index_version,
            "total_matches": self.total_matches,
            "plans": dict(self.plans),
            "min_score": self.min_score,
        }

    def to_arrow(self) -> pa.Table:
        """One row per hit: rank, score, doc_id, row_id, modality, source, then metadata."""
        import pyarrow as pa

        cols: dict[str, list[Any]] = {
            "rank": [h.rank for h in self.hits],
            "score": [h.score for h in self.hits],
            "doc_id": [h.doc_id for h in self.hits],
            "row_id": [h.row_id for h in self.hits],
            "modality": [h.modality for h in self.hits],
            "source": [h.source for h in self.hits],
        }
        names: list[str] = []
        for h in self.hits:
            names.extend(n for n in h.metadata if n not in names and n not in cols)
        for n in names:
            cols[n] = [h.metadata.get(n) for h in self.hits]
        schema = {"rank": pa.int64(), "score": pa.float32(), "row_id": pa.int64()}
        arrays = {n: pa.array(v, type=schema.get(n)) for n, v in cols.items()}
        return pa.table(arrays)
