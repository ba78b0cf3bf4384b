"""``SearchOptions``: every knob of one search, validated once, shared by every surface.

The library (:meth:`SearchEngine.search`), the CLI (``clipsearch search``) and the HTTP
API (``POST /search``) all build one of these and hand it to the engine; none of them
re-declares or re-validates an option. Construction checks everything that can be
checked without the index (ranges, spellings, the filter's syntax); what needs the index
(a filter's column names and types, a sort or boost field) is checked by the engine
against the index's schema and raises the same error family.

Importing this module is cheap (no numpy, pyarrow, torch or faiss).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, TypedDict

from clipsearch.retrieval.errors import InvalidOptionError

# The largest page a query may ask for.
MAX_K = 1000
# The candidate pool never grows past this (bounds work for min_score / grouping), so
# ``offset + k`` may not exceed it either.
MAX_POOL = 10_000
# Row kinds a query may target.
MODALITIES = ("image", "text")

Grouping = Literal["max", "mean"]
# How a query ranks rows: by vector similarity, by BM25 over the shards' text fields, or
# both lists fused (clipsearch.retrieval.hybrid).
Mode = Literal["vector", "lexical", "hybrid"]
MODES = ("vector", "lexical", "hybrid")
# How hybrid fuses the two lists: reciprocal rank fusion, or a weighted sum of scores
# min-max normalised per list.
Fusion = Literal["rrf", "weighted"]
FUSIONS = ("rrf", "weighted")
# RRF's k: a row at rank r of a list adds weight / (k + r). 60 is the value of the RRF
# paper (Cormack et al. 2009) and of most engines that fuse.
DEFAULT_RRF_K = 60
# Rows each list (vector, lexical) contributes to a hybrid fusion, at least offset + k:
# the window of Elasticsearch's rrf ``rank_window_size``. 50 lets a row ranked 50th by
# both lists beat one ranked 1st by one list alone (2 / 110 > 1 / 61). Measured against
# 100: the same top 10 for 198 of 200 queries at 1M rows, nDCG@10 0.885 against 0.894
# on the demo catalog's brand + kind queries ungrouped (grouped: the same), and 10% less
# time per hybrid query on 2 cores (docs/INTERNALS.md "Hybrid latency, third pass").
DEFAULT_FUSION_DEPTH = 50
MAX_FUSION_DEPTH = MAX_POOL
# ``min_score="auto"``: the model's calibrated relevance threshold for the query's
# direction (query modality -> row modality), resolved by the engine per query
# (clipsearch.retrieval.engine.relevance_threshold).
AUTO: Literal["auto"] = "auto"
MinScore = float | Literal["auto"]


@dataclass(frozen=True, kw_only=True)
class SearchOptions:
    """How to search, filter, rerank and page. Frozen; derive variants with :meth:`replace`.

    Every field has a default that gives a plain top-10 relevance search.
    """

    # Results per page, 1..MAX_K.
    k: int = 10
    # Results to skip before the page (stable paging); offset + k <= MAX_POOL.
    offset: int = 0
    # Metadata filter: an expression ("price < 30 and in_stock") or its JSON AST (dict).
    where: str | dict[str, Any] | None = None
    # Rows to search: "image" or "text"; None = image rows when the index has any
    # (text->image, image->image), else text rows.
    modality: str | None = None
    # One result per doc_id: None (off), "max" (a product is as good as its best row) or
    # "mean" (mean of its rows in the pool). True / False are accepted for "max" / None.
    group_by_doc: Grouping | None = None
    # MMR diversity lambda in [0, 1] (1 = relevance only); None = off.
    mmr: float | None = None
    # Order the relevant results by a metadata field: "field", "field:asc", "field:desc"
    # (nulls last), applied after min_score to a pool of at least RERANK_WINDOW rows.
    sort: str | None = None
    # Drop results whose (boosted, grouped) score is below this cosine; "auto" = the
    # model's calibrated relevance threshold for the query's direction (text->image...),
    # resolved by the engine per query; a model without one is an InvalidOptionError.
    # A cutoff (numeric or auto) makes the default mode "vector"; "auto" refuses an
    # explicit lexical / hybrid mode, whose fused scores are not cosines.
    min_score: MinScore | None = None
    # Linear score boosts over numeric fields: score += weight * value (null = 0).
    # Given as a mapping; stored as sorted (field, weight) pairs so options hash.
    boosts: tuple[tuple[str, float], ...] = ()
    # "vector", "lexical" (BM25 over the shards' text fields) or "hybrid" (both, fused);
    # None = "hybrid" when the searched shards have lexical parts and no min_score is set
    # (a cosine cutoff), else "vector". Lexical and hybrid need a text query (a str, or
    # a ComposedQuery's text terms); in hybrid, queries without text rank by vectors.
    mode: Mode | None = None
    # Hybrid fusion: "rrf" (score = sum of weight / (rrf_k + rank)) or "weighted"
    # (score = sum of weight * score min-max normalised over the list).
    fusion: Fusion = "rrf"
    # RRF's k, >= 1: larger values flatten the difference between top ranks.
    rrf_k: int = DEFAULT_RRF_K
    # Weights of the vector and lexical lists in the fusion (>= 0, not both 0).
    vector_weight: float = 1.0
    lexical_weight: float = 1.0
    # Hybrid: rows whose text holds every query word (a misspelt word within its edits)
    # rank before the others, each group by fused score: "Northwind mug" lists Northwind
    # mugs first, in the order both lists agree on. False: the plain fused order.
    all_words_first: bool = True
    # Hybrid: rows each list contributes to the fusion (at least offset + k, or the
    # rerank window), 1..MAX_FUSION_DEPTH; deeper lists let rows both lists rank lower
    # rise, at the cost of a deeper vector search. See DEFAULT_FUSION_DEPTH.
    fusion_depth: int = DEFAULT_FUSION_DEPTH

    def __post_init__(self) -> None:
        _set = object.__setattr__
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= MAX_K:
            raise InvalidOptionError(
                "k", f"k must be an integer between 1 and {MAX_K}, got {self.k!r}"
            )
        if isinstance(self.offset, bool) or not isinstance(self.offset, int) or self.offset < 0:
            raise InvalidOptionError(
                "offset", f"offset must be an integer >= 0, got {self.offset!r}"
            )
        if self.offset + self.k > MAX_POOL:
            raise InvalidOptionError(
                "offset",
                f"offset + k must be at most {MAX_POOL} (got {self.offset} + {self.k}); "
                "narrow the query with a filter instead of paging that deep",
            )
        if self.modality is not None and self.modality not in MODALITIES:
            raise InvalidOptionError(
                "modality",
                f"modality must be one of {', '.join(MODALITIES)} (or omitted), got {self.modality!r}",
            )
        _set(self, "group_by_doc", _grouping(self.group_by_doc))
        if self.mmr is not None:
            mmr = _finite("mmr", "mmr", self.mmr)
            if not 0.0 <= mmr <= 1.0:
                raise InvalidOptionError("mmr", f"mmr lambda must be within [0, 1], got {mmr}")
            _set(self, "mmr", mmr)
        if self.min_score is not None:
            _set(self, "min_score", _min_score(self.min_score))
        if self.sort is not None:
            _set(self, "sort", _sort_spec(self.sort))
        _set(self, "boosts", _boosts(self.boosts))
        if self.where is not None:
            _set(self, "where", _where(self.where))
        self._check_hybrid()

    def _check_hybrid(self) -> None:
        _set = object.__setattr__
        if self.mode is not None and self.mode not in MODES:
            raise InvalidOptionError(
                "mode", f"mode must be one of {', '.join(MODES)} (or omitted), got {self.mode!r}"
            )
        if self.fusion not in FUSIONS:
            raise InvalidOptionError(
                "fusion", f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}"
            )
        k = self.rrf_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidOptionError("rrf_k", f"rrf_k must be an integer >= 1, got {k!r}")
        depth = self.fusion_depth
        if isinstance(depth, bool) or not isinstance(depth, int):
            raise InvalidOptionError(
                "fusion_depth", f"fusion_depth must be an integer, got {depth!r}"
            )
        if not 1 <= depth <= MAX_FUSION_DEPTH:
            raise InvalidOptionError(
                "fusion_depth",
                f"fusion_depth must be between 1 and {MAX_FUSION_DEPTH}, got {depth}",
            )
        for name in ("vector_weight", "lexical_weight"):
            weight = _finite(name, name, getattr(self, name))
            if weight < 0:
                raise InvalidOptionError(name, f"{name} must be >= 0, got {weight}")
            _set(self, name, weight)
        if not isinstance(self.all_words_first, bool):
            raise InvalidOptionError(
                "all_words_first",
                f"all_words_first must be true or false, got {self.all_words_first!r}",
            )
        if self.vector_weight == 0 and self.lexical_weight == 0:
            raise InvalidOptionError(
                "vector_weight", "vector_weight and lexical_weight cannot both be 0"
            )
        if self.min_score == AUTO and self.mode in ("lexical", "hybrid"):
            raise InvalidOptionError(
                "min_score",
                f"min_score 'auto' is a calibrated cosine threshold, and mode {self.mode!r} "
                "ranks by BM25 / fused scores, which are not cosines; use mode 'vector' "
                "(the default with a min_score) or give no min_score",
            )

    # ------------------------------------------------------------------ derived

    @property
    def reranks(self) -> bool:
        """Whether any rerank stage runs (then the pool is at least RERANK_WINDOW rows)."""
        return bool(
            self.boosts
            or self.group_by_doc
            or self.min_score is not None
            or self.mmr is not None
            or self.sort is not None
        )

    def replace(self, **changes: Any) -> SearchOptions:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def __hash__(self) -> int:
        # A dict filter is unhashable; the canonical key hashes equal options alike.
        return hash(self.key())

    def key(self) -> str:
        """Canonical text of these options: equal options give equal keys (batching)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (boosts as a dict)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["boosts"] = dict(self.boosts)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SearchOptions:
        """Inverse of :meth:`to_dict`; unknown keys raise QueryError naming them."""
        return resolve_options(None, d)


