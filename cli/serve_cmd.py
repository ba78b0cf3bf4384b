"""``clipsearch serve INDEX``: the HTTP API and web page over one index.

FastAPI and uvicorn are imported inside the command, so ``clipsearch --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from clipsearch.cli.common import cli_errors, console


def serve(
    index: Path = typer.Argument(
        ..., help="Index directory (as built by `clipsearch index build`)."
    ),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 = all)."),
    port: int = typer.Option(8000, help="TCP port."),
    workers: int = typer.Option(1, help="Worker processes (each loads the index)."),
    api_key: str | None = typer.Option(
        None,
        envvar="CLIPSEARCH_API_KEY",
        help="Require this key in the X-API-Key header on every route but /health.",
    ),
    watch: bool = typer.Option(False, help="Poll the index and serve new versions as they commit."),
    watch_interval: float = typer.Option(2.0, help="Seconds between --watch polls."),
    allow_url_fetch: bool = typer.Option(
        False, help="Let queries name images by http(s) URL (public addresses only)."
    ),
    image_root: list[Path] = typer.Option(
        [], help="Extra folder the indexed images may be served from (repeatable)."
    ),
    max_batch: int = typer.Option(16, help="Largest micro-batch of queries."),
    batch_wait_ms: float = typer.Option(
        0.0,
        help="How long a query waits for batch company (ms); 0: batches form from what "
        "arrives while the previous batch is encoded and searched.",
    ),
    max_queue: int = typer.Option(64, help="Queued queries beyond which requests get 429."),
    max_queue_delay: float = typer.Option(
        250.0, help="Refuse (429) while queued queries have waited longer than this (ms)."
    ),
    timeout: float = typer.Option(10.0, help="Per-request deadline in seconds (then 504)."),
    ray: str | None = typer.Option(
        None,
        "--ray",
        metavar="ADDRESS",
        help="Host the shards on Ray actors ('auto': the cluster `ray start` joined, "
        "host:port, ray://host:10001, 'local'); this process runs the coordinator and the "
        "HTTP app. INDEX must be on storage every node mounts (needs clipsearch[ray]).",
    ),
    ray_groups: int | None = typer.Option(
        None, help="With --ray: shard groups, one actor each (default: one per node)."
    ),
    ray_replicas: int = typer.Option(1, help="With --ray: actors per shard group."),
    expose_source: bool = typer.Option(
        False,
        "--expose-source",
        help="Let HTTP clients see, filter, sort and boost the `source` column (server "
        "paths). Off by default: paths can reveal the server's layout.",
    ),
    admin_without_key: bool = typer.Option(
        False,
        "--admin-without-key",
        help="Allow /admin/* without --api-key, only for loopback clients of a loopback "
        "--host (refused otherwise).",
    ),
    relevance_cutoff: float | None = typer.Option(
        None,
        help="Cosine below which hits are 'weak' and facets ignore them (default: the "
        "model's calibrated threshold when it has one).",
    ),
    max_text_chars: int = typer.Option(
        8192, help="Characters of text one request may send in all (413 above)."
    ),
    query_threads: int = typer.Option(
        1,
        min=1,
        help="CPU threads that encode a micro-batch of up to 4 queries (larger batches "
        "use every core); 1 keeps latency steady when the machine is busy.",
    ),
    encode_workers: int | None = typer.Option(
        None,
        help="Micro-batches of queries encoded at once, one thread each (default: one "
        "per CPU core up to 4, 1 on a GPU). With N > 1 each encode call gets cores/N "
        "threads, so the cores are never oversubscribed.",
    ),
    decode_pixel_budget: int = typer.Option(
        80_000_000,
        help="Decoded image pixels in flight across all requests (bounds memory; requests "
        "wait for room, 504 at their deadline).",
    ),
) -> None:
    """Serve INDEX over HTTP: JSON API, OpenAPI docs at /docs, and a search page at /."""
    from clipsearch.retrieval.errors import ConfigError
    from clipsearch.retrieval.service.config import ServiceConfig
    from clipsearch.retrieval.service.server import serve as run_server

    with cli_errors():
        config = ServiceConfig(
            api_key=api_key,
            watch_interval_s=watch_interval if watch else 0.0,
            allow_url_fetch=allow_url_fetch,
            image_roots=tuple(str(p) for p in image_root),
            max_batch_size=max_batch,
            max_batch_wait_ms=batch_wait_ms,
            max_queue=max_queue,
            max_queue_delay_ms=max_queue_delay,
            request_timeout_s=timeout,
            expose_source=expose_source,
            admin_without_key=admin_without_key,
            max_text_chars=max_text_chars,
            relevance_cutoff=relevance_cutoff,
            decode_pixel_budget=decode_pixel_budget,
            query_threads=query_threads,
            encode_workers=encode_workers,
        )
        if ray is not None and workers != 1:
            raise ConfigError(
                "--workers must be 1 with --ray (one coordinator per process; run more "
                "serve processes behind a load balancer for more HTTP capacity)"
            )
        console.print(f"serving [bold]{index}[/] on http://{host}:{port}/  (API docs: /docs)")
        if ray is not None:
            from clipsearch.retrieval.distributed import DistributedOptions
            from clipsearch.retrieval.distributed.serve import serve_distributed

            options = DistributedOptions(address=ray, groups=ray_groups, replicas=ray_replicas)
            serve_distributed(index, config, options, host=host, port=port)
            return
        run_server(index, config, host=host, port=port, workers=workers)
