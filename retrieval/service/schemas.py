"""Request and response models of the HTTP API (pydantic; they also feed the OpenAPI schema)."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from clipsearch.retrieval.options import (
    DEFAULT_FUSION_DEPTH,
    MAX_FUSION_DEPTH,
    Mode,
    SearchOptions,
)


class QueryTerm(BaseModel):
    """One term of a composed query: exactly one of text, image, image_url or like_doc."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(default=None, description="Text of the term.")
    image: str | None = Field(default=None, description="Image as base64 (or a data: URL).")
    image_url: str | None = Field(
        default=None, description="Image URL (only when URL fetch is on)."
    )
    like_doc: str | None = Field(
        default=None, description="Use this indexed doc's image as the term."
    )
    weight: float = Field(
        default=1.0, description="Weight of the term; negative to steer away from it."
    )


class SearchRequest(BaseModel):
    """A search: one query (text, image, a doc to find more like, or composed terms) and
    its options.

    The options are those of :class:`~clipsearch.retrieval.options.SearchOptions` (the
    filter is called ``filter`` here, ``where`` there); this model only declares their
    JSON types, and :meth:`to_options` hands the values to SearchOptions, which
    validates them: no range or spelling is checked here.
    """

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(default=None, description="Text query ('red running shoes').")
    image: str | None = Field(default=None, description="Image query as base64 (or a data: URL).")
    image_url: str | None = Field(
        default=None, description="Image query by http(s) URL, when enabled."
    )
    like_doc: str | None = Field(
        default=None, description="'More like this': the doc_id whose image is the query."
    )
    terms: list[QueryTerm] | None = Field(
        default=None, description="Composed query: weighted sum of terms ('this photo, but red')."
    )
    filter: str | dict[str, Any] | None = Field(
        default=None,
        description='Metadata filter: an expression string ("price < 30 and in_stock") '
        "or its JSON AST. Blank = none.",
    )
    k: int = Field(default=10, description="Results per page (1..max_k).")
    offset: int = Field(default=0, description="Results to skip (paging).")
    modality: str | None = Field(
        default=None,
        description="Rows to search: 'image' or 'text'; default image rows when the index "
        "has any (image rows for like_doc and terms).",
    )
    group_by_doc: bool | str = Field(
        default=False,
        description="One result per doc_id: true or 'max' (scored by its best row), 'mean' "
        "(mean of its rows), false = off.",
    )
    mmr: float | None = Field(
        default=None, description="MMR diversity: lambda in [0, 1] (1 = pure relevance)."
    )
    sort: str | None = Field(
        default=None,
        description="Sort the relevant results by a metadata column: 'price', 'price:asc' or "
        "'price:desc' (nulls last). Blank = relevance.",
    )
    min_score: float | Literal["auto"] | None = Field(
        default=None,
        description="Drop results scoring below this cosine. 'auto': the server's relevance "
        "cutoff (its --relevance-cutoff, else the model's calibrated threshold for this "
        "query's direction, e.g. text->image), reported as relevance_cutoff; 422 when the "
        "server has neither. A min_score makes the default mode 'vector'; 'auto' refuses "
        "mode 'lexical' / 'hybrid' (their scores are not cosines).",
    )
    boosts: dict[Annotated[str, StringConstraints(min_length=1)], float] | None = Field(
        default=None,
        description="Linear score boosts over numeric metadata columns: score += weight * "
        'value (null = 0), e.g. {"rating": 0.01}.',
    )
    mode: Literal["vector", "lexical", "hybrid"] | None = Field(
        default=None,
        description="'vector', 'lexical' (BM25 over the index's text fields) or 'hybrid' "
        "(both, fused); default hybrid when the index has a lexical part, else vector.",
    )
    fusion: Literal["rrf", "weighted"] = Field(
        default="rrf",
        description="How hybrid fuses the two lists: 'rrf' (reciprocal rank fusion) or "
        "'weighted' (a weighted sum of normalised scores).",
    )
    rrf_k: int = Field(default=60, ge=1, description="The k of reciprocal rank fusion.")
    vector_weight: float = Field(default=1.0, ge=0, description="Weight of the vector list.")
    lexical_weight: float = Field(default=1.0, ge=0, description="Weight of the lexical list.")
    all_words_first: bool = Field(
        default=True,
        description="Hybrid: rows holding every query word rank first (in fused order).",
    )
    fusion_depth: int = Field(
        default=DEFAULT_FUSION_DEPTH,
        ge=1,
        le=MAX_FUSION_DEPTH,
        description="Hybrid: rows each list contributes to the fusion (at least offset + k).",
    )
    facets: list[str] | None = Field(
        default=None,
        description="Metadata columns to count per product for this query and filter "
        "(see SearchResponse.facets).",
    )

    def to_options(self, *, modality: str | None = None) -> SearchOptions:
        """The request's SearchOptions (``modality`` replaces an omitted one).

        Raises:
            InvalidOptionError naming the option, FilterError for a malformed filter.
        """
        # Options this API does not declare (yet) keep SearchOptions' defaults.
        declared = type(self).model_fields
        values = {
            f.name: getattr(self, OPTION_FIELDS.get(f.name, f.name))
            for f in dataclasses.fields(SearchOptions)
            if OPTION_FIELDS.get(f.name, f.name) in declared
        }
        # Form-style blanks mean "not given" over HTTP.
        for name in ("where", "sort", "modality"):
            if isinstance(values[name], str) and not values[name].strip():
                values[name] = None
        values["modality"] = values["modality"] or modality
        return SearchOptions(**values)


