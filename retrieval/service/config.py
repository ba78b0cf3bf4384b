"""Configuration of the HTTP service: one frozen, validated dataclass.

Kept free of FastAPI imports so the CLI can build and validate it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

from clipsearch.retrieval.errors import ConfigError
from clipsearch.retrieval.placement import usable_cores

# encode_workers=None uses one worker per usable core, up to this many: past a few
# concurrent micro-batches the queue rarely holds enough queries to feed more, and each
# worker holds a batch's activations.
MAX_AUTO_ENCODE_WORKERS = 4


def auto_encode_workers() -> int:
    """The default ``encode_workers`` on a CPU: one per usable core, capped."""
    return min(usable_cores(), MAX_AUTO_ENCODE_WORKERS)


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    """How ``clipsearch serve`` answers requests and protects itself.

    The defaults suit a 2-core CPU box serving a product catalog: batches of 16 are where
    a CPU text tower reaches its throughput, and they form by themselves under load (the
    queries that arrive while a batch is encoded or searched make the next one).
    """

    # Largest number of queries encoded and searched together in one worker call.
    max_batch_size: int = 16
    # How long a query waits for company (ms) while an earlier batch is still being
    # encoded or searched; an idle server starts a query at once. 0 = never wait: the
    # pipelined batcher already gathers every query that arrives while a stage is busy,
    # so batches grow with the queue anyway (benchmarks/load.py, demo model, 2 cores:
    # 0 ms gave capacity 144 req/s and p50 14 ms at half of it; 5 ms, 128 req/s and 25 ms).
    max_batch_wait_ms: float = 0.0
    # Queries admitted but not yet answered, beyond which requests get a fast 429.
    max_queue: int = 64
    # Refuse new queries (429) while the oldest queued one has waited longer than this
    # (ms); 0 = only the max_queue count applies. Set it near the latency budget: a count
    # alone lets the queue hold seconds of work when queries are slow.
    max_queue_delay_ms: float = 250.0
    # Per-request deadline (s): past it the request gets 504 and its work is dropped.
    request_timeout_s: float = 10.0
    # Seconds a client is told to wait (Retry-After) when the queue is full.
    retry_after_s: int = 1
    # Largest request body accepted (bytes), JSON and multipart alike; larger is 413.
    max_body_bytes: int = 12 * 1024 * 1024
    # Largest encoded image accepted (bytes), uploaded, base64 or fetched; larger is 413.
    max_image_bytes: int = 8 * 1024 * 1024
    # Largest decoded image accepted (pixels); larger is 413. 40 MP covers any camera photo.
    max_image_pixels: int = 40_000_000
    # Decoded pixels all requests together may hold at once (decoding, waiting for the
    # encoder); a request whose image does not fit waits (FIFO) until earlier images are
    # freed, or gets 504 at its deadline. Bounds decode memory at ~10-12 bytes per pixel
    # (Pillow's 4-byte RGB buffer, one converted copy while decoding, allocator slack):
    # 80 MP stays under ~0.9 GB above the idle RSS whatever the concurrency (measured by
    # benchmarks/hostile.py). At least max_image_pixels, so any admitted image fits alone.
    decode_pixel_budget: int = 80_000_000
    # Longest text one request may carry, in characters, over all its texts together
    # (the query text, composed terms' texts, classify labels); longer is 413 before any
    # tokenizing. CLIP reads 77 tokens (~300 characters) of each text anyway.
    max_text_chars: int = 8192
    # Largest k (results per page) a query may ask for.
    max_k: int = 200
    # Largest offset + k a query may page to (deep pages cost like a big k).
    max_page_depth: int = 1000
    # Largest number of labels one /classify call may score.
    max_labels: int = 100
    # Largest number of terms in one composed query.
    max_terms: int = 8
    # When set, every route but /health requires this value in the X-API-Key header.
    api_key: str | None = None
    # Admin routes (/admin/*) need the API key; with no key set they answer 403, unless
    # this is true, the server is bound to a loopback address and the request comes
    # from one (a single-user laptop). `clipsearch serve --admin-without-key`.
    admin_without_key: bool = False
    # Whether HTTP clients may see and filter the `source` column (server file paths of
    # image rows): off by default, since even a filter like `source startswith '/s'`
    # reveals paths one character at a time. `clipsearch serve --expose-source`.
    expose_source: bool = False
    # Whether queries may name an image by http(s) URL (fetched with SSRF guards).
    allow_url_fetch: bool = False
    # Largest image fetched by URL (bytes) and the total time a fetch may take (s).
    fetch_max_bytes: int = 8 * 1024 * 1024
    fetch_timeout_s: float = 5.0
    # Redirects a URL fetch may follow (each hop is re-checked against the address guard).
    fetch_max_redirects: int = 3
    # Poll the index's CURRENT file every this many seconds and reload on change; 0 = off.
    watch_interval_s: float = 0.0
    # Folders the indexed images may be served from by GET /items/{doc_id}/image, besides
    # the roots the index recorded at build time. A row's image is served only when its
    # resolved path (symlinks followed) lies inside one of them.
    image_roots: tuple[str, ...] = ()
    # Origins allowed to call the API from a browser (CORS); empty = same origin only.
    cors_origins: tuple[str, ...] = ()
    # Score (cosine) at or above which a result counts as relevant when the query gives
    # no min_score: facets then count the relevant rows only, and hits carry
    # ``relevant``. None = the model's calibrated threshold when it has one, else no
    # cutoff (facets count every product the filter allows).
    relevance_cutoff: float | None = None
    # CPU threads of the query encoder for micro-batches of up to 4 queries (larger
    # batches use every core): 1 keeps latency steady on a busy machine, see
    # SearchEngine.open. Ignored when the app is given an encoder.
    query_threads: int = 1
    # Micro-batches encoded at once, each on its own thread (the search stage stays one
    # thread). None = every usable CPU core (os.sched_getaffinity) up to
    # MAX_AUTO_ENCODE_WORKERS, or 1 when the encoder runs on a GPU. A CPU micro-batch
    # of 1-4 queries runs on query_threads (one core), so a single encode worker left the
    # other cores idle under load. With N > 1 workers the engine's encoder gets
    # cores // N threads per call (so N calls at once never oversubscribe the cores) and
    # query_threads is capped at that. See docs/INTERNALS.md ("Encode workers").
    encode_workers: int | None = None

    def __post_init__(self) -> None:
        positive_ints = {
            "max_batch_size": self.max_batch_size,
            "max_queue": self.max_queue,
            "max_body_bytes": self.max_body_bytes,
            "max_image_bytes": self.max_image_bytes,
            "max_image_pixels": self.max_image_pixels,
            "decode_pixel_budget": self.decode_pixel_budget,
            "max_text_chars": self.max_text_chars,
            "max_k": self.max_k,
            "max_page_depth": self.max_page_depth,
            "max_labels": self.max_labels,
            "max_terms": self.max_terms,
            "fetch_max_bytes": self.fetch_max_bytes,
            "retry_after_s": self.retry_after_s,
        }
        for name, value in positive_ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ServiceConfig.{name} must be a positive integer, got {value!r}")
        if self.max_queue_delay_ms < 0:
            raise ConfigError(
                f"ServiceConfig.max_queue_delay_ms must be >= 0 (0 = off), got {self.max_queue_delay_ms}"
            )
        if self.max_batch_wait_ms < 0:
            raise ConfigError(
                f"ServiceConfig.max_batch_wait_ms must be >= 0, got {self.max_batch_wait_ms}"
            )
        if self.request_timeout_s <= 0 or self.fetch_timeout_s <= 0:
            raise ConfigError(
                "ServiceConfig.request_timeout_s and fetch_timeout_s must be > 0 seconds, got "
                f"{self.request_timeout_s} and {self.fetch_timeout_s}"
            )
        if self.watch_interval_s < 0:
            raise ConfigError(
                f"ServiceConfig.watch_interval_s must be >= 0 (0 = off), got {self.watch_interval_s}"
            )
        if self.fetch_max_redirects < 0:
            raise ConfigError(
                f"ServiceConfig.fetch_max_redirects must be >= 0, got {self.fetch_max_redirects}"
            )
        if self.max_k > self.max_page_depth:
            raise ConfigError(
                f"ServiceConfig.max_k ({self.max_k}) cannot exceed max_page_depth "
                f"({self.max_page_depth})"
            )
        if self.max_image_bytes > self.max_body_bytes:
            raise ConfigError(
                f"ServiceConfig.max_image_bytes ({self.max_image_bytes}) cannot exceed "
                f"max_body_bytes ({self.max_body_bytes}): such an image could never arrive"
            )
        if self.decode_pixel_budget < self.max_image_pixels:
            raise ConfigError(
                f"ServiceConfig.decode_pixel_budget ({self.decode_pixel_budget:,}) cannot be "
                f"below max_image_pixels ({self.max_image_pixels:,}): the largest admitted "
                "image would never fit"
            )
        if isinstance(self.query_threads, bool) or not (
            isinstance(self.query_threads, int) and self.query_threads >= 1
        ):
            raise ConfigError(
                f"ServiceConfig.query_threads must be an integer >= 1, got {self.query_threads!r}"
            )
        if self.encode_workers is not None and (
            isinstance(self.encode_workers, bool)
            or not isinstance(self.encode_workers, int)
            or not 1 <= self.encode_workers <= 64
        ):
            raise ConfigError(
                "ServiceConfig.encode_workers must be an integer from 1 to 64 (or None: "
                f"one per CPU core, up to {MAX_AUTO_ENCODE_WORKERS}), got {self.encode_workers!r}"
            )
        if self.relevance_cutoff is not None and not -1.0 <= self.relevance_cutoff <= 1.0:
            raise ConfigError(
                "ServiceConfig.relevance_cutoff is a cosine score in [-1, 1] (or None for "
                f"the model's calibrated threshold), got {self.relevance_cutoff}"
            )
        if self.api_key is not None and len(self.api_key) < 8:
            raise ConfigError(
                "ServiceConfig.api_key must be at least 8 characters; generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(24))'`"
            )
