"""Turning API requests into engine queries, and engine results into API responses.

Search options are validated by :class:`~clipsearch.retrieval.options.SearchOptions`
(the request model hands its values over); this module maps its errors onto the API's
codes and adds only the service's own limits (``max_k``, ``max_page_depth``, labels,
terms), with errors that name the field and the allowed range. Images are decoded in
worker threads.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np

from clipsearch.retrieval.encoders.base import decode_side
from clipsearch.retrieval.errors import InvalidOptionError
from clipsearch.retrieval.options import AUTO, MAX_K, MAX_POOL, SearchOptions
from clipsearch.retrieval.service.admission import decode_base64_image, remaining
from clipsearch.retrieval.service.catalog import ItemRow, item_rows, resolve_image
from clipsearch.retrieval.service.decoding import decode_image_async
from clipsearch.retrieval.service.errors import ApiError
from clipsearch.retrieval.service.fetch import FetchLimits, fetch_url
from clipsearch.retrieval.service.schemas import OPTION_FIELDS, SearchRequest
from clipsearch.retrieval.service.schemas import ItemRow as ItemRowOut

if TYPE_CHECKING:
    from clipsearch.retrieval.service.config import ServiceConfig
    from clipsearch.retrieval.service.schemas import ClassifyRequest, QueryTerm
    from clipsearch.retrieval.service.state import ServiceState


@dataclass(frozen=True, kw_only=True)
class Query:
    """An engine-ready query: the value (str, PIL image, vector, ComposedQuery) + options."""

    value: Any
    options: SearchOptions
    # For "more like this": the doc the query came from, dropped from its own results.
    exclude_doc: str | None = None
    # "text" or "image": what the query is (for the calibrated relevance threshold).
    query_modality: str = "text"
    # Columns to count facets of.
    facets: tuple[str, ...] = ()
    # Score at or above which a hit is relevant (see ServiceState.relevance_cutoff).
    relevance_cutoff: float | None = None


# Most facet columns one request may ask for.
MAX_FACETS = 20


def check_facets(names: list[str] | None, state: ServiceState) -> tuple[str, ...]:
    """The request's facet columns, checked against the index's schema: 422
    ``invalid_request`` (``details.field = "facets"``) naming a bad one."""
    if not names:
        return ()
    from clipsearch.retrieval.facets import check_facet_column

    if len(names) > MAX_FACETS:
        raise ApiError(
            422,
            "invalid_request",
            f"facets: at most {MAX_FACETS} columns per request, got {len(names)}",
            details={"field": "facets"},
        )
    engine = state.engine
    if not hasattr(engine, "allowed_rows"):  # e.g. a distributed coordinator
        raise ApiError(
            422,
            "invalid_request",
            f"facets: this server's engine ({type(engine).__name__}) cannot count facets; "
            "leave facets out",
            details={"field": "facets"},
        )
    schema = engine.schema
    for name in names:
        try:
            check_facet_column(schema, name)
        except InvalidOptionError as e:
            raise ApiError(
                422, "invalid_request", str(e), details={"field": "facets", "column": name}
            ) from e
    return tuple(dict.fromkeys(names))


def with_relevance(query: Query, body: SearchRequest, state: ServiceState) -> Query:
    """``query`` with its facet columns and relevance cutoff; ``min_score: "auto"``
    becomes that cutoff's number here, before the job is queued (the batcher hands the
    engine vectors, which do not say whether they were texts or images)."""
    import dataclasses

    facets = check_facets(body.facets, state)
    options = query.options
    if options.min_score == AUTO:
        options = options.replace(min_score=_auto_cutoff(query, state))
    cutoff = state.relevance_cutoff(query.query_modality, options)
    return dataclasses.replace(query, options=options, facets=facets, relevance_cutoff=cutoff)


def _auto_cutoff(query: Query, state: ServiceState) -> float:
    """What ``min_score: "auto"`` means on this server: its relevance cutoff (the one
    hits' ``relevant`` and facets use: ``--relevance-cutoff``, else the model's
    calibrated threshold for the query's direction, cached per version); 422
    ``invalid_request`` (``details.field = "min_score"``) when there is neither."""
    cutoff = state.relevance_cutoff(query.query_modality, query.options.replace(min_score=None))
    if cutoff is not None:
        return cutoff
    try:  # no cutoff: the engine's error says which directions the model has and why
        return float(state.engine.relevance_threshold(query.query_modality, query.options.modality))
    except InvalidOptionError as e:
        message = f"{e} (or start the server with --relevance-cutoff)"
        raise ApiError(422, "invalid_request", message, details={"field": "min_score"}) from e


def search_options(
    body: SearchRequest, config: ServiceConfig, *, modality: str | None = None
) -> SearchOptions:
    """The validated SearchOptions of a search request, within the service's limits.

    ``modality`` replaces an omitted one. SearchOptions checks every value; a bad one
    becomes 422 ``k_out_of_range`` / ``offset_out_of_range`` (k, offset) or
    ``invalid_request`` (any other option, ``details.field`` naming it); a malformed
    filter raises FilterError (400 ``bad_filter``). Then the operator's limits apply.
    """
    try:
        options = body.to_options(modality=modality)
    except InvalidOptionError as e:
        raise _option_error(e, body.k, body.offset, config) from e
    if options.k > config.max_k:
        raise _k_out_of_range(options.k, config)
    _, depth, max_offset = page_limits(config)
    if options.offset > max_offset or options.offset + options.k > depth:
        raise _offset_out_of_range(options.offset, options.k, config)
    if not config.expose_source:
        _refuse_hidden_columns(options)
    return options


# Columns that hold server file paths (an image row's source): hidden over HTTP unless
# the operator starts the server with --expose-source.
HIDDEN_COLUMNS = frozenset({"source"})


def _refuse_hidden_columns(options: SearchOptions) -> None:
    """400 ``bad_filter`` / 422 ``invalid_request`` when a filter, sort or boost names a
    hidden column: even a prefix filter on ``source`` reveals server paths."""
    from clipsearch.retrieval.filters import from_json
    from clipsearch.retrieval.filters.nodes import columns_of

    if options.where is not None:
        if isinstance(options.where, str):
            hidden = _hidden_in_text(options.where)
        else:
            hidden = tuple(sorted(columns_of(from_json(options.where)) & HIDDEN_COLUMNS))
        if hidden:
            raise ApiError(
                400,
                "bad_filter",
                f"filter: column {hidden[0]!r} cannot be filtered over HTTP (it holds server "
                "file paths); the operator can allow it with `clipsearch serve --expose-source`",
                details={"field": "filter", "column": hidden[0]},
            )
    named = {"sort": [options.sort.split(":")[0]] if options.sort else []}
    named["boosts"] = [name for name, _ in options.boosts]
    for field, columns in named.items():
        for column in columns:
            if column in HIDDEN_COLUMNS:
                raise ApiError(
                    422,
                    "invalid_request",
                    f"{field}: column {column!r} is not available over HTTP (it holds server "
                    "file paths)",
                    details={"field": field, "column": column},
                )


@functools.lru_cache(maxsize=1024)
def _hidden_in_text(where: str) -> tuple[str, ...]:
    """Hidden columns a filter text names (a page repeats a few filters: parsed once)."""
    from clipsearch.retrieval.filters import parse
    from clipsearch.retrieval.filters.nodes import columns_of

    return tuple(sorted(columns_of(parse(where)) & HIDDEN_COLUMNS))


def check_text_budget(texts: list[str], config: ServiceConfig, *, field: str) -> None:
    """413 ``text_too_long`` when a request's texts together exceed ``max_text_chars``,
    before any of them reaches the tokenizer (a 10 MB query would hold the one encode
    worker for seconds)."""
    total = sum(len(t) for t in texts)
    if total > config.max_text_chars:
        raise ApiError(
            413,
            "text_too_long",
            f"{field}: the request carries {total:,} characters of text; the limit is "
            f"{config.max_text_chars:,}. The model reads only the first ~300 characters of "
            "each text: shorten it",
            details={"field": field, "chars": total, "limit": config.max_text_chars},
        )


def _option_error(e: InvalidOptionError, k: int, offset: int, config: ServiceConfig) -> ApiError:
    if e.option == "k":
        return _k_out_of_range(k, config)
    if e.option == "offset":
        return _offset_out_of_range(offset, k, config)
    field = OPTION_FIELDS.get(e.option, e.option)
    return ApiError(422, "invalid_request", str(e), details={"field": field})


def page_limits(config: ServiceConfig) -> tuple[int, int, int]:
    """(largest k, largest offset + k, largest offset) of this server: the service's
    limits within the library's. The OpenAPI schema documents them, requests are checked
    against them, so the two never disagree."""
    k_max = min(config.max_k, MAX_K)
    depth = min(config.max_page_depth, MAX_POOL)
    return k_max, depth, depth - k_max


def _k_out_of_range(k: int, config: ServiceConfig) -> ApiError:
    top, _, _ = page_limits(config)
    return ApiError(
        422,
        "k_out_of_range",
        f"k must be between 1 and {top}, got {k}",
        details={"field": "k", "min": 1, "max": top},
    )


def _offset_out_of_range(offset: int, k: int, config: ServiceConfig) -> ApiError:
    """The documented range (OpenAPI: 0..max_page_depth - max_k) and the page depth."""
    _, depth, top = page_limits(config)
    return ApiError(
        422,
        "offset_out_of_range",
        f"offset must be between 0 and {top}, and offset + k at most {depth}; got offset "
        f"{offset} with k {k}",
        details={"field": "offset", "max": top, "max_depth": depth},
    )


def check_labels(labels: list[str], config: ServiceConfig) -> tuple[str, ...]:
    check_text_budget(labels, config, field="labels")
    cleaned = tuple(label.strip() for label in labels)
    if len(cleaned) < 2:
        raise ApiError(
            422,
            "invalid_request",
            "labels: give at least two candidate labels",
            details={"field": "labels"},
        )
    if len(cleaned) > config.max_labels:
        raise ApiError(
            422,
            "invalid_request",
            f"labels: at most {config.max_labels} labels per call, got {len(cleaned)}",
            details={"field": "labels"},
        )
    if any(not label for label in cleaned):
        raise ApiError(
            422, "invalid_request", "labels: a label is empty", details={"field": "labels"}
        )
    return cleaned


async def build_query(body: SearchRequest, state: ServiceState, deadline: float) -> Query:
    """The engine query of a /search body: exactly one of text, image, image_url,
    like_doc or terms."""
    config = state.config
    given = [
        name
        for name in ("text", "image", "image_url", "like_doc", "terms")
        if getattr(body, name) not in (None, "", [])
    ]
    if not given:
        raise ApiError(
            400,
            "empty_query",
            "the query is empty: give text, image (base64), image_url, like_doc or terms",
        )
    if len(given) > 1:
        raise ApiError(
            400,
            "ambiguous_query",
            f"give exactly one of text, image, image_url, like_doc or terms (got {given}); "
            "to combine them use terms",
            details={"fields": given},
        )
    kind = given[0]
    texts = [body.text or ""] + [t.text or "" for t in body.terms or []]
    check_text_budget(texts, config, field="terms" if kind == "terms" else "text")
    if kind == "text":
        text = (body.text or "").strip()
        if not text:
            raise ApiError(400, "empty_query", "text: the query text is blank")
        query = Query(value=text, options=search_options(body, config))
    elif kind == "terms":
        terms = body.terms or []
        query = Query(
            value=await _composed(terms, state, deadline),
            options=search_options(body, config, modality="image"),
            query_modality="text" if all(t.text is not None for t in terms) else "image",
        )
    elif kind == "like_doc":
        doc_id = body.like_doc or ""
        vector = await _doc_vector(doc_id, state)
        options = search_options(body, config, modality="image")
        query = Query(
            value=vector,
            options=_excluding(options, doc_id),
            exclude_doc=doc_id,
            query_modality="image",
        )
    else:
        image = await image_from(body, state, deadline, field=kind)
        query = Query(value=image, options=search_options(body, config), query_modality="image")
    return with_relevance(query, body, state)


def _excluding(options: SearchOptions, doc_id: str) -> SearchOptions:
    """``options`` with a filter dropping ``doc_id`` (a doc is not "like" itself)."""
    from clipsearch.retrieval.filters import from_json, parse, to_json

    not_self = {"op": "!=", "column": "doc_id", "value": doc_id}
    if options.where is None:
        return options.replace(where=not_self)
    user = parse(options.where) if isinstance(options.where, str) else from_json(options.where)
    return options.replace(where={"op": "and", "args": [to_json(user), not_self]})


async def image_from(
    body: SearchRequest | ClassifyRequest | QueryTerm,
    state: ServiceState,
    deadline: float,
    *,
    field: str,
    vector_ok: bool = True,
    held: int = 0,
) -> Any:
    """The decoded PIL image named by a body's image / image_url / like_doc field.

    For like_doc the doc's stored vector is returned instead when ``vector_ok`` (search
    terms); otherwise (classify) its indexed image file is read from the image roots.
    """
    config = state.config
    if body.image:
        raw = decode_base64_image(body.image, config, field=field)
    elif body.image_url:
        raw = await _fetch(body.image_url, config, deadline)
    elif body.like_doc and vector_ok:
        return await _doc_vector(body.like_doc, state)
    elif body.like_doc:
        raw = await asyncio.to_thread(_doc_image_bytes, body.like_doc, state)
    else:
        raise ApiError(
            400, "empty_query", f"{field}: give an image (base64), image_url or like_doc"
        )
    min_side = decode_side(state.engine.encoder)
    return await decode_image_async(
        raw, config, state.pixels, field=field, deadline=deadline, min_side=min_side, held=held
    )


async def _fetch(url: str, config: ServiceConfig, deadline: float) -> bytes:
    if not config.allow_url_fetch:
        raise ApiError(
            403,
            "url_fetch_disabled",
            "image_url is disabled on this server (start it with --allow-url-fetch); send the "
            "image bytes as base64 or use POST /search/image",
        )
    limits = FetchLimits(
        max_bytes=min(config.fetch_max_bytes, config.max_image_bytes),
        timeout_s=min(config.fetch_timeout_s, remaining(deadline)),
        max_redirects=config.fetch_max_redirects,
    )
    return await asyncio.to_thread(fetch_url, url, limits)


async def _doc_vector(doc_id: str, state: ServiceState) -> np.ndarray:
    """The stored vector of a doc's first image row (else its first row), float32 [dim]."""
    rows = await asyncio.to_thread(item_rows, state.snapshot, doc_id)
    if not rows:
        raise ApiError(
            404,
            "unknown_doc",
            f"like_doc: no live row has doc_id {doc_id!r}",
            details={"doc_id": doc_id},
        )
    row = next((r for r in rows if r.modality == "image"), rows[0])
    vector = row.vector.astype(np.float32)
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


