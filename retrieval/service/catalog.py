"""Read-only views of a pinned snapshot's metadata for the service: items, facets, images.

These answer ``GET /items/{doc_id}``, ``GET /facets`` and ``GET /items/{doc_id}/image``
straight from the snapshot's Parquet tables (no vector search involved). Tombstoned rows
are invisible here exactly as in search.
"""

from __future__ import annotations

import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsearch.retrieval.manifest import FIXED_COLUMNS

if TYPE_CHECKING:
    from clipsearch.retrieval.store import Snapshot

# String columns with more distinct values than this are not offered as facets (a
# free-text title is not a filter menu).
MAX_FACET_VALUES = 60
# Image types served by /items/{doc_id}/image; anything else is refused.
IMAGE_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}


@dataclass(frozen=True)
class ItemRow:
    """One live row of a doc."""

    row_id: int
    modality: str
    source: str
    metadata: dict[str, Any]
    # float16 [dim] stored vector of the row.
    vector: np.ndarray


def item_rows(snapshot: Snapshot, doc_id: str) -> list[ItemRow]:
    """Every live row whose doc_id is ``doc_id``, in row_id order (empty when none)."""
    import pyarrow.compute as pc

    out: list[ItemRow] = []
    for shard in snapshot.shards:
        table = shard.metadata
        mask = pc.equal(table.column("doc_id"), doc_id)
        offsets = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
        if not len(offsets):
            continue
        rows = table.take(offsets).to_pylist()
        for offset, row in zip(offsets, rows, strict=True):
            row_id = int(row["row_id"])
            if len(snapshot.tombstones) and _contains(snapshot.tombstones, row_id):
                continue
            metadata = {k: v for k, v in row.items() if k not in FIXED_COLUMNS}
            out.append(
                ItemRow(
                    row_id=row_id,
                    modality=str(row["modality"]),
                    source=str(row["source"]),
                    metadata=metadata,
                    vector=np.asarray(shard.vectors[int(offset)]),
                )
            )
    return sorted(out, key=lambda r: r.row_id)


def _contains(sorted_ids: np.ndarray, row_id: int) -> bool:
    i = int(np.searchsorted(sorted_ids, row_id))
    return i < len(sorted_ids) and int(sorted_ids[i]) == row_id


def facets(snapshot: Snapshot) -> dict[str, dict[str, Any]]:
    """Filterable metadata columns: distinct values of small string columns, numeric
    ranges, boolean columns, and date columns (type only: what a page can sort by). Keys are column names; see ``schemas.Facet``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    tables = [s.metadata for s in snapshot.shards if s.metadata.num_rows]
    if not tables:
        return {}
    table = pa.concat_tables(tables, promote_options="default")
    n_docs = pc.count_distinct(table.column("doc_id")).as_py()
    out: dict[str, dict[str, Any]] = {}
    for name in table.column_names:
        if name in FIXED_COLUMNS:
            continue
        col = table.column(name)
        t = col.type
        if pa.types.is_boolean(t):
            out[name] = {"type": "bool"}
        elif pa.types.is_timestamp(t) or pa.types.is_date(t):
            out[name] = {"type": "date"}  # sortable ("newest"), not counted
        elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
            mm = pc.min_max(col)
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
            if lo is not None and hi is not None:
                out[name] = {"type": "number", "min": float(lo), "max": float(hi)}
        elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
            n_values = pc.count_distinct(col).as_py()
            if n_values > MAX_FACET_VALUES or n_values > max(10, n_docs // 2):
                continue  # a free-text column (titles), not a menu
            # Count documents, not rows: a product with two photos and a title is one.
            grouped = (
                pa.table({"v": col, "d": table.column("doc_id")})
                .group_by("v")
                .aggregate([("d", "count_distinct")])
                .to_pylist()
            )
            counts = [
                (str(g["v"]), int(g["d_count_distinct"])) for g in grouped if g["v"] is not None
            ]
            if counts:
                counts.sort(key=lambda c: (-c[1], c[0]))
                out[name] = {
                    "type": "string",
                    "values": [v for v, _ in counts],
                    "counts": [n for _, n in counts],
                }
    return out


def common_image_root(snapshot: Snapshot, *, min_depth: int = 2) -> Path | None:
    """Deepest folder holding every absolute image source of the snapshot, or None.

    Only the fallback for manifests that do not record their image roots (written by an
    older clipsearch): one stray path widens this root, so it is a weak guard.
    ``min_depth`` refuses roots too close to ``/`` (``/`` itself, ``/home``) to guard
    anything; relative sources cannot be placed without a configured root.
    """
    import os

    import pyarrow.compute as pc

    folders: set[str] = set()
    for shard in snapshot.shards:
        if shard.record.modality != "image" or not shard.metadata.num_rows:
            continue
        sources = pc.unique(shard.metadata.column("source")).to_pylist()
        for source in sources:
            if not source or not os.path.isabs(source):
                return None
            folders.add(os.path.dirname(os.path.normpath(source)))
    if not folders:
        return None
    root = Path(os.path.commonpath(sorted(folders)))
    return root if len(root.parts) > min_depth else None


def resolve_image(source: str, roots: tuple[Path, ...]) -> tuple[Path, str] | None:
    """The file an image row's ``source`` names, if it lies inside one of ``roots``.

    A relative source is tried under each root; an absolute one must already lie inside
    a root. Symlinks are resolved before the containment check, so a link pointing out
    of the root is refused. Returns (path, content type) or None.
    """
    content_type = IMAGE_TYPES.get(Path(source).suffix.lower())
    if content_type is None:
        content_type = mimetypes.guess_type(source)[0]
        if content_type is None or not content_type.startswith("image/"):
            return None
    candidate = Path(source)
    absolute: Path | None = None
    if candidate.is_absolute():
        try:
            absolute = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
    for root in roots:
        try:
            real_root = root.resolve(strict=True)
            path = absolute or (real_root / candidate).resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if path.is_relative_to(real_root) and path.is_file():
            return path, content_type
    return None
