"""Fetching catalog images by URL: bounded concurrency, retries, caps and a local cache.

Manifest image columns may hold ``http(s)://`` URLs (shop exports do). Each URL goes
through :func:`clipsearch.retrieval.netguard.guarded_get` (the private-address guard, a
byte cap and a time budget per fetch); transient failures (timeouts, dropped
connections, HTTP 429/5xx) are retried with exponential backoff. At most
``concurrency`` fetches run at once, whatever the number of decode workers.

Fetched bodies land in a local cache keyed by URL and by content hash::

    <cache>/urls/ab/<sha256(url)>.json   {"url": ..., "sha256": ..., "bytes": ...}
    <cache>/blobs/cd/<sha256(body)>      the body

so a re-run (or a resumed build) reads an already fetched URL from disk, and two URLs
serving the same image store it once. The cache never expires: delete it (or pass
another ``cache_dir``) to fetch changed images again. Pixel caps apply when the body is
decoded (``load_image``'s ``max_pixels``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from clipsearch.indexer.fsutil import atomic_write_bytes
from clipsearch.retrieval.errors import ConfigError
from clipsearch.retrieval.netguard import (
    SCHEMES,
    NetFetchError,
    guarded_get,
    public_address_only,
    public_or_loopback,
)

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/clipsearch/images`` (``~/.cache/clipsearch/images``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clipsearch" / "images"


def url_scheme(source: str) -> str | None:
    """The lower-case scheme of ``source`` when it looks like a URL (``scheme://``), else None."""
    head, sep, _ = source.partition("://")
    if not sep or not head or not head[0].isalpha():
        return None
    if not all(c.isalnum() or c in "+-." for c in head):
        return None
    return head.lower()


def is_fetchable(source: str) -> bool:
    return url_scheme(source) in SCHEMES


@dataclass(frozen=True, kw_only=True)
class FetchOptions:
    """How image URLs are fetched during build/add."""

    # Fetches in flight at once (network-bound; independent of decode workers).
    concurrency: int = 8
    # Wall-clock budget of one attempt (redirects included), in seconds.
    timeout_s: float = 20.0
    # Extra attempts after a transient failure (timeout, connection error, HTTP 429/5xx).
    retries: int = 2
    # First retry waits this long; each further retry waits twice as long.
    backoff_s: float = 0.5
    # Redirect hops followed; each hop passes the address guard again.
    max_redirects: int = 5
    # Where fetched images are cached; None: default_cache_dir().
    cache_dir: Path | None = None
    # Allow loopback addresses (127.0.0.1, ::1) besides public ones. For tests against
    # a local server; private, link-local and other special ranges stay refused.
    allow_loopback: bool = False

    # Fields that do not change which items get indexed or their vectors.
    NOT_IN_RESUME_KEY: ClassVar[frozenset[str]] = frozenset(
        {"concurrency", "timeout_s", "retries", "backoff_s", "cache_dir"}
    )

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"fetch concurrency must be >= 1, got {self.concurrency}")
        if not self.timeout_s > 0:
            raise ConfigError(f"fetch timeout must be > 0 seconds, got {self.timeout_s}")
        if self.retries < 0 or self.backoff_s < 0 or self.max_redirects < 0:
            raise ConfigError("fetch retries, backoff and max_redirects must be >= 0")


@dataclass
class FetchStats:
    """Counters of one fetcher (read from the build's progress reports)."""

    fetched: int = 0
    cached: int = 0
    failed: int = 0
    retried: int = 0
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def to_dict(self) -> dict[str, int]:
        return {
            "fetched": self.fetched,
            "cached": self.cached,
            "failed": self.failed,
            "retried": self.retried,
            "bytes": self.bytes,
        }


class UrlFetcher:
    """Thread-safe ``fetch(url) -> bytes`` under :class:`FetchOptions` and a byte cap."""

    def __init__(
        self,
        options: FetchOptions,
        *,
        max_bytes: int,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.options = options
        self.max_bytes = max_bytes
        self.cache = Path(options.cache_dir) if options.cache_dir else default_cache_dir()
        self.stats = FetchStats()
        self._slots = threading.BoundedSemaphore(options.concurrency)
        self._policy = public_or_loopback if options.allow_loopback else public_address_only
        self._sleep = sleep

    def fetch(self, url: str) -> bytes:
        """The body of ``url`` (from the cache when fetched before).

        Raises:
            NetFetchError: refused, or still failing after the retries.
        """
        cached = self._cached(url)
        if cached is not None:
            self.stats.add(cached=1)
            return cached
        attempt = 0
        while True:
            try:
                with self._slots:
                    body = guarded_get(
                        url,
                        max_bytes=self.max_bytes,
                        timeout_s=self.options.timeout_s,
                        max_redirects=self.options.max_redirects,
                        address_allowed=self._policy,
                    )
                break
            except NetFetchError as e:
                if not e.transient or attempt >= self.options.retries:
                    self.stats.add(failed=1)
                    if attempt:
                        raise NetFetchError(
                            f"{e} (after {attempt + 1} attempts)", kind=e.kind, status=e.status
                        ) from e
                    raise
                wait = self.options.backoff_s * 2**attempt
                log.info("retrying %s in %.1f s: %s", url, wait, e)
                self.stats.add(retried=1)
                self._sleep(wait)
                attempt += 1
        self.stats.add(fetched=1, bytes=len(body))
        self._store(url, body)
        return body

    # -- cache -------------------------------------------------------------------

    def _url_entry(self, url: str) -> Path:
        h = hashlib.sha256(url.encode("utf-8")).hexdigest()
        return self.cache / "urls" / h[:2] / f"{h}.json"

    def _blob(self, digest: str) -> Path:
        return self.cache / "blobs" / digest[:2] / digest

    def _cached(self, url: str) -> bytes | None:
        try:
            entry = json.loads(self._url_entry(url).read_text(encoding="utf-8"))
            if entry.get("url") != url:
                return None
            body = self._blob(str(entry["sha256"])).read_bytes()
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if len(body) > self.max_bytes or hashlib.sha256(body).hexdigest() != entry["sha256"]:
            return None  # damaged, or over a cap lowered since: fetch again
        return body

    def _store(self, url: str, body: bytes) -> None:
        """Cache ``body``; a cache that cannot be written only costs a later re-fetch."""
        digest = hashlib.sha256(body).hexdigest()
        entry = {"url": url, "sha256": digest, "bytes": len(body)}
        try:
            blob = self._blob(digest)
            if not blob.exists():
                atomic_write_bytes(blob, body, sync_dir=False)
            atomic_write_bytes(self._url_entry(url), json.dumps(entry).encode(), sync_dir=False)
        except OSError as e:
            log.warning("cannot cache %s in %s: %s", url, self.cache, e)
