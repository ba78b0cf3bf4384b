"""One metadata schema across the shards of an index.

Shards committed by different builds and adds may carry different user columns: a
catalog gains a ``season`` column, loses ``rating``. Readers see one schema, the union
of every shard's columns (fixed columns first, then user columns in the order they
first appear), and every shard's table is padded to it: a column a shard lacks reads as
null there, so a filter on it is simply false (SQL null semantics) for that shard's rows.

Types may widen across shards the way Arrow promotes them (int32 + int64 -> int64,
int64 + double -> double, string + large_string -> large_string, null + anything); a
genuine conflict (a number in one shard, text in another) is refused: by ``add`` before
anything is embedded (:func:`check_add_schema`), and reported by ``index verify``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clipsearch.retrieval.errors import IndexFormatError, SourceError
from clipsearch.retrieval.manifest import FIXED_COLUMNS, Manifest

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class SchemaConflict:
    """A column whose types cannot be unified."""

    column: str
    # The type seen first and where ("shard s000001"), then the clashing one and where.
    first_type: str
    first_where: str
    second_type: str
    second_where: str

    def message(self) -> str:
        return (
            f"column {self.column!r} is {describe_type(self.first_type)} in "
            f"{self.first_where} but {describe_type(self.second_type)} in {self.second_where}"
        )


def describe_type(type_name: str) -> str:
    """``"int64" -> "a number (int64)"``: what a catalog author calls the type."""
    t = type_name
    if t.startswith(("int", "uint", "float", "double", "halffloat", "decimal")):
        kind = "a number"
    elif t in ("string", "large_string", "utf8", "large_utf8", "string_view"):
        kind = "text"
    elif t == "bool":
        kind = "a boolean"
    elif t.startswith(("timestamp", "date", "time")):
        kind = "a date/time"
    else:
        kind = "a value"
    return f"{kind} ({t})"


def _merge(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The type both ``a`` and ``b`` widen to, or None when they conflict."""
    import pyarrow as pa

    if a == b:
        return a
    try:
        unified = pa.unify_schemas(
            [pa.schema([("x", a)]), pa.schema([("x", b)])], promote_options="permissive"
        )
    except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    return unified.field("x").type


def unify(
    schemas: Sequence[pa.Schema], names: Sequence[str]
) -> tuple[pa.Schema, list[SchemaConflict]]:
    """The union schema of ``schemas`` (``names[i]`` says where schema i comes from, for
    messages) and every conflict found; a conflicting column keeps its first type."""
    import pyarrow as pa

    types: dict[str, pa.DataType] = {}
    seen_in: dict[str, str] = {}
    conflicts: list[SchemaConflict] = []
    for schema, where in zip(schemas, names, strict=True):
        for f in schema:
            if f.name not in types:
                types[f.name], seen_in[f.name] = f.type, where
                continue
            merged = _merge(types[f.name], f.type)
            if merged is None:
                conflicts.append(
                    SchemaConflict(f.name, str(types[f.name]), seen_in[f.name], str(f.type), where)
                )
            else:
                types[f.name] = merged
    fixed = [c for c in FIXED_COLUMNS if c in types]
    order = fixed + [c for c in types if c not in FIXED_COLUMNS]
    return pa.schema([pa.field(c, types[c]) for c in order]), conflicts


def unified_schema(schemas: Sequence[pa.Schema], names: Sequence[str] | None = None) -> pa.Schema:
    """The union schema of shard schemas; raises IndexFormatError on a type conflict."""
    import pyarrow as pa

    if not schemas:
        return pa.schema([(c, pa.int64() if c == "row_id" else pa.string()) for c in FIXED_COLUMNS])
    names = names or [f"shard {i}" for i in range(len(schemas))]
    schema, conflicts = unify(schemas, names)
    if conflicts:
        raise IndexFormatError(
            "the shards' metadata columns disagree: "
            + "; ".join(c.message() for c in conflicts)
            + "; rebuild the index with one type per column"
        )
    return schema


def conform(table: pa.Table, schema: pa.Schema, *, lenient: bool = False) -> pa.Table:
    """``table`` with exactly ``schema``'s columns, in its order: columns it lacks are
    all-null, narrower types are widened (int32 -> int64, int64 -> double, ...).

    Columns of ``table`` that ``schema`` lacks are dropped. A column that cannot be cast
    (a type conflict :func:`unify` reported) raises IndexFormatError, or with
    ``lenient`` reads as null (readers of an index written before conflicts were refused).
    """
    import pyarrow as pa

    if table.schema.equals(schema):
        return table
    columns = []
    for f in schema:
        if f.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, f.type))
            continue
        col = table.column(f.name)
        if col.type != f.type:
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
                if lenient:
                    columns.append(pa.nulls(table.num_rows, f.type))
                    continue
                raise IndexFormatError(
                    f"metadata column {f.name!r} of type {col.type} cannot be read as {f.type} ({e})"
                ) from e
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=schema)


def shard_schemas(root: str | Path, manifest: Manifest) -> list[pa.Schema]:
    """The metadata schema of every shard of ``manifest``, read from the Parquet footers
    (cheap: no rows are read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipsearch.retrieval.store import resolve_in_root

    out = []
    for s in manifest.shards:
        path = resolve_in_root(Path(root), s.metadata.path)
        try:
            out.append(pq.read_schema(path))
        except (pa.ArrowInvalid, OSError) as e:
            raise IndexFormatError(f"{path}: not a readable Parquet file ({e})") from e
    return out


def check_add_schema(
    root: str | Path, base: Manifest, incoming: pa.Schema, *, where: str = "the new sources"
) -> pa.Schema:
    """Refuse an ``add`` whose metadata columns clash with the index's, before any embedding.

    ``incoming`` is the schema of the rows to add (user columns are enough). New columns
    and missing columns are fine (they read as null where absent); a column that is,
    say, a number in the index and text in ``incoming`` raises :class:`SourceError`
    naming the column, both types and the shard. Returns the unified schema after the add.
    """
    schemas = shard_schemas(root, base)
    names = [f"shard {s.name} of {Path(root)}" for s in base.shards]
    schema, conflicts = unify([*schemas, incoming], [*names, where])
    if conflicts:
        c = conflicts[0]
        raise SourceError(
            f"cannot add to {root}: {c.message()}"
            + (f" (and {len(conflicts) - 1} more conflicts)" if len(conflicts) > 1 else "")
            + f"; convert {c.column!r} in the new rows to the index's type, rename the "
            "column, or rebuild the index with `clipsearch index build`"
        )
    return schema
