"""Running the app under uvicorn (what ``clipsearch serve`` calls)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from clipsearch.retrieval.errors import ConfigError, IndexNotFoundError
from clipsearch.retrieval.service.config import ServiceConfig

log = logging.getLogger(__name__)


def http_protocol() -> type:
    """uvicorn's HTTP protocol class (httptools when installed, else h11), answering
    requests it cannot parse (``Content-Length: -1``, broken framing) in the service's
    JSON error shape instead of uvicorn's text/plain "Invalid HTTP request received."."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # httptools is optional
        from uvicorn.protocols.http.h11_impl import H11Protocol as base  # type: ignore[assignment]

    return type("JsonErrorProtocol", (_JsonBadRequest, base), {"__module__": __name__})


class _JsonBadRequest:
    """Mixin over a uvicorn protocol: its 400 for unparseable requests, as our JSON."""

    transport: Any

    def send_400_response(self, msg: str) -> None:
        from clipsearch.retrieval.service.errors import error_body

        body = json.dumps(
            error_body(
                "bad_request",
                f"the request is not valid HTTP/1.1 ({msg.rstrip('.')}); check its "
                "Content-Length and Transfer-Encoding headers",
            )
        ).encode()
        head = (
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode("ascii") + body)
        self.transport.close()


def serve(
    index: str | Path,
    config: ServiceConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    log_level: str = "info",
) -> None:
    """Serve ``index`` over HTTP until interrupted.

    ``workers`` > 1 starts that many processes (each loads the index and batches on its
    own); on a 2-core CPU box one worker is best, since one batch already uses both cores.
    """
    import uvicorn

    from clipsearch.retrieval.manifest import current_version

    root = Path(index)
    if current_version(root) is None:
        raise IndexNotFoundError(
            f"{root}: no committed index here (no CURRENT file); build one with "
            "`clipsearch index build` or `clipsearch demo`"
        )
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    if config.admin_without_key and config.api_key is None and not _loopback(host):
        raise ConfigError(
            f"--admin-without-key needs a loopback --host (127.0.0.1 or ::1), got {host!r}: "
            "anyone who can reach the server could reload it; set --api-key instead"
        )
    if workers == 1:
        from clipsearch.retrieval.service.app import create_app

        uvicorn.run(
            create_app(root, config),
            host=host,
            port=port,
            log_level=log_level,
            http=http_protocol(),
        )
        return
    from clipsearch.retrieval.service.app import CONFIG_ENV, INDEX_ENV

    os.environ[INDEX_ENV] = str(root.resolve())
    os.environ[CONFIG_ENV] = json.dumps(dataclasses.asdict(config))
    uvicorn.run(
        "clipsearch.retrieval.service.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        http=http_protocol(),
    )


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
