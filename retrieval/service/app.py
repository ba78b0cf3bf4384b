"""The FastAPI app: routes over a :class:`~clipsearch.retrieval.service.state.ServiceState`.

``create_app(index_path_or_engine, config)`` builds the app; ``clipsearch serve`` runs it
under uvicorn. Every JSON response carries ``index_version`` and every response the
``X-Index-Version`` header; every error has the shape of
:mod:`clipsearch.retrieval.service.errors`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
)
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

import clipsearch
from clipsearch.retrieval.encoders.base import decode_side
from clipsearch.retrieval.errors import ClipsearchError
from clipsearch.retrieval.service import queries
from clipsearch.retrieval.service.admission import deadline_for, remaining
from clipsearch.retrieval.service.batching import DeadlineExceededError, QueueFullError
from clipsearch.retrieval.service.catalog import item_rows, resolve_image
from clipsearch.retrieval.service.config import ServiceConfig
from clipsearch.retrieval.service.decoding import decode_image_async
from clipsearch.retrieval.service.errors import ApiError, error_body, to_api_error
from clipsearch.retrieval.service.forms import IMAGE_FORM, image_form_schema, read_image_form
from clipsearch.retrieval.service.middleware import ServiceMiddleware
from clipsearch.retrieval.service.runner import ClassifyJob, SearchJob
from clipsearch.retrieval.service.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    FacetsResponse,
    HealthResponse,
    InfoResponse,
    ItemResponse,
    ReloadResponse,
    SearchRequest,
    SearchResponse,
)
from clipsearch.retrieval.service.state import ServiceState

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"


class FastJSONResponse(Response):
    """JSON rendered by orjson (the ``serve`` extra; 5-10x faster than json.dumps on a
    page of hits, NaN as null); the standard library when orjson is missing."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        try:
            import orjson
        except ImportError:  # pragma: no cover - orjson ships with the serve extra
            return json.dumps(content, separators=(",", ":")).encode()
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


CONFIG_ENV = "CLIPSEARCH_SERVE_CONFIG"
INDEX_ENV = "CLIPSEARCH_SERVE_INDEX"


def create_app(
    index: str | Path | Any, config: ServiceConfig | None = None, *, encoder: Any = None
) -> FastAPI:
    """Build the service app.

    Args:
        index: an index directory (opened in a worker thread after startup; /health is
            503 until it has loaded) or an already open ``SearchEngine``.
        config: limits, batching, API key...; defaults to ``ServiceConfig()``.
        encoder: the query encoder, when opening by path; None = the index's own.
    """
    config = config or ServiceConfig()
    state = ServiceState(index, config, encoder=encoder)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(
        title="clipsearch",
        version=clipsearch.__version__,
        description="Cross-modal product search: text and image queries over a CLIP index.",
        lifespan=lifespan,
    )
    app.state.service = state
    _install_error_handlers(app, state)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["content-type", "x-api-key"],
        )
    app.add_middleware(
        ServiceMiddleware,
        api_key=config.api_key,
        admin_without_key=config.admin_without_key,
        max_body_bytes=config.max_body_bytes,
        observe=state.metrics.observe_request,
        index_version=lambda: state.version,
        overloaded=state.overloaded,
        retry_after_s=config.retry_after_s,
    )
    _add_search_routes(app, state)
    _add_catalog_routes(app, state)
    _add_ops_routes(app, state)
    _document_limits(app, config, state)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for ``--workers N``: each worker process builds its own app."""
    raw = json.loads(os.environ[CONFIG_ENV])
    raw["image_roots"] = tuple(raw.get("image_roots", ()))
    raw["cors_origins"] = tuple(raw.get("cors_origins", ()))
    return create_app(os.environ[INDEX_ENV], ServiceConfig(**raw))


# ---------------------------------------------------------------------------- schema

_STATUS_TEXT = {
    400: "Bad request: empty or ambiguous query, bad filter, undecodable image, bad header.",
    401: "Missing or wrong API key (when the server has one).",
    403: "Forbidden: URL fetch is off, or admin routes without an API key.",
    404: "Unknown doc_id, image not available, or no such route.",
    413: "Too large: body, image bytes, image pixels or text.",
    422: "Invalid request: a field of the wrong type or out of range.",
    429: "Overloaded: the queue is full; retry after Retry-After seconds.",
    500: "Unexpected server error (logged).",
    503: "Not ready: the index is loading or unavailable.",
    504: "The request deadline passed.",
}
# Every route may answer these: the middleware's checks and the last-resort 500.
_ALWAYS = (400, 401, 413, 500)


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error statuses a route returns, in our error shape."""
    return {
        status: {"model": ErrorResponse, "description": _STATUS_TEXT[status]}
        for status in sorted({*_ALWAYS, *statuses})
    }


