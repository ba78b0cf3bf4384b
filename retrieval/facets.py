"""Facet counts per product for the current query and filter: "Shoes (213)".

A shop page shows, beside its results, how many *products* each value of a column would
leave: counted over the products the filter allows and, with a text or image query,
over the relevant ones (rows scoring at or above a relevance cutoff). A product (one
``doc_id``) with three photos and a title counts once, and it counts once under each
value any of its counted rows has.

How it is cheap (measured by ``benchmarks/facets.py``): per pinned snapshot and column,
:class:`FacetIndex` encodes once every row's (doc_id, value) pair as a dense int32
``pair id`` and each pair's value as a code. Counting a selection of rows is then

    seen[pair_ids[rows]] = True;  counts = bincount(pair_value[seen])

two vectorised passes over the selected rows and one over the distinct pairs, no
strings. Selections come from the engine's filter cache
(:meth:`~clipsearch.retrieval.engine.SearchEngine.allowed_rows`: the same per-shard
``AllowedRows`` a search with that filter uses, tombstones removed) or, for the relevant
rows of a query, from the row ids of its hits. Filter-only counts are also kept per
(version, filter, modality, column) in :class:`Faceter`'s LRU, since a shop repeats a
handful of filters.

Column kinds:

* strings: one entry per value, most products first (ties by value), at most
  ``FACET_TOP`` entries;
* booleans: ``True`` / ``False``;
* numbers: ``NUMERIC_BUCKETS`` ranges whose edges are fixed per index version (quantiles
  of the column over every live row, rounded to two significant digits, so a page's
  ranges do not jump between queries): ``[min, max)``, the last one ``[min, max]``. Each
  entry carries ``min`` and ``max``; ``value`` is a label such as ``"10 – 20"``.

Nulls are never counted. Ranges with no product are dropped, as are string values
with none.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from clipsearch.retrieval.errors import InvalidOptionError
from clipsearch.retrieval.manifest import FIXED_COLUMNS

if TYPE_CHECKING:
    from clipsearch.retrieval.planner import AllowedRows
    from clipsearch.retrieval.store import Snapshot

# Most entries returned for one string column (a facet menu, not an export).
FACET_TOP = 100
# Ranges per numeric column.
NUMERIC_BUCKETS = 5
# Filter-only facet results kept per Faceter (a site repeats a few filters).
RESULT_CACHE_SIZE = 256
# A selection above this share of a shard's rows is read through its mask, below it
# through its row offsets (fewer bytes touched either way).
MASK_SHARE = 0.125


@dataclass(frozen=True)
class FacetValue:
    """One entry of a facet: a value (or a numeric range) and how many products have it."""

    # The string, the bool, or a range's label ("10 – 20").
    value: str | bool | float
    # Distinct doc_ids among the counted rows that have this value.
    count: int
    # Numeric ranges only: [min, max), the last range [min, max].
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class FacetCounts:
    """Facets of one selection of rows."""

    # Column -> entries (see the module docstring for their order).
    columns: dict[str, list[FacetValue]]
    # Distinct doc_ids among the counted rows: the product count of the selection.
    products: int
    # Rows counted.
    rows: int


@dataclass(frozen=True)
class _Column:
    kind: str  # "string", "bool", "number"
    # int32 [total rows]: the row's (doc_id, value) pair; -1 when the value is null.
    pair_ids: np.ndarray
    # int32 [pairs]: the value code of each pair.
    pair_value: np.ndarray
    # code -> value: the string, the bool, or (lo, hi) of a range.
    labels: tuple[Any, ...]
    # int32 [docs]: the value code of each doc_id (-1: null), when every product has at
    # most one value in this column (the usual case: a product's category, price...).
    # Counting then reads one entry per selected product instead of one per row.
    doc_value: np.ndarray | None = None


class FacetIndex:
    """Per pinned snapshot: dense codes for doc_ids and for the (doc_id, value) pairs of
    each faceted column, built on first use of a column (one pass over the column)."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.version = snapshot.version
        self.schema = snapshot.schema
        self._snapshot = weakref.ref(snapshot)
        starts, total = {}, 0
        for shard in snapshot.shards:
            starts[shard.record.name] = total
            total += shard.metadata.num_rows
        # Shard name -> position of its first row in the concatenated arrays.
        self.starts: dict[str, int] = starts
        self.total_rows = total
        self._row_id_starts = np.array([s.record.row_id_start for s in snapshot.shards], np.int64)
        self._row_id_order = np.argsort(self._row_id_starts, kind="stable")
        self._shard_rows = np.array([s.metadata.num_rows for s in snapshot.shards], np.int64)
        self._shard_pos = np.array(list(starts.values()), np.int64)
        self._lock = threading.Lock()
        self._columns: dict[str, _Column] = {}
        self._docs: tuple[np.ndarray, int] | None = None

    # ------------------------------------------------------------------ building

    def _chunked(self, name: str) -> pa.ChunkedArray:
        snapshot = self._snapshot()
        if snapshot is None:  # pragma: no cover - the Faceter keeps its snapshot alive
            raise RuntimeError("the snapshot of this FacetIndex is gone")
        chunks = [c for s in snapshot.shards for c in s.metadata.column(name).chunks]
        return pa.chunked_array(chunks, type=self.schema.field(name).type)

    def doc_codes(self) -> tuple[np.ndarray, int]:
        """(int32 [total rows] dense doc_id code, number of distinct doc_ids)."""
        with self._lock:
            if self._docs is None:
                self._docs = _codes(self._chunked("doc_id"))[:2]
            return self._docs

    def column(self, name: str) -> _Column:
        """The pair codes of ``name``; InvalidOptionError for a column facets cannot use."""
        check_facet_column(self.schema, name)
        with self._lock:
            cached = self._columns.get(name)
        if cached is not None:
            return cached
        docs, _ = self.doc_codes()
        built = self._build(name, docs)
        with self._lock:
            return self._columns.setdefault(name, built)

    def _build(self, name: str, docs: np.ndarray) -> _Column:
        col = self._chunked(name)
        t = col.type
        if pa.types.is_boolean(t):
            kind = "bool"
            values = col.to_numpy(zero_copy_only=False)
            isnull = np.asarray(col.is_null().to_numpy(zero_copy_only=False), bool)
            codes = np.where(isnull, -1, np.where(values.astype(bool, copy=False), 0, 1))
            labels: tuple[Any, ...] = (True, False)
        elif _is_numeric(t):
            kind = "number"
            x = np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False), np.float64)
            finite = np.isfinite(x)
            edges = nice_edges(x[finite], NUMERIC_BUCKETS)
            if len(edges) < 2:
                codes = np.where(finite, 0, -1)
                lo = float(edges[0]) if len(edges) else 0.0
                labels = ((lo, lo),)
            else:
                inner = np.searchsorted(edges[1:-1], x, side="right")
                codes = np.where(finite & (x >= edges[0]) & (x <= edges[-1]), inner, -1)
                labels = tuple((float(a), float(b)) for a, b in itertools.pairwise(edges))
        else:
            kind = "string"
            codes, n_values, uniques = _codes(col)
            labels = tuple(str(v) for v in uniques)
            del n_values
        codes = np.asarray(codes, np.int64)
        valid = codes >= 0
        n_values = len(labels)
        key = np.where(valid, docs.astype(np.int64) * n_values + codes, -1)
        pairs, inverse = np.unique(key[valid], return_inverse=True)
        pair_ids = np.full(len(codes), -1, np.int32)
        pair_ids[valid] = inverse.astype(np.int32)
        pair_docs = pairs // max(n_values, 1)
        doc_value = None
        if len(pair_docs) == len(np.unique(pair_docs)):  # one value per product at most
            doc_value = np.full(self.doc_codes()[1], -1, np.int32)
            doc_value[pair_docs] = pairs % max(n_values, 1)
        return _Column(
            kind=kind,
            pair_ids=pair_ids,
            pair_value=(pairs % max(n_values, 1)).astype(np.int32),
            labels=labels,
            doc_value=doc_value,
        )

    # ------------------------------------------------------------------ selections

    def positions(self, selection: Mapping[str, AllowedRows | np.ndarray | None]) -> list[Any]:
        """Row selectors into the concatenated arrays: per shard a slice (every row), a
        bool mask over the shard's slice, or global row positions (int64)."""
        out: list[Any] = []
        for name, sel in selection.items():
            start = self.starts[name]
            n = self._rows_of(name)
            if sel is None:
                out.append(slice(start, start + n))
            elif isinstance(sel, np.ndarray):
                out.append(sel.astype(np.int64, copy=False) + start)
            elif sel.count > MASK_SHARE * n:
                out.append((slice(start, start + n), sel.mask))
            else:
                out.append(sel.rows + start)
        return out

    def _rows_of(self, name: str) -> int:
        i = list(self.starts).index(name)
        return int(self._shard_rows[i])

    def local_rows(self, row_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Row ids (int64) -> per shard name, the local row offsets among them."""
        snapshot = self._snapshot()
        if snapshot is None:  # pragma: no cover
            raise RuntimeError("the snapshot of this FacetIndex is gone")
        row_ids = np.asarray(row_ids, np.int64)
        starts = self._row_id_starts[self._row_id_order]
        which = self._row_id_order[np.searchsorted(starts, row_ids, side="right") - 1]
        out: dict[str, np.ndarray] = {}
        for i in np.unique(which):
            shard = snapshot.shards[int(i)]
            local = row_ids[which == i] - shard.record.row_id_start
            out[shard.record.name] = local[(local >= 0) & (local < shard.metadata.num_rows)]
        return out

    # ------------------------------------------------------------------ counting

    def count(
        self, columns: Sequence[str], selection: Mapping[str, AllowedRows | np.ndarray | None]
    ) -> FacetCounts:
        """Facets of ``columns`` over the selected rows (per shard name: an AllowedRows,
        int local row offsets, or None for every row of the shard; shards not named are
        not counted)."""
        picks = self.positions(selection)
        docs, n_docs = self.doc_codes()
        rows = 0
        seen_docs = np.zeros(n_docs, bool)
        for pick in picks:
            part = _take(docs, pick)
            rows += len(part)
            seen_docs[part] = True
        selected = np.flatnonzero(seen_docs)
        out = {name: self._count_column(self.column(name), picks, selected) for name in columns}
        return FacetCounts(columns=out, products=len(selected), rows=rows)

    def _count_column(self, col: _Column, picks: list[Any], docs: np.ndarray) -> list[FacetValue]:
        if col.doc_value is not None:
            values = col.doc_value[docs]
            counts = np.bincount(values[values >= 0], minlength=len(col.labels))
        else:
            seen = np.zeros(len(col.pair_value) + 1, bool)  # the last slot absorbs nulls
            for pick in picks:
                seen[_take(col.pair_ids, pick)] = True
            counts = np.bincount(col.pair_value[seen[:-1]], minlength=len(col.labels))
        if col.kind == "number":
            last = len(col.labels) - 1
            return [
                FacetValue(value=_range_label(lo, hi, i == last), count=int(n), min=lo, max=hi)
                for i, ((lo, hi), n) in enumerate(zip(col.labels, counts, strict=True))
                if n
            ]
        if col.kind == "bool":
            return [
                FacetValue(value=label, count=int(n))
                for label, n in zip(col.labels, counts, strict=True)
                if n
            ]
        nonzero = np.flatnonzero(counts)
        ranked = sorted(
            ((int(counts[i]), col.labels[i]) for i in nonzero), key=lambda c: (-c[0], c[1])
        )
        ranked = ranked[:FACET_TOP]
        return [FacetValue(value=label, count=n) for n, label in ranked]


class Faceter:
    """Facet counts over an engine: the :class:`FacetIndex` of its current snapshot (one at
    a time) and an LRU of filter-only results. Thread-safe; one per service."""

    def __init__(self, cache_size: int = RESULT_CACHE_SIZE) -> None:
        self._lock = threading.Lock()
        self._index: tuple[Snapshot, FacetIndex] | None = None
        self._results: OrderedDict[tuple[Any, ...], tuple[list[FacetValue], int, int]] = (
            OrderedDict()
        )
        self._cache_size = cache_size

    def index_for(self, snapshot: Snapshot) -> FacetIndex:
        with self._lock:
            if self._index is None or self._index[0] is not snapshot:
                self._index = (snapshot, FacetIndex(snapshot))
                self._results.clear()
            return self._index[1]

    def count(
        self,
        engine: Any,
        columns: Sequence[str],
        *,
        where: str | dict[str, Any] | None = None,
        modality: str | None = None,
        relevant_row_ids: np.ndarray | None = None,
    ) -> FacetCounts:
        """Facets of ``columns`` over the products ``where`` allows among the rows a query
        with ``modality`` searches; with ``relevant_row_ids`` (the row ids of a query's
        hits at or above its relevance cutoff, found with the same filter), over those
        rows only.

        Raises InvalidOptionError (option "facets") for an unknown or unfacetable column,
        FilterError for a filter that does not fit the index.
        """
        snapshot, allowed = engine.allowed_rows(where, modality)
        index = self.index_for(snapshot)
        for name in columns:
            check_facet_column(index.schema, name)
        if relevant_row_ids is not None:
            local = index.local_rows(relevant_row_ids)
            selection: dict[str, Any] = {n: local.get(n, _NONE) for n in allowed}
            return index.count(columns, selection)
        key_base = (index.version, _where_key(where), modality, tuple(sorted(allowed)))
        out: dict[str, list[FacetValue]] = {}
        missing = []
        with self._lock:
            for name in columns:
                hit = self._results.get((*key_base, name))
                if hit is None:
                    missing.append(name)
                else:
                    self._results.move_to_end((*key_base, name))
                    out[name] = hit[0]
            totals = self._results.get((*key_base, ""))
        if missing or totals is None:
            fresh = index.count(missing, allowed)
            totals = ([], fresh.products, fresh.rows)
            with self._lock:
                if self._index is not None and self._index[1] is index:
                    self._results[(*key_base, "")] = totals
                    for name in missing:
                        self._results[(*key_base, name)] = (fresh.columns[name], 0, 0)
                    while len(self._results) > self._cache_size:
                        self._results.popitem(last=False)
            out.update(fresh.columns)
        return FacetCounts(
            columns={name: out[name] for name in columns}, products=totals[1], rows=totals[2]
        )


_NONE = np.zeros(0, np.int64)


def check_facet_column(schema: pa.Schema, name: str) -> None:
    """InvalidOptionError (option "facets") unless ``name`` is a user column of ``schema``
    holding strings, booleans or numbers."""
    if name in FIXED_COLUMNS:
        raise InvalidOptionError(
            "facets",
            f"facets: {name!r} is a built-in column and cannot be a facet; facet a metadata "
            "column such as a category, colour or price",
        )
    if name not in schema.names:
        user = [n for n in schema.names if n not in FIXED_COLUMNS]
        raise InvalidOptionError(
            "facets",
            f"facets: unknown column {name!r}; this index has {', '.join(user) or 'none'}",
        )
    t = schema.field(name).type
    if not (
        pa.types.is_boolean(t)
        or _is_numeric(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or (pa.types.is_dictionary(t) and pa.types.is_string(t.value_type))
    ):
        raise InvalidOptionError(
            "facets",
            f"facets: column {name!r} holds {t}; facets count strings, booleans and numbers",
        )


def nice_edges(values: np.ndarray, buckets: int) -> np.ndarray:
    """Range edges for ``values`` (float64, finite): ``buckets`` quantile ranges, inner
    edges rounded to two significant digits, the outer ones the exact min and max;
    duplicates dropped. Empty input gives no edges; one distinct value gives one."""
    if not len(values):
        return np.zeros(0)
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return np.array([lo])
    inner = np.quantile(values, np.linspace(0, 1, buckets + 1)[1:-1])
    rounded = [_round2(float(v)) for v in inner]
    edges = sorted({lo, hi, *(v for v in rounded if lo < v < hi)})
    return np.array(edges)


def _round2(x: float) -> float:
    if x == 0:
        return 0.0
    digits = 1 - math.floor(math.log10(abs(x)))
    return round(x, digits)


def _range_label(lo: float, hi: float, last: bool) -> str:
    return f"{_fmt(lo)} – {_fmt(hi)}" if last or lo != hi else _fmt(lo)


def _fmt(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:g}"


def _codes(col: pa.ChunkedArray) -> tuple[np.ndarray, int, list[Any]]:
    """Dense int32 codes of a column's values (-1 for null), their count, the values."""
    import pyarrow.compute as pc

    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    uniques = pc.unique(col).drop_null()
    idx = pc.index_in(col, value_set=uniques)
    codes = np.asarray(pc.fill_null(idx, -1).to_numpy(zero_copy_only=False), np.int32)
    return codes, len(uniques), uniques.to_pylist()


def _take(arr: np.ndarray, pick: Any) -> np.ndarray:
    if isinstance(pick, tuple):
        span, mask = pick
        return arr[span][mask]
    return arr[pick]


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _where_key(where: str | dict[str, Any] | None) -> str | None:
    if where is None or isinstance(where, str):
        return where
    return json.dumps(where, sort_keys=True, separators=(",", ":"))
