"""Writing one shard: fp16 vectors, aligned Parquet metadata, and its FAISS index.

Each file goes through the temp-name/fsync/rename protocol of :mod:`clipsearch.indexer.fsutil`, so a
shard file under its final name is always complete. A shard becomes part of the index
only when a manifest that lists it is committed (:mod:`clipsearch.indexer.commit`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from clipsearch.indexer.ann import IndexOptions, build_ann
from clipsearch.indexer.fsutil import atomic_write
from clipsearch.retrieval.errors import ConfigError
from clipsearch.retrieval.manifest import FIXED_COLUMNS, SHARD_DIR, FileRecord, ShardRecord
from clipsearch.retrieval.progress import Progress, ProgressCallback
from clipsearch.retrieval.store import file_digests

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)


def write_shard(
    root: Path,
    *,
    name: str,
    modality: str,
    row_id_start: int,
    vectors: np.ndarray,
    metadata: pa.Table,
    index_options: IndexOptions,
    progress: ProgressCallback | None = None,
    text_fields: Sequence[str] = (),
) -> ShardRecord:
    """Write the three files of shard ``name`` (and its lexical folder) and return its
    manifest record.

    Args:
        vectors: float32 or float16 ``[rows, dim]``, L2-normalised. Stored as float16
            (half the disk and page cache of float32; cosine scores move by < 1e-3).
        metadata: ``rows`` rows with the fixed columns except ``row_id`` (doc_id,
            modality, source, content_hash), then user columns; ``row_id`` is prepended.
        progress: gets the index stages of :func:`clipsearch.indexer.ann.build_ann`, then
            "write shard" (files written, of 3; 4 with a lexical part).
        text_fields: metadata columns indexed for lexical search in
            ``shards/<name>.lex/`` (:mod:`clipsearch.indexer.lexical`); () = none.
    """
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, dim = vectors.shape
    if metadata.num_rows != rows:
        raise ConfigError(f"shard {name}: {rows} vectors but {metadata.num_rows} metadata rows")
    half = np.ascontiguousarray(vectors, dtype=np.float16)
    row_ids = pa.array(np.arange(row_id_start, row_id_start + rows, dtype=np.int64))
    table = metadata.drop_columns([c for c in ("row_id",) if c in metadata.column_names])
    table = table.add_column(0, "row_id", row_ids)
    missing = [c for c in FIXED_COLUMNS if c not in table.column_names]
    if missing:
        raise ConfigError(f"shard {name}: metadata lacks fixed columns {missing}")

    index, spec = build_ann(half.astype(np.float32), index_options, progress)
    shard_dir = root / SHARD_DIR
    paths = {
        "vectors": shard_dir / f"{name}.f16.npy",
        "metadata": shard_dir / f"{name}.parquet",
        "faiss": shard_dir / f"{name}.faiss",
    }
    serialized = faiss.serialize_index(index)
    writers: dict[str, Callable[[BinaryIO], object]] = {
        "vectors": lambda f: np.save(f, half, allow_pickle=False),
        "metadata": lambda f: pq.write_table(table, f, compression="zstd"),
        "faiss": lambda f: f.write(serialized.tobytes()),
    }
    detail = {"shard": name, "rows": rows}
    n_files = len(writers) + bool(text_fields)
    for i, (kind, write) in enumerate(writers.items()):
        if progress:
            progress(Progress("write shard", i, n_files, "files", detail=detail))
        atomic_write(paths[kind], write)
    lexical = None
    if text_fields:
        from clipsearch.indexer.lexical import write_lexical

        if progress:
            progress(Progress("write shard", len(writers), n_files, "files", detail=detail))
        lexical = write_lexical(root, name, table, tuple(text_fields))
    if progress:
        progress(Progress("write shard", n_files, n_files, "files", detail=detail))
    log.info("wrote shard %s: %d %s rows, index %s", name, rows, modality, spec.factory)
    records = {k: file_record(root, p) for k, p in paths.items()}
    return ShardRecord(
        name=name,
        modality=modality,
        rows=rows,
        row_id_start=row_id_start,
        dim=dim,
        index=spec,
        faiss=records["faiss"],
        vectors=records["vectors"],
        metadata=records["metadata"],
        lexical=lexical,
    )


def file_record(root: Path, path: Path) -> FileRecord:
    """Size, sha256 and XXH3-128 (one read) of a written file, with its path relative
    to ``root``."""
    sha256, xxh3 = file_digests(path)
    return FileRecord(
        path=path.relative_to(root).as_posix(),
        bytes=path.stat().st_size,
        sha256=sha256,
        xxh3=xxh3,
    )