_QUERY_ERRORS = _errors(403, 404, 422, 429, 503, 504)


def _document_limits(app: FastAPI, config: ServiceConfig, state: ServiceState) -> None:
    """Put this server's limits into its OpenAPI schema (ranges of k and offset, text
    lengths, list sizes), so schema-driven clients and testers generate requests it
    accepts. Documentation only: SearchOptions and the service's checks enforce them."""
    original = app.openapi
    k_max, _, max_offset = queries.page_limits(config)
    nonblank: dict[str, Any] = {"minLength": 1, "pattern": r"\S"}
    search: dict[str, dict[str, Any]] = {
        "k": {"minimum": 1, "maximum": k_max},
        "offset": {"minimum": 0, "maximum": max_offset},
        "text": {**nonblank, "maxLength": config.max_text_chars},
        "terms": {"maxItems": config.max_terms, "minItems": 1},
        "modality": {"enum": ["image", "text"]},
        "mmr": {"minimum": 0, "maximum": 1},
        "filter": nonblank,
        "sort": {"pattern": r"^[A-Za-z_][A-Za-z0-9_]*(:(asc|desc))?$"},
        # Only the string branch of bool | str.
        "group_by_doc": {"by_type": {"string": {"enum": ["max", "mean"]}}},
        "facets": {"maxItems": queries.MAX_FACETS},
    }
    limits: dict[str, dict[str, dict[str, Any]]] = {
        "SearchRequest": search,
        "QueryTerm": {"text": {**nonblank, "maxLength": config.max_text_chars // config.max_terms}},
        "ClassifyRequest": {
            "labels": {
                "minItems": 2,
                "maxItems": config.max_labels,
                "items": {
                    "type": "string",
                    "pattern": r"\S",
                    "maxLength": config.max_text_chars // config.max_labels,
                },
            }
        },
        IMAGE_FORM: {**search, "image": {"minLength": 1}},
    }

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        facetable = _facetable_columns(state)
        models = schema.setdefault("components", {}).setdefault("schemas", {})
        models[IMAGE_FORM] = image_form_schema()
        for model, fields in limits.items():
            props = models.get(model, {}).get("properties", {})
            for name, extra in fields.items():
                if name in props:
                    target = props[name]
                    # Optional fields are anyOf [T, null]: constrain the T branch.
                    for branch in target.get("anyOf", [target]):
                        kind = branch.get("type")
                        if kind == "null":
                            continue
                        if "by_type" in extra:
                            branch.update(extra["by_type"].get(kind, {}))
                        else:
                            branch.update(extra)
        if facetable is not None:
            for model in ("SearchRequest", IMAGE_FORM):
                props = models.get(model, {}).get("properties", {})
                facets = props.get("facets", {})
                for branch in facets.get("anyOf", [facets]):
                    if branch.get("type") == "array":
                        branch["items"] = {"type": "string", "enum": facetable}
            app.openapi_schema = schema  # cached once the index (its columns) is known
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _facetable_columns(state: ServiceState) -> list[str] | None:
    """Columns ``facets`` accepts on the loaded index; None before it has loaded."""
    if not state.ready:
        return None
    from clipsearch.retrieval.errors import InvalidOptionError
    from clipsearch.retrieval.facets import check_facet_column

    schema = state.engine.schema
    out = []
    for name in schema.names:
        try:
            check_facet_column(schema, name)
        except InvalidOptionError:
            continue
        out.append(name)
    return out


# ---------------------------------------------------------------------------- search


def _add_search_routes(app: FastAPI, state: ServiceState) -> None:
    config = state.config

    @app.post(
        "/search",
        response_model=SearchResponse,
        response_model_exclude_unset=True,
        responses=_QUERY_ERRORS,
        tags=["search"],
    )
    async def search(body: SearchRequest) -> Response:
        """Text, image, "more like this" or composed query with filters, reranking and
        per-product facet counts."""
        start = time.perf_counter()
        deadline = deadline_for(config)
        query = await queries.build_query(body, state, deadline)
        return await _run_search(state, query, start, deadline)

    @app.post(
        "/search/image",
        response_model=SearchResponse,
        response_model_exclude_unset=True,
        responses=_QUERY_ERRORS,
        tags=["search"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {"$ref": f"#/components/schemas/{IMAGE_FORM}"}
                    }
                },
            }
        },
    )
    async def search_image(request: Request) -> Response:
        """Image query by multipart upload (what a browser form sends): the ``image`` file
        plus any option of ``POST /search`` as form fields (``facets`` repeated, objects
        such as ``boosts`` as JSON text), validated into the same SearchOptions. A
        ``text`` field refines the photo with words ("like this, but blue")."""
        start = time.perf_counter()
        deadline = deadline_for(config)
        raw, body = await read_image_form(request, config)
        options = queries.search_options(body, config)
        text = (body.text or "").strip()  # blank form fields arrive as not given
        queries.check_text_budget([text], config, field="text")
        min_side = decode_side(state.engine.encoder)
        pil = await decode_image_async(
            raw, config, state.pixels, field="image", deadline=deadline, min_side=min_side
        )
        value: Any = pil
        if text:
            from clipsearch.retrieval.queries import ComposedQuery

            value = ComposedQuery(terms=((1.0, pil), (1.0, text)))
        query = queries.Query(value=value, options=options, query_modality="image")
        query = queries.with_relevance(query, body, state)
        return await _run_search(state, query, start, deadline)

    @app.post(
        "/classify", response_model=ClassifyResponse, responses=_QUERY_ERRORS, tags=["search"]
    )
    async def classify(body: ClassifyRequest) -> ClassifyResponse:
        """Zero-shot: probabilities of the image over the given labels."""
        start = time.perf_counter()
        deadline = deadline_for(config)
        labels = queries.check_labels(body.labels, config)
        pil = await queries.image_from(body, state, deadline, field="image", vector_ok=False)
        version = state.version
        answer = await _submit(state, ClassifyJob(image=pil, labels=labels), deadline)
        return ClassifyResponse(
            index_version=version or 0,
            took_ms=(time.perf_counter() - start) * 1000,
            labels=[{"label": str(lab), "probability": float(p)} for lab, p in answer],  # type: ignore[misc]
        )


