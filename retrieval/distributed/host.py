"""A shard host: the shards one Ray actor keeps in memory, searched with the local planner.

:class:`ShardHost` is a plain class; the coordinator turns it into a Ray actor
(``ray.remote(ShardHost)``), so it can also be tested in-process. A host keeps the
shards of one or two index versions (the live one and, during a rollout, the next),
each as :class:`~clipsearch.retrieval.planner.ShardSearcher` objects built exactly as
:class:`~clipsearch.retrieval.engine.SearchEngine` builds them (same tombstones, same
unified schema, same planner config), and answers with the engine's own functions
(``allowed_rows`` for filters and their cache, ``ShardSearcher.search`` for the plan,
``field_range`` for boosts). Shard files are read once per host: a new version re-uses
the loaded files of shards it shares with the previous one.

Every call names the version it is about. A host that lacks it (restarted by Ray after
a crash, or asked before a rollout reached it) loads it then: a restart costs a slower
query, never a wrong or missing answer.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from clipsearch.retrieval.kernels import single_threaded_worker
from clipsearch.retrieval.manifest import Manifest, ShardRecord, read_manifest
from clipsearch.retrieval.planner import PlannerConfig, ShardSearcher

log = logging.getLogger(__name__)

# Versions a host keeps: the live one and the one being rolled out (or the previous one,
# for queries that started before the switch).
KEEP_VERSIONS = 2


def version_schema(root: Path, manifest: Manifest) -> pa.Schema:
    """The unified metadata schema of a version, as :func:`~clipsearch.retrieval.store.open_snapshot`
    computes it, from the Parquet footers only (no rows are read)."""
    import pyarrow.parquet as pq

    from clipsearch.retrieval.schema import unify
    from clipsearch.retrieval.store import resolve_in_root

    schemas = [pq.read_schema(resolve_in_root(root, s.metadata.path)) for s in manifest.shards]
    schema, _ = unify(schemas, [f"shard {s.name}" for s in manifest.shards])
    return schema


@dataclass(frozen=True, eq=False)
class _Version:
    manifest: Manifest
    schema: pa.Schema
    tombstones: np.ndarray
    shards: dict[str, ShardSearcher]
    masks: Any  # engine.MaskCache


class ShardHost:
    """Hosts some shards of an index for the distributed coordinator (a Ray actor)."""

    def __init__(self, root: str, config: PlannerConfig | None = None) -> None:
        from clipsearch.retrieval.engine import SHARD_THREADS_FROM_CORES
        from clipsearch.retrieval.placement import usable_cores

        logging.getLogger("clipsearch").setLevel(logging.WARNING)
        self.root = Path(root)
        self.config = config or PlannerConfig()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, min(8, os.cpu_count() or 1)),
            thread_name_prefix="clipsearch-host",
            initializer=single_threaded_worker,
        )
        self._shard_threads = usable_cores() >= SHARD_THREADS_FROM_CORES
        self._versions: dict[int, _Version] = {}
        # Shard name -> (CPU index, fp16 vectors, metadata as stored, lexical index or
        # None): files read once.
        self._files: dict[str, tuple[Any, np.ndarray, pa.Table, Any]] = {}

    # ---------------------------------------------------------------- versions

    def load(self, version: int, names: list[str]) -> dict[str, Any]:
        """Make ``version``'s shards ``names`` searchable here (idempotent). Returns
        where this host runs and the bytes its shards hold."""
        self._shards(version, names)
        return self.info()

    def drop(self, keep: list[int]) -> None:
        """Forget every version not in ``keep``, and shard files no kept version uses."""
        with self._lock:
            for v in [v for v in self._versions if v not in keep]:
                del self._versions[v]
            used = {n for ver in self._versions.values() for n in ver.shards}
            for name in [n for n in self._files if n not in used]:
                del self._files[name]

    def info(self) -> dict[str, Any]:
        import ray

        with self._lock:
            nbytes = sum(v.nbytes + t.nbytes for _, v, t, _ in self._files.values())
            return {
                "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(),
                "versions": sorted(self._versions),
                "shards": sorted(self._files),
                "bytes": int(nbytes),
            }

    def _version(self, version: int) -> _Version:
        from clipsearch.retrieval.engine import MASK_CACHE_SIZE, MaskCache
        from clipsearch.retrieval.kernels import configure_faiss
        from clipsearch.retrieval.store import read_tombstones

        ver = self._versions.get(version)
        if ver is None:
            manifest = read_manifest(self.root, version)
            configure_faiss(manifest.dim)  # as SearchEngine.open: same kernels, same scores
            ver = _Version(
                manifest=manifest,
                schema=version_schema(self.root, manifest),
                tombstones=read_tombstones(self.root, manifest),
                shards={},
                masks=MaskCache(MASK_CACHE_SIZE, self.config.gather_cache_bytes),
            )
            self._versions[version] = ver
            for old in sorted(self._versions)[:-KEEP_VERSIONS]:
                del self._versions[old]
        return ver

    def _shards(self, version: int, names: list[str]) -> tuple[_Version, list[ShardSearcher]]:
        with self._lock:
            ver = self._version(version)
            missing = [n for n in names if n not in ver.shards]
        if missing:
            # Read outside the lock: queries on loaded shards (the live version, during a
            # rollout) go on meanwhile. Two calls may read one shard twice; one wins.
            records = {s.name: s for s in ver.manifest.shards}
            built = {n: self._searcher(ver, records[n]) for n in missing}
            with self._lock:
                for name, searcher in built.items():
                    ver.shards.setdefault(name, searcher)
            log.info("host %d: version %d serves %d shards", os.getpid(), version, len(names))
        with self._lock:
            return ver, [ver.shards[n] for n in names]

    def _searcher(self, ver: _Version, record: ShardRecord) -> ShardSearcher:
        from clipsearch.retrieval.schema import conform
        from clipsearch.retrieval.store import load_shard

        files = self._files.get(record.name)
        if files is None:
            index, vectors, table = load_shard(self.root, ver.manifest, record)
            lexical = _open_lexical(self.root, record)
            files = self._files[record.name] = (index, vectors, table, lexical)
        index, vectors, table, _ = files
        metadata = conform(table, ver.schema, lenient=True)
        return ShardSearcher.create(
            record, index, vectors, metadata, ver.tombstones, config=self.config
        )

    # ---------------------------------------------------------------- queries

    def search(
        self,
        version: int,
        names: list[str],
        xq: np.ndarray,
        pool: int,
        where: str | dict[str, Any] | None,
    ) -> list[tuple[np.ndarray, np.ndarray, str, int]]:
        """Per shard of ``names``: the planner's (scores, local rows, plan) for the best
        ``pool`` allowed rows of every query, and how many rows the filter allows."""
        from clipsearch.retrieval.engine import allowed_rows, search_shards

        ver, shards = self._shards(version, names)
        allowed = allowed_rows(shards, where, ver.schema, ver.masks)
        xq = np.asarray(xq, np.float32)

        results = search_shards(self._pool, self._shard_threads, shards, allowed, xq, pool)
        return [
            (d, i, plan, s.rows if a is None else a.count)
            for s, a, (d, i, plan) in zip(shards, allowed, results, strict=True)
        ]

    def count(self, version: int, names: list[str], where: str | dict[str, Any] | None) -> int:
        from clipsearch.retrieval.engine import allowed_rows

        ver, shards = self._shards(version, names)
        allowed = allowed_rows(shards, where, ver.schema, ver.masks)
        return sum(s.rows if a is None else a.count for s, a in zip(shards, allowed, strict=True))

    def rows(
        self, version: int, requests: list[tuple[str, np.ndarray]], vectors: bool
    ) -> list[tuple[pa.Table, np.ndarray | None]]:
        """Metadata (in the version's schema) and, with ``vectors``, float32 vectors of
        the given local rows of each named shard."""
        _, shards = self._shards(version, [n for n, _ in requests])
        out = []
        for s, (_, local) in zip(shards, requests, strict=True):
            local = np.asarray(local, np.int64)
            vecs = np.asarray(s.vectors[local], np.float32) if vectors else None
            out.append((s.metadata.take(pa.array(local)), vecs))
        return out

    def lexical(
        self,
        version: int,
        names: list[str],
        terms: list[Any],
        depth: int,
        where: str | dict[str, Any] | None,
        with_complete: bool,
    ) -> list[list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] | None]:
        """Per shard of ``names`` (None: it has no lexical index here), per query terms
        (None: no text), the shard's ``LexicalIndex.search`` under the filter's rows."""
        from clipsearch.retrieval.engine import allowed_rows

        ver, shards = self._shards(version, names)
        allowed = allowed_rows(shards, where, ver.schema, ver.masks)
        out: list[list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] | None] = []
        for name, a in zip(names, allowed, strict=True):
            index = self._files[name][3]
            if index is None:
                out.append(None)
                continue
            out.append(
                [
                    index.search(t, depth, a, with_complete=with_complete)
                    if t is not None
                    else None
                    for t in terms
                ]
            )
        return out

    def field_range(self, version: int, names: list[str], name: str) -> tuple[float, float]:
        from clipsearch.retrieval.engine import field_range

        _, shards = self._shards(version, names)
        return field_range(shards, name)

    def ping(self) -> int:
        return os.getpid()


def _open_lexical(root: Path, record: ShardRecord) -> Any:
    """The shard's lexical index as the store opens it (file sizes checked), or None
    when it has none or tantivy is missing (then the coordinator searches by vectors)."""
    from clipsearch.retrieval.errors import IndexFormatError
    from clipsearch.retrieval.lexical import have_tantivy, open_lexical
    from clipsearch.retrieval.store import check_file

    if record.lexical is None or not have_tantivy():
        return None
    problems = [p for f in record.lexical.files if (p := check_file(root, f, verify_hash=False))]
    if problems:
        raise IndexFormatError(f"shard {record.name}: lexical index: {'; '.join(problems)}")
    return open_lexical(root, record.lexical)
