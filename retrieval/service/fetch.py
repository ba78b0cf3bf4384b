"""Fetching query images by URL, guarded against server-side request forgery.

Off unless the service is started with ``--allow-url-fetch``. When on, every fetch goes
through :func:`clipsearch.retrieval.netguard.guarded_get`, the guard the indexer's
catalog fetches use too: http(s) only, no credentials, address literals in any spelling
judged without DNS, every resolved address public, the connection pinned to the checked
address, every redirect hop checked again, body and time capped. This module maps the
guard's failures onto the service's error codes and statuses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from clipsearch.retrieval.errors import ClipsearchError
from clipsearch.retrieval.netguard import (
    IPAddress,
    NetFetchError,
    blocked_reason,
    guarded_get,
    host_address,
    public_address_only,
    resolve_host,
)

__all__ = [
    "FetchError",
    "FetchLimits",
    "IPAddress",
    "blocked_reason",
    "fetch_url",
    "host_address",
    "public_address_only",
]

# NetFetchError.kind -> (service error code, HTTP status).
_CODES = {
    "not_allowed": ("url_not_allowed", 400),
    "timeout": ("fetch_timeout", 504),
    "too_large": ("image_too_large", 413),
}


class FetchError(ClipsearchError, ValueError):
    """A URL was refused by the guard, or fetching it failed (status, size, time)."""

    def __init__(self, message: str, *, code: str = "fetch_failed", status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass(frozen=True, kw_only=True)
class FetchLimits:
    """Caps on one URL fetch."""

    # Largest body accepted, in bytes; a larger body aborts the fetch (413).
    max_bytes: int
    # Wall-clock budget for the whole fetch, redirects included, in seconds.
    timeout_s: float
    # Redirect hops followed; each is checked like the first URL.
    max_redirects: int


def fetch_url(
    url: str,
    limits: FetchLimits,
    *,
    address_allowed: Callable[[IPAddress], bool] = public_address_only,
    resolve: Callable[[str, int], list[IPAddress]] | None = None,
) -> bytes:
    """GET ``url`` and return its body, enforcing the guard on every hop.

    ``address_allowed`` and ``resolve`` exist for tests (loopback-only servers); the
    service always uses the defaults. Raises :class:`FetchError` with the service's
    code: ``url_not_allowed``, ``fetch_timeout`` (504), ``image_too_large`` (413) or
    ``fetch_failed``.
    """
    try:
        return guarded_get(
            url,
            max_bytes=limits.max_bytes,
            timeout_s=limits.timeout_s,
            max_redirects=limits.max_redirects,
            address_allowed=address_allowed,
            resolve=resolve or resolve_host,
        )
    except NetFetchError as e:
        code, status = _CODES.get(e.kind, ("fetch_failed", 400))
        raise FetchError(str(e), code=code, status=status) from e