async def _submit(state: ServiceState, job: Any, deadline: float) -> Any:
    state.engine  # noqa: B018 (raises the 503 not_ready before queueing)
    remaining(deadline)
    try:
        return await state.batcher.submit(job, deadline=deadline)
    except Exception as e:
        if isinstance(e, ApiError):
            raise
        api = to_api_error(e, retry_after_s=state.config.retry_after_s, known=state.known_paths())
        if api is None:
            raise
        if api.code == "overloaded":
            state.metrics.observe_rejection("queue_full")
        elif api.code == "deadline_exceeded":
            state.metrics.observe_rejection("deadline")
        raise api from e


async def _run_search(
    state: ServiceState, query: queries.Query, start: float, deadline: float
) -> Response:
    job = SearchJob(
        query=query.value,
        options=query.options,
        facets=query.facets,
        relevance_cutoff=query.relevance_cutoff,
    )
    results = await _submit(state, job, deadline)
    body = queries.to_response(
        results,
        query,
        took_ms=(time.perf_counter() - start) * 1000,
        expose_source=state.config.expose_source,
    )
    # orjson, and no second pydantic pass over a body built from typed results (the
    # response_model still documents it): ~10x cheaper than FastAPI's default path.
    return FastJSONResponse(body)


# ---------------------------------------------------------------------------- catalog


