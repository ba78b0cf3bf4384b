"""The service's error shape and the mapping from library exceptions onto HTTP.

Every 4xx/5xx body is ``{"error": {"code": ..., "message": ..., "details": {...}}}``.
``code`` is a stable snake_case identifier clients can branch on; ``message`` is for
people (what, where, how to fix); ``details`` carries structured extras. Unexpected
exceptions become a 500 with a generic message: stack traces go to the log only.
"""

from __future__ import annotations

import re
from typing import Any

from clipsearch.retrieval.errors import (
    ClipsearchError,
    ConfigError,
    FilterError,
    FingerprintMismatchError,
    ImageDecodeError,
    IndexFormatError,
    IndexNotFoundError,
    QueryError,
)
from clipsearch.retrieval.service.batching import DeadlineExceededError, QueueFullError
from clipsearch.retrieval.service.fetch import FetchError


class ApiError(Exception):
    """An error the service answers with a given status and stable code."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.details)


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


# Object reprs ("<_io.BytesIO object at 0x7f95...>") and absolute file paths of two or
# more components: neither belongs in a message sent to a client.
_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")
_PATH = re.compile(r"(?<![\w:/.>])(?:[A-Za-z]:)?(?:/[^\s/'\"<>:,;()]+){2,}/?")


def scrub(message: str, known: dict[str, str] | None = None) -> str:
    """``message`` without object reprs or server paths, for a client's eyes.

    ``known`` maps path prefixes the server knows (the index folder, image roots) onto
    names a client may see; any other absolute path becomes ``<path>``. The full message
    is only ever logged.
    """
    for prefix, name in sorted((known or {}).items(), key=lambda kv: -len(kv[0])):
        if prefix:
            message = message.replace(prefix, name)
    message = _REPR.sub("the uploaded data", message)
    return _PATH.sub("<path>", message)


# Library exception -> (status, code). Checked in order; the first isinstance wins.
_LIBRARY_ERRORS: tuple[tuple[type[BaseException], int, str], ...] = (
    (FilterError, 400, "bad_filter"),
    (QueryError, 400, "bad_query"),
    (ImageDecodeError, 400, "bad_image"),
    (FingerprintMismatchError, 503, "index_unavailable"),
    (IndexNotFoundError, 503, "index_unavailable"),
    (IndexFormatError, 503, "index_unavailable"),
    (ConfigError, 400, "bad_request"),
)


def to_api_error(
    exc: BaseException, *, retry_after_s: int = 1, known: dict[str, str] | None = None
) -> ApiError | None:
    """The ApiError for an exception the service knows, or None for an unexpected one.

    Library messages are scrubbed (:func:`scrub`, ``known`` paths renamed)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFullError):
        return ApiError(
            429,
            "overloaded",
            f"the service is at capacity ({exc}); retry after {retry_after_s} s",
            headers={"Retry-After": str(retry_after_s)},
        )
    if isinstance(exc, DeadlineExceededError):
        return ApiError(504, "deadline_exceeded", f"the query was abandoned: {exc}")
    if isinstance(exc, FetchError):
        return ApiError(exc.status, exc.code, scrub(str(exc)))
    for cls, status, code in _LIBRARY_ERRORS:
        if isinstance(exc, cls):
            return ApiError(
                status, code, scrub(str(exc), known), details={"type": type(exc).__name__}
            )
    if isinstance(exc, ClipsearchError):
        return ApiError(
            400, "bad_request", scrub(str(exc), known), details={"type": type(exc).__name__}
        )
    return None