class SearchOverrides(TypedDict, total=False):
    """The keyword form of :class:`SearchOptions` (``engine.search(q, k=5, where=...)``).

    Same names and meanings as the dataclass fields; ``boosts`` may be any mapping and
    ``group_by_doc`` also takes True / False.
    """

    k: int
    offset: int
    where: str | Mapping[str, Any] | None
    modality: str | None
    group_by_doc: bool | Grouping | None
    mmr: float | None
    sort: str | None
    min_score: MinScore | None
    boosts: Mapping[str, float] | tuple[tuple[str, float], ...] | None
    mode: Mode | None
    fusion: Fusion
    rrf_k: int
    vector_weight: float
    lexical_weight: float
    all_words_first: bool
    fusion_depth: int


def resolve_options(
    options: SearchOptions | None, overrides: Mapping[str, Any] | None = None
) -> SearchOptions:
    """``options`` (default: ``SearchOptions()``) with ``overrides`` applied, validated."""
    if options is not None and not isinstance(options, SearchOptions):
        raise InvalidOptionError(
            "options",
            f"options must be a SearchOptions, got {type(options).__name__}; "
            "pass single options as keywords instead (k=5, where=...)",
        )
    base = options if options is not None else SearchOptions()
    if not overrides:
        return base
    known = {f.name for f in fields(SearchOptions)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InvalidOptionError(
            unknown[0],
            f"unknown search option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}",
        )
    return replace(base, **overrides)


def _grouping(value: object) -> Grouping | None:
    if value is None or value is False:
        return None
    if value is True or value == "max":
        return "max"
    if value == "mean":
        return "mean"
    raise InvalidOptionError(
        "group_by_doc", f"group_by_doc must be 'max', 'mean', true or false, got {value!r}"
    )


def _finite(option: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidOptionError(option, f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidOptionError(option, f"{name} must be finite, got {value}")
    return float(value)


def _min_score(value: object) -> MinScore:
    """A finite cosine, or "auto" (any case, surrounding blanks ignored)."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidOptionError(
            "min_score",
            f"min_score must be a number (a cosine such as 0.3) or 'auto' (the model's "
            f"calibrated relevance threshold), got {value!r}",
        )
    return _finite("min_score", "min_score", value)


def _sort_spec(spec: object) -> str:
    if not isinstance(spec, str):
        raise InvalidOptionError("sort", f"sort must be a string like 'price:asc', got {spec!r}")
    name, _, direction = spec.partition(":")
    if not name.strip() or direction not in ("", "asc", "desc"):
        raise InvalidOptionError(
            "sort", f"sort must look like 'field', 'field:asc' or 'field:desc', got {spec!r}"
        )
    return spec


def _boosts(value: object) -> tuple[tuple[str, float], ...]:
    if value is None:
        return ()
    items: Any = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = [(name, weight) for name, weight in items]
    except (TypeError, ValueError) as e:
        raise InvalidOptionError(
            "boosts",
            f"boosts must map numeric field names to weights, e.g. {{'rating': 0.01}}; got {value!r}",
        ) from e
    out: dict[str, float] = {}
    for name, weight in pairs:
        if not isinstance(name, str) or not name:
            raise InvalidOptionError(
                "boosts", f"boost field names must be non-empty strings, got {name!r}"
            )
        if name in out:
            raise InvalidOptionError("boosts", f"boost field {name!r} is given twice")
        out[name] = _finite("boosts", f"boost weight for {name!r}", weight)
    return tuple(sorted(out.items()))


def _where(where: object) -> str | dict[str, Any]:
    # Syntax is checked here (no schema needed); columns and types by the engine.
    from clipsearch.retrieval.filters import from_json, parse

    if isinstance(where, str):
        if not where.strip():
            raise InvalidOptionError(
                "where", "where: the filter is empty; omit it to search every row"
            )
        parse(where)
        return where
    if isinstance(where, Mapping):
        where = dict(where)
        from_json(where)
        return where
    raise InvalidOptionError(
        "where", f"where must be a filter expression string or its JSON form, got {where!r}"
    )
