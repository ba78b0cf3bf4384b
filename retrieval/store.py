"""Reading an index directory: pin a version, load its shards, verify its files.

``open_snapshot`` is what the query engine uses: it reads ``CURRENT`` once, so a
concurrent commit never changes what an open snapshot sees (old files are only removed
by ``index compact``, and on POSIX an opened or memory-mapped file outlives its unlink).
``verify_index`` is what ``clipsearch index verify`` runs: it checks every file of the
live version against the manifest and reports problems per shard instead of stopping
at the first.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsearch.retrieval.errors import IndexFormatError
from clipsearch.retrieval.manifest import (
    FIXED_COLUMNS,
    FileRecord,
    Manifest,
    ShardRecord,
    read_current,
)

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LoadedShard:
    """One shard of a pinned version, ready to search."""

    # The manifest entry (name, modality, rows, row_id_start, index spec, files).
    record: ShardRecord
    # faiss.Index in CPU form; FAISS ids are row offsets 0..rows-1.
    index: Any
    # float16 [rows, dim], memory-mapped read-only; exact vectors for rescoring.
    vectors: np.ndarray
    # Row i describes vector i; fixed columns first (row_id, doc_id, modality, source,
    # content_hash), then user metadata.
    metadata: pa.Table


@dataclass(frozen=True, eq=False)
class Snapshot:
    """A pinned, loaded version of an index."""

    root: Path
    manifest: Manifest
    shards: tuple[LoadedShard, ...]
    # int64, sorted: row ids deleted in this version (filtered out of every search).
    tombstones: np.ndarray

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def dim(self) -> int:
        return self.manifest.dim


def sha256_file(path: str | Path, *, chunk: int = 1 << 20) -> str:
    """sha256 hex of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def open_snapshot(root: str | Path, *, verify_hashes: bool = False) -> Snapshot:
    """Pin the live version of the index at ``root`` and load every shard (CPU).

    Checks every file's size against the manifest (and its sha256 when
    ``verify_hashes``), each shard's row counts and dims. Raises
    :class:`IndexNotFoundError` when ``root`` holds no index and
    :class:`IndexFormatError` naming the file and the fix when anything disagrees.
    """
    root = Path(root)
    manifest = read_current(root)
    for f in manifest.files():
        problem = check_file(root, f, verify_hash=verify_hashes)
        if problem:
            raise IndexFormatError(
                f"{root}: version {manifest.version}: {problem}; run `clipsearch index verify "
                f"{root}` for a full report, then restore the file or rebuild the index"
            )
    shards = tuple(_load_shard(root, s) for s in manifest.shards)
    tombstones = read_tombstones(root, manifest)
    log.info(
        "opened %s version %d: %d shards, %d rows, %d tombstones",
        root,
        manifest.version,
        len(shards),
        manifest.n_rows,
        len(tombstones),
    )
    return Snapshot(root=root, manifest=manifest, shards=shards, tombstones=tombstones)


def check_file(root: Path, f: FileRecord, *, verify_hash: bool) -> str | None:
    """A one-line problem description, or None when the file matches its record."""
    path = root / f.path
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{f.path} is missing"
    except OSError as e:
        return f"{f.path} cannot be read ({e.strerror})"
    if size != f.bytes:
        return f"{f.path} has {size} bytes, the manifest says {f.bytes} (truncated or replaced)"
    if verify_hash:
        try:
            digest = sha256_file(path)
        except OSError as e:
            return f"{f.path} cannot be read ({e.strerror})"
        if digest != f.sha256:
            return f"{f.path} sha256 {digest[:12]}... differs from the manifest's {f.sha256[:12]}... (corrupt)"
    return None


def read_faiss(path: Path) -> Any:
    """Read a FAISS index, memory-mapped where the index type allows it."""
    import faiss

    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        try:
            return faiss.read_index(str(path))
        except RuntimeError as e:
            raise IndexFormatError(f"{path}: not a readable FAISS index ({e})") from e


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


def read_vectors(path: Path) -> np.ndarray:
    """The fp16 vectors of a shard, memory-mapped read-only (no pickle)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise IndexFormatError(f"{path}: not a readable .npy vector file ({e})") from e


def read_metadata(path: Path) -> pa.Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise IndexFormatError(f"{path}: not a readable Parquet file ({e})") from e


def shard_problems(root: Path, s: ShardRecord, *, verify_hashes: bool) -> list[str]:
    """Everything wrong with one shard: files, FAISS ntotal/dim, vector and metadata shapes."""
    problems = [p for f in s.files if (p := check_file(root, f, verify_hash=verify_hashes))]
    if problems:
        return problems
    try:
        index = read_faiss(root / s.faiss.path)
        vectors = read_vectors(root / s.vectors.path)
        metadata = read_metadata(root / s.metadata.path)
    except IndexFormatError as e:
        return [str(e)]
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
        row_ids = metadata.column("row_id").to_numpy()
        expected = np.arange(s.row_id_start, s.row_id_end, dtype=np.int64)
        if not np.array_equal(row_ids, expected):
            problems.append(f"row_id column is not {s.row_id_start}..{s.row_id_end - 1}")
        modalities = set(metadata.column("modality").to_pylist())
        if modalities - {s.modality}:
            problems.append(f"metadata has modalities {sorted(modalities)}, shard is {s.modality}")
    return problems


def _load_shard(root: Path, s: ShardRecord) -> LoadedShard:
    problems = shard_problems(root, s, verify_hashes=False)
    if problems:
        raise IndexFormatError(
            f"{root}: shard {s.name}: {'; '.join(problems)}; run `clipsearch index verify "
            f"{root}` and restore the files or rebuild the index"
        )
    index = read_faiss(root / s.faiss.path)
    apply_search_params(index, s.index.search_params)
    return LoadedShard(
        record=s,
        index=index,
        vectors=read_vectors(root / s.vectors.path),
        metadata=read_metadata(root / s.metadata.path),
    )


def read_tombstones(root: Path, manifest: Manifest) -> np.ndarray:
    """Sorted int64 row ids deleted in ``manifest``'s version."""
    if manifest.tombstones is None:
        return np.zeros(0, dtype=np.int64)
    table = read_metadata(root / manifest.tombstones.path)
    if "row_id" not in table.column_names:
        raise IndexFormatError(f"{root / manifest.tombstones.path}: lacks the row_id column")
    return np.sort(table.column("row_id").to_numpy().astype(np.int64))


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
    """Check every file of the live version: sizes, sha256s, row counts, FAISS ntotal/dim.

    Never raises for a damaged shard; problems are collected per shard. Raises only when
    there is no index at all or the manifest itself is unreadable.
    """
    root = Path(root)
    manifest = read_current(root)
    problems: dict[str, list[str]] = {}
    for s in manifest.shards:
        found = shard_problems(root, s, verify_hashes=verify_hashes)
        if s.dim != manifest.dim:
            found.append(f"shard dim {s.dim} differs from the encoder's {manifest.dim}")
        if found:
            problems[s.name] = found
    if manifest.tombstones is not None:
        p = check_file(root, manifest.tombstones, verify_hash=verify_hashes)
        if p is None:
            try:
                n = len(read_tombstones(root, manifest))
            except IndexFormatError as e:
                p = str(e)
            else:
                if n != manifest.n_tombstones:
                    p = f"tombstones hold {n} rows, the manifest says {manifest.n_tombstones}"
        if p:
            problems["tombstones"] = [p]
    for report in manifest.errors:
        p = check_file(root, report.file, verify_hash=verify_hashes)
        if p:
            problems.setdefault("errors", []).append(p)
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
