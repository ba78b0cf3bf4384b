"""The distributed search coordinator: one index's shards on Ray actors, one engine API.

:class:`DistributedSearchEngine` has the shape of :class:`~clipsearch.retrieval.engine.SearchEngine`
(``search``, ``search_batch``, ``count``, ``classify``, ``reload``, ``version``,
``close``, a context manager), so library users and the HTTP service use either. It runs
the query path of the local engine with the shard loop moved to actors:

1. encode the queries once, here (the coordinator holds the encoder);
2. check the filter against the version's schema here (bad filters fail before any
   fan-out, with the local engine's message);
3. send the query vectors to one replica of every shard group holding shards of the
   target modality; each host runs the local planner per shard
   (:class:`~clipsearch.retrieval.distributed.host.ShardHost`) and returns its
   per-shard top lists and filter counts;
4. merge them with the engine's heap merge, fetch the metadata (and vectors, for MMR)
   of the merged rows from their hosts, and run the engine's rerank loop
   (:func:`~clipsearch.retrieval.engine.rank_queries`: the same candidate pool growth,
   the same stages, the same paging).

So for any query it returns what ``SearchEngine`` returns on the same version, with the
same ``min(k, matches)`` contract for filters.

Placement: shards are cut into ``groups`` by size (largest first onto the least loaded
group), each group hosted by ``replicas`` actors that reserve the group's memory
(Ray's ``memory`` resource, so a host only lands on a node with room for it) and are
spread over nodes. Failures: hosts are Ray actors with ``max_restarts``; a restarted
host reloads its version on its next call. A replica that is gone for good (killed,
restarts exhausted, its node lost without room elsewhere) is skipped and the call sent to
another replica of its group; with none left, the query fails with
:class:`ShardsUnavailableError` naming the shards, never with silently missing rows.
``reload()`` replaces lost replicas. Rollout: ``reload()`` loads the new version on every
host, and only then switches queries to it; queries already running finish on the
version they started with (hosts keep the previous one).
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Unpack

import numpy as np
import pyarrow as pa

from clipsearch.retrieval.encoders import Encoder
from clipsearch.retrieval.errors import ClipsearchError, ConfigError, QueryError
from clipsearch.retrieval.manifest import Manifest, ShardRecord
from clipsearch.retrieval.options import SearchOptions, SearchOverrides, resolve_options
from clipsearch.retrieval.planner import PlannerConfig
from clipsearch.retrieval.results import SearchResults

log = logging.getLogger(__name__)

# In-memory size of a shard's metadata relative to its zstd Parquet file (an estimate:
# Arrow strings and numbers decompressed), for memory reservations.
METADATA_EXPANSION = 3.0


class ShardsUnavailableError(ClipsearchError, RuntimeError):
    """Some shards of the index have no live host; the query was not answered."""

    def __init__(self, message: str, *, shards: Sequence[str]) -> None:
        super().__init__(message)
        # Names of the shards that could not be searched.
        self.shards = tuple(shards)


@dataclass(frozen=True, kw_only=True)
class DistributedOptions:
    """How a :class:`DistributedSearchEngine` lays an index out on a Ray cluster."""

    # Cluster to join when Ray is not initialised in this process: "auto" (the one
    # `ray start` started on this machine), "local" (a private one, stopped on close),
    # or an address ("10.0.0.5:6379", "ray://head:10001").
    address: str = "auto"
    # Shard groups (each held whole by one actor). None: one per alive node.
    groups: int | None = None
    # Actors per group: queries go to one of them; more replicas survive more failures
    # and spread query load.
    replicas: int = 1
    # CPUs each host reserves (its share of the node's cores for shard scans).
    cpus_per_host: float = 1.0
    # Calls a host serves at once (queries from several coordinator threads, a rollout's
    # load beside queries); its shards are searched in parallel within a call.
    host_concurrency: int = 4
    # Memory each host reserves = estimated bytes of its shards x this (room for filter
    # caches and the next version during a rollout).
    memory_headroom: float = 1.5
    # Restarts of a crashed host (-1: unlimited); calls lost with it are retried.
    max_restarts: int = -1
    # A host call taking longer than this fails over to another replica (seconds).
    call_timeout_s: float = 120.0
    # Planner thresholds, as SearchEngine.open's ``config``.
    planner: PlannerConfig = field(default_factory=PlannerConfig)

    def __post_init__(self) -> None:
        if not self.address:
            raise ConfigError('the Ray address is empty; use "auto", "local" or host:port')
        if self.groups is not None and self.groups < 1:
            raise ConfigError(f"groups must be >= 1, got {self.groups}")
        if self.replicas < 1:
            raise ConfigError(f"replicas must be >= 1, got {self.replicas}")
        if self.cpus_per_host < 0 or self.memory_headroom < 1:
            raise ConfigError("cpus_per_host must be >= 0 and memory_headroom >= 1")
        if self.host_concurrency < 1:
            raise ConfigError(f"host_concurrency must be >= 1, got {self.host_concurrency}")
        if self.max_restarts < -1 or not self.call_timeout_s > 0:
            raise ConfigError("max_restarts must be >= -1 and call_timeout_s > 0")


def shard_bytes(record: ShardRecord) -> int:
    """Estimated memory of a loaded shard: FAISS index + fp16 vectors + metadata."""
    return int(
        record.faiss.bytes + record.vectors.bytes + METADATA_EXPANSION * record.metadata.bytes
    )


def assign_groups(
    shards: Sequence[ShardRecord], n_groups: int, previous: dict[str, int] | None = None
) -> dict[str, int]:
    """Shard name -> group. Shards in ``previous`` stay where they are (a rollout moves
    no data); the others go, largest first, to the group holding the fewest bytes."""
    previous = previous or {}
    load = [0] * n_groups
    out: dict[str, int] = {}
    for s in shards:
        g = previous.get(s.name)
        if g is not None and g < n_groups:
            out[s.name] = g
            load[g] += shard_bytes(s)
    for s in sorted(
        (s for s in shards if s.name not in out), key=lambda s: (-shard_bytes(s), s.name)
    ):
        g = min(range(n_groups), key=lambda i: (load[i], i))
        out[s.name] = g
        load[g] += shard_bytes(s)
    return out


@dataclass(eq=False)
class _Replica:
    group: int
    handle: Any
    alive: bool = True
    node_id: str = ""


@dataclass(frozen=True, eq=False)
class _Layout:
    """One served version: what queries read once and use throughout."""

    manifest: Manifest
    schema: pa.Schema
    # Shard name -> group.
    group_of: dict[str, int]
    # Numeric field -> (min, max) over every row (see engine.field_range), on demand.
    field_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def version(self) -> int:
        return self.manifest.version

    def names(self, group: int, records: Sequence[ShardRecord] | None = None) -> list[str]:
        records = self.manifest.shards if records is None else records
        return [s.name for s in records if self.group_of[s.name] == group]

    def target(self, modality: str | None) -> str:
        """As SearchEngine.target_modality."""
        if modality is not None:
            return modality
        has_images = any(s.modality == "image" and s.rows for s in self.manifest.shards)
        return "image" if has_images else "text"


class DistributedSearchEngine:
    """Search one index whose shards live on Ray actors; safe to share between threads."""

    def __init__(
        self,
        root: Path,
        encoder: Encoder,
        options: DistributedOptions,
        layout: _Layout,
        replicas: list[list[_Replica]],
        owns_ray: bool,
    ) -> None:
        self.root = root
        self.encoder = encoder
        self.options = options
        self.config = options.planner
        self._layout = layout
        self._replicas = replicas
        self._owns_ray = owns_ray
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._turn = itertools.count()
        self._snapshot: Any = None
        self._closed = False

    @classmethod
    def open(
        cls,
        path: str | Path,
        encoder: Encoder | None = None,
        device: str = "auto",
        *,
        options: DistributedOptions | None = None,
        query_threads: int = 1,
    ) -> DistributedSearchEngine:
        """Pin the live version at ``path`` (a filesystem every node mounts at the same
        path) and load its shards onto host actors.

        Args:
            encoder: the query encoder (checked against the index); None re-creates the
                index's own, on ``device``, in this process.
            query_threads: CPU threads of that encoder for calls of up to 4 items
                (queries), as :meth:`SearchEngine.open
                <clipsearch.retrieval.engine.SearchEngine.open>`.
        Raises:
            IndexNotFoundError, IndexFormatError, FingerprintMismatchError as
            SearchEngine.open; ConfigError when Ray is missing or the cluster cannot be
            joined; ShardsUnavailableError when a group's hosts cannot load.
        """
        from clipsearch.retrieval.distributed.host import version_schema
        from clipsearch.retrieval.encoders import encoder_from_fingerprint
        from clipsearch.retrieval.engine import check_fingerprint
        from clipsearch.retrieval.manifest import read_current

        options = options or DistributedOptions()
        root = Path(path).resolve()
        manifest = read_current(root)
        if encoder is None:
            encoder = encoder_from_fingerprint(
                manifest.encoder, device=device, query_threads=query_threads
            )
        check_fingerprint(manifest, encoder)
        ray, owns_ray = _join(options.address)
        try:
            n_groups = options.groups or max(1, len([n for n in ray.nodes() if n.get("Alive")]))
            layout = _Layout(
                manifest=manifest,
                schema=version_schema(root, manifest),
                group_of=assign_groups(manifest.shards, n_groups),
            )
            replicas = [
                [_Replica(g, None) for _ in range(options.replicas)] for g in range(n_groups)
            ]
            engine = cls(root, encoder, options, layout, replicas, owns_ray)
            engine._start_missing(layout)
            engine._load_everywhere(layout)
        except BaseException:
            if owns_ray:
                ray.shutdown()
            raise
        log.info(
            "%s: version %d on %d group(s) x %d replica(s)",
            root,
            manifest.version,
            n_groups,
            options.replicas,
        )
        return engine

    # ------------------------------------------------------------------ properties

    @property
    def version(self) -> int:
        return self._layout.version

    @property
    def manifest(self) -> Manifest:
        return self._layout.manifest

    @property
    def schema(self) -> pa.Schema:
        return self._layout.schema

    @property
    def placement(self) -> dict[str, list[str]]:
        """Shard name -> node ids of its live hosts."""
        layout = self._layout
        with self._lock:
            return {
                name: [r.node_id for r in self._replicas[g] if r.alive]
                for name, g in layout.group_of.items()
            }

    @property
    def snapshot(self) -> Any:
        """A metadata-only :class:`~clipsearch.retrieval.store.Snapshot` of the served
        version (no FAISS indexes; vectors memory-mapped), read here on first use: the
        HTTP service's item and facet routes need it. Queries never touch it."""
        from clipsearch.retrieval.schema import conform
        from clipsearch.retrieval.store import (
            LoadedShard,
            Snapshot,
            read_metadata,
            read_tombstones,
            read_vectors,
            resolve_in_root,
        )

        layout = self._layout
        cached = self._snapshot
        if cached is not None and cached.version == layout.version:
            return cached
        m = layout.manifest
        shards = tuple(
            LoadedShard(
                record=s,
                index=None,
                vectors=read_vectors(resolve_in_root(self.root, s.vectors.path)),
                metadata=conform(
                    read_metadata(resolve_in_root(self.root, s.metadata.path)),
                    layout.schema,
                    lenient=True,
                ),
            )
            for s in m.shards
        )
        snap = Snapshot(
            root=self.root,
            manifest=m,
            shards=shards,
            tombstones=read_tombstones(self.root, m),
            schema=layout.schema,
        )
        self._snapshot = snap
        return snap

    def target_modality(self, modality: str | None = None) -> str:
        return self._layout.target(modality)

    def relevance_threshold(self, query_modality: str, modality: str | None = None) -> float:
        """As :meth:`SearchEngine.relevance_threshold
        <clipsearch.retrieval.engine.SearchEngine.relevance_threshold>`."""
        from clipsearch.retrieval.engine import relevance_threshold

        layout = self._layout
        direction = f"{query_modality}->{layout.target(modality)}"
        return relevance_threshold(layout.manifest, direction)

    def allowed_rows(
        self, where: str | dict[str, Any] | None = None, modality: str | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """As SearchEngine.allowed_rows (facet counts): the metadata-only
        :attr:`snapshot` and, per shard of the target modality, the rows ``where``
        allows (tombstones removed; None: every row), computed here from the metadata."""
        from clipsearch.retrieval.filters import compile_filter
        from clipsearch.retrieval.planner import AllowedRows

        snap = self.snapshot
        compiled = None if where is None else compile_filter(where, snap.schema)
        target = self.target_modality(modality)
        out: dict[str, Any] = {}
        for s in snap.shards:
            if s.record.modality != target:
                continue
            live = None
            if len(snap.tombstones):
                row_ids = s.metadata.column("row_id").to_numpy()
                dead = np.isin(row_ids, snap.tombstones)
                live = ~dead if dead.any() else None
            mask = None if compiled is None else compiled.mask(s.metadata)
            if mask is not None and live is not None:
                mask = mask & live
            mask = live if mask is None else mask
            out[s.record.name] = None if mask is None else AllowedRows(mask)
        return snap, out

    def watch(self, interval_s: float) -> threading.Event:
        """Roll out new versions as they are committed: a daemon thread calls
        :meth:`reload` every ``interval_s`` seconds (errors are logged; the served version
        stays). Set the returned event to stop it."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(interval_s):
                try:
                    self.reload()
                except Exception as e:
                    log.warning("%s: could not roll out the new version: %s", self.root, e)

        threading.Thread(target=run, name="clipsearch-ray-watch", daemon=True).start()
        return stop

    # ------------------------------------------------------------------ lifecycle

    def reload(self) -> bool:
        """Roll out the newest committed version; True when the version changed.

        Every host loads the new version first (shards it already holds are not read
        again); only when all have, queries switch to it. Queries already running finish
        on their version. Lost replicas are replaced here too. If loading fails, the
        current version stays served and the error is raised.
        """
        from clipsearch.retrieval.distributed.host import version_schema
        from clipsearch.retrieval.engine import check_fingerprint
        from clipsearch.retrieval.manifest import read_current

        with self._reload_lock:
            old = self._layout
            self._start_missing(old)
            manifest = read_current(self.root)
            if manifest.version == old.version:
                self._load_everywhere(old)  # the replacements
                return False
            check_fingerprint(manifest, self.encoder)
            new = _Layout(
                manifest=manifest,
                schema=version_schema(self.root, manifest),
                group_of=assign_groups(manifest.shards, len(self._replicas), old.group_of),
            )
            self._load_everywhere(new)
            self._layout = new
            self._each_host(lambda h: h.drop.remote([old.version, new.version]), wait=False)
            log.info("%s: switched to version %d", self.root, new.version)
            return True

    def close(self) -> None:
        """Stop the host actors (and the private cluster, if ``address="local"``)."""
        if self._closed:
            return
        self._closed = True
        import ray

        with self._lock:
            for reps in self._replicas:
                for r in reps:
                    if r.handle is not None:
                        ray.kill(r.handle, no_restart=True)
                    r.alive = False
        if self._owns_ray:
            ray.shutdown()

    def __enter__(self) -> DistributedSearchEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ queries

    def search(
        self,
        query: Any,
        options: SearchOptions | None = None,
        **overrides: Unpack[SearchOverrides],
    ) -> SearchResults:
        """Search with one query; see :meth:`search_batch`."""
        return self.search_batch([query], options, **overrides)[0]

    def search_batch(
        self,
        queries: Sequence[Any],
        options: SearchOptions | None = None,
        *,
        texts: Sequence[str | None] | None = None,
        **overrides: Unpack[SearchOverrides],
    ) -> list[SearchResults]:
        """As :meth:`SearchEngine.search_batch <clipsearch.retrieval.engine.SearchEngine.search_batch>`
        (lexical and hybrid modes included: the BM25 lists come from the hosts).

        Raises:
            QueryError, FilterError as SearchEngine; ShardsUnavailableError when a group
            of the target shards has no live host.
        """
        from clipsearch.retrieval.engine import (
            boost_headroom,
            build_candidates,
            merge_shard_tops,
            page_results,
            rank_queries,
            search_auto,
        )
        from clipsearch.retrieval.filters import compile_filter
        from clipsearch.retrieval.hybrid import query_vectors
        from clipsearch.retrieval.queries import encode_queries

        t0 = time.perf_counter()
        opts = resolve_options(options, overrides)
        layout = self._layout
        if not queries:
            return []
        if opts.min_score == "auto":  # each query with its direction's threshold
            target = layout.target(opts.modality)
            return search_auto(self.search_batch, queries, opts, texts, layout.manifest, target)
        timings: dict[str, float] = {}
        tick = time.perf_counter()
        if opts.where is not None:
            compile_filter(opts.where, layout.schema)  # bad filters fail here, not remotely
        shards = [s for s in layout.manifest.shards if s.modality == layout.target(opts.modality)]
        timings["filter"] = _ms(tick)
        if texts is not None and len(texts) != len(queries):
            raise QueryError(f"{len(texts)} texts for {len(queries)} queries")
        hybrid = self._hybrid(layout, opts, queries if texts is None else texts, shards, timings)
        tick = time.perf_counter()
        dim = layout.manifest.dim
        xq = query_vectors(
            hybrid, lambda: encode_queries(self.encoder, list(queries), dim), len(queries), dim
        )
        timings["encode"] = _ms(tick)
        starts = [s.row_id_start for s in shards]
        position = {s.name: i for i, s in enumerate(shards)}
        counts: dict[str, int] = {}

        def search(
            pool: int, least: int | None = None
        ) -> tuple[list[list[tuple[float, int, int]]], dict[str, str]]:
            # (Hosts search every shard to `pool` rows: `least` is for local shards.)
            answers = self._fanout(
                layout,
                shards,
                lambda h, names: h.search.remote(layout.version, names, xq, pool, opts.where),
            )
            results: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0), np.zeros(0))] * len(
                shards
            )
            plans: dict[str, str] = {}
            for names, answer in answers:
                for name, (d, i, plan, count) in zip(names, answer, strict=True):
                    results[position[name]] = (d, i)
                    plans[name] = plan
                    counts[name] = count
            merged = merge_shard_tops(starts, results, xq.shape[0], pool)
            return merged, {s.name: plans[s.name] for s in shards}

        def candidates(merged: list[list[tuple[float, int, int]]], vectors: bool) -> list[Any]:
            take = self._fetch_rows(layout, shards, merged, vectors)
            return [
                build_candidates(m, xq[qi], vectors, starts, take, layout.schema)
                for qi, m in enumerate(merged)
            ]

        step: Callable[[int], Any] = search
        if hybrid is not None:
            step = functools.partial(hybrid.search, search)

        def total() -> int:  # lexical mode runs no vector search, so no counts
            return sum(counts.values()) if counts else self._count(layout, shards, opts)

        ranked, plans = rank_queries(
            opts,
            total=total,
            search=step,
            candidates=candidates,
            headroom=lambda: boost_headroom(opts, lambda f: self._field_range(layout, f)),
            timings=timings,
        )
        results = page_results(ranked, opts, total(), plans, timings, t0, layout.version)
        return results if hybrid is None else hybrid.attach(results)

    def classify(self, image: Any, labels: Sequence[str]) -> list[tuple[str, float]]:
        """Zero-shot label probabilities for an image (runs here, like SearchEngine)."""
        from clipsearch.retrieval.queries import classify

        if self.encoder is None:
            raise QueryError("classify needs an encoder")
        return classify(self.encoder, image, labels)

    def count(self, where: str | dict[str, Any] | None = None, modality: str | None = None) -> int:
        """Live rows of a modality (default: all) that pass ``where``."""
        from clipsearch.retrieval.filters import compile_filter

        layout = self._layout
        if where is not None:
            compile_filter(where, layout.schema)
        shards = [s for s in layout.manifest.shards if modality is None or s.modality == modality]
        answers = self._fanout(
            layout, shards, lambda h, names: h.count.remote(layout.version, names, where)
        )
        return sum(int(n) for _, n in answers)

    # ------------------------------------------------------------------ internals

    def _count(self, layout: _Layout, shards: list[ShardRecord], opts: SearchOptions) -> int:
        answers = self._fanout(
            layout, shards, lambda h, names: h.count.remote(layout.version, names, opts.where)
        )
        return sum(int(n) for _, n in answers)

    def _hybrid(
        self,
        layout: _Layout,
        opts: SearchOptions,
        queries: Sequence[Any],
        shards: list[ShardRecord],
        timings: dict[str, float],
    ) -> Any:
        """The hybrid module's search step over the hosts' BM25 lists, or None for
        vector mode (decided by the local engine's rule); its ``xq`` is set once the
        queries are encoded."""
        from clipsearch.retrieval.distributed.lexical import remote_hybrid

        return remote_hybrid(self, layout, opts, queries, shards, timings)

    def _fetch_rows(
        self,
        layout: _Layout,
        shards: list[ShardRecord],
        merged: list[list[tuple[float, int, int]]],
        vectors: bool,
    ) -> Callable[[int, np.ndarray], tuple[pa.Table, np.ndarray | None]]:
        """Fetch the merged rows of every query in one call per group; returns the
        ``take`` of :func:`~clipsearch.retrieval.engine.build_candidates`."""
        wanted: dict[int, set[int]] = {}
        for m in merged:
            for _, si, j in m:
                wanted.setdefault(si, set()).add(j)
        local = {si: np.array(sorted(rows), np.int64) for si, rows in wanted.items()}
        by_name = {shards[si].name: si for si in local}
        needed = [s for s in shards if s.name in by_name]
        answers = self._fanout(
            layout,
            needed,
            lambda h, names: h.rows.remote(
                layout.version, [(n, local[by_name[n]]) for n in names], vectors
            ),
        )
        fetched: dict[int, tuple[pa.Table, np.ndarray | None]] = {}
        for names, answer in answers:
            for name, got in zip(names, answer, strict=True):
                fetched[by_name[name]] = got

        def take(si: int, rows: np.ndarray) -> tuple[pa.Table, np.ndarray | None]:
            table, vecs = fetched[si]
            pos = np.searchsorted(local[si], rows)
            return table.take(pa.array(pos)), None if vecs is None else vecs[pos]

        return take

    def _field_range(self, layout: _Layout, name: str) -> tuple[float, float]:
        cached = layout.field_ranges.get(name)
        if cached is not None:
            return cached
        answers = self._fanout(
            layout,
            layout.manifest.shards,
            lambda h, names: h.field_range.remote(layout.version, names, name),
        )
        lo = min([0.0, *(float(a[0]) for _, a in answers)])
        hi = max([0.0, *(float(a[1]) for _, a in answers)])
        layout.field_ranges[name] = (lo, hi)
        return lo, hi

    def _fanout(
        self,
        layout: _Layout,
        shards: Sequence[ShardRecord],
        call: Callable[[Any, list[str]], Any],
    ) -> list[tuple[list[str], Any]]:
        """``call(host, names)`` on one live replica of every group holding some of
        ``shards``, concurrently; a replica that is gone (or does not answer within
        ``call_timeout_s``) is replaced by another of its group. Returns (names, answer)
        per group. Raises ShardsUnavailableError when a group runs out of replicas."""
        import ray
        from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

        groups = sorted({layout.group_of[s.name] for s in shards})
        names = {g: layout.names(g, shards) for g in groups}
        tried: dict[int, list[_Replica]] = {g: [] for g in groups}
        pending: dict[int, tuple[_Replica, Any]] = {}
        for g in groups:
            r = self._choose(layout, g, tried[g], names[g])
            pending[g] = (r, call(r.handle, names[g]))
        out = []
        for g in groups:
            while True:
                replica, ref = pending[g]
                try:
                    out.append((names[g], ray.get(ref, timeout=self.options.call_timeout_s)))
                    break
                except (RayActorError, ActorUnavailableError, GetTimeoutError) as e:
                    tried[g].append(replica)
                    if not isinstance(e, GetTimeoutError):
                        self._lost(replica, e)
                    else:
                        log.warning("a host of group %d did not answer in time; failing over", g)
                    r = self._choose(layout, g, tried[g], names[g])
                    pending[g] = (r, call(r.handle, names[g]))
        return out

    def _choose(
        self, layout: _Layout, group: int, tried: list[_Replica], names: list[str]
    ) -> _Replica:
        with self._lock:
            live = [r for r in self._replicas[group] if r.alive and r not in tried]
        if not live:
            raise ShardsUnavailableError(
                f"{self.root} version {layout.version}: shards {', '.join(names)} have no live "
                f"host ({len(self._replicas[group])} replica(s) of group {group} lost); "
                "engine.reload() starts new hosts, or open with more replicas",
                shards=names,
            )
        return live[next(self._turn) % len(live)]

    def _lost(self, replica: _Replica, error: BaseException) -> None:
        with self._lock:
            if replica.alive:
                replica.alive = False
                log.warning(
                    "shard host of group %d on node %s is gone (%s); using another replica",
                    replica.group,
                    replica.node_id[:12],
                    type(error).__name__,
                )

    def _start_missing(self, layout: _Layout) -> None:
        """Create an actor for every replica slot without a live one."""
        import ray

        from clipsearch.retrieval.distributed.host import ShardHost

        remote = ray.remote(ShardHost)
        for g, reps in enumerate(self._replicas):
            need = sum(
                shard_bytes(s) for s in layout.manifest.shards if layout.group_of[s.name] == g
            )
            for i, r in enumerate(reps):
                if r.handle is not None and r.alive:
                    continue
                options: dict[str, Any] = {
                    "num_cpus": self.options.cpus_per_host,
                    "max_restarts": self.options.max_restarts,
                    "max_task_retries": -1 if self.options.max_restarts != 0 else 0,
                    "scheduling_strategy": "SPREAD",
                    "max_concurrency": self.options.host_concurrency,
                }
                if need:
                    options["memory"] = int(need * self.options.memory_headroom)
                handle = remote.options(**options).remote(str(self.root), self.options.planner)
                with self._lock:
                    reps[i] = _Replica(g, handle)

    def _load_everywhere(self, layout: _Layout) -> None:
        """Load ``layout``'s version on every live replica; a replica that fails is marked
        lost; a group left without any raises ShardsUnavailableError."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        calls = []
        with self._lock:
            for g, reps in enumerate(self._replicas):
                for r in reps:
                    if r.alive and r.handle is not None:
                        calls.append((r, r.handle.load.remote(layout.version, layout.names(g))))
        for r, ref in calls:
            try:
                info = ray.get(ref)
                r.node_id = str(info["node_id"])
            except (RayActorError, ActorUnavailableError) as e:
                self._lost(r, e)
        for g, reps in enumerate(self._replicas):
            if not any(r.alive for r in reps):
                names = layout.names(g)
                raise ShardsUnavailableError(
                    f"{self.root} version {layout.version}: no host of group {g} could load "
                    f"shards {', '.join(names)}",
                    shards=names,
                )

    def _each_host(self, call: Callable[[Any], Any], *, wait: bool) -> None:
        import ray

        with self._lock:
            refs = [call(r.handle) for reps in self._replicas for r in reps if r.alive]
        if wait:
            ray.get(refs)


def _join(address: str) -> tuple[Any, bool]:
    """The ray module, and whether this call started Ray (then close() stops it)."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError(
            f"distributed search needs Ray ({e}); install `pip install 'clipsearch[ray]'`"
        ) from e
    if ray.is_initialized():
        return ray, False
    try:
        # "local" is Ray's own spelling for "start a new cluster here", even when one
        # already runs on this machine (a bare ray.init() would join that one).
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(
            f"cannot join the Ray cluster at {address!r}: {e}; start one with `ray start "
            "--head` (then --ray auto) or pass its address"
        ) from e
    return ray, True


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000.0, 3)