async def _composed(terms: list[QueryTerm], state: ServiceState, deadline: float) -> Any:
    from clipsearch.retrieval.queries import ComposedQuery

    if len(terms) > state.config.max_terms:
        raise ApiError(
            422,
            "invalid_request",
            f"terms: at most {state.config.max_terms} terms, got {len(terms)}",
            details={"field": "terms"},
        )
    parts: list[tuple[Any, float]] = []
    held = 0  # decoded pixels this request holds so far
    for i, term in enumerate(terms):
        field = f"terms[{i}]"
        named = [n for n in ("text", "image", "image_url", "like_doc") if getattr(term, n)]
        if len(named) != 1:
            raise ApiError(
                400,
                "bad_query",
                f"{field}: give exactly one of text, image, image_url or like_doc",
                details={"field": field},
            )
        if term.text is not None:
            if not term.text.strip():
                raise ApiError(
                    400, "empty_query", f"{field}: text is blank", details={"field": field}
                )
            value: Any = term.text.strip()
        else:
            value = await image_from(term, state, deadline, field=field, held=held)
            if not isinstance(value, np.ndarray):  # a decoded image, not a stored vector
                held += value.width * value.height
        parts.append((value, float(term.weight)))
    return ComposedQuery(terms=tuple((weight, value) for value, weight in parts))


