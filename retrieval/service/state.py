"""The running service's state: the engine, its readiness, reloads, and the batcher.

One :class:`ServiceState` per app. The engine is opened in a worker thread after
startup, so ``/health`` can answer 503 while the manifest is verified and the shards
load, and 200 only once searches can run. Reloads (``POST /admin/reload`` or the
``CURRENT`` watcher) call ``engine.reload()`` in a thread; the engine swaps its pinned
snapshot atomically, so batches already running finish on the version they started on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

from clipsearch.retrieval.service.batching import MicroBatcher
from clipsearch.retrieval.service.config import ServiceConfig, auto_encode_workers, usable_cores
from clipsearch.retrieval.service.decoding import (
    PixelBudget,
    map_large_allocations,
    return_memory,
)
from clipsearch.retrieval.service.errors import ApiError, scrub
from clipsearch.retrieval.service.metrics import Metrics
from clipsearch.retrieval.service.runner import EncodedBatch, Job, encode_jobs, search_encoded

log = logging.getLogger(__name__)


def _pin_torch_threads(threads: int) -> None:
    """Set torch's process-wide intra-op thread count to ``threads`` (the per-call
    share of N encode workers), when the engine's encoder uses torch at all.

    The torch encoder switches the count around each call (``OpenClipEncoder._threads``)
    and restores the previous one; with the process default (every core) left in place,
    concurrent calls from several workers switch it under each other and run no faster
    than one worker: ViT-B-32 text, 2 workers x 1 thread on 2 cores, 15.6 texts/s vs
    15.6 for one worker; with the default pinned to 1, 24-29 texts/s (measured while
    writing this). Pinned, every call already runs on its count and nothing switches.
    """
    torch = sys.modules.get("torch")
    if torch is None:  # an ONNX or fake encoder: nothing to pin
        return
    if torch.get_num_threads() != threads:
        log.info("torch intra-op threads: %d -> %d", torch.get_num_threads(), threads)
        torch.set_num_threads(threads)


class ServiceState:
    """Engine holder + batcher + metrics for one app instance."""

    def __init__(
        self,
        index: str | Path | Any,
        config: ServiceConfig,
        *,
        encoder: Any = None,
    ) -> None:
        self.config = config
        self.metrics = Metrics()
        self._encoder = encoder
        if isinstance(index, (str, Path)):
            self.index_path: Path | None = Path(index)
            self._engine: Any = None
        else:
            self._engine = index
            self.index_path = None
        self.load_error: str | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()
        self._facets: tuple[int, dict[str, Any]] | None = None
        self._image_roots: tuple[int, tuple[Path, ...]] | None = None
        self._thresholds: dict[tuple[int | None, str], float | None] = {}
        self._background: set[asyncio.Future[None]] = set()
        from clipsearch.retrieval.facets import Faceter

        # Facet counts of the current version (per-version codes, filter-only LRU).
        self.faceter = Faceter()
        # Two stages: encoding batches (on encode_workers threads) overlaps searching
        # the previous one (one thread).
        self.encode_workers = config.encode_workers or auto_encode_workers()
        if config.encode_workers is None and self._engine is not None:
            self.encode_workers = self._auto_workers_for(self._engine.encoder)
        elif config.encode_workers is None and encoder is not None:
            self.encode_workers = self._auto_workers_for(encoder)
        self.batcher: MicroBatcher[Job, Any] = MicroBatcher(
            self._search_batch,
            prepare=self._encode_batch,
            max_batch_size=config.max_batch_size,
            max_wait_s=config.max_batch_wait_ms / 1000.0,
            max_queue=config.max_queue,
            max_queue_delay_s=config.max_queue_delay_ms / 1000.0 or None,
            on_batch=self.metrics.observe_batch,
            prepare_workers=self.encode_workers,
        )
        # Decoded query-image pixels held by all requests together (see decoding.py).
        self.pixels = PixelBudget(config.decode_pixel_budget, on_idle=return_memory)
        self.metrics.gauge(
            "clipsearch_decode_pixels_in_use",
            "Decoded query-image pixels held now (decoding or waiting for the encoder).",
            lambda: float(self.pixels.in_use),
        )
        self.metrics.gauge(
            "clipsearch_decode_waiting",
            "Requests waiting for room in the decode pixel budget.",
            lambda: float(self.pixels.waiting),
        )
        self.metrics.gauge(
            "clipsearch_queue_depth",
            "Queries admitted and not yet answered.",
            lambda: float(self.batcher.depth),
        )
        self.metrics.gauge(
            "clipsearch_encode_workers",
            "Micro-batches the service may encode at once (ServiceConfig.encode_workers).",
            lambda: float(self.batcher.prepare_workers),
        )
        self.metrics.gauge(
            "clipsearch_encode_busy",
            "Micro-batches being encoded now.",
            lambda: float(self.batcher.preparing),
        )
        self.metrics.gauge(
            "clipsearch_ready", "1 once the index is loaded.", lambda: float(self.ready)
        )
        self.metrics.gauge(
            "clipsearch_index_version",
            "Version number of the index being served (0 before it is loaded).",
            lambda: float(self.version or 0),
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        map_large_allocations()  # decoded images go back to the OS when freed
        self.batcher.start()
        if self._engine is None:
            self._load_task = asyncio.get_running_loop().create_task(self._load())
        if self.config.watch_interval_s > 0 and self.index_path is not None:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        for task in (self._watch_task, self._load_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.batcher.stop()

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait until the engine has loaded (tests, benchmarks); raises if loading failed."""
        deadline = time.monotonic() + timeout_s
        while not self.ready:
            if self.load_error is not None:
                raise RuntimeError(self.load_error)
            if time.monotonic() > deadline:
                raise TimeoutError("the index did not load in time")
            await asyncio.sleep(0.01)

    async def _load(self) -> None:
        from clipsearch.retrieval.engine import SearchEngine

        assert self.index_path is not None  # only scheduled when a path was given
        threads, query_threads = self._encoder_threads()
        try:
            engine = await asyncio.to_thread(
                SearchEngine.open,
                self.index_path,
                encoder=self._encoder,
                threads=threads,
                query_threads=query_threads,
            )
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("could not open index %s: %s", self.index_path, e)
            return
        if self.config.encode_workers is None and self._encoder is None:
            workers = self._auto_workers_for(engine.encoder)
            if workers < self.batcher.prepare_workers:
                self.batcher.prepare_workers = self.encode_workers = workers
        if threads is not None and self._encoder is None and self.batcher.prepare_workers > 1:
            _pin_torch_threads(threads)
        self._engine = engine
        log.info(
            "encoding up to %d micro-batches at once (%s threads per call)",
            self.batcher.prepare_workers,
            "the runtime's default" if threads is None else threads,
        )
        log.info("serving %s version %s", self.index_path, self.version)
        self._warm_facets()

    def _encoder_threads(self) -> tuple[int | None, int]:
        """(threads, query_threads) for the engine's encoder: with N encode workers,
        each call gets cores // N threads, so N calls at once fill the cores without
        oversubscribing them (a 16-query batch would otherwise take every core while
        another worker encodes too). One worker keeps the engine's defaults."""
        if self.encode_workers <= 1:
            return None, self.config.query_threads
        per_call = max(1, usable_cores() // self.encode_workers)
        return per_call, min(self.config.query_threads, per_call)

    @staticmethod
    def _auto_workers_for(encoder: Any) -> int:
        """Default worker count for this encoder: one per core on a CPU, 1 on a GPU
        (one device: concurrent calls would only queue on it)."""
        device = str(getattr(encoder, "device", "cpu") or "cpu")
        return auto_encode_workers() if device.split(":")[0] == "cpu" else 1

    def _warm_facets(self) -> None:
        """In the background, build what the first page load needs of this version:
        the catalog facets (GET /facets) and the facet codes of their columns (1M rows:
        a few seconds, which the first shopper would otherwise wait for)."""

        def warm() -> None:
            try:
                _version, columns = self.facets()
                names = [n for n, f in columns.items() if f.get("type") != "date"]
                if names:
                    self.faceter.count(self.engine, names)
            except Exception as e:  # a cache warm-up; the request path reports errors
                log.warning("facet warm-up failed: %s", e)

        task = asyncio.get_running_loop().run_in_executor(None, warm)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ engine access

    @property
    def ready(self) -> bool:
        return self._engine is not None

    @property
    def engine(self) -> Any:
        """The loaded engine; 503 ``not_ready`` while it is still loading (or failed)."""
        if self._engine is None:
            why = (
                scrub(self.load_error, self.known_paths())
                if self.load_error
                else ("the index is still loading")
            )
            raise ApiError(503, "not_ready", f"not ready: {why}", headers={"Retry-After": "1"})
        return self._engine

    @property
    def snapshot(self) -> Any:
        """The engine's pinned Snapshot (for item lookups and facets; 503 before load)."""
        engine = self.engine
        snapshot = getattr(engine, "snapshot", None)
        if snapshot is None:
            # SearchEngine keeps its pinned snapshot in _state; reading it whole (one
            # attribute read) gives a consistent version even while a reload swaps it.
            snapshot = engine._state.snapshot
        return snapshot

    @property
    def version(self) -> int | None:
        if self._engine is None:
            return None
        return int(self._engine.version)

    def known_paths(self) -> dict[str, str]:
        """Server folders a client may see named but not spelled out: path -> name."""
        known: dict[str, str] = {}
        if self.index_path is not None:
            known[str(self.index_path)] = "<index>"
            known[str(self.index_path.resolve())] = "<index>"
        roots = [*self.config.image_roots]
        if self._image_roots is not None:
            roots.extend(str(r) for r in self._image_roots[1])
        for root in roots:
            known.setdefault(str(root), "<image root>")
        return known

    def overloaded(self) -> str | None:
        """Why a query arriving now would get 429 (the queue is full), or None; counted
        in the rejection metrics when it would."""
        reason = self.batcher.overloaded() if self.ready else None
        if reason is not None:
            self.metrics.observe_rejection("queue_full")
        return reason

    def _encode_batch(self, jobs: Any) -> EncodedBatch:
        return encode_jobs(self.engine, jobs)

    def _search_batch(self, batch: EncodedBatch) -> list[Any]:
        return search_encoded(self.engine, batch, self.faceter)

    def relevance_cutoff(self, query_modality: str, options: Any) -> float | None:
        """The score at or above which a result counts as relevant (facets over the
        relevant rows, the page's "good match" labels): the query's ``min_score``, else
        the server's ``relevance_cutoff``, else the model's calibrated threshold for this
        query -> row direction when it has one (``clipsearch.retrieval.models``), else
        None (no cutoff: facets count every row the filter allows)."""
        if options.min_score is not None:
            return float(options.min_score)
        if self.config.relevance_cutoff is not None:
            return self.config.relevance_cutoff
        engine = self.engine
        direction = f"{query_modality}->{engine.target_modality(options.modality)}"
        key = (self.version, direction)
        cached = self._thresholds.get(key, ...)
        if cached is ...:
            try:
                cached = engine.manifest.relevance_threshold(direction)
            except ValueError:
                cached = None
            self._thresholds[key] = cached
        return cached

    def facets(self) -> tuple[int, dict[str, Any]]:
        """(version, facets) of the current snapshot, computed once per version."""
        from clipsearch.retrieval.service.catalog import facets

        snapshot = self.snapshot
        cached = self._facets
        if cached is None or cached[0] != snapshot.version:
            cached = self._facets = (snapshot.version, facets(snapshot))
        return cached

    def image_roots(self) -> tuple[Path, ...]:
        """Folders images of the current version may be served from, computed once per
        version: the roots the index recorded at build time plus ``--image-root``.

        A manifest written before roots were recorded falls back to ``--image-root``
        alone when given, else to the deepest folder containing every indexed image path
        (refused when that is ``/`` or one level below: no guard at all), with a warning.
        """
        snapshot = self.snapshot
        cached = self._image_roots
        if cached is None or cached[0] != snapshot.version:
            cached = self._image_roots = (snapshot.version, self._compute_image_roots(snapshot))
        return cached[1]

    def _compute_image_roots(self, snapshot: Any) -> tuple[Path, ...]:
        from clipsearch.retrieval.service.catalog import common_image_root

        configured = [Path(r) for r in self.config.image_roots]
        recorded = snapshot.manifest.image_roots
        if recorded is not None:
            roots = [Path(r) for r in recorded]
            return tuple(dict.fromkeys([*roots, *configured]))
        if configured:
            return tuple(dict.fromkeys(configured))
        inferred = common_image_root(snapshot)
        log.warning(
            "index version %d does not record its image roots (built by an older "
            "clipsearch); %s. Run `clipsearch index add` or rebuild to record them, or "
            "pass --image-root",
            snapshot.version,
            "no image will be served"
            if inferred is None
            else f"serving images from the inferred folder {inferred}",
        )
        return () if inferred is None else (inferred,)

    # ------------------------------------------------------------------ reload

    async def reload(self) -> tuple[int, int]:
        """Switch to the newest committed version; returns (previous, current) versions."""
        engine = self.engine
        async with self._reload_lock:
            previous = int(engine.version)
            try:
                await asyncio.to_thread(engine.reload)
            except Exception:
                self.metrics.observe_reload("failed")
                raise
            current = int(engine.version)
            self.metrics.observe_reload("changed" if current != previous else "unchanged")
            if current != previous:
                log.info("reloaded index: version %d -> %d", previous, current)
                self._warm_facets()
            return previous, current

    async def _watch(self) -> None:
        from clipsearch.retrieval.manifest import current_version

        assert self.index_path is not None
        while True:
            await asyncio.sleep(self.config.watch_interval_s)
            if not self.ready:
                continue
            try:
                on_disk = await asyncio.to_thread(current_version, self.index_path)
                if on_disk is not None and on_disk != self.version:
                    await self.reload()
            except Exception as e:  # keep serving the pinned version; try again next tick
                log.warning("index watch: reload failed, still serving %s: %s", self.version, e)
