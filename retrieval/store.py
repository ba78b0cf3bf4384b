"""Reading an index directory: pin a version, load its shards, verify its files.

``open_snapshot`` is what the query engine uses: it reads ``CURRENT`` once, so a
concurrent commit never changes what an open snapshot sees. Every file is opened once:
its size is checked, its content is hashed (XXH3-128, ~10 GB/s; sha256 for files of
manifests written before XXH3 was recorded) and it is parsed from the same mapping, so
no byte the engine serves was read from anything but the checked content, and nothing
is read twice. A damaged file raises :class:`IndexFormatError` naming the file, the
version, what to do, and whether the previous version is intact.

``index compact`` removes the files of versions it no longer keeps, possibly while a
reader is opening one of them: when a file of the version being opened is missing and
``CURRENT`` has meanwhile moved on, the open starts over on the newer version (an open
or memory-mapped file outlives its unlink on POSIX, so a finished open is never hurt).

``verify_index`` is what ``clipsearch index verify`` runs: it checks every file of the
live version against the manifest (sha256 and XXH3) plus the shards' metadata schemas,
and reports problems per shard instead of stopping at the first.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import mmap
import os
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from clipsearch.retrieval.arrow_convert import arrow_to_numpy
from clipsearch.retrieval.errors import IndexFormatError
from clipsearch.retrieval.manifest import (
    CURRENT_FILE,
    FIXED_COLUMNS,
    FileRecord,
    LexicalRecord,
    Manifest,
    ShardRecord,
    check_relative_path,
    current_version,
    manifest_path,
    read_current,
    read_manifest,
    version_name,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from clipsearch.retrieval.lexical import LexicalIndex

log = logging.getLogger(__name__)

# How much of each file an open checks: "size" (sizes only), "fast" (sizes and XXH3;
# sha256 where a file has no XXH3 recorded), "full" (sizes, sha256 and XXH3).
VerifyLevel = Literal["size", "fast", "full"]
# Opens restarted because compaction removed the files of the version being opened;
# each restart means a newer version was committed meanwhile.
MAX_OPEN_RETRIES = 64


@dataclass(frozen=True, eq=False)
class LoadedShard:
    """One shard of a pinned version, ready to search."""

    # The manifest entry (name, modality, rows, row_id_start, index spec, files).
    record: ShardRecord
    # faiss.Index in CPU form; FAISS ids are row offsets 0..rows-1.
    index: Any
    # float16 [rows, dim], memory-mapped read-only; exact vectors for rescoring.
    vectors: np.ndarray
    # Row i describes vector i, in the snapshot's unified schema (``Snapshot.schema``):
    # fixed columns (row_id, doc_id, modality, source, content_hash), then every user
    # column of any shard; columns this shard's file lacks are all-null.
    metadata: pa.Table
    # The shard's full-text index (clipsearch.retrieval.lexical), its files checked like
    # the others; None when the shard has none (or tantivy is not installed).
    lexical: LexicalIndex | None = None


@dataclass(frozen=True, eq=False)
class Snapshot:
    """A pinned, loaded version of an index."""

    root: Path
    manifest: Manifest
    shards: tuple[LoadedShard, ...]
    # int64, sorted: row ids deleted in this version (filtered out of every search).
    tombstones: np.ndarray
    # The metadata schema of every shard (the union of their columns; see
    # clipsearch.retrieval.schema). Filters, facets and results use this one.
    schema: pa.Schema

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def dim(self) -> int:
        return self.manifest.dim


class _FileProblem(Exception):
    """A file of a version does not match its record (internal; becomes IndexFormatError)."""

    def __init__(self, path: str, problem: str, *, missing: bool = False) -> None:
        super().__init__(f"{path} {problem}")
        self.path = path
        self.missing = missing


def sha256_file(path: str | Path, *, chunk: int = 1 << 20) -> str:
    """sha256 hex of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_digests(path: str | Path, *, chunk: int = 1 << 22) -> tuple[str, str]:
    """``(sha256 hex, XXH3-128 hex)`` of a file, read once."""
    import xxhash

    sha, fast = hashlib.sha256(), xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
            fast.update(block)
    return sha.hexdigest(), fast.hexdigest()


