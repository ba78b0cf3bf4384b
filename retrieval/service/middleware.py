"""The outermost ASGI layer: API key, admin guard, body size limit, metrics, and the
last-resort 500.

Written as plain ASGI (not Starlette's BaseHTTPMiddleware) so it can refuse an oversized
body while it streams in, without buffering it, and so it sees every response,
including the ones FastAPI's own handlers produce. A body that crosses the limit while
streaming (chunked, or lying about its length) makes the app's body parser fail; the
app's answer to that (FastAPI's 400 "There was an error parsing the body") is replaced
by our 413, so every oversized body gets the same answer whatever its framing.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from clipsearch.retrieval.service.admission import API_KEY_HEADER, api_key_ok
from clipsearch.retrieval.service.errors import error_body

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Paths that never need the API key: the liveness probe, and the static page itself
# (it holds no data; the page asks for the key and sends it on every API call).
PUBLIC_PATHS = frozenset({"/health", "/", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)
ADMIN_PREFIX = "/admin/"
# Routes whose work goes through the batcher's queue: refused with 429 before their
# body is read or validated while the queue is full (a fast, cheap answer to overload).
QUEUED_PATHS = frozenset({"/search", "/search/image", "/classify"})


class _BodyTooLarge(Exception):
    pass


class _Label:
    """Stands in for the route of a request refused before routing (metrics label)."""

    def __init__(self, path: str) -> None:
        self.path = path


class ServiceMiddleware:
    """Wraps the FastAPI app; see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        admin_without_key: bool = False,
        max_body_bytes: int,
        observe: Callable[[str, str, int, float], None],
        index_version: Callable[[], int | None],
        overloaded: Callable[[], str | None] | None = None,
        retry_after_s: int = 1,
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.admin_without_key = admin_without_key
        self.max_body_bytes = max_body_bytes
        self.observe = observe
        self.index_version = index_version
        self.overloaded = overloaded
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path: str = scope.get("path", "")
        status = {"code": 500, "started": False}
        # Set once the body crossed the limit: whatever the app answers is replaced.
        overflow = {"seen": False, "replaced": False}

        async def send_wrapper(message: Message) -> None:
            if overflow["seen"] and not overflow["replaced"]:
                if message["type"] == "http.response.start":
                    overflow["replaced"] = True
                    status["code"], status["started"] = 413, True
                    await self._reply(send, 413, "body_too_large", self._too_large(None))
                return
            if overflow["replaced"]:
                return  # the body of the app's own (replaced) answer
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
                status["started"] = True
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-index-version" for k, _ in headers):
                    version = self.index_version()
                    if version is not None:
                        headers.append((b"x-index-version", str(version).encode()))
                message["headers"] = headers
            await send(message)

        try:
            if not self._authorized(scope, path):
                await self._reply(
                    send_wrapper,
                    401,
                    "unauthorized",
                    f"missing or wrong API key; send it in the {API_KEY_HEADER} header",
                    extra_headers=[(b"www-authenticate", b"ApiKey")],
                )
                return
            # (Other methods fall through to the app's 405: there is nothing to guard.)
            admin_call = path.startswith(ADMIN_PREFIX) and scope.get("method") == "POST"
            if admin_call and not self._admin_allowed(scope):
                await self._reply(
                    send_wrapper,
                    403,
                    "admin_disabled",
                    "admin routes need an API key: start the server with --api-key (or, "
                    "bound to 127.0.0.1 on a single-user machine, --admin-without-key)",
                )
                return
            try:
                declared = _content_length(scope)
            except ValueError as e:
                await self._reply(send_wrapper, 400, "bad_request", str(e))
                return
            if declared is not None and declared > self.max_body_bytes:
                await self._reply(send_wrapper, 413, "body_too_large", self._too_large(declared))
                return
            if self.overloaded is not None and path in QUEUED_PATHS:
                reason = self.overloaded()
                if reason is not None:
                    scope["route"] = _Label(path)
                    await self._reply(
                        send_wrapper,
                        429,
                        "overloaded",
                        f"the server is overloaded ({reason}); retry after {self.retry_after_s} s",
                        extra_headers=[(b"retry-after", str(self.retry_after_s).encode())],
                    )
                    return
            await self.app(scope, self._limited(receive, overflow), send_wrapper)
        except _BodyTooLarge:
            if not status["started"]:
                overflow["seen"] = False
                await self._reply(send_wrapper, 413, "body_too_large", self._too_large(None))
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), path)
            if not status["started"]:
                await self._reply(
                    send_wrapper,
                    500,
                    "internal_error",
                    "the server hit an unexpected error; it has been logged",
                )
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "(unmatched)"
            self.observe(
                label, scope.get("method", ""), status["code"], time.perf_counter() - start
            )

    def _authorized(self, scope: Scope, path: str) -> bool:
        if self.api_key is None or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return True
        given = None
        for k, v in scope.get("headers", []):
            if k.lower() == API_KEY_HEADER.encode():
                given = v.decode("latin-1")
                break
        return api_key_ok(self.api_key, given)

    def _admin_allowed(self, scope: Scope) -> bool:
        """Admin routes: with a key, the key check above already passed; without one,
        only when the operator allowed it and both ends of the connection are loopback."""
        if self.api_key is not None:
            return True
        if not self.admin_without_key:
            return False
        ends = [scope.get("server"), scope.get("client")]
        return all(end is not None and _is_loopback(str(end[0])) for end in ends)

    def _limited(self, receive: Receive, overflow: dict[str, bool]) -> Receive:
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    overflow["seen"] = True
                    raise _BodyTooLarge
            return message

        return limited_receive

    def _too_large(self, size: int | None) -> str:
        got = f"{size:,} bytes" if size is not None else "more than that"
        return (
            f"request body is {got}; the limit is {self.max_body_bytes:,} bytes. Send "
            "smaller images (they are downscaled for search anyway)"
        )

    async def _reply(
        self,
        send: Send,
        status: int,
        code: str,
        message: str,
        *,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        body = json.dumps(error_body(code, message)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *(extra_headers or []),
        ]
        if status == 413:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    """The declared body length; ValueError (a 400) for a malformed or negative one."""
    values = [v for k, v in scope.get("headers", []) if k.lower() == b"content-length"]
    if not values:
        return None
    if len(set(values)) > 1 or not values[0].strip().isdigit():
        raise ValueError(
            "Content-Length must be one non-negative integer, got "
            + ", ".join(repr(v.decode("latin-1")[:20]) for v in values[:3])
        )
    return int(values[0])


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