def _doc_image_bytes(doc_id: str, state: ServiceState) -> bytes:
    """The bytes of a doc's first indexed image, read from the image roots only."""
    images = [r for r in item_rows(state.snapshot, doc_id) if r.modality == "image"]
    if not images:
        raise ApiError(
            404,
            "unknown_doc",
            f"like_doc: no image row has doc_id {doc_id!r}",
            details={"doc_id": doc_id},
        )
    found = resolve_image(images[0].source, image_roots(state))
    if found is None:
        raise ApiError(
            404, "image_not_found", f"like_doc: the image of {doc_id!r} is not available"
        )
    return found[0].read_bytes()


def image_roots(state: ServiceState) -> tuple[Path, ...]:
    """Folders images may be served from: the roots the index recorded at build time
    plus any --image-root folders (see ``ServiceState.image_roots``)."""
    return state.image_roots()


def _image_url(doc_id: str, row_id: int) -> str:
    return f"/items/{quote(doc_id, safe='/')}/image?row_id={row_id}"


def to_response(
    results: Any, query: Query, *, took_ms: float, expose_source: bool = False
) -> dict[str, Any]:
    """The JSON body of a search answer (a SearchResponse as plain data, serialised by
    orjson without a second validation pass: the fields are built from typed results)."""
    facets = None
    if hasattr(results, "facets"):  # FacetedResults
        facets, results = results.facets, results.results
    cutoff = query.relevance_cutoff
    hits = []
    for h in results.hits:
        image = h.modality == "image"
        hit: dict[str, Any] = {
            "rank": h.rank,
            "score": h.score,
            "doc_id": h.doc_id,
            "row_id": h.row_id,
            "modality": h.modality,
            "text": None if image else h.source,
            "image_url": _image_url(h.doc_id, h.row_id) if image else None,
            "metadata": _jsonable(h.metadata),
        }
        if expose_source:
            hit["source"] = h.source
        if h.explain is not None:
            hit["explain"] = h.explain
        if cutoff is not None:
            # The cutoff is a cosine; a fused (hybrid) score is not, so use the row's own.
            cosine = h.explain["vector"]["score"] if h.explain and h.explain.get("vector") else None
            hit["relevant"] = (h.score if cosine is None else cosine) >= cutoff
        hits.append(hit)
    body: dict[str, Any] = {
        "index_version": int(results.index_version),
        "took_ms": took_ms,
        "timings": results.timings,
        "total_matches": results.total_matches,
        "hits": hits,
    }
    if cutoff is not None:
        body["relevance_cutoff"] = cutoff
    if facets is not None:
        body["facets"] = {
            name: [_facet_value(v) for v in values] for name, values in facets.columns.items()
        }
        body["total_products"] = facets.products
        body["facets_scope"] = "filter" if cutoff is None else "relevant"
    return body


def _facet_value(v: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"value": v.value, "count": v.count}
    if v.min is not None:
        out["min"], out["max"] = v.min, v.max
    return out


def item_row_out(doc_id: str, row: ItemRow, *, expose_source: bool = False) -> ItemRowOut:
    return ItemRowOut(
        row_id=row.row_id,
        modality=row.modality,
        text=row.source if row.modality == "text" else None,
        image_url=_image_url(doc_id, row.row_id) if row.modality == "image" else None,
        metadata=_jsonable(row.metadata),
        **({"source": row.source} if expose_source else {}),
    )


def _jsonable(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata values as JSON can carry them (dates as ISO strings, NaN as null)."""
    import datetime as dt
    import decimal
    import math

    out: dict[str, Any] = {}
    for k, v in metadata.items():
        if isinstance(v, (dt.date, dt.datetime, dt.time)):
            v = v.isoformat()
        elif isinstance(v, decimal.Decimal):
            v = float(v)
        elif (isinstance(v, float) and not math.isfinite(v)) or isinstance(v, bytes):
            v = None
        out[k] = v
    return out