def resolve_in_root(root: Path, rel: str) -> Path:
    """The real path of manifest path ``rel`` under ``root``; refuses (IndexFormatError)
    a path that leaves the index folder, also through a symlink."""
    check_relative_path(rel)
    real_root = root.resolve()
    real = (real_root / rel).resolve()
    if not real.is_relative_to(real_root):
        raise IndexFormatError(
            f"{root}: manifest path {rel!r} resolves to {real}, outside the index folder "
            "(a symlink leads out); refusing to read it: replace the link with the file"
        )
    return real


def _map_checked(
    root: Path, f: FileRecord, level: VerifyLevel, *, mapped: bool = True
) -> mmap.mmap | bytes:
    """Open ``f`` once: check its size and (per ``level``) its content, and return what
    the caller parses, so what is parsed is what was checked: a read-only mapping, or
    with ``mapped=False`` the bytes (for files whose parsed form may keep pointing into
    the buffer, e.g. Parquet, so a later overwrite in place cannot reach them)."""
    path = resolve_in_root(root, f.path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size != f.bytes:
                raise _FileProblem(
                    f.path, f"has {size} bytes, the manifest says {f.bytes} (truncated or replaced)"
                )
            if not mapped or not size:
                buf: mmap.mmap | bytes = fh.read(size)
            else:
                buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError as e:
        raise _FileProblem(f.path, "is missing", missing=True) from e
    except (OSError, ValueError) as e:
        raise _FileProblem(f.path, f"cannot be read ({e})") from e
    _check_content(f, buf, level)
    return buf


def _check_content(f: FileRecord, buf: mmap.mmap | bytes, level: VerifyLevel) -> None:
    import xxhash

    if level == "size":
        return
    if f.xxh3 is not None:
        digest = xxhash.xxh3_128(buf).hexdigest()
        if digest != f.xxh3:
            raise _FileProblem(
                f.path,
                f"content differs from the manifest's (XXH3 {digest[:12]}... "
                f"!= {f.xxh3[:12]}...; corrupt)",
            )
    if level == "full" or f.xxh3 is None:
        digest = hashlib.sha256(buf).hexdigest()
        if digest != f.sha256:
            raise _FileProblem(
                f.path,
                f"content differs from the manifest's (sha256 {digest[:12]}... "
                f"!= {f.sha256[:12]}...; corrupt)",
            )


def open_snapshot(
    root: str | Path, *, verify_hashes: bool = False, verify: VerifyLevel = "fast"
) -> Snapshot:
    """Pin the live version of the index at ``root`` and load every shard (CPU).

    Args:
        verify: what is checked before anything is served: "fast" (default: sizes and
            XXH3-128 of every shard and tombstones file, ~10 GB/s; files of older
            manifests without XXH3 get sha256, ~1.5 GB/s), "full" (sha256 as well) or
            "size" (sizes only, for tools that check content themselves).
        verify_hashes: True is ``verify="full"`` (kept for older callers).
    Raises:
        IndexNotFoundError when ``root`` holds no index; IndexFormatError naming the file,
        the version, the fix and the state of the previous version when anything is
        damaged (nothing of a damaged version is ever served).
    """
    root = Path(root)
    level: VerifyLevel = "full" if verify_hashes else verify
    for attempt in itertools.count():
        manifest = _read_live_manifest(root)
        if manifest is None:
            continue  # CURRENT moved on while its old manifest was being removed
        try:
            return _open_version(root, manifest, level)
        except _FileProblem as p:
            if (
                p.missing
                and attempt < MAX_OPEN_RETRIES
                and current_version(root) != manifest.version
            ):
                log.info(
                    "%s: version %d was replaced during the open; retrying", root, manifest.version
                )
                continue
            raise IndexFormatError(damage_message(root, manifest, str(p))) from p
    raise AssertionError("unreachable")  # pragma: no cover


def _read_live_manifest(root: Path) -> Manifest | None:
    """``read_current``, or None when CURRENT moved on between reading it and reading
    the manifest it named (compaction removed that manifest)."""
    version = current_version(root)
    if version is None:
        return read_current(root)  # raises IndexNotFoundError with the usual message
    try:
        return read_manifest(root, version)
    except IndexFormatError:
        if not (root / manifest_path(version)).exists() and current_version(root) != version:
            return None
        raise


def _open_version(root: Path, manifest: Manifest, level: VerifyLevel) -> Snapshot:
    from clipsearch.retrieval.schema import conform, unify

    loaded = [_load_shard(root, s, level) for s in manifest.shards]
    lexical = [_load_lexical(root, s, level) for s in manifest.shards]
    tombstones = _read_tombstones(root, manifest, level)
    names = [f"shard {s.name}" for s in manifest.shards]
    schema, conflicts = unify([t.schema for _, _, t in loaded], names)
    for c in conflicts:
        log.warning(
            "%s: %s; the column reads as null where it clashes; run `clipsearch index verify`",
            root,
            c.message(),
        )
    shards = tuple(
        LoadedShard(
            record=s,
            index=index,
            vectors=vectors,
            metadata=conform(t, schema, lenient=True),
            lexical=lex,
        )
        for s, (index, vectors, t), lex in zip(manifest.shards, loaded, lexical, strict=True)
    )
    log.info(
        "opened %s version %d: %d shards, %d rows, %d tombstones (checked: %s)",
        root,
        manifest.version,
        len(shards),
        manifest.n_rows,
        len(tombstones),
        level,
    )
    return Snapshot(
        root=root, manifest=manifest, shards=shards, tombstones=tombstones, schema=schema
    )


def damage_message(root: Path, manifest: Manifest, problem: str) -> str:
    """What a user reads when a file of ``manifest``'s version is damaged: which file,
    which version, what to do, and whether the previous version is intact."""
    return (
        f"{root}: version {manifest.version} cannot be served: {problem}. Nothing is read "
        f"from a damaged index; restore the file from a backup or rebuild the index with "
        f"`clipsearch index build` (`clipsearch index verify {root}` lists every problem). "
        f"{_previous_version_state(root, manifest)}"
    )


def _previous_version_state(root: Path, manifest: Manifest) -> str:
    prev = manifest.parent_version
    if prev is None:
        return "There is no previous version."
    try:
        old = read_manifest(root, prev)
    except IndexFormatError:
        return f"The previous version {prev} is no longer kept (compacted away)."
    for f in [*(f for s in old.shards for f in s.files), *filter(None, [old.tombstones])]:
        try:
            _map_checked(root, f, "fast")
        except (_FileProblem, IndexFormatError) as e:
            return f"The previous version {prev} is damaged too ({e})."
    return (
        f"The previous version {prev} is intact: to serve it meanwhile, write "
        f"'{version_name(prev)}.json' into {root / CURRENT_FILE}."
    )


def check_file(root: Path, f: FileRecord, *, verify_hash: bool) -> str | None:
    """A one-line problem description, or None when the file matches its record
    (size; with ``verify_hash`` also sha256 and XXH3)."""
    try:
        _map_checked(root, f, "full" if verify_hash else "size")
    except _FileProblem as p:
        return str(p)
    except IndexFormatError as e:
        return str(e)
    return None


class _BufferReader:
    """Feeds a mapping to faiss in chunks (faiss.PyCallbackIOReader), so a FAISS file is
    parsed from the checked mapping without a second read or a whole-file copy."""

    def __init__(self, buf: mmap.mmap | bytes) -> None:
        self.view = memoryview(buf)
        self.pos = 0

    def __call__(self, n: int) -> bytes:
        out = self.view[self.pos : self.pos + n].tobytes()
        self.pos += len(out)
        return out


def _faiss_from_buffer(buf: mmap.mmap | bytes, where: str) -> Any:
    import faiss

    try:
        reader = faiss.PyCallbackIOReader(_BufferReader(buf), 1 << 22)  # type: ignore[attr-defined]
        return faiss.read_index(reader)
    except (RuntimeError, ValueError) as e:
        raise IndexFormatError(f"{where}: not a readable FAISS index ({e})") from e


def read_faiss(path: Path) -> Any:
    """Read a FAISS index file (no content check; see ``open_snapshot`` for that)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IndexFormatError(f"{path}: cannot be read ({e.strerror})") from e
    return _faiss_from_buffer(data, str(path))


def apply_search_params(index: Any, params: dict[str, int]) -> None:
    """Set a shard index's search knobs from its manifest ``search_params``.

    ``nprobe`` goes to the IVF layer (wherever it sits in the index), ``efSearch`` to the
    HNSW graph; ``k_factor`` is not a FAISS setting: the caller fetches ``k * k_factor``
    candidates and rescores them exactly with the fp16 vectors.
    """
    import faiss

    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    if "efSearch" in params:
        hnsw_index: Any = faiss.downcast_index(index)
        hnsw_index.hnsw.efSearch = int(params["efSearch"])


def _npy_from_buffer(buf: mmap.mmap | bytes, where: str) -> np.ndarray:
    """The array of a .npy file's bytes, as a read-only view of them (no pickle)."""
    import io

    from numpy.lib import format as npy

    fh: Any = buf if isinstance(buf, mmap.mmap) else io.BytesIO(buf)
    try:
        fh.seek(0)
        version = npy.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = npy.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        if dtype.hasobject:
            raise ValueError("object arrays are refused (they need pickle)")
        return np.ndarray(
            shape, dtype=dtype, buffer=buf, offset=fh.tell(), order="F" if fortran else "C"
        )
    except (ValueError, OSError, TypeError, SyntaxError, tokenize.TokenError) as e:
        raise IndexFormatError(
            f"{where}: not a readable .npy vector file ({type(e).__name__}: {e}); the file "
            "is corrupt: restore it from a backup or rebuild the index"
        ) from e


def read_vectors(path: Path) -> np.ndarray:
    """The fp16 vectors of a shard, memory-mapped read-only (no content check)."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except (OSError, ValueError) as e:
        raise IndexFormatError(f"{path}: not a readable .npy vector file ({e})") from e
    return _npy_from_buffer(buf, str(path))


def _parquet_from_buffer(buf: mmap.mmap | bytes, where: str) -> pa.Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # ParquetFile, not read_table: read_table goes through pyarrow.dataset, whose
        # import pulls in pandas when it is installed (~0.25 s of every CLI query).
        return pq.ParquetFile(pa.BufferReader(pa.py_buffer(buf))).read()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise IndexFormatError(f"{where}: not a readable Parquet file ({e})") from e


def read_metadata(path: Path) -> pa.Table:
    """A Parquet file of the index (shard metadata, tombstones), as stored (no content
    check, no padding to the snapshot schema)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).read()
    except (pa.ArrowException, OSError) as e:
        raise IndexFormatError(f"{path}: not a readable Parquet file ({e})") from e


