"""Running the app under uvicorn (what ``clipsearch serve`` calls)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from clipsearch.retrieval.errors import ConfigError, IndexNotFoundError
from clipsearch.retrieval.service.config import ServiceConfig

log = logging.getLogger(__name__)


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
    if workers == 1:
        from clipsearch.retrieval.service.app import create_app

        uvicorn.run(create_app(root, config), host=host, port=port, log_level=log_level)
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
    )
