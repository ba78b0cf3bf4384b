"""Writing a shard's lexical part: a tantivy index of its text fields, beside its files.

The folder ``shards/<name>.lex/`` is written under a temp name, every file fsynced, then
renamed into place and the shard folder fsynced, like the shard's other files; its files
are listed in the manifest (:class:`~clipsearch.retrieval.manifest.LexicalRecord`) with
sizes and hashes. Format and analysis: :mod:`clipsearch.retrieval.lexical`.

Why a folder and not one file: tantivy opens an index only from a directory (its
Python bindings offer no read-from-bytes directory), and an index of a 100k-row shard is
a handful of files (one segment: terms, postings, field norms, fast fields, meta.json),
each recorded and checked like any other shard file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipsearch.indexer.fsutil import TMP_MARKER, fsync_dir, fsync_file, make_dirs, write_error
from clipsearch.retrieval.errors import ConfigError
from clipsearch.retrieval.lexical import (
    ANALYZER,
    FIELD_CJK,
    FIELD_ROW,
    FIELD_WORDS,
    FILTERS_FILE,
    LEXICAL_SUFFIX,
    FilterField,
    filter_fields,
    register_analyzers,
    require_tantivy,
    schema,
    split_cjk,
)
from clipsearch.retrieval.manifest import FIXED_COLUMNS, SHARD_DIR, LexicalRecord

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

# tantivy's writer memory: a shard's documents up to this size make one segment.
WRITER_HEAP_BYTES = 256 * 1024 * 1024
# tantivy's writer lock, removed once the index is written. Its reader lock
# (".tantivy-meta.lock", empty, locked with flock by every reader) is kept and recorded,
# so opening an index creates no file in it.
_WRITER_LOCK = ".tantivy-writer.lock"
_READER_LOCK = ".tantivy-meta.lock"


def default_text_fields(
    table_schema: pa.Schema, modality: str, id_col: str | None = None
) -> tuple[str, ...]:
    """The text a shard's lexical part indexes when none are chosen: the row's text
    (``source``) for text rows, the document id when it comes from a column of the
    user's (``id_col``: a SKU), plus every string metadata column of the user's; none for
    image rows without string columns."""
    import pyarrow as pa

    user = [
        f.name
        for f in table_schema
        if f.name not in FIXED_COLUMNS
        and (pa.types.is_string(f.type) or pa.types.is_large_string(f.type))
    ]
    if modality != "text" and not user:
        return ()  # images without any text: no lexical part (ids alone are no text)
    own = (("source",) if modality == "text" else ()) + (("doc_id",) if id_col else ())
    return own + tuple(user)


def id_fields(
    fields: Sequence[str], id_col: str | None, table_schema: pa.Schema
) -> tuple[str, ...]:
    """``fields`` with the manifest's id column (which becomes ``doc_id`` and is not kept
    as a column of its own) named ``doc_id``: ``--text-fields title,sku --id-col sku``."""
    return tuple(
        "doc_id" if f == id_col and table_schema.get_field_index(f) < 0 else f for f in fields
    )


def check_text_fields(fields: Sequence[str], table_schema: pa.Schema, where: str) -> None:
    """ConfigError naming a chosen text field the metadata lacks or that is not text."""
    import pyarrow as pa

    for name in fields:
        idx = table_schema.get_field_index(name)
        if idx < 0:
            columns = ", ".join(n for n in table_schema.names if n not in ("row_id",))
            raise ConfigError(
                f"{where}: text field {name!r} is not a column of the indexed items; "
                f"columns are: {columns} (--text-fields takes a comma-separated list of them)"
            )
        t = table_schema.field(idx).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise ConfigError(
                f"{where}: text field {name!r} is a {t} column, not text; choose string "
                "columns for --text-fields"
            )


def resolve_text_fields(
    option: tuple[str, ...] | None,
    table_schema: pa.Schema,
    modality: str,
    id_col: str | None = None,
) -> tuple[str, ...]:
    """The fields a shard indexes: ``option`` (checked; the id column read as doc_id)
    or the default; () = none."""
    if option is None:
        return default_text_fields(table_schema, modality, id_col)
    fields = id_fields(option, id_col, table_schema)
    check_text_fields(fields, table_schema, "lexical index")
    return fields


def document_texts(metadata: pa.Table, fields: Sequence[str]) -> list[str]:
    """Per row, the chosen fields' text joined by newlines (nulls skipped)."""
    columns = [metadata.column(f).to_pylist() for f in fields]
    return ["\n".join(v for v in values if v) for values in zip(*columns, strict=True)]