def _shape_problems(
    s: ShardRecord, index: Any, vectors: np.ndarray, metadata: pa.Table
) -> list[str]:
    """What disagrees between a shard's loaded files and its record."""
    import pyarrow.compute as pc

    problems = []
    if index.ntotal != s.rows:
        problems.append(f"FAISS index holds {index.ntotal} vectors, the manifest says {s.rows}")
    if index.d != s.dim:
        problems.append(f"FAISS index has dim {index.d}, the manifest says {s.dim}")
    if vectors.dtype != np.float16 or vectors.shape != (s.rows, s.dim):
        problems.append(
            f"vectors are {vectors.dtype} {tuple(vectors.shape)}, expected float16 {(s.rows, s.dim)}"
        )
    if metadata.num_rows != s.rows:
        problems.append(f"metadata has {metadata.num_rows} rows, the manifest says {s.rows}")
    missing = [c for c in FIXED_COLUMNS if c not in metadata.column_names]
    if missing:
        problems.append(f"metadata lacks the fixed columns {missing}")
    elif metadata.num_rows == s.rows:
        # Through DLPack and compute, not to_numpy / Python lists: those wake pyarrow's
        # pandas integration (see arrow_convert), ~0.25 s of every cold open.
        row_ids = arrow_to_numpy(metadata.column("row_id"))
        expected = np.arange(s.row_id_start, s.row_id_end, dtype=np.int64)
        if not np.array_equal(row_ids, expected):
            problems.append(f"row_id column is not {s.row_id_start}..{s.row_id_end - 1}")
        modalities = set(pc.unique(metadata.column("modality")).to_pylist())
        if modalities - {s.modality}:
            problems.append(f"metadata has modalities {sorted(modalities)}, shard is {s.modality}")
    return problems


