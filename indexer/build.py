"""``build`` and ``add``: sources -> embed pipeline -> shards -> committed version.

Both run the same resumable ingest under the index lock:

1. scan the sources (deterministic item order, a fingerprint of the inputs);
2. embed the items in order; rows fill a shard buffer per modality; a full buffer (or
   the end of a modality) is written as a shard (:func:`clipsearch.indexer.writer.write_shard`) and
   recorded in a journal under ``.staging/<key>/``, where the key hashes the inputs,
   the options that shape the result, the encoder and the base version;
3. write the errors report and tombstones, then commit a manifest and swap ``CURRENT``.

Killed at any point, the previous version stays live. Rerunning the same command finds
the journal, keeps the shards it lists (after checking their files) and continues after
the last one, so it ends with the same rows as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsearch.indexer.ann import IndexOptions
from clipsearch.indexer.commit import commit, next_version
from clipsearch.indexer.crash import crash_point
from clipsearch.indexer.fsutil import atomic_write, atomic_write_bytes, remove_temp_files
from clipsearch.indexer.lock import IndexLock
from clipsearch.indexer.pipeline import Embedded, embed_items
from clipsearch.indexer.sources import (
    Item,
    Problem,
    SourceOptions,
    SourceScan,
    covering_folders,
    scan_sources,
)
from clipsearch.indexer.writer import file_record, write_shard
from clipsearch.retrieval.encoders.base import Encoder
from clipsearch.retrieval.errors import ConfigError, FingerprintMismatchError
from clipsearch.retrieval.manifest import (
    ERRORS_DIR,
    MANIFEST_DIR,
    SHARD_DIR,
    TOMBSTONE_DIR,
    ErrorReport,
    Manifest,
    ShardRecord,
    current_version,
    read_manifest,
    shard_name,
    version_name,
)
from clipsearch.retrieval.progress import Progress, ProgressCallback
from clipsearch.retrieval.store import check_file, read_metadata, read_tombstones

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

STAGING_DIR = ".staging"
ERROR_COLUMNS = ("source", "doc_id", "stage", "reason", "action")


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    """Options of ``build`` and ``add``."""

    # Rows per shard (per modality). Smaller shards resume faster after a crash and
    # parallelise queries; larger ones get better ANN indexes. 100k x 512 fp16 = 100 MB.
    shard_size: int = 100_000
    # Items per encoder forward pass; None: the encoder's own batch size.
    batch_size: int | None = None
    # Decode/preprocess worker threads.
    workers: int = field(default_factory=lambda: max(1, min(8, os.cpu_count() or 1)))
    # Index type and tuning.
    index: IndexOptions = field(default_factory=IndexOptions)
    # Manifest column mapping and duplicate policy.
    sources: SourceOptions = field(default_factory=SourceOptions)

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ConfigError(f"shard size must be >= 1, got {self.shard_size}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")


@dataclass(frozen=True)
class IngestSummary:
    """What a build or add did. ``indexed + skipped + unchanged == input``."""

    root: str
    version: int
    operation: str
    input: int
    indexed: int
    skipped: int
    unchanged: int
    # Indexed but flagged in the errors report (e.g. truncated texts).
    flagged: int
    # Older rows tombstoned because their document changed.
    replaced: int
    shards_written: int
    shards_resumed: int
    errors_report: str | None
    seconds: float
    by_stage: dict[str, int] = field(default_factory=dict)

    @property
    def items_per_second(self) -> float:
        return self.input / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "version": self.version,
            "operation": self.operation,
            "input": self.input,
            "indexed": self.indexed,
            "skipped": self.skipped,
            "unchanged": self.unchanged,
            "flagged": self.flagged,
            "replaced": self.replaced,
            "shards_written": self.shards_written,
            "shards_resumed": self.shards_resumed,
            "errors_report": self.errors_report,
            "skipped_by_stage": self.by_stage,
            "seconds": round(self.seconds, 3),
            "items_per_second": round(self.items_per_second, 2),
        }


def build(
    sources: list[str | Path],
    out: str | Path,
    *,
    encoder: Encoder,
    options: BuildOptions | None = None,
    progress: ProgressCallback | None = None,
) -> IngestSummary:
    """Index ``sources`` into ``out`` as a new version holding only these sources.

    If ``out`` already holds an index, the new version replaces its rows (the old
    version stays readable until the commit; ``index compact`` removes its files).

    ``progress`` gets, in order: "scan" (items found), "embed" (items, ``skipped`` the
    failed and unchanged ones), per shard written "train index" / "fill index" /
    "tune index" (see :func:`clipsearch.indexer.ann.build_ann`) and "write shard" (files),
    interleaved with "embed", and last "commit" (versions).
    """
    return _run("build", Path(out), sources, encoder, options or BuildOptions(), progress)


def add(
    root: str | Path,
    sources: list[str | Path],
    *,
    encoder: Encoder | None = None,
    options: BuildOptions | None = None,
    progress: ProgressCallback | None = None,
) -> IngestSummary:
    """Append ``sources`` to the index at ``root`` as new shards.

    Items whose (doc_id, modality, content hash) is already indexed are skipped; an
    item whose document is indexed with different content replaces the old row (the
    old row is tombstoned). ``encoder`` defaults to the index's own. ``progress`` gets
    the stages of :func:`build`; "embed" also has ``detail["unchanged"]``.
    """
    from clipsearch.retrieval.encoders import encoder_from_fingerprint
    from clipsearch.retrieval.manifest import read_current

    root = Path(root)
    base = read_current(root)
    if encoder is None:
        encoder = encoder_from_fingerprint(base.encoder)
    diff = base.encoder.diff(encoder.fingerprint)
    if diff:
        fields = ", ".join(f"{k}: index has {a!r}, encoder has {b!r}" for k, (a, b) in diff.items())
        raise FingerprintMismatchError(
            f"{root}: the encoder differs from the one the index was built with ({fields}); "
            "use the same --model/--pretrained, or rebuild with `clipsearch index build`"
        )
    return _run("add", root, sources, encoder, options or BuildOptions(), progress)


def _run(
    operation: str,
    root: Path,
    sources: list[str | Path],
    encoder: Encoder,
    options: BuildOptions,
    progress: ProgressCallback | None,
) -> IngestSummary:
    t0 = time.perf_counter()
    if progress:
        progress(Progress("scan", 0, None, "items"))
    scan = scan_sources(list(sources), options.sources)
    if progress:
        n_dropped = scan.n_input - len(scan.items)
        progress(Progress("scan", scan.n_input, scan.n_input, "items", skipped=n_dropped))
    with IndexLock(root, operation):
        for sub in ("", SHARD_DIR, MANIFEST_DIR, TOMBSTONE_DIR, ERRORS_DIR):
            remove_temp_files(root / sub)
        base_version = current_version(root)
        base = read_manifest(root, base_version) if base_version is not None else None
        if operation == "add" and base is None:
            raise ConfigError(f"{root}: no index to add to; run `clipsearch index build` first")
        ingest = _Ingest(operation, root, scan, encoder, options, base, progress)
        summary = ingest.run()
    return replace(summary, seconds=time.perf_counter() - t0)


@dataclass
class _Chunk:
    """One journal entry: a shard (or none) plus what was skipped up to ``cursor``."""

    record: ShardRecord | None
    cursor: int
    problems: list[Problem]
    unchanged: list[tuple[str, str, str]]
    new_keys: list[tuple[str, str, str]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "record": None if self.record is None else self.record.to_dict(),
            "cursor": self.cursor,
            "problems": [p.to_dict() for p in self.problems],
            "unchanged": self.unchanged,
            "new_keys": self.new_keys,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _Chunk:
        return cls(
            record=None if d["record"] is None else ShardRecord.from_dict(d["record"]),
            cursor=int(d["cursor"]),
            problems=[Problem(**p) for p in d["problems"]],
            unchanged=[(a, b, c) for a, b, c in d["unchanged"]],
            new_keys=[(a, b, c) for a, b, c in d["new_keys"]],
        )


class _Ingest:
    """The state of one resumable ingest (see the module docstring)."""

    def __init__(
        self,
        operation: str,
        root: Path,
        scan: SourceScan,
        encoder: Encoder,
        options: BuildOptions,
        base: Manifest | None,
        progress: ProgressCallback | None,
    ) -> None:
        self.operation = operation
        self.root = root
        self.scan = scan
        self.encoder = encoder
        self.options = options
        self.base = base
        self.progress = progress
        self.existing = self._existing_rows() if operation == "add" else {}
        key = self._key()
        self.staging = root / STAGING_DIR / key[:20]
        self.journal_path = self.staging / "journal.json"
        self.key = key
        self.chunks: list[_Chunk] = self._load_journal()
        self.resumed = sum(c.record is not None for c in self.chunks)

    # -- journal -------------------------------------------------------------------

    def _key(self) -> str:
        payload = {
            "operation": self.operation,
            "inputs": self.scan.fingerprint,
            "shard_size": self.options.shard_size,
            "index": {
                k: getattr(self.options.index, k)
                for k in (
                    "index",
                    "target_recall",
                    "max_memory",
                    "flat_max_rows",
                    "tune_queries",
                    "seed",
                )
            },
            "encoder": self.encoder.fingerprint.to_dict(),
            "base_version": None if self.base is None else self.base.version,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _load_journal(self) -> list[_Chunk]:
        try:
            data = json.loads(self.journal_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable build journal %s (%s)", self.journal_path, e)
            return []
        if data.get("key") != self.key:
            return []
        chunks = []
        for d in data.get("chunks", []):
            chunk = _Chunk.from_dict(d)
            if chunk.record is not None and any(
                check_file(self.root, f, verify_hash=False) for f in chunk.record.files
            ):
                log.warning(
                    "shard %s of the interrupted build is damaged; redoing it", chunk.record.name
                )
                break
            chunks.append(chunk)
        if chunks:
            log.info("resuming %s: %d shards already written", self.operation, len(chunks))
        return chunks

    def _save_journal(self) -> None:
        data = {"key": self.key, "chunks": [c.to_dict() for c in self.chunks]}
        atomic_write_bytes(self.journal_path, json.dumps(data).encode("utf-8"))

    # -- existing rows (add) -------------------------------------------------------

    def _existing_rows(self) -> dict[str, list[tuple[str, str, int]]]:
        """doc_id -> [(modality, content_hash, row_id)] of the base version's live rows."""
        assert self.base is not None  # internal: only called for add
        dead = set(read_tombstones(self.root, self.base).tolist())
        out: dict[str, list[tuple[str, str, int]]] = {}
        for s in self.base.shards:
            t = read_metadata(self.root / s.metadata.path).select(
                ["row_id", "doc_id", "modality", "content_hash"]
            )
            for rid, doc, mod, h in zip(*(t.column(i).to_pylist() for i in range(4)), strict=True):
                if rid not in dead:
                    out.setdefault(doc, []).append((mod, h, rid))
        return out

    def _skip(self, item: Item, digest: str) -> bool:
        return any(
            m == item.modality and h == digest for m, h, _ in self.existing.get(item.doc_id, ())
        )

    # -- main loop -----------------------------------------------------------------

    def run(self) -> IngestSummary:
        items = self.scan.items
        start = self.chunks[-1].cursor if self.chunks else 0
        buf: list[Embedded] = []
        problems: list[Problem] = []
        unchanged: list[tuple[str, str, str]] = []
        done_skipped = sum(
            len([p for p in c.problems if p.action == "skipped"]) for c in self.chunks
        )
        done_unchanged = sum(len(c.unchanged) for c in self.chunks)
        n_total = len(items)

        def report(done: int) -> None:
            if self.progress:
                detail = {"unchanged": done_unchanged} if self.operation == "add" else {}
                skipped = done_skipped + done_unchanged
                self.progress(Progress("embed", done, n_total, "items", skipped, detail))

        report(start)
        batch: int = self.options.batch_size or int(getattr(self.encoder, "batch_size", 64) or 64)
        stream: Iterator[Embedded] = embed_items(
            items,
            self.encoder,
            start=start,
            batch_size=batch,
            workers=self.options.workers,
            skip=self._skip if self.existing else None,
        )
        for e in stream:
            if buf and e.item.modality != buf[0].item.modality:
                self._flush(buf, problems, unchanged, cursor=e.position)
                buf, problems, unchanged = [], [], []
            crash_point("embed:item")
            if e.problem is not None:
                problems.append(e.problem)
                done_skipped += e.problem.action == "skipped"
            if e.unchanged:
                unchanged.append((e.item.doc_id, e.item.modality, e.content_hash))
                done_unchanged += 1
            if e.vector is not None:
                buf.append(e)
            if len(buf) >= self.options.shard_size:
                self._flush(buf, problems, unchanged, cursor=e.position + 1)
                buf, problems, unchanged = [], [], []
            if e.position % 32 == 0 or e.position == n_total - 1:
                report(e.position + 1)
        if buf or problems or unchanged:
            self._flush(buf, problems, unchanged, cursor=n_total)
        return self._commit()

    def _flush(
        self,
        buf: list[Embedded],
        problems: list[Problem],
        unchanged: list[tuple[str, str, str]],
        *,
        cursor: int,
    ) -> None:
        record = None
        if buf:
            n_prev = sum(c.record is not None for c in self.chunks)
            rows_prev = sum(c.record.rows for c in self.chunks if c.record is not None)
            base_row = self.base.next_row_id if self.base else 0
            base_shard = self.base.next_shard if self.base else 0
            record = write_shard(
                self.root,
                name=shard_name(base_shard + n_prev),
                modality=buf[0].item.modality,
                row_id_start=base_row + rows_prev,
                vectors=np.stack([e.vector for e in buf if e.vector is not None]),
                metadata=self._metadata(buf),
                index_options=self.options.index,
                progress=self.progress,
            )
        new_keys = [(e.item.doc_id, e.item.modality, e.content_hash) for e in buf]
        self.chunks.append(_Chunk(record, cursor, list(problems), list(unchanged), new_keys))
        self._save_journal()
        crash_point("shard:written")

    def _metadata(self, buf: list[Embedded]) -> pa.Table:
        import pyarrow as pa

        schema = pa.schema(
            [
                pa.field("doc_id", pa.string()),
                pa.field("modality", pa.string()),
                pa.field("source", pa.string()),
                pa.field("content_hash", pa.string()),
                *self.scan.schema,
            ]
        )
        columns: dict[str, list[Any]] = {
            "doc_id": [e.item.doc_id for e in buf],
            "modality": [e.item.modality for e in buf],
            "source": [e.item.source for e in buf],
            "content_hash": [e.content_hash for e in buf],
        }
        for f in self.scan.schema:
            columns[f.name] = [e.item.metadata.get(f.name) for e in buf]
        return pa.table(columns, schema=schema)

    # -- commit --------------------------------------------------------------------

    def _commit(self) -> IngestSummary:
        version = next_version(self.root)
        problems = list(self.scan.problems) + [p for c in self.chunks for p in c.problems]
        errors: tuple[ErrorReport, ...] = ()
        report_path = None
        if problems:
            path = self.root / ERRORS_DIR / f"{version_name(version)}-{self.operation}.parquet"
            _write_errors(path, problems)
            report_path = path.relative_to(self.root).as_posix()
            errors = (
                ErrorReport(
                    file=file_record(self.root, path),
                    rows=len(problems),
                    version=version,
                    operation=self.operation,
                ),
            )
        new_shards = tuple(c.record for c in self.chunks if c.record is not None)
        replaced = self._replaced_rows()
        tombstones, n_tomb = None, 0
        base = self.base
        image_roots = self.scan.image_roots
        if self.operation == "add" and base is not None:
            old_ids = _tombstone_table(self.root, base)
            if replaced or old_ids:
                tombstones, n_tomb = _write_tombstones(self.root, version, old_ids, replaced)
            shards = base.shards + new_shards
            errors = base.errors + errors
            image_roots = covering_folders([*base_image_roots(self.root, base), *image_roots])
        else:
            shards = new_shards
        rows_new = sum(s.rows for s in new_shards)
        manifest = Manifest(
            version=version,
            parent_version=None if base is None else base.version,
            created_at="",
            operation=self.operation,
            encoder=self.encoder.fingerprint,
            shards=shards,
            tombstones=tombstones,
            n_tombstones=n_tomb,
            errors=errors,
            next_row_id=(base.next_row_id if base else 0) + rows_new,
            next_shard=(base.next_shard if base else 0) + len(new_shards),
            image_roots=image_roots,
        )
        if self.progress:
            self.progress(Progress("commit", 0, 1, "versions"))
        commit(self.root, manifest)
        if self.progress:
            self.progress(Progress("commit", 1, 1, "versions", detail={"version": version}))
        shutil.rmtree(self.staging, ignore_errors=True)
        skipped_problems = [p for p in problems if p.action == "skipped"]
        by_stage: dict[str, int] = {}
        for p in skipped_problems:
            by_stage[p.stage] = by_stage.get(p.stage, 0) + p.n_items
        unchanged = sum(len(c.unchanged) for c in self.chunks)
        return IngestSummary(
            root=str(self.root),
            version=version,
            operation=self.operation,
            input=self.scan.n_input,
            indexed=rows_new,
            skipped=sum(p.n_items for p in skipped_problems),
            unchanged=unchanged,
            flagged=sum(1 for p in problems if p.action == "kept"),
            replaced=len(replaced),
            shards_written=len(new_shards) - self.resumed,
            shards_resumed=self.resumed,
            errors_report=report_path,
            seconds=0.0,
            by_stage=by_stage,
        )

    def _replaced_rows(self) -> list[tuple[int, str]]:
        """Old live rows of documents this add re-indexed with different content."""
        if not self.existing:
            return []
        new = {k for c in self.chunks for k in c.new_keys}
        keep = new | {k for c in self.chunks for k in c.unchanged}
        touched = {(doc, mod) for doc, mod, _ in new}
        out = []
        for doc, mod in sorted(touched):
            for m, h, rid in self.existing.get(doc, ()):
                if m == mod and (doc, m, h) not in keep:
                    out.append((rid, doc))
        return out


