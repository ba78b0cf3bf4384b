"""Fetching query images by URL, guarded against server-side request forgery.

Off unless the service is started with ``--allow-url-fetch``. When on, a URL must be
http or https; its host is resolved and *every* address must be public (not private,
loopback, link-local, multicast, reserved or unspecified, IPv4 and IPv6 alike,
including IPv4-mapped / 6to4 / Teredo forms of those). A host that is an address
literal in any spelling (``127.0.0.1.``, ``2130706433``, ``0177.1``, ``0x7f.1``,
``[::ffff:127.0.0.1]``) is judged as that address without asking the resolver, and a
host that is neither a literal nor a valid DNS name (an IPv6 zone id such as
``[fe80::1%25lo]``, a numeric last label, odd characters) is refused before any DNS
query. The connection then goes to the
address that was checked, so a DNS answer that changes between check and connect
(rebinding) cannot redirect it. Redirects are followed by hand and every hop is checked
again. The body is capped in bytes and the whole fetch in time.

Stdlib only (``http.client`` + ``ssl``), run in a worker thread by the caller.
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from clipsearch.retrieval.errors import ClipsearchError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_REDIRECTS = {301, 302, 303, 307, 308}
_CHUNK = 64 * 1024
# One DNS label (RFC 1123): letters, digits and inner hyphens, 1..63 characters.
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# One part of an inet_aton-style IPv4 literal: decimal, octal (leading 0) or hex (0x).
_NUMERIC_PART = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


class FetchError(ClipsearchError, ValueError):
    """A URL was refused by the guard, or fetching it failed (status, size, time)."""

    def __init__(self, message: str, *, code: str = "fetch_failed", status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def blocked_reason(ip: IPAddress) -> str | None:
    """Why the service must not connect to ``ip`` ("loopback", "private", ...), or None."""
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv4 wrapped in IPv6 is judged as the IPv4 address it reaches.
        for embedded in (ip.ipv4_mapped, ip.sixtofour):
            if embedded is not None:
                reason = blocked_reason(embedded)
                return None if reason is None else f"{reason} (embedded in {ip})"
        if ip.teredo is not None:
            return "teredo tunnel address"
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
    )
    for name, hit in checks:
        if hit:
            return name
    if not ip.is_global:  # shared address space (100.64/10) and other special ranges
        return "not globally routable"
    return None


def public_address_only(ip: IPAddress) -> bool:
    """The default address policy: only globally routable unicast addresses."""
    return blocked_reason(ip) is None


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
    service always uses the defaults. Raises :class:`FetchError`.
    """
    deadline = time.monotonic() + limits.timeout_s
    resolve = resolve or _resolve
    for _hop in range(limits.max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise FetchError(
                f"image URL scheme {parts.scheme or '(none)'!r} is not allowed; use http or https",
                code="url_not_allowed",
            )
        if not parts.hostname:
            raise FetchError(f"image URL {url!r} has no host", code="url_not_allowed")
        if parts.username or parts.password:
            raise FetchError("image URLs with credentials are not allowed", code="url_not_allowed")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise FetchError(f"image URL {url!r}: bad port", code="url_not_allowed") from e
        literal = host_address(parts.hostname)
        addresses = [literal] if literal is not None else resolve(parts.hostname, port)
        if not addresses:
            raise FetchError(f"image URL host {parts.hostname!r} does not resolve")
        for ip in addresses:
            if not address_allowed(ip):
                reason = blocked_reason(ip) or "not allowed"
                raise FetchError(
                    f"image URL host {parts.hostname!r} resolves to {ip} ({reason}); "
                    "only public addresses may be fetched",
                    code="url_not_allowed",
                )
        status, location, body = _get_once(
            parts.scheme, parts.hostname, addresses[0], port, _path(url), limits, deadline
        )
        if status in _REDIRECTS:
            if not location:
                raise FetchError(f"image URL {url!r}: redirect without a Location header")
            url = urljoin(url, location)
            continue
        if status != 200:
            raise FetchError(f"image URL {url!r} answered HTTP {status}", code="fetch_failed")
        return body
    raise FetchError(
        f"image URL followed more than {limits.max_redirects} redirects", code="fetch_failed"
    )


def host_address(host: str) -> IPAddress | None:
    """The address a URL host names literally, or None for a DNS name worth resolving.

    Literals come in many spellings the system resolver would accept: a trailing dot,
    brackets, and the inet_aton forms (``2130706433``, ``0177.0.0.1``, ``0x7f.1``,
    ``127.1``); all of them are parsed here, so checking them never reaches DNS.
    Raises FetchError (``url_not_allowed``) for a host that is neither a literal nor a
    valid DNS name: IPv6 zone ids (``fe80::1%lo``), labels with odd characters, a
    numeric last label (no top-level domain is numeric), names over 253 characters.
    """
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if "%" in name:
        raise FetchError(
            "image URL hosts with an IPv6 zone id are not allowed", code="url_not_allowed"
        )
    name = name.rstrip(".")
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        pass
    labels = name.split(".")
    if all(_NUMERIC_PART.match(label) for label in labels):
        ip = _inet_aton(labels)
        if ip is None:
            raise FetchError(
                f"image URL host {host!r} is not a valid address", code="url_not_allowed"
            )
        return ip
    if (
        len(name) > 253
        or not all(_LABEL.match(label) for label in labels)
        or _NUMERIC_PART.match(labels[-1])
    ):
        raise FetchError(
            f"image URL host {host!r} is not a valid host name", code="url_not_allowed"
        )
    return None


def _inet_aton(parts: list[str]) -> ipaddress.IPv4Address | None:
    """inet_aton's reading of 1..4 numeric parts (the last fills the remaining bytes)."""
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        try:
            if part.startswith("0x"):
                values.append(int(part[2:] or "0", 16))
            elif len(part) > 1 and part.startswith("0"):
                values.append(int(part, 8))
            else:
                values.append(int(part, 10))
        except ValueError:  # "09" is not octal
            return None
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    number = last
    for i, v in enumerate(head):
        number += v << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def _path(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise FetchError(f"image URL host {host!r} does not resolve ({e})") from e
    out: list[IPAddress] = []
    for info in infos:
        addr = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if addr not in out:
            out.append(addr)
    return out


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError("image URL fetch ran out of time", code="fetch_timeout", status=504)
    return left


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to a pre-checked address while sending the URL's own Host header."""

    def __init__(self, host: str, ip: IPAddress, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((str(self._ip), self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """TLS to a pre-checked address; the certificate is verified for the URL's host name."""

    def __init__(self, host: str, ip: IPAddress, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self) -> None:
        raw = socket.create_connection((str(self._ip), self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)  # type: ignore[attr-defined]


def _get_once(
    scheme: str,
    host: str,
    ip: IPAddress,
    port: int,
    path: str,
    limits: FetchLimits,
    deadline: float,
) -> tuple[int, str | None, bytes]:
    cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
    conn = cls(host, ip, port, _remaining(deadline))
    try:
        conn.request("GET", path, headers={"User-Agent": "clipsearch", "Accept": "image/*"})
        resp = conn.getresponse()
        if resp.status in _REDIRECTS:
            return resp.status, resp.getheader("Location"), b""
        declared = resp.getheader("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
            raise FetchError(
                f"image URL body is {int(declared):,} bytes; the limit is {limits.max_bytes:,}",
                code="image_too_large",
                status=413,
            )
        chunks: list[bytes] = []
        size = 0
        while True:
            if conn.sock is not None:
                conn.sock.settimeout(_remaining(deadline))
            chunk = resp.read(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > limits.max_bytes:
                raise FetchError(
                    f"image URL body exceeds the limit of {limits.max_bytes:,} bytes",
                    code="image_too_large",
                    status=413,
                )
            chunks.append(chunk)
        return resp.status, None, b"".join(chunks)
    except TimeoutError as e:
        raise FetchError("image URL fetch timed out", code="fetch_timeout", status=504) from e
    except (OSError, http.client.HTTPException) as e:
        raise FetchError(f"image URL fetch failed ({type(e).__name__}: {e})") from e
    finally:
        conn.close()