def _load_shard(root: Path, s: ShardRecord, level: VerifyLevel) -> tuple[Any, np.ndarray, pa.Table]:
    """A shard's (FAISS index with its search params, fp16 vectors, metadata as stored),
    each file read once and checked per ``level``; raises _FileProblem."""
    index = _faiss_from_buffer(_map_checked(root, s.faiss, level), s.faiss.path)
    vectors = _npy_from_buffer(_map_checked(root, s.vectors, level), s.vectors.path)
    metadata = _parquet_from_buffer(
        _map_checked(root, s.metadata, level, mapped=False), s.metadata.path
    )
    problems = _shape_problems(s, index, vectors, metadata)
    if problems:
        raise _FileProblem(f"shard {s.name}:", "; ".join(problems))
    apply_search_params(index, s.index.search_params)
    return index, vectors, metadata


_warned_no_tantivy = False


def _load_lexical(root: Path, s: ShardRecord, level: VerifyLevel) -> LexicalIndex | None:
    """A shard's lexical index, every file checked per ``level`` first; None when the
    shard has none, or (with a warning) when tantivy is not installed: vector search
    still works. Raises _FileProblem for a damaged file."""
    global _warned_no_tantivy
    if s.lexical is None:
        return None
    from clipsearch.retrieval.lexical import ANALYZER, have_tantivy, open_lexical

    record: LexicalRecord = s.lexical
    for f in record.files:
        buf = _map_checked(root, f, level)
        if isinstance(buf, mmap.mmap):
            buf.close()
    if record.analyzer != ANALYZER:
        log.warning(
            "%s: shard %s has a lexical index written with analyzer %r; this clipsearch "
            "reads %r: searching it by vectors only (`clipsearch index add INDEX SOURCES "
            "--text-fields ...` writes a new one)",
            root,
            s.name,
            record.analyzer,
            ANALYZER,
        )
        return None
    if not have_tantivy():
        if not _warned_no_tantivy:
            log.warning(
                "%s: shards have lexical indexes but tantivy is not installed; searching "
                "by vectors only (pip install 'clipsearch[hybrid]' for hybrid search)",
                root,
            )
            _warned_no_tantivy = True
        return None
    try:
        return open_lexical(root, record)
    except IndexFormatError as e:
        # tantivy opens the folder after the check above: a compaction that removed this
        # version's files in between is a replaced version (the open retries on the new
        # one), not damage.
        gone = any(not (root / f.path).exists() for f in record.files)
        raise _FileProblem(f"shard {s.name}:", str(e), missing=gone) from e


