"""The outermost ASGI layer: API key, body size limit, metrics, and the last-resort 500.

Written as plain ASGI (not Starlette's BaseHTTPMiddleware) so it can refuse an oversized
body while it streams in, without buffering it, and so it sees every response,
including the ones FastAPI's own handlers produce.
"""

from __future__ import annotations

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


class _BodyTooLarge(Exception):
    pass


class ServiceMiddleware:
    """Wraps the FastAPI app; see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        observe: Callable[[str, str, int, float], None],
        index_version: Callable[[], int | None],
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.observe = observe
        self.index_version = index_version

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path: str = scope.get("path", "")
        status = {"code": 500, "started": False}

        async def send_wrapper(message: Message) -> None:
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
            declared = _content_length(scope)
            if declared is not None and declared > self.max_body_bytes:
                await self._reply(send_wrapper, 413, "body_too_large", self._too_large(declared))
                return
            await self.app(scope, self._limited(receive), send_wrapper)
        except _BodyTooLarge:
            if not status["started"]:
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

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
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
    for k, v in scope.get("headers", []):
        if k.lower() == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None