def _add_catalog_routes(app: FastAPI, state: ServiceState) -> None:
    # doc_ids may contain "/" (an image folder's relative paths), hence :path; the
    # image route is declared first so ".../image" is not read as part of a doc_id.
    @app.get(
        "/items/{doc_id:path}/image",
        tags=["catalog"],
        response_class=FileResponse,
        responses={
            200: {"content": {"image/*": {}}, "description": "The image file."},
            **_errors(404, 422, 503),
        },
    )
    async def item_image(doc_id: str, row_id: int | None = None) -> FileResponse:
        """The indexed photo of a doc (its first, or the row ``row_id``), from the index's
        image roots only."""
        snapshot = state.snapshot
        rows = await asyncio.to_thread(item_rows, snapshot, doc_id)
        images = [r for r in rows if r.modality == "image"]
        if row_id is not None:
            images = [r for r in images if r.row_id == row_id]
        if not images:
            raise ApiError(
                404,
                "image_not_found",
                f"doc {doc_id!r} has no indexed image"
                + (f" with row_id {row_id}" if row_id is not None else ""),
                details={"doc_id": doc_id},
            )
        roots = queries.image_roots(state)
        found = resolve_image(images[0].source, roots)
        if found is None:
            raise ApiError(
                404,
                "image_not_found",
                f"the image of doc {doc_id!r} is not available inside the index's image "
                "roots (moved, deleted, or outside them); start `clipsearch serve` with "
                "--image-root pointing at the catalog folder",
                details={"doc_id": doc_id, "roots": len(roots)},
            )
        path, content_type = found
        return FileResponse(
            path,
            media_type=content_type,
            headers={
                "X-Index-Version": str(snapshot.version),
                "Cache-Control": "public, max-age=300",
                "X-Content-Type-Options": "nosniff",
            },
        )

    @app.get(
        "/items/{doc_id:path}",
        response_model=ItemResponse,
        response_model_exclude_unset=True,
        responses=_errors(404, 422, 503),
        tags=["catalog"],
    )
    async def item(doc_id: str) -> ItemResponse:
        """Every indexed row of one product/document: its photos and texts with metadata."""
        snapshot = state.snapshot
        rows = await asyncio.to_thread(item_rows, snapshot, doc_id)
        if not rows:
            raise _unknown_doc(doc_id)
        return ItemResponse(
            index_version=snapshot.version,
            doc_id=doc_id,
            rows=[
                queries.item_row_out(doc_id, r, expose_source=state.config.expose_source)
                for r in rows
            ],
        )

    @app.get("/facets", response_model=FacetsResponse, responses=_errors(503), tags=["catalog"])
    async def facets() -> FacetsResponse:
        """Filterable metadata columns: distinct values, numeric ranges, booleans."""
        state.snapshot  # noqa: B018 (503 before the index is loaded)
        version, columns = await asyncio.to_thread(state.facets)
        return FacetsResponse(index_version=version, columns=columns)


def _unknown_doc(doc_id: str) -> ApiError:
    return ApiError(
        404, "unknown_doc", f"no live row has doc_id {doc_id!r}", details={"doc_id": doc_id}
    )


# ---------------------------------------------------------------------------- ops


