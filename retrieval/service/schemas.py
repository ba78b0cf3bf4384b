"""Request and response models of the HTTP API (pydantic; they also feed the OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Modality = Literal["image", "text"]


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
    """A search: one query (text, image, a doc to find more like, or composed terms)."""

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
        "or its JSON AST.",
    )
    k: int = Field(default=10, description="Results per page (1..max_k).")
    offset: int = Field(default=0, description="Results to skip (paging).")
    modality: Modality | None = Field(
        default=None, description="Rows to search; default image (product photos)."
    )
    group_by_doc: bool = Field(default=False, description="One result per doc_id (its best row).")
    mmr: float | None = Field(
        default=None, description="MMR diversity: lambda in [0, 1] (1 = pure relevance)."
    )
    sort: str | None = Field(
        default=None,
        description="Sort the relevant results by a metadata column: 'price', 'price:asc' or "
        "'price:desc'.",
    )
    min_score: float | None = Field(default=None, description="Drop results scoring below this.")


class ClassifyRequest(BaseModel):
    """Zero-shot classification of one image against candidate labels."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(default=None, description="Image as base64 (or a data: URL).")
    image_url: str | None = Field(default=None, description="Image by http(s) URL, when enabled.")
    like_doc: str | None = Field(default=None, description="Classify this indexed doc's image.")
    labels: list[str] = Field(..., description="Candidate labels ('a shirt', 'a shoe').")


class HitOut(BaseModel):
    rank: int
    score: float
    doc_id: str
    row_id: int
    modality: str
    # The text of a text row; None for image rows (fetch image_url instead).
    text: str | None = None
    # Where to fetch the image of an image row.
    image_url: str | None = None
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    index_version: int
    # Server-side time for this request, ms (queueing, decoding and search).
    took_ms: float
    # Engine timings by stage, ms.
    timings: dict[str, float]
    # Rows passing the filter (when a filter was given).
    total_matches: int | None = None
    hits: list[HitOut]


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
    metadata: dict[str, Any]


class ItemResponse(BaseModel):
    index_version: int
    doc_id: str
    rows: list[ItemRow]


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
    # "string", "number", "bool".
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