def load_shard(
    root: Path, manifest: Manifest, s: ShardRecord, *, verify: VerifyLevel = "fast"
) -> tuple[Any, np.ndarray, pa.Table]:
    """One shard of ``manifest`` as :func:`open_snapshot` loads it (FAISS index with its
    search params, fp16 vectors, metadata as stored), for hosts that serve only some
    shards. Raises IndexFormatError (as an open does) when a file is damaged."""
    try:
        return _load_shard(root, s, verify)
    except _FileProblem as p:
        raise IndexFormatError(damage_message(root, manifest, str(p))) from p


def shard_problems(root: Path, s: ShardRecord, *, verify_hashes: bool) -> list[str]:
    """Everything wrong with one shard: files, FAISS ntotal/dim, vector and metadata shapes."""
    problems = [p for f in s.files if (p := check_file(root, f, verify_hash=False))]
    if problems:
        return problems
    try:
        _load_shard(root, s, "full" if verify_hashes else "fast")
        _load_lexical(root, s, "full" if verify_hashes else "fast")
    except _FileProblem as p:
        return [str(p)]
    except IndexFormatError as e:
        return [str(e)]
    return []


def _read_tombstones(root: Path, manifest: Manifest, level: VerifyLevel) -> np.ndarray:
    if manifest.tombstones is None:
        return np.zeros(0, dtype=np.int64)
    f = manifest.tombstones
    table = _parquet_from_buffer(_map_checked(root, f, level, mapped=False), f.path)
    if "row_id" not in table.column_names:
        raise _FileProblem(f.path, "lacks the row_id column")
    return np.sort(table.column("row_id").to_numpy().astype(np.int64))