def _index_info(snapshot: Any) -> dict[str, Any]:
    """InfoResponse fields of a pinned snapshot (its shards' lexical parts as loaded:
    a recorded part that could not be opened, e.g. without tantivy, does not count)."""
    by_modality: dict[str, list[Any]] = {}
    for shard in snapshot.shards:
        if shard.record.rows:
            by_modality.setdefault(shard.record.modality, []).append(shard)
    live = snapshot.manifest.rows_by_modality()
    modalities = {}
    for modality, shards in sorted(by_modality.items()):
        lexical = [s.lexical is not None for s in shards]
        fields = {f for s in shards if s.lexical is not None for f in s.record.lexical.fields}
        modalities[modality] = {
            "rows": int(live.get(modality, 0)),
            "modes": ["vector", "lexical", "hybrid"] if any(lexical) else ["vector"],
            "default_mode": "hybrid" if all(lexical) else "vector",
            "text_fields": sorted(fields),
        }
    return {
        "index_version": snapshot.version,
        "default_modality": "image" if "image" in modalities else "text",
        "modalities": modalities,
    }


def _add_ops_routes(app: FastAPI, state: ServiceState) -> None:
    @app.get("/health", response_model=HealthResponse, responses=_errors(503), tags=["ops"])
    async def health() -> HealthResponse:
        """200 once the manifest is verified and every shard is loaded; 503 before."""
        manifest = state.snapshot.manifest
        return HealthResponse(
            status="ok",
            index_version=manifest.version,
            rows=manifest.n_live,
            rows_by_modality=manifest.rows_by_modality(),
        )

    info_cache: dict[int, dict[str, Any]] = {}

    @app.get("/info", response_model=InfoResponse, responses=_errors(503), tags=["ops"])
    async def info() -> Response:
        """What the index offers: per modality its rows, search modes (whether words can
        be matched: lexical and hybrid) and the text fields they match."""
        snapshot = state.snapshot
        body = info_cache.get(snapshot.version)
        if body is None:
            info_cache.clear()  # one version at a time
            body = info_cache[snapshot.version] = _index_info(snapshot)
        return FastJSONResponse(body)

    @app.get("/metrics", response_class=PlainTextResponse, responses=_errors(), tags=["ops"])
    async def metrics() -> PlainTextResponse:
        """Prometheus text exposition: requests, latency histograms, queue depth, version."""
        return PlainTextResponse(
            state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.post(
        "/admin/reload",
        response_model=ReloadResponse,
        responses=_errors(403, 503),
        tags=["ops"],
    )
    async def reload() -> ReloadResponse:
        """Switch to the newest committed index version; in-flight queries finish on theirs.

        Needs the API key; with none set it is 403 unless the server runs with
        --admin-without-key on a loopback address and the caller is local."""
        previous, current = await state.reload()
        return ReloadResponse(
            previous_version=previous, index_version=current, changed=previous != current
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------- errors


def _install_error_handlers(app: FastAPI, state: ServiceState) -> None:
    def respond(err: ApiError) -> JSONResponse:
        headers = dict(err.headers)
        if state.version is not None:
            headers.setdefault("X-Index-Version", str(state.version))
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {
                "location": ".".join(str(p) for p in e.get("loc", ())),
                "message": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
            for e in exc.errors()
        ]
        summary = "; ".join(f"{p['location']}: {p['message']}" for p in problems[:5])
        return respond(
            ApiError(
                422,
                "invalid_request",
                f"invalid request: {summary}",
                details={"problems": problems},
            )
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
        code = codes.get(exc.status_code, "http_error")
        return JSONResponse(
            error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
        )

    async def library_error(_request: Request, exc: Exception) -> JSONResponse:
        log.info("%s: %s", type(exc).__name__, exc)  # the unscrubbed message, for the operator
        api = to_api_error(exc, retry_after_s=state.config.retry_after_s, known=state.known_paths())
        if api is None:  # unreachable for the registered types; keeps mypy honest
            raise exc
        return respond(api)

    # Registered per family (not for Exception, which Starlette routes around the
    # middleware): anything else reaches ServiceMiddleware, which logs it and answers 500.
    for family in (ClipsearchError, QueueFullError, DeadlineExceededError):
        app.add_exception_handler(family, library_error)