def base_image_roots(root: Path, manifest: Manifest) -> tuple[str, ...]:
    """The image roots of ``manifest``; for a manifest written before roots were
    recorded, the folders of its image rows' sources (resolved), so an ``add`` to an
    older index keeps its existing images servable."""
    if manifest.image_roots is not None:
        return manifest.image_roots
    import pyarrow.compute as pc

    folders: set[str] = set()
    for s in manifest.shards:
        if s.modality != "image":
            continue
        sources = pc.unique(read_metadata(root / s.metadata.path).column("source"))
        for source in sources.to_pylist():
            if source and os.path.isabs(source):
                folders.add(os.path.dirname(os.path.realpath(source)))
    log.info(
        "%s: version %d records no image roots; derived %d", root, manifest.version, len(folders)
    )
    return covering_folders(sorted(folders))


def _write_errors(path: Path, problems: list[Problem]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({c: [p.to_dict()[c] for p in problems] for c in ERROR_COLUMNS})
    atomic_write(path, lambda f: pq.write_table(table, f))


def _tombstone_table(root: Path, manifest: Manifest) -> list[tuple[int, str]]:
    if manifest.tombstones is None:
        return []
    t = read_metadata(root / manifest.tombstones.path)
    return list(zip(t.column("row_id").to_pylist(), t.column("doc_id").to_pylist(), strict=True))


def _write_tombstones(
    root: Path, version: int, old: list[tuple[int, str]], new: list[tuple[int, str]]
) -> tuple[Any, int]:
    """Write the cumulative tombstones of ``version``; returns (FileRecord, rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(set(old) | set(new))
    table = pa.table(
        {
            "row_id": pa.array([r for r, _ in rows], pa.int64()),
            "doc_id": pa.array([d for _, d in rows], pa.string()),
        }
    )
    path = root / TOMBSTONE_DIR / f"{version_name(version)}.parquet"
    atomic_write(path, lambda f: pq.write_table(table, f))
    return file_record(root, path), len(rows)
