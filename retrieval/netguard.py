"""Guarded HTTP(S) GETs: the server-side-request-forgery guard shared by every URL fetch.

A URL must be http or https without credentials. A host that is an address literal in
any spelling (``127.0.0.1.``, ``2130706433``, ``0177.1``, ``0x7f.1``,
``[::ffff:127.0.0.1]``) is judged as that address without asking the resolver, and a
host that is neither a literal nor a valid DNS name (an IPv6 zone id such as
``[fe80::1%25lo]``, a numeric last label, odd characters) is refused before any DNS
query. Other hosts are resolved and *every* address must be allowed (by default: globally routable unicast only, judging IPv4
wrapped in IPv6 -- mapped, 6to4 -- as the IPv4 address it reaches, and refusing Teredo).
The connection then goes to the address that was checked, so a DNS answer that changes
between check and connect (rebinding) cannot redirect it. Redirects are followed by hand
and every hop is checked again. The body is capped in bytes and the whole fetch in time.

Stdlib only (``http.client`` + ``ssl``); blocking, so callers run it in worker threads.
The indexer fetches catalog image URLs through it (:mod:`clipsearch.indexer.fetch`);
the service's query-image fetch (:mod:`clipsearch.retrieval.service.fetch`) maps its
errors onto HTTP answers.
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

from clipsearch.retrieval.errors import ClipsearchError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressPolicy = Callable[[IPAddress], bool]
Resolver = Callable[[str, int], list[IPAddress]]
_REDIRECTS = {301, 302, 303, 307, 308}
_CHUNK = 64 * 1024
SCHEMES = ("http", "https")
# One DNS label (RFC 1123): letters, digits and inner hyphens, 1..63 characters.
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# One part of an inet_aton-style IPv4 literal: decimal, octal (leading 0) or hex (0x).
_NUMERIC_PART = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


class NetFetchError(ClipsearchError, ValueError):
    """A URL was refused by the guard, or fetching it failed.

    ``kind`` says which: ``not_allowed`` (scheme, credentials, blocked address),
    ``unresolved`` (DNS), ``timeout``, ``too_large``, ``http_status`` (``status`` holds
    the answer's code), ``failed`` (connection or protocol error). Callers decide from
    it whether to retry (timeouts, connection errors, 429 and 5xx are transient).
    """

    def __init__(self, message: str, *, kind: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status

    @property
    def transient(self) -> bool:
        """Worth retrying: a timeout, a dropped connection, HTTP 429 or 5xx."""
        if self.kind in ("timeout", "failed"):
            return True
        return (
            self.kind == "http_status"
            and self.status is not None
            and (self.status == 429 or self.status >= 500)
        )


def blocked_reason(ip: IPAddress) -> str | None:
    """Why a fetch must not connect to ``ip`` ("loopback", "private", ...), or None."""
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


def public_or_loopback(ip: IPAddress) -> bool:
    """Public addresses plus this machine's loopback: for tests against a local server."""
    return blocked_reason(ip) is None or ip.is_loopback


def host_address(host: str) -> IPAddress | None:
    """The address a URL host names literally, or None for a DNS name worth resolving.

    Literals come in many spellings the system resolver would accept: a trailing dot,
    brackets, and the inet_aton forms (``2130706433``, ``0177.0.0.1``, ``0x7f.1``,
    ``127.1``); all of them are parsed here, so checking them never reaches DNS.
    Raises NetFetchError (``not_allowed``) for a host that is neither a literal nor a
    valid DNS name: IPv6 zone ids (``fe80::1%lo``), labels with odd characters, a
    numeric last label (no top-level domain is numeric), names over 253 characters.
    """
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if "%" in name:
        raise NetFetchError("URL hosts with an IPv6 zone id are not allowed", kind="not_allowed")
    name = name.rstrip(".")
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        pass
    labels = name.split(".")
    if all(_NUMERIC_PART.match(label) for label in labels):
        ip = _inet_aton(labels)
        if ip is None:
            raise NetFetchError(f"URL host {host!r} is not a valid address", kind="not_allowed")
        return ip
    if (
        len(name) > 253
        or not all(_LABEL.match(label) for label in labels)
        or _NUMERIC_PART.match(labels[-1])
    ):
        raise NetFetchError(f"URL host {host!r} is not a valid host name", kind="not_allowed")
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


def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (deduplicated, in resolver order)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise NetFetchError(f"host {host!r} does not resolve ({e})", kind="unresolved") from e
    out: list[IPAddress] = []
    for info in infos:
        addr = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if addr not in out:
            out.append(addr)
    return out


def guarded_get(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    max_redirects: int = 5,
    address_allowed: AddressPolicy = public_address_only,
    resolve: Resolver = resolve_host,
) -> bytes:
    """GET ``url`` and return its body, enforcing the guard on every hop.

    Args:
        max_bytes: largest body accepted (a declared or streamed larger body aborts).
        timeout_s: wall-clock budget of the whole fetch, redirects included.
        max_redirects: redirect hops followed; each is checked like the first URL.
        address_allowed: the address policy (default: public addresses only).

    Raises:
        NetFetchError: refused by the guard, or the fetch failed (see ``kind``).
    """
    deadline = time.monotonic() + timeout_s
    for _hop in range(max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise NetFetchError(
                f"URL scheme {parts.scheme or '(none)'!r} is not allowed; use http or https",
                kind="not_allowed",
            )
        if not parts.hostname:
            raise NetFetchError(f"URL {url!r} has no host", kind="not_allowed")
        if parts.username or parts.password:
            raise NetFetchError("URLs with credentials are not allowed", kind="not_allowed")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise NetFetchError(f"URL {url!r}: bad port", kind="not_allowed") from e
        literal = host_address(parts.hostname)
        addresses = [literal] if literal is not None else resolve(parts.hostname, port)
        if not addresses:
            raise NetFetchError(f"host {parts.hostname!r} does not resolve", kind="unresolved")
        for ip in addresses:
            if not address_allowed(ip):
                reason = blocked_reason(ip) or "not allowed"
                raise NetFetchError(
                    f"host {parts.hostname!r} resolves to {ip} ({reason}); "
                    "only public addresses may be fetched",
                    kind="not_allowed",
                )
        status, location, body = _get_once(
            parts.scheme, parts.hostname, addresses[0], port, _path(url), max_bytes, deadline
        )
        if status in _REDIRECTS:
            if not location:
                raise NetFetchError(
                    f"URL {url!r}: redirect without a Location header", kind="failed"
                )
            url = urljoin(url, location)
            continue
        if status != 200:
            raise NetFetchError(
                f"URL {url!r} answered HTTP {status}", kind="http_status", status=status
            )
        return body
    raise NetFetchError(f"URL followed more than {max_redirects} redirects", kind="failed")


def _path(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise NetFetchError("URL fetch ran out of time", kind="timeout")
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
    max_bytes: int,
    deadline: float,
) -> tuple[int, str | None, bytes]:
    cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
    conn = cls(host, ip, port, _remaining(deadline))
    try:
        conn.request("GET", path, headers={"User-Agent": "clipsearch", "Accept": "image/*"})
        resp = conn.getresponse()
        if resp.status in _REDIRECTS:
            return resp.status, resp.getheader("Location"), b""
        if resp.status != 200:
            return resp.status, None, b""
        declared = resp.getheader("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise NetFetchError(
                f"body is {int(declared):,} bytes; the limit is {max_bytes:,}", kind="too_large"
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
            if size > max_bytes:
                raise NetFetchError(
                    f"body exceeds the limit of {max_bytes:,} bytes", kind="too_large"
                )
            chunks.append(chunk)
        return resp.status, None, b"".join(chunks)
    except TimeoutError as e:
        raise NetFetchError("URL fetch timed out", kind="timeout") from e
    except (OSError, http.client.HTTPException) as e:
        raise NetFetchError(f"URL fetch failed ({type(e).__name__}: {e})", kind="failed") from e
    finally:
        conn.close()
