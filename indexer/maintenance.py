"""``delete``, ``compact`` and ``info``: the operations on an existing index.

* ``delete`` records tombstones (row ids + doc ids) in a new version; searches filter
  them out until ``compact`` rewrites the shards.
* ``compact`` rewrites every shard that has tombstoned rows without them (fresh row ids;
  row ids are never reused), commits, then garbage-collects: manifests older than the
  kept versions, and every shard/tombstone/errors file and abandoned build staging
  folder that no kept manifest references.
* ``info`` summarises the live version for people and scripts.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.indexer.ann import IndexOptions
from clipsearch.indexer.build import STAGING_DIR, _tombstone_table, _write_tombstones
from clipsearch.indexer.commit import commit, next_version
from clipsearch.indexer.crash import crash_point
from clipsearch.indexer.fsutil import remove_temp_files
from clipsearch.indexer.lock import IndexLock
from clipsearch.indexer.writer import write_shard
from clipsearch.retrieval.errors import ClipsearchError, ConfigError
from clipsearch.retrieval.lexical import LEXICAL_SUFFIX
from clipsearch.retrieval.manifest import (
    ERRORS_DIR,
    MANIFEST_DIR,
    SHARD_DIR,
    TOMBSTONE_DIR,
    Manifest,
    ShardRecord,
    list_versions,
    manifest_path,
    read_current,
    read_manifest,
    shard_name,
)
from clipsearch.retrieval.progress import Progress, ProgressCallback, ignore
from clipsearch.retrieval.store import read_metadata, read_tombstones, read_vectors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeleteSummary:
    version: int
    # Rows newly tombstoned by this call.
    deleted_rows: int
    # Distinct doc ids of those rows.
    deleted_docs: int
    # Ids asked for that matched no live row.
    not_found: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "deleted_rows": self.deleted_rows,
            "deleted_docs": self.deleted_docs,
            "not_found": list(self.not_found),
        }


def delete(
    root: str | Path,
    *,
    ids: Sequence[str] | None = None,
    where: str | dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
) -> DeleteSummary:
    """Tombstone every live row whose doc_id is in ``ids`` or that matches ``where``.

    ``where`` is a filter expression (``clipsearch.retrieval.filters``) over the metadata columns,
    e.g. ``"category = 'mugs' and price > 100"``. Commits a new version when anything
    matched; otherwise returns the current version unchanged. ``progress`` gets "read
    metadata" (shards) and, when something matched, "commit" (versions).
    """
    if not ids and where is None:
        raise ConfigError("delete needs ids (--ids) or a filter expression (--where)")
    root = Path(root)
    report = progress or ignore
    with IndexLock(root, "delete"):
        base = read_current(root)
        dead = set(read_tombstones(root, base).tolist())
        tables = []
        for i, s in enumerate(base.shards):
            report(Progress("read metadata", i, len(base.shards), "shards"))
            tables.append(read_metadata(root / s.metadata.path))
        report(Progress("read metadata", len(tables), len(tables), "shards"))
        wanted = set(ids or ())
        hits: list[tuple[int, str]] = []
        found: set[str] = set()
        names = [f"shard {s.name}" for s in base.shards]
        masks = _where_masks(tables, names, where) if where is not None else None
        for i, t in enumerate(tables):
            row_ids = t.column("row_id").to_numpy()
            doc_ids = t.column("doc_id").to_pylist()
            match = np.array([d in wanted for d in doc_ids], dtype=bool)
            if masks is not None:
                match |= masks[i]
            for rid, doc in zip(
                row_ids[match].tolist(), np.asarray(doc_ids, dtype=object)[match], strict=True
            ):
                if rid not in dead:
                    hits.append((rid, doc))
                    found.add(doc)
        not_found = tuple(sorted(wanted - found - _dead_docs(root, base)))
        if not hits:
            return DeleteSummary(base.version, 0, 0, not_found)
        version = next_version(root)
        tomb, n = _write_tombstones(root, version, _tombstone_table(root, base), hits)
        manifest = replace(
            base,
            version=version,
            parent_version=base.version,
            operation="delete",
            tombstones=tomb,
            n_tombstones=n,
        )
        report(Progress("commit", 0, 1, "versions"))
        commit(root, manifest)
        report(Progress("commit", 1, 1, "versions", detail={"version": version}))
        return DeleteSummary(version, len(hits), len(found), not_found)


def _dead_docs(root: Path, base: Manifest) -> set[str]:
    return {doc for _, doc in _tombstone_table(root, base)}


def _where_masks(
    tables: list[Any], names: list[str], where: str | dict[str, Any]
) -> list[np.ndarray]:
    """Evaluate ``where`` on every shard's metadata in the index's unified schema
    (clipsearch.retrieval.schema): a column a shard lacks reads as null there."""
    from clipsearch.retrieval.filters import compile_filter
    from clipsearch.retrieval.schema import conform, unified_schema

    schema = unified_schema([t.schema for t in tables], names)
    compiled = compile_filter(where, schema)
    return [compiled.mask(conform(t, schema)) for t in tables]


@dataclass(frozen=True)
class CompactSummary:
    version: int
    shards_rewritten: int
    rows_removed: int
    files_removed: int
    bytes_freed: int
    versions_removed: tuple[int, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "shards_rewritten": self.shards_rewritten,
            "rows_removed": self.rows_removed,
            "files_removed": self.files_removed,
            "bytes_freed": self.bytes_freed,
            "versions_removed": list(self.versions_removed),
        }


def compact(
    root: str | Path, *, keep_versions: int = 1, progress: ProgressCallback | None = None
) -> CompactSummary:
    """Rewrite shards without their tombstoned rows, commit, and garbage-collect.

    Args:
        keep_versions: committed versions whose files survive the GC (the live one
            counts). 1 frees the most space; readers that pinned an older version keep
            working on POSIX (open and memory-mapped files outlive their unlink), but a
            new ``open_snapshot`` of an older version is no longer possible.
        progress: gets "rewrite shards" (shards with deleted rows), with the index and
            "write shard" stages of each rewritten shard nested in it (see
            :func:`clipsearch.indexer.writer.write_shard`), then "commit" (versions) and
            "remove files" (unreferenced files).
    """
    if keep_versions < 1:
        raise ConfigError(f"keep_versions must be >= 1, got {keep_versions}")
    root = Path(root)
    report = progress or ignore
    with IndexLock(root, "compact"):
        for sub in ("", SHARD_DIR, MANIFEST_DIR, TOMBSTONE_DIR, ERRORS_DIR):
            remove_temp_files(root / sub)
        base = read_current(root)
        dead = read_tombstones(root, base)
        version = base.version
        rewritten, removed = 0, 0
        if len(dead):
            try:
                shards, rewritten, removed = _rewrite_shards(root, base, dead, report)
                version = next_version(root)
                manifest = replace(
                    base,
                    version=version,
                    parent_version=base.version,
                    operation="compact",
                    shards=shards,
                    tombstones=None,
                    n_tombstones=0,
                    next_row_id=_next_row(base, shards),
                    next_shard=base.next_shard + rewritten,
                )
                report(Progress("commit", 0, 1, "versions"))
                commit(root, manifest)
            except BaseException:  # disk full, Ctrl-C, a bug: leave no half-written shard
                _discard_new_shards(root, base)
                raise
            report(Progress("commit", 1, 1, "versions", detail={"version": version}))
        files, freed, gone = _collect_garbage(root, keep_versions, report)
    return CompactSummary(version, rewritten, removed, files, freed, gone)


def _discard_new_shards(root: Path, base: Manifest) -> None:
    """Remove the shard files a failed compact wrote (names from ``base.next_shard`` on),
    unless its commit went through after all (then the live manifest lists them)."""
    try:
        if read_current(root).version != base.version:
            return
    except ClipsearchError:
        return  # cannot tell; a later compact collects unreferenced files
    for path in (root / SHARD_DIR).glob("s*.*"):
        stem = path.name.split(".", 1)[0]
        if stem[1:].isdigit() and int(stem[1:]) >= base.next_shard:
            with contextlib.suppress(OSError):
                if path.is_dir():  # a lexical folder
                    shutil.rmtree(path)
                else:
                    path.unlink()
                log.info("removed %s left by the failed compact", path)


def _next_row(base: Manifest, shards: tuple[ShardRecord, ...]) -> int:
    return max([base.next_row_id, *(s.row_id_end for s in shards)])


def _rewrite_shards(
    root: Path, base: Manifest, dead: np.ndarray, report: ProgressCallback
) -> tuple[tuple[ShardRecord, ...], int, int]:
    out: list[ShardRecord] = []
    next_row, next_shard = base.next_row_id, base.next_shard
    rewritten = removed = 0
    ranges = [np.searchsorted(dead, [s.row_id_start, s.row_id_end]) for s in base.shards]
    n_touched = sum(int(hi > lo) for lo, hi in ranges)
    n_done = 0
    report(Progress("rewrite shards", 0, n_touched, "shards"))
    for s, (lo, hi) in zip(base.shards, ranges, strict=True):
        if hi == lo:
            out.append(s)
            continue
        keep = np.ones(s.rows, dtype=bool)
        keep[dead[lo:hi] - s.row_id_start] = False
        removed += int((~keep).sum())
        n_done += 1
        if not keep.any():
            report(Progress("rewrite shards", n_done, n_touched, "shards"))
            continue  # every row deleted: the shard disappears
        vectors = np.asarray(read_vectors(root / s.vectors.path))[keep]
        metadata = read_metadata(root / s.metadata.path).filter(keep)
        options = IndexOptions.for_shard(s.index)
        record = write_shard(
            root,
            name=shard_name(next_shard),
            modality=s.modality,
            row_id_start=next_row,
            vectors=vectors,
            metadata=metadata,
            index_options=options,
            progress=report,
            # The lexical part is rebuilt over the same fields (rows renumbered with it).
            text_fields=s.lexical.fields if s.lexical is not None else (),
        )
        crash_point("compact:shard")
        report(Progress("rewrite shards", n_done, n_touched, "shards"))
        out.append(record)
        next_row += record.rows
        next_shard += 1
        rewritten += 1
    return tuple(out), rewritten, removed


def _collect_garbage(
    root: Path, keep_versions: int, report: ProgressCallback
) -> tuple[int, int, tuple[int, ...]]:
    """Delete files no kept manifest references; returns (files, bytes, versions removed)."""
    current = read_current(root)
    versions = [v for v in list_versions(root) if v <= current.version]
    kept = versions[-keep_versions:]
    gone = tuple(v for v in list_versions(root) if v not in kept)
    referenced = {manifest_path(v) for v in kept}
    for v in kept:
        referenced.update(f.path for f in read_manifest(root, v).files())
    garbage = [
        p
        for sub in (SHARD_DIR, TOMBSTONE_DIR, ERRORS_DIR, MANIFEST_DIR)
        if (root / sub).is_dir()
        for p in sorted((root / sub).iterdir())
        if p.is_file() and p.relative_to(root).as_posix() not in referenced
    ]
    # Lexical folders (shards/<name>.lex/, temp folders of failed writes) go whole when no
    # kept version references a file inside them.
    folders = {posixpath.dirname(path) for path in referenced}
    shard_dir = root / SHARD_DIR
    garbage += [
        p
        for p in (sorted(shard_dir.iterdir()) if shard_dir.is_dir() else [])
        if p.is_dir() and LEXICAL_SUFFIX in p.name and p.relative_to(root).as_posix() not in folders
    ]
    # Progress and the summary count files (a folder counts its files).
    sizes = {p: len([f for f in p.rglob("*") if f.is_file()]) if p.is_dir() else 1 for p in garbage}
    total = sum(sizes.values())
    n_files = n_bytes = 0
    report(Progress("remove files", 0, total, "files"))
    for p in garbage:
        if p.is_dir():
            n_bytes += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            shutil.rmtree(p)
        else:
            n_bytes += p.stat().st_size
            p.unlink()
        n_files += sizes[p]
        report(Progress("remove files", n_files, total, "files"))
    if (root / STAGING_DIR).is_dir():
        shutil.rmtree(root / STAGING_DIR)
    log.info("compact GC: removed %d files (%d bytes), versions %s", n_files, n_bytes, gone)
    return n_files, n_bytes, gone


def info(root: str | Path) -> dict[str, Any]:
    """A JSON-ready summary of the live version."""
    root = Path(root)
    m = read_current(root)
    rows = m.rows_by_modality()
    dead = read_tombstones(root, m)
    live = dict(rows)
    for s in m.shards:
        lo, hi = np.searchsorted(dead, [s.row_id_start, s.row_id_end])
        live[s.modality] -= int(hi - lo)
    recalls = [s.index.measured_recall for s in m.shards if s.index.measured_recall is not None]
    size = sum(f.bytes for f in m.files())
    return {
        "root": str(root),
        "version": m.version,
        "versions": list_versions(root),
        "created_at": m.created_at,
        "operation": m.operation,
        "model": {
            "kind": m.encoder.kind,
            "arch": m.encoder.arch,
            "pretrained": m.encoder.pretrained,
            "dim": m.encoder.dim,
        },
        "shards": len(m.shards),
        "rows": {
            "total": m.n_rows,
            "live": m.n_live,
            "by_modality": rows,
            "live_by_modality": live,
        },
        "tombstones": m.n_tombstones,
        "index_types": dict(Counter(s.index.factory for s in m.shards)),
        "search_params": [
            dict(p)
            for p in sorted({tuple(sorted(s.index.search_params.items())) for s in m.shards})
        ],
        "measured_recall_min": min(recalls) if recalls else None,
        "errors": m.n_errors,
        "error_reports": [e.file.path for e in m.errors],
        # Folders the service may serve images from; None: not recorded (older index).
        "image_roots": None if m.image_roots is None else list(m.image_roots),
        "bytes": size,
    }