def read_tombstones(root: Path, manifest: Manifest) -> np.ndarray:
    """Sorted int64 row ids deleted in ``manifest``'s version (checked like an open)."""
    try:
        return _read_tombstones(root, manifest, "fast")
    except _FileProblem as p:
        raise IndexFormatError(damage_message(root, manifest, str(p))) from p


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify_index`` found. ``ok`` is False when anything is wrong."""

    root: str
    version: int | None
    # Shard name (or "manifest", "tombstones", "errors") -> problems found there.
    problems: dict[str, list[str]] = field(default_factory=dict)
    shards_checked: int = 0
    files_checked: int = 0
    rows: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "version": self.version,
            "ok": self.ok,
            "shards_checked": self.shards_checked,
            "files_checked": self.files_checked,
            "rows": self.rows,
            "problems": self.problems,
        }


def verify_index(root: str | Path, *, verify_hashes: bool = True) -> VerifyReport:
    """Check every file of the live version: sizes, hashes, row counts, FAISS ntotal/dim,
    and that the shards' metadata columns unify into one schema.

    ``verify_hashes``: sha256 and XXH3 of every file (False: XXH3 only, still catching
    any changed byte at ~10 GB/s; sha256 for files recorded without XXH3). Never raises
    for a damaged shard; problems are collected per shard. Raises only when there is no
    index at all or the manifest itself is unreadable.
    """
    from clipsearch.retrieval.schema import unify

    root = Path(root)
    manifest = read_current(root)
    level: VerifyLevel = "full" if verify_hashes else "fast"
    problems: dict[str, list[str]] = {}
    schemas, names = [], []
    for s in manifest.shards:
        found: list[str] = []
        try:
            _, _, metadata = _load_shard(root, s, level)
        except (_FileProblem, IndexFormatError) as e:
            found.append(str(e))
        else:
            schemas.append(metadata.schema)
            names.append(f"shard {s.name}")
        try:
            _load_lexical(root, s, level)
        except (_FileProblem, IndexFormatError) as e:
            found.append(f"lexical index: {e}")
        if s.dim != manifest.dim:
            found.append(f"shard dim {s.dim} differs from the encoder's {manifest.dim}")
        if found:
            problems[s.name] = found
    _, conflicts = unify(schemas, names)
    if conflicts:
        problems["schema"] = [c.message() for c in conflicts]
    if manifest.tombstones is not None:
        p = None
        try:
            n = len(_read_tombstones(root, manifest, level))
        except (_FileProblem, IndexFormatError) as e:
            p = str(e)
        else:
            if n != manifest.n_tombstones:
                p = f"tombstones hold {n} rows, the manifest says {manifest.n_tombstones}"
        if p:
            problems["tombstones"] = [p]
    for report in manifest.errors:
        try:
            _map_checked(root, report.file, level)
        except (_FileProblem, IndexFormatError) as e:
            problems.setdefault("errors", []).append(str(e))
    starts = [(s.row_id_start, s.row_id_end, s.name) for s in manifest.shards]
    starts.sort()
    for (_, end_a, a), (start_b, _, b) in itertools.pairwise(starts):
        if start_b < end_a:
            problems.setdefault("manifest", []).append(f"row ids of {a} and {b} overlap")
    return VerifyReport(
        root=str(root),
        version=manifest.version,
        problems=problems,
        shards_checked=len(manifest.shards),
        files_checked=len(manifest.files()),
        rows=manifest.n_rows,
    )