def write_lexical(
    root: Path, name: str, metadata: pa.Table, fields: Sequence[str]
) -> LexicalRecord:
    """Write ``shards/<name>.lex/`` over ``fields`` of ``metadata`` (row i = document i),
    with its scalar columns indexed for filters (``FILTERS_FILE`` lists them), and return
    its record. Replaces a leftover folder of that name (a failed write)."""
    from clipsearch.indexer.writer import file_record

    tantivy = require_tantivy()
    shard_dir = root / SHARD_DIR
    final = shard_dir / f"{name}{LEXICAL_SUFFIX}"
    tmp = shard_dir / f"{name}{LEXICAL_SUFFIX}{TMP_MARKER}{os.getpid()}"
    make_dirs(shard_dir)
    for stale in (final, tmp):
        shutil.rmtree(stale, ignore_errors=True)
    texts = document_texts(metadata, fields) if fields else [""] * metadata.num_rows
    try:
        tmp.mkdir()
        filters = filter_fields(metadata)
        index = tantivy.Index(schema(filters), path=str(tmp), reuse=False)
        register_analyzers(index)
        # One writer thread: one segment per shard (a second thread writes a second
        # segment, and every query then searches both: 11% slower at 250k rows).
        writer = index.writer(heap_size=WRITER_HEAP_BYTES, num_threads=1)
        doc = tantivy.Document
        values = filter_values(metadata, filters)
        for row, text in enumerate(texts):
            words, grams = split_cjk(text)
            d = doc(**{FIELD_WORDS: [words], FIELD_CJK: [grams], FIELD_ROW: [row]})
            for add, field, column in values:
                v = column[row]
                if v is not None:
                    add(d, field, v)
            writer.add_document(d)
        writer.commit()
        writer.wait_merging_threads()
        (tmp / _WRITER_LOCK).unlink(missing_ok=True)
        (tmp / _READER_LOCK).touch()
        listing = [{"column": f.column, "field": f.field, "kind": f.kind} for f in filters]
        (tmp / FILTERS_FILE).write_text(json.dumps(listing, indent=1) + "\n", encoding="utf-8")
        for p in tmp.iterdir():
            fsync_file(p)
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(shard_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(e, final) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = tuple(file_record(root, p) for p in sorted(final.iterdir()) if p.is_file())
    log.info("wrote lexical index %s: %d rows over %s", final, len(texts), ", ".join(fields))
    return LexicalRecord(fields=tuple(fields), analyzer=ANALYZER, rows=len(texts), files=files)


def filter_values(
    metadata: pa.Table, filters: Sequence[FilterField]
) -> list[tuple[Callable[[Any, str, Any], None], str, list[Any]]]:
    """Per filter field: the tantivy Document method adding its values, its name, and
    its column's values (None for nulls and NaN: those rows match no comparison)."""
    import tantivy

    doc = tantivy.Document
    adders: dict[str, Callable[[Any, str, Any], None]] = {
        "i64": doc.add_integer,
        "u64": doc.add_unsigned,
        "f64": doc.add_float,
        "bool": doc.add_boolean,
        "str": doc.add_text,
    }
    out: list[tuple[Callable[[Any, str, Any], None], str, list[Any]]] = []
    for f in filters:
        column = metadata.column(f.column).to_pylist()
        if f.kind == "f64":
            column = [None if v is None or math.isnan(v) else v for v in column]
        out.append((adders[f.kind], f.field, column))
    return out


def remove_lexical(root: Path, name: str) -> None:
    """Remove shard ``name``'s lexical folder and temp folders (after a failed write)."""
    shard_dir = root / SHARD_DIR
    for p in shard_dir.glob(f"{name}{LEXICAL_SUFFIX}*"):
        with contextlib.suppress(OSError):
            shutil.rmtree(p)