# SearchOptions field -> SearchRequest field, where the HTTP name differs.
OPTION_FIELDS = {"where": "filter"}


class ClassifyRequest(BaseModel):
    """Zero-shot classification of one image against candidate labels."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(default=None, description="Image as base64 (or a data: URL).")
    image_url: str | None = Field(default=None, description="Image by http(s) URL, when enabled.")
    like_doc: str | None = Field(default=None, description="Classify this indexed doc's image.")
    labels: list[str] = Field(..., description="Candidate labels ('a shirt', 'a shoe').")


class HitOut(BaseModel):
    # 1-based position in the whole ranking (offset included): page 2 of k=10 starts at 11.
    rank: int
    score: float
    doc_id: str
    row_id: int
    modality: str
    # The text of a text row; None for image rows (fetch image_url instead).
    text: str | None = None
    # Where to fetch the image of an image row.
    image_url: str | None = None
    # The row's source (an image's server path): only when the server runs with
    # --expose-source, else omitted.
    source: str | None = None
    # Whether the score reaches the relevance cutoff (SearchResponse.relevance_cutoff);
    # omitted when there is none.
    relevant: bool | None = None
    # Lexical and hybrid queries: the vector score and rank, the lexical (BM25) score and
    # rank and the fused score of this row; omitted for plain vector queries.
    explain: dict[str, Any] | None = None
    metadata: dict[str, Any]


class FacetValue(BaseModel):
    # A string column's value, a boolean, or a numeric range's label ("10 – 20").
    value: str | bool | float
    # Products (distinct doc_ids) counted that have this value.
    count: int
    # Numeric ranges only: [min, max), the last range of a column [min, max].
    min: float | None = None
    max: float | None = None


class SearchResponse(BaseModel):
    index_version: int
    # Server-side time for this request, ms (queueing, decoding and search).
    took_ms: float
    # Engine timings by stage, ms.
    timings: dict[str, float]
    # Rows passing the filter (when a filter was given).
    total_matches: int | None = None
    hits: list[HitOut]
    # With ``facets`` in the request: column -> values with product counts, over the
    # products the filter allows, or (when relevance_cutoff is set) over the products
    # among the query's best 1000 rows scoring at or above it. Strings: most products
    # first (at most 100); booleans: true/false; numbers: up to 5 ranges with edges
    # fixed per index version. Values with no product are left out.
    facets: dict[str, list[FacetValue]] | None = None
    # With ``facets``: the products those counts were taken over.
    total_products: int | None = None
    # "filter" (every product the filter allows) or "relevant" (those scoring at or
    # above relevance_cutoff); with ``facets`` only.
    facets_scope: str | None = None
    # The score at or above which a hit counts as relevant: the request's min_score
    # ("auto" resolved to its number), the server's --relevance-cutoff, or the model's
    # calibrated threshold; omitted when there is none.
    relevance_cutoff: float | None = None


class LabelScore(BaseModel):
    label: str
    probability: float


class ClassifyResponse(BaseModel):
    index_version: int
    took_ms: float
    labels: list[LabelScore]


class ItemRow(BaseModel):
    row_id: int
    modality: str
    text: str | None = None
    image_url: str | None = None
    # Only with --expose-source (see HitOut.source).
    source: str | None = None
    metadata: dict[str, Any]


class ItemResponse(BaseModel):
    index_version: int
    doc_id: str
    rows: list[ItemRow]


class ModalitySearch(BaseModel):
    """How the rows of one modality can be searched."""

    # Live rows of this modality.
    rows: int
    # Values of ``mode`` that /search accepts for these rows: "vector" always; "lexical"
    # and "hybrid" when at least one of their shards has a lexical (full-text) part.
    modes: list[Mode]
    # The mode a query without ``mode`` runs in: "hybrid" when every shard holding these
    # rows has a lexical part (and no min_score is given), else "vector".
    default_mode: Mode
    # Metadata columns the lexical parts index (words are matched in these), sorted.
    text_fields: list[str]


class InfoResponse(BaseModel):
    """What this server's index offers a client (a page decides what to show from it)."""

    index_version: int
    # The rows a query without ``modality`` searches ("image" when there are any).
    default_modality: str
    # Per modality with rows: its search modes (see ModalitySearch).
    modalities: dict[str, ModalitySearch]


class HealthResponse(BaseModel):
    status: str
    index_version: int
    rows: int
    rows_by_modality: dict[str, int]


class ReloadResponse(BaseModel):
    previous_version: int
    index_version: int
    changed: bool


class Facet(BaseModel):
    # "string", "number", "bool", "date" (a timestamp or date column: sortable).
    type: str
    # Distinct values (strings) with their row counts, most common first.
    values: list[str] | None = None
    counts: list[int] | None = None
    # Range of a numeric column.
    min: float | None = None
    max: float | None = None


class FacetsResponse(BaseModel):
    index_version: int
    columns: dict[str, Facet]


class ErrorInfo(BaseModel):
    # Stable snake_case identifier to branch on ("bad_image", "overloaded", ...).
    code: str
    # For people: what went wrong, where, and how to fix it.
    message: str
    # Structured extras (the field at fault, the limit exceeded, ...).
    details: dict[str, Any]


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer."""

    error: ErrorInfo
