"""``clipsearch serve --ray``: the HTTP service in front of a distributed engine.

The existing FastAPI app (:func:`clipsearch.retrieval.service.app.create_app`) runs in
this process with a :class:`~clipsearch.retrieval.distributed.DistributedSearchEngine`
as its engine: the service keeps its micro-batching, limits, error shapes, OpenAPI
schema and web page, and the coordinator fans each batch out to the shard hosts. Why
not Ray Serve: see ``docs/scale-out.md`` (one HTTP surface to maintain and test; the
shard hosts, not the HTTP layer, are what needs a cluster; more HTTP capacity is more
of these processes behind a load balancer, each with its own coordinator over the same
hosts' index).
"""

from __future__ import annotations

import logging
from pathlib import Path

from clipsearch.retrieval.distributed.coordinator import DistributedOptions, DistributedSearchEngine
from clipsearch.retrieval.errors import ConfigError
from clipsearch.retrieval.service.config import ServiceConfig

log = logging.getLogger(__name__)


def serve_distributed(
    index: str | Path,
    config: ServiceConfig,
    options: DistributedOptions,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
) -> None:
    """Open ``index`` on the Ray cluster of ``options`` and serve it until interrupted.

    ``config.watch_interval_s`` > 0 rolls out new versions as they are committed
    (:meth:`DistributedSearchEngine.watch`). Raises ConfigError for a bad port.
    """
    import uvicorn

    from clipsearch.retrieval.service.app import create_app
    from clipsearch.retrieval.service.server import http_protocol

    if not 0 < port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    with DistributedSearchEngine.open(index, options=options) as engine:
        stop = engine.watch(config.watch_interval_s) if config.watch_interval_s > 0 else None
        try:
            uvicorn.run(
                create_app(engine, config),
                host=host,
                port=port,
                log_level=log_level,
                http=http_protocol(),
            )
        finally:
            if stop is not None:
                stop.set()
