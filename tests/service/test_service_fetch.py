"""The URL-fetch guard. No real outbound connection: address checks are tested directly,
and fetches go only to a server on 127.0.0.1 (or are refused before connecting)."""

from __future__ import annotations

import http.server
import ipaddress
import socket
import threading
from collections.abc import Iterator
from typing import ClassVar

import pytest

from clipsearch.retrieval.service.fetch import (
    FetchError,
    FetchLimits,
    IPAddress,
    blocked_reason,
    fetch_url,
)

LIMITS = FetchLimits(max_bytes=10_000, timeout_s=5.0, max_redirects=2)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata endpoint
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "not globally routable"),  # carrier-grade NAT
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
        ("::", "unspecified"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "link-local"),
        ("2002:7f00:1::", "loopback"),  # 6to4 wrapping 127.0.0.1
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "teredo"),
    ],
)
def test_non_public_addresses_are_blocked(address: str, reason: str) -> None:
    got = blocked_reason(ipaddress.ip_address(address))
    assert got is not None and reason in got


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is None


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, dict[str, str], bytes]]] = {}
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        status, headers, body = self.routes.get(self.path, (404, {}, b"nope"))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def loopback_server() -> Iterator[str]:
    _Handler.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    _Handler.routes = {
        "/img.png": (200, {"Content-Type": "image/png"}, b"\x89PNG fake bytes"),
        "/big": (200, {}, b"x" * 20_000),
        "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data"}, b""),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
        "/to-img": (301, {"Location": "/img.png"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
    }
    try:
        yield base
    finally:
        server.shutdown()
        server.server_close()


def _loopback_only(ip: IPAddress) -> bool:
    return str(ip) == "127.0.0.1"


def test_loopback_url_is_refused_before_connecting(loopback_server: str) -> None:
    with pytest.raises(FetchError, match="loopback") as e:
        fetch_url(loopback_server + "/img.png", LIMITS)
    assert e.value.code == "url_not_allowed"
    assert _Handler.hits == []


def test_a_name_resolving_to_a_private_address_is_refused() -> None:
    def fake_dns(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("10.0.0.5")]

    with pytest.raises(FetchError, match=r"10\.0\.0\.5 \(private\)"):
        fetch_url("http://shop.example/photo.jpg", LIMITS, resolve=fake_dns)


def test_every_redirect_hop_is_checked_again(loopback_server: str) -> None:
    assert (
        fetch_url(loopback_server + "/to-img", LIMITS, address_allowed=_loopback_only)
        == b"\x89PNG fake bytes"
    )
    with pytest.raises(FetchError, match=r"169\.254\.169\.254"):
        fetch_url(loopback_server + "/to-metadata", LIMITS, address_allowed=_loopback_only)
    with pytest.raises(FetchError, match="scheme 'file'"):
        fetch_url(loopback_server + "/to-file", LIMITS, address_allowed=_loopback_only)
    with pytest.raises(FetchError, match="more than 2 redirects"):
        fetch_url(loopback_server + "/loop", LIMITS, address_allowed=_loopback_only)


def test_size_cap_and_bad_urls(loopback_server: str) -> None:
    with pytest.raises(FetchError) as e:
        fetch_url(loopback_server + "/big", LIMITS, address_allowed=_loopback_only)
    assert e.value.status == 413
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_url(loopback_server + "/missing", LIMITS, address_allowed=_loopback_only)
    for url in ("ftp://example.com/a.jpg", "gopher://x/", "/etc/passwd", "http://user:pw@host/a"):
        with pytest.raises(FetchError) as e:
            fetch_url(url, LIMITS, address_allowed=_loopback_only)
        assert e.value.code == "url_not_allowed"


# ---------------------------------------------------------------------------- exotic hosts


@pytest.fixture
def no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The system resolver fails the test if anything asks it."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the resolver was asked: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "gethostbyname", refuse)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1./x.png",
        "http://127.0.0.1../x.png",
        "http://[fe80::1%25lo]/x.png",
        "http://[fe80::1%lo]/x.png",
        "http://2130706433/x.png",  # decimal 127.0.0.1
        "http://0177.0.0.1/x.png",  # octal
        "http://0x7f.0.0.1/x.png",  # hex
        "http://0x7f000001/x.png",
        "http://127.1/x.png",  # inet_aton short form
        "http://0/x.png",
        "http://[::ffff:127.0.0.1]/x.png",  # IPv4-mapped
        "http://[::ffff:7f00:1]/x.png",
        "http://[::1]/x.png",
        "http://[0:0:0:0:0:ffff:169.254.169.254]/x.png",
        "http://169.254.169.254./latest/meta-data",
        "http://1.2.3.4.5/x.png",  # numeric last label: not a name, not an address
        "http://0x7g.1/x.png",
        "http://exa_mple.com/x.png",
        "http://999.1.1.1/x.png",
    ],
)
def test_exotic_hosts_are_refused_without_any_dns_query(url: str, no_dns: None) -> None:
    with pytest.raises(FetchError) as err:
        fetch_url(url, LIMITS)
    assert err.value.code == "url_not_allowed", err.value


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("134744072", "8.8.8.8"),
        ("8.8.8.8.", "8.8.8.8"),
        ("[2606:4700:4700::1111]", "2606:4700:4700::1111"),
    ],
)
def test_address_literals_in_every_spelling_are_read_as_addresses(
    host: str, address: str, no_dns: None
) -> None:
    from clipsearch.retrieval.service.fetch import host_address

    assert host_address(host) == ipaddress.ip_address(address)


def test_dns_names_still_go_to_the_resolver(no_dns: None) -> None:
    from clipsearch.retrieval.service.fetch import host_address

    for name in ("example.com", "cdn.example.com.", "xn--bcher-kva.example", "a-b.c0"):
        assert host_address(name) is None
