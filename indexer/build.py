"""``build`` and ``add``: sources -> embed pipeline -> shards -> committed version.

Both run the same resumable ingest under the index lock:

1. scan the sources (deterministic item order, a fingerprint of the inputs);
2. embed the items in order; rows fill a shard buffer per modality; a full buffer (or
   the end of a modality) is written as a shard (:func:`clipsearch.indexer.writer.write_shard`) and
   recorded in a journal under ``.staging/<key>/``, where the key hashes the inputs,
   every option that can change the result (:func:`resume_key`), the encoder and the
   base version;
3. write the errors report and tombstones, then commit a manifest and swap ``CURRENT``.

Durable progress does not wait for a full shard: at least every
``checkpoint_seconds`` (and every ``checkpoint_items``) the rows embedded since the last
checkpoint are spilled to the staging folder (float32 vectors ``.npy`` + metadata
``.parquet``, temp/fsync/rename) and journaled with the items skipped meanwhile. Ctrl-C
spills what is pending and raises :class:`IngestInterrupted` saying what was kept.

Killed at any point, the previous version stays live. Rerunning the same command finds
the journal, keeps the shards and spills it lists (after checking their files) and
continues after the last one, so it ends with the same rows as an uninterrupted run and
loses at most one checkpoint interval of embedding work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsearch.indexer.build_options import (
    BuildOptions,
    IngestInterrupted,
    IngestSummary,
    TooManyErrorsError,
    resume_key,
)
from clipsearch.indexer.commit import commit, next_version
from clipsearch.indexer.crash import crash_point
from clipsearch.indexer.fetch import UrlFetcher
from clipsearch.indexer.fsutil import atomic_write, atomic_write_bytes, remove_temp_files
from clipsearch.indexer.lock import IndexLock
from clipsearch.indexer.pipeline import Embedded, ReadLimits, embed_items
from clipsearch.indexer.sources import (
    Item,
    Problem,
    SourceScan,
    covering_folders,
    outside_folders,
    scan_sources,
)
from clipsearch.indexer.writer import file_record, write_shard
from clipsearch.retrieval.encoders.base import Encoder, EncoderFingerprint
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
from clipsearch.retrieval.schema import check_add_schema
from clipsearch.retrieval.store import check_file, read_metadata, read_tombstones

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

STAGING_DIR = ".staging"
ERROR_COLUMNS = ("source", "doc_id", "stage", "reason", "action")
# Skip reasons shown in summaries and errors (the report holds them all).
TOP_REASONS = 5


# Replaces :func:`clipsearch.indexer.pipeline.embed_items` (same arguments, same ordered
# outcomes), e.g. to embed on a cluster (:mod:`clipsearch.indexer.distributed`).
EmbedFn = Callable[..., Generator[Embedded, None, None]]
# Replaces :func:`clipsearch.indexer.writer.write_shard` (same arguments and record).
ShardWriteFn = Callable[..., ShardRecord]


def build(
    sources: list[str | Path],
    out: str | Path,
    *,
    encoder: Encoder,
    options: BuildOptions | None = None,
    progress: ProgressCallback | None = None,
    embedder: EmbedFn | None = None,
    shard_writer: ShardWriteFn | None = None,
) -> IngestSummary:
    """Index ``sources`` into ``out`` as a new version holding only these sources.

    If ``out`` already holds an index, the new version replaces its rows (the old
    version stays readable until the commit; ``index compact`` removes its files).

    ``progress`` gets, in order: "scan" (items found), "embed" (items, ``skipped`` the
    failed and unchanged ones), per shard written "train index" / "fill index" /
    "tune index" (see :func:`clipsearch.indexer.ann.build_ann`) and "write shard" (files),
    interleaved with "embed", and last "commit" (versions).

    ``embedder`` and ``shard_writer`` replace the local embed pipeline and shard writer
    (the distributed build runs them on a Ray cluster); the journal, resume and commit
    stay here.
    """
    return _run(
        "build",
        Path(out),
        sources,
        encoder,
        options or BuildOptions(),
        progress,
        hooks=(embedder, shard_writer),
    )


def add(
    root: str | Path,
    sources: list[str | Path],
    *,
    encoder: Encoder | None = None,
    options: BuildOptions | None = None,
    progress: ProgressCallback | None = None,
    embedder: EmbedFn | None = None,
    shard_writer: ShardWriteFn | None = None,
) -> IngestSummary:
    """Append ``sources`` to the index at ``root`` as new shards.

    Items whose (doc_id, modality, content hash) is already indexed are skipped; an
    item whose document is indexed with different content replaces the old row (the
    old row is tombstoned). ``encoder`` defaults to the index's own. ``progress`` gets
    the stages of :func:`build`; "embed" also has ``detail["unchanged"]``.
    ``embedder`` and ``shard_writer``: as in :func:`build`.
    """
    from clipsearch.retrieval.encoders import encoder_from_fingerprint
    from clipsearch.retrieval.manifest import read_current

    root = Path(root)
    base = read_current(root)
    if encoder is None:
        encoder = encoder_from_fingerprint(base.encoder, purpose="build")
    diff = base.encoder.diff(encoder.fingerprint)
    if diff:
        fields = ", ".join(f"{k}: index has {a!r}, encoder has {b!r}" for k, (a, b) in diff.items())
        raise FingerprintMismatchError(
            f"{root}: the encoder differs from the one the index was built with ({fields}); "
            "use the same --model/--pretrained, or rebuild with `clipsearch index build`"
        )
    return _run(
        "add",
        root,
        sources,
        encoder,
        options or BuildOptions(),
        progress,
        hooks=(embedder, shard_writer),
    )


def _run(
    operation: str,
    root: Path,
    sources: list[str | Path],
    encoder: Encoder,
    options: BuildOptions,
    progress: ProgressCallback | None,
    *,
    hooks: tuple[EmbedFn | None, ShardWriteFn | None] = (None, None),
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
        if operation == "add" and base is not None:
            # A column whose type clashes with the index's is refused before any embedding.
            check_add_schema(root, base, scan.schema, where=", ".join(map(str, sources)))
        if options.text_fields:
            from clipsearch.indexer.lexical import check_text_fields, id_fields

            schema = _item_schema(scan)
            fields = id_fields(options.text_fields, options.sources.id_col, schema)
            check_text_fields(fields, schema, ", ".join(map(str, sources)))
        ingest = _Ingest(operation, root, scan, encoder, options, base, progress)
        ingest.embedder, ingest.shard_writer = hooks
        summary = ingest.run()
    return replace(summary, seconds=time.perf_counter() - t0)


@dataclass
class _Chunk:
    """One journal entry: a shard or a spill (or neither) plus what was skipped up to
    ``cursor`` since the previous entry.

    A spill holds embedded rows not yet in a shard (``<spill>.npy`` float32 vectors and
    ``<spill>.parquet`` metadata in the staging folder); when the shard holding them is
    written, the spill entries are kept (for their problems) with ``spill=None``.
    """

    record: ShardRecord | None
    cursor: int
    problems: list[Problem]
    unchanged: list[tuple[str, str, str]]
    new_keys: list[tuple[str, str, str]]
    spill: str | None = None
    # Rows in the spill.
    rows: int = 0
    # Resolved folders of indexed local images outside the scan's roots.
    image_dirs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "record": None if self.record is None else self.record.to_dict(),
            "cursor": self.cursor,
            "problems": [p.to_dict() | {"n_items": p.n_items} for p in self.problems],
            "unchanged": self.unchanged,
            "new_keys": self.new_keys,
            "spill": self.spill,
            "rows": self.rows,
            "image_dirs": self.image_dirs,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _Chunk:
        return cls(
            record=None if d["record"] is None else ShardRecord.from_dict(d["record"]),
            cursor=int(d["cursor"]),
            problems=[Problem(**p) for p in d["problems"]],
            unchanged=[(a, b, c) for a, b, c in d["unchanged"]],
            new_keys=[(a, b, c) for a, b, c in d["new_keys"]],
            spill=d.get("spill"),
            rows=int(d.get("rows", 0)),
            image_dirs=list(d.get("image_dirs", [])),
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
        # Rows spilled and not yet in a shard: (float32 vectors, metadata), in order.
        self.spilled: list[tuple[np.ndarray, pa.Table]] = []
        self.chunks: list[_Chunk] = self._load_journal()
        self.resumed = sum(c.record is not None for c in self.chunks)
        # Outcomes since the last journal entry, and the position after the last one.
        self.pending: list[Embedded] = []
        self.cursor = self.chunks[-1].cursor if self.chunks else 0
        self.items_resumed = self.cursor
        self.fetcher = UrlFetcher(options.fetch, max_bytes=options.max_image_bytes)

    # -- journal -------------------------------------------------------------------

    def _key(self) -> str:
        payload = {
            "operation": self.operation,
            "inputs": self.scan.fingerprint,
            "options": resume_key(self.options),
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
        chunks: list[_Chunk] = []
        # Chunks up to the last intact shard: the state to fall back to when a shard is
        # damaged (the spills it consumed are gone, so everything after is redone).
        after_shard = 0
        for d in data.get("chunks", []):
            chunk = _Chunk.from_dict(d)
            if chunk.record is not None:
                if any(check_file(self.root, f, verify_hash=False) for f in chunk.record.files):
                    log.warning(
                        "shard %s of the interrupted %s is damaged; redoing it",
                        chunk.record.name,
                        self.operation,
                    )
                    chunks, self.spilled = chunks[:after_shard], []
                    break
                self.spilled = []
                after_shard = len(chunks) + 1
            elif chunk.spill is not None:
                loaded = self._read_spill(chunk)
                if loaded is None:
                    break
                self.spilled.append(loaded)
            chunks.append(chunk)
        if chunks:
            log.info(
                "resuming %s: %d items done (%d shards, %d rows spilled)",
                self.operation,
                chunks[-1].cursor,
                sum(c.record is not None for c in chunks),
                sum(len(v) for v, _ in self.spilled),
            )
        return chunks

    def _read_spill(self, chunk: _Chunk) -> tuple[np.ndarray, pa.Table] | None:
        import pyarrow.parquet as pq

        stem = self.staging / str(chunk.spill)
        try:
            vectors = np.load(stem.with_suffix(".npy"), allow_pickle=False)
            table = pq.read_table(stem.with_suffix(".parquet")).cast(self._schema())
        except Exception as e:  # damaged spill: redo from the entry before it
            log.warning(
                "spill %s of the interrupted %s is unreadable (%s); redoing it",
                stem,
                self.operation,
                e,
            )
            return None
        if len(vectors) != chunk.rows or table.num_rows != chunk.rows:
            log.warning("spill %s has the wrong row count; redoing it", stem)
            return None
        return vectors, table

    def _journal(self, chunks: list[_Chunk], *, drop_on_failure: str | None = None) -> None:
        """Make ``chunks`` the journal. If writing it fails (disk full), the journal on
        disk stays as it was, and so does the in-memory one, so the files the new entry
        refers to count as orphans (removed); an interrupt keeps the new list, which
        the interrupt handler saves again."""
        previous, self.chunks = self.chunks, chunks
        try:
            self._save_journal()
        except Exception:
            self.chunks = previous
            if drop_on_failure is not None:
                for suffix in (".npy", ".parquet"):
                    with contextlib.suppress(OSError):
                        (self.staging / drop_on_failure).with_suffix(suffix).unlink()
            raise

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

    embedder: EmbedFn | None = None
    shard_writer: ShardWriteFn | None = None

    # -- main loop -----------------------------------------------------------------

    def run(self) -> IngestSummary:
        try:
            self._embed_all()
        except KeyboardInterrupt as e:
            raise self._interrupted() from e
        except BaseException:
            self._discard_orphans()
            raise
        try:
            return self._commit()
        except KeyboardInterrupt as e:
            raise IngestInterrupted(
                f"interrupted while committing; every item is embedded and kept in "
                f"{self.staging}; re-run the same command to finish (the index shows the "
                "previous version until a commit completes)",
                items_kept=len(self.scan.items),
                total=len(self.scan.items),
                staging=str(self.staging),
            ) from e

    def _embed_all(self) -> None:
        items = self.scan.items
        n_total = len(items)
        done_skipped = sum(
            sum(p.n_items for p in c.problems if p.action == "skipped") for c in self.chunks
        )
        done_unchanged = sum(len(c.unchanged) for c in self.chunks)

        def report(done: int) -> None:
            if self.progress:
                detail: dict[str, int] = {}
                if self.operation == "add":
                    detail["unchanged"] = done_unchanged
                if self.fetcher.stats.fetched or self.fetcher.stats.cached:
                    detail["fetched"] = self.fetcher.stats.fetched
                    detail["cached"] = self.fetcher.stats.cached
                skipped = done_skipped + done_unchanged
                self.progress(Progress("embed", done, n_total, "items", skipped, detail))

        report(self.cursor)
        batch: int = self.options.batch_size or int(getattr(self.encoder, "batch_size", 64) or 64)
        limits = ReadLimits(
            max_bytes=self.options.max_image_bytes,
            max_pixels=self.options.max_image_pixels,
            fetcher=self.fetcher,
        )
        stream: Generator[Embedded, None, None] = (self.embedder or embed_items)(
            items,
            self.encoder,
            start=self.cursor,
            batch_size=batch,
            workers=self.options.workers,
            skip=UnchangedRows(self.existing) if self.existing else None,
            limits=limits,
        )
        last_checkpoint = time.monotonic()
        modality = self._buffered_modality()
        try:
            for e in stream:
                if modality is not None and e.vector is not None and e.item.modality != modality:
                    self._flush_shard()
                    modality = None
                crash_point("embed:item")
                self.pending.append(e)
                self.cursor = e.position + 1
                if e.problem is not None and e.problem.action == "skipped":
                    done_skipped += 1
                done_unchanged += e.unchanged
                if e.vector is not None:
                    modality = e.item.modality
                if self._buffered_rows() >= self.options.shard_size:
                    self._flush_shard()
                    modality = None
                    last_checkpoint = time.monotonic()
                elif (
                    len(self.pending) >= self.options.checkpoint_items
                    or time.monotonic() - last_checkpoint >= self.options.checkpoint_seconds
                ):
                    self._checkpoint()
                    last_checkpoint = time.monotonic()
                if e.position % 32 == 0 or e.position == n_total - 1:
                    report(e.position + 1)
        finally:
            stream.close()  # stops the decode workers now, also on Ctrl-C
        if self.pending or self.spilled:
            self._flush_shard()

    def _buffered_rows(self) -> int:
        return sum(len(v) for v, _ in self.spilled) + sum(
            e.vector is not None for e in self.pending
        )

    def _buffered_modality(self) -> str | None:
        if self.spilled:
            return str(self.spilled[-1][1].column("modality")[0].as_py())
        return None

    def _new_outcomes(self) -> list[Embedded]:
        """Pending outcomes not yet journaled, up to the cursor (an interrupt may land
        between appending an outcome and moving the cursor: that item is redone)."""
        last = self.chunks[-1].cursor if self.chunks else 0
        return [e for e in self.pending if last <= e.position < self.cursor]

    def _entry(self, outcomes: list[Embedded], embedded: list[Embedded], **kw: Any) -> _Chunk:
        image_sources = [e.item.source for e in embedded if e.item.modality == "image"]
        return _Chunk(
            cursor=self.cursor,
            problems=[e.problem for e in outcomes if e.problem is not None],
            unchanged=[
                (e.item.doc_id, e.item.modality, e.content_hash) for e in outcomes if e.unchanged
            ],
            new_keys=[(e.item.doc_id, e.item.modality, e.content_hash) for e in embedded],
            image_dirs=sorted(outside_folders(image_sources, self.scan.image_roots)),
            **kw,
        )

    def _checkpoint(self) -> None:
        """Spill the rows embedded since the last entry and journal them (with the items
        skipped meanwhile), so a kill from here on loses none of it."""
        outcomes = self._new_outcomes()
        if not outcomes:
            return
        rows = [e for e in outcomes if e.vector is not None]
        name = None
        spilled = None
        if rows:
            import pyarrow.parquet as pq

            name = f"spill-{self.cursor:010d}"
            vectors = np.stack([e.vector for e in rows if e.vector is not None]).astype(
                np.float32, copy=False
            )
            table = self._metadata(rows)
            stem = self.staging / name
            try:
                atomic_write(
                    stem.with_suffix(".npy"), lambda f: np.save(f, vectors, allow_pickle=False)
                )
                atomic_write(stem.with_suffix(".parquet"), lambda f: pq.write_table(table, f))
            except Exception:
                for suffix in (".npy", ".parquet"):
                    with contextlib.suppress(OSError):
                        stem.with_suffix(suffix).unlink()
                raise
            spilled = (vectors, table)
        chunk = self._entry(outcomes, rows, record=None, spill=name, rows=len(rows))
        self._journal([*self.chunks, chunk], drop_on_failure=name)
        crash_point("spill:written")
        if spilled is not None:
            self.spilled.append(spilled)
        self.pending = [e for e in self.pending if e.position >= chunk.cursor]

    def _flush_shard(self) -> None:
        """Write the spilled and pending rows (up to the cursor) as one shard."""
        import pyarrow as pa

        outcomes = self._new_outcomes()
        rows = [e for e in outcomes if e.vector is not None]
        parts_v = [v for v, _ in self.spilled]
        parts_t = [t for _, t in self.spilled]
        if rows:
            parts_v.append(np.stack([e.vector for e in rows if e.vector is not None]))
            parts_t.append(self._metadata(rows))
        record = None
        if parts_v:
            n_prev = sum(c.record is not None for c in self.chunks)
            rows_prev = sum(c.record.rows for c in self.chunks if c.record is not None)
            base_row = self.base.next_row_id if self.base else 0
            base_shard = self.base.next_shard if self.base else 0
            name = shard_name(base_shard + n_prev)
            self._writing = name
            modality = str(parts_t[0].column("modality")[0].as_py())
            record = (self.shard_writer or write_shard)(
                self.root,
                name=name,
                modality=modality,
                row_id_start=base_row + rows_prev,
                vectors=np.concatenate(parts_v).astype(np.float32, copy=False),
                metadata=pa.concat_tables(parts_t),
                index_options=self.options.index,
                progress=self.progress,
                text_fields=self._text_fields(modality),
            )
        elif not outcomes:
            return
        consumed = [c.spill for c in self.chunks if c.spill is not None]
        chunk = self._entry(outcomes, rows, record=record)
        self._journal([replace(c, spill=None) for c in self.chunks] + [chunk])
        self._writing = None
        self.spilled = []
        self.pending = [e for e in self.pending if e.position >= chunk.cursor]
        for stem in consumed:
            for suffix in (".npy", ".parquet"):
                (self.staging / stem).with_suffix(suffix).unlink(missing_ok=True)
        crash_point("shard:written")

    _writing: str | None = None

    def _discard_orphans(self) -> None:
        """After a failure: remove the files of a shard being written that no journal
        lists (a disk-full error halfway through its three files)."""
        name = self._writing
        if name is None or any(c.record and c.record.name == name for c in self.chunks):
            return
        for path in (self.root / SHARD_DIR).glob(f"{name}.*"):
            with contextlib.suppress(OSError):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self._writing = None

    def _interrupted(self) -> IngestInterrupted:
        """Ctrl-C: save the pending outcomes, then say what is kept."""
        self._discard_orphans()
        try:
            self._checkpoint()
            # The interrupt may have landed while the journal was being replaced, after
            # the in-memory journal gained its entry: write it again.
            if self.chunks:
                self._save_journal()
        except BaseException as e:  # a second Ctrl-C, or the disk: keep what is journaled
            log.warning("could not save the last items before stopping: %s", e)
        kept = self.chunks[-1].cursor if self.chunks else 0
        total = len(self.scan.items)
        rows = sum(c.rows for c in self.chunks if c.spill is not None) + sum(
            c.record.rows for c in self.chunks if c.record is not None
        )
        if kept:
            message = (
                f"interrupted: kept {kept:,} of {total:,} items ({rows:,} embedded rows) in "
                f"{self.staging}; re-run the same command to resume"
            )
        else:
            message = "interrupted before any item was embedded; nothing to keep"
        return IngestInterrupted(message, items_kept=kept, total=total, staging=str(self.staging))

    def _schema(self) -> pa.Schema:
        return _item_schema(self.scan)

    def _text_fields(self, modality: str) -> tuple[str, ...]:
        """The columns a new shard of ``modality`` indexes for lexical search."""
        from clipsearch.indexer.lexical import resolve_text_fields
        from clipsearch.retrieval.lexical import have_tantivy

        if self.options.text_fields is None and not have_tantivy():
            return ()
        return resolve_text_fields(
            self.options.text_fields, self._schema(), modality, self.options.sources.id_col
        )

    def _backfill_lexical(
        self, shards: tuple[ShardRecord, ...], version: int, written: list[Path]
    ) -> tuple[ShardRecord, ...]:
        """``add`` with text fields: base shards without a lexical part over these fields
        get one, in a folder named for this version (the base keeps its own)."""
        from clipsearch.indexer.lexical import resolve_text_fields, write_lexical
        from clipsearch.retrieval.schema import conform, unified_schema

        if not self.options.text_fields:
            return shards
        out = []
        for s in shards:
            table = read_metadata(self.root / s.metadata.path)
            schema = unified_schema([table.schema, self._schema()], [s.name, "new items"])
            fields = resolve_text_fields(
                self.options.text_fields, schema, s.modality, self.options.sources.id_col
            )
            if s.lexical is not None and s.lexical.fields == fields:
                out.append(s)
                continue
            stem = f"{s.name}.{version_name(version)}"
            written.append(self.root / SHARD_DIR / f"{stem}.lex")
            lexical = write_lexical(self.root, stem, conform(table, schema), fields)
            out.append(replace(s, lexical=lexical))
            log.info("%s: shard %s now has a lexical part over %s", self.root, s.name, fields)
        return tuple(out)

    def _metadata(self, buf: list[Embedded]) -> pa.Table:
        import pyarrow as pa

        columns: dict[str, list[Any]] = {
            "doc_id": [e.item.doc_id for e in buf],
            "modality": [e.item.modality for e in buf],
            "source": [e.item.source for e in buf],
            "content_hash": [e.content_hash for e in buf],
        }
        for f in self.scan.schema:
            columns[f.name] = [e.item.metadata.get(f.name) for e in buf]
        return pa.table(columns, schema=self._schema())

    # -- commit --------------------------------------------------------------------

    def _skipped(self, problems: list[Problem]) -> list[Problem]:
        return [p for p in problems if p.action == "skipped"]

    def _check_error_limit(self, problems: list[Problem]) -> None:
        limit = self.options.error_limit(self.scan.n_input)
        n_skipped = sum(p.n_items for p in self._skipped(problems))
        if limit is None or n_skipped <= limit:
            return
        path = self.staging / "errors.parquet"
        _write_errors(path, problems)
        share = n_skipped / max(1, self.scan.n_input)
        reasons = "; ".join(f"{n} x {st}: {r}" for st, r, n in top_reasons(problems))
        allowed = (
            f"{self.options.max_errors:.0%}"
            if isinstance(self.options.max_errors, float)
            else f"{limit}"
        )
        kept = "the previous version stays live" if self.base else "no index was created"
        raise TooManyErrorsError(
            f"{self.operation} of {self.root}: {n_skipped:,} of {self.scan.n_input:,} items "
            f"({share:.1%}) were skipped, more than --max-errors allows ({allowed}); nothing "
            f"was committed and {kept}. Top reasons: {reasons}. Full report: {path}. Fix "
            "the inputs or raise --max-errors; re-running resumes without embedding again"
        )

    def _commit(self) -> IngestSummary:
        problems = list(self.scan.problems) + [p for c in self.chunks for p in c.problems]
        self._check_error_limit(problems)
        version = next_version(self.root)
        written: list[Path] = []
        try:
            manifest, report_path, replaced = self._manifest(version, problems, written)
            if self.progress:
                self.progress(Progress("commit", 0, 1, "versions"))
            commit(self.root, manifest)
        except BaseException:
            for path in written:  # files of a version that never became live
                with contextlib.suppress(OSError):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            raise
        if self.progress:
            self.progress(Progress("commit", 1, 1, "versions", detail={"version": version}))
        shutil.rmtree(self.staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.root / STAGING_DIR).rmdir()  # only when no other staging is left
        skipped_problems = self._skipped(problems)
        by_stage: dict[str, int] = {}
        for p in skipped_problems:
            by_stage[p.stage] = by_stage.get(p.stage, 0) + p.n_items
        unchanged = sum(len(c.unchanged) for c in self.chunks)
        new_shards = [c.record for c in self.chunks if c.record is not None]
        stats = self.fetcher.stats
        return IngestSummary(
            root=str(self.root),
            version=version,
            operation=self.operation,
            input=self.scan.n_input,
            indexed=sum(s.rows for s in new_shards),
            skipped=sum(p.n_items for p in skipped_problems),
            unchanged=unchanged,
            flagged=sum(1 for p in problems if p.action == "kept"),
            replaced=len(replaced),
            shards_written=len(new_shards) - self.resumed,
            shards_resumed=self.resumed,
            errors_report=report_path,
            seconds=0.0,
            by_stage=by_stage,
            top_reasons=top_reasons(problems),
            not_considered=dict(self.scan.not_considered),
            items_resumed=self.items_resumed,
            fetch=stats.to_dict() if stats.fetched or stats.cached or stats.failed else {},
        )

    def _manifest(
        self, version: int, problems: list[Problem], written: list[Path]
    ) -> tuple[Manifest, str | None, list[tuple[int, str]]]:
        errors: tuple[ErrorReport, ...] = ()
        report_path = None
        if problems:
            path = self.root / ERRORS_DIR / f"{version_name(version)}-{self.operation}.parquet"
            written.append(path)
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
        outside = [d for c in self.chunks for d in c.image_dirs]
        image_roots = covering_folders([*self.scan.image_roots, *outside])
        if self.operation == "add" and base is not None:
            old_ids = _tombstone_table(self.root, base)
            if replaced or old_ids:
                written.append(self.root / TOMBSTONE_DIR / f"{version_name(version)}.parquet")
                tombstones, n_tomb = _write_tombstones(self.root, version, old_ids, replaced)
            shards = self._backfill_lexical(base.shards, version, written) + new_shards
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
            relevance_thresholds=recorded_thresholds(self.encoder.fingerprint, base),
        )
        return manifest, report_path, replaced

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


@dataclass(frozen=True)
class UnchangedRows:
    """The skip test of ``add``: True for an item whose (doc_id, modality, content hash)
    is already live. A plain object (not a bound method), so a distributed embedder can
    ship it to its workers."""

    # doc_id -> [(modality, content_hash, row_id)] of the base version's live rows.
    existing: dict[str, list[tuple[str, str, int]]]

    def __call__(self, item: Item, digest: str) -> bool:
        return any(
            m == item.modality and h == digest for m, h, _ in self.existing.get(item.doc_id, ())
        )


_NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(\.\d+)?(?![\w.])")
_ORIGIN = re.compile(r"(first seen at|superseded by) [^;()]*")


def top_reasons(problems: list[Problem], n: int = TOP_REASONS) -> list[tuple[str, str, int]]:
    """The ``n`` most common skip reasons as (stage, reason, items); reasons that differ
    only in numbers or in the row they point at count as one (numbers become "N")."""
    counts: Counter[tuple[str, str]] = Counter()
    for p in problems:
        if p.action == "skipped":
            reason = _NUMBER.sub("N", _ORIGIN.sub(r"\1 another row", p.reason))
            counts[(p.stage, reason)] += p.n_items
    return [(stage, reason, k) for (stage, reason), k in counts.most_common(n)]


def recorded_thresholds(
    fingerprint: EncoderFingerprint, base: Manifest | None
) -> tuple[tuple[str, float], ...] | None:
    """The relevance thresholds a new version records: the model card's calibration
    for these weights, else what the base version recorded (same encoder), else None."""
    from clipsearch.retrieval.models import DIRECTIONS, calibrated_threshold

    found = [(d, calibrated_threshold(fingerprint, d)) for d in DIRECTIONS]
    card = tuple((d, float(v)) for d, v in found if v is not None)
    if card:
        return card
    return None if base is None else base.relevance_thresholds


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


def _item_schema(scan: SourceScan) -> pa.Schema:
    """The metadata schema of the scan's rows (fixed columns but row_id, then the user's)."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("doc_id", pa.string()),
            pa.field("modality", pa.string()),
            pa.field("source", pa.string()),
            pa.field("content_hash", pa.string()),
            *scan.schema,
        ]
    )


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
