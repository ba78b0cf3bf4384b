"""Arrow <-> numpy / Python on the query path without waking pyarrow's pandas integration.

pyarrow imports pandas, when it is installed, the first time a process converts Python
or numpy values to Arrow (``pa.array``, ``pa.scalar``, a Python scalar passed to a
compute function, ``take`` with a numpy index), Arrow to numpy (``to_numpy``,
``np.asarray``), or a time-zone-aware timestamp to Python (``to_pylist`` of a table
with such a column). That is ~0.25 s of a cold ``clipsearch search``, for nothing: the
query path moves null-free integers and floats and turns a page of rows into dicts.

- ``numpy_to_arrow`` / ``arrow_to_numpy`` move integer and float columns through their
  buffers (``Array.from_buffers`` over the numpy memory; DLPack back), zero-copy;
- ``table_to_pylist`` is ``Table.to_pylist`` with tz-aware timestamps converted from
  their UTC values (a cast to naive timestamps) and the zone pyarrow would attach;
- ``array_of`` / ``scalar_of`` are ``pa.array(values, type)`` / ``pa.scalar(value, type)``
  for the literals of filters (integers, floats, booleans, strings, dates, timestamps).

Anything else (nulls, strings, nanosecond timestamps) falls back to pyarrow's own
conversion, which stays correct and merely imports pandas. Other Arrow -> Python
conversions (``to_pylist``, ``as_py``) and compute functions on Arrow inputs only do not
import pandas.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from datetime import UTC
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

# numpy dtypes whose bytes are an Arrow primitive array's value buffer as they are.
_PRIMITIVE = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
_FLOATS = ("float16", "float32", "float64")


def _arrow_type(dtype: np.dtype) -> pa.DataType | None:
    import pyarrow as pa

    name = dtype.name
    if name in _PRIMITIVE or name in _FLOATS:
        return pa.from_numpy_dtype(dtype)
    return None


def _numpy_dtype(type_: pa.DataType) -> np.dtype:
    """The numpy dtype of an Arrow integer or float type (``to_pandas_dtype`` may import
    pandas)."""
    name = str(type_)
    return np.dtype(
        {"halffloat": "float16", "float": "float32", "double": "float64"}.get(name, name)
    )


def numpy_to_arrow(values: np.ndarray) -> pa.Array:
    """A 1-d numpy array of integers or floats as an Arrow array (no nulls).

    Zero-copy for contiguous arrays (the Arrow array keeps ``values`` alive); other
    dtypes go through ``pa.array``. Raises ValueError for arrays that are not 1-d.
    """
    import pyarrow as pa

    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"numpy_to_arrow takes a 1-d array, got shape {values.shape}")
    arrow_type = _arrow_type(values.dtype)
    if arrow_type is None or values.dtype.byteorder == ">":
        return pa.array(values)
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(arrow_type, len(values), [None, pa.py_buffer(values)])


def _unpack_bools(chunk: pa.Array) -> np.ndarray:
    """A null-free BooleanArray's bits (LSB first, from its offset) as numpy bools."""
    bits = np.frombuffer(chunk.buffers()[1], dtype=np.uint8)
    end = chunk.offset + len(chunk)
    return np.unpackbits(bits, count=end, bitorder="little")[chunk.offset :].astype(bool)


def arrow_to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An Arrow integer, float or boolean column without nulls as a numpy array.

    Numbers, one chunk: a read-only view of the Arrow memory; several chunks: one
    concatenated copy; booleans: unpacked bits (a copy). Columns with nulls or of other
    types go through pyarrow's ``to_numpy`` (nulls become NaN / objects as pyarrow
    does it).
    """
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if pa.types.is_boolean(column.type) and not column.null_count:
        return np.concatenate([np.zeros(0, bool), *(_unpack_bools(c) for c in chunks)])
    numeric = pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
    if not numeric or column.null_count:
        if isinstance(column, pa.ChunkedArray):
            return column.to_numpy()
        return column.to_numpy(zero_copy_only=False)
    if not chunks:
        return np.zeros(0, dtype=_numpy_dtype(column.type))
    parts = [np.from_dlpack(c) for c in chunks]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def table_to_pylist(table: pa.Table) -> list[dict[str, Any]]:
    """``table.to_pylist()``: one dict per row, values as pyarrow gives them.

    Columns of tz-aware timestamps in s/ms/us (what Parquet writers store) become
    ``datetime`` objects in the column's zone, equal to pyarrow's own, without pyarrow's
    tz conversion (which imports pandas). Other columns convert with ``to_pylist``.
    """
    import pyarrow as pa

    columns = []
    for field, column in zip(table.schema, table.columns, strict=True):
        if pa.types.is_timestamp(field.type) and field.type.tz and field.type.unit != "ns":
            zone = pa.lib.string_to_tzinfo(field.type.tz)
            naive = column.cast(pa.timestamp(field.type.unit)).to_pylist()
            columns.append(
                [None if v is None else v.replace(tzinfo=UTC).astimezone(zone) for v in naive]
            )
        else:
            columns.append(column.to_pylist())
    names = table.column_names
    return [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]


_EPOCH = dt.datetime(1970, 1, 1)
_EPOCH_UTC = dt.datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_DATE = dt.date(1970, 1, 1)
_MICROS_PER_UNIT = {"s": 1_000_000, "ms": 1_000, "us": 1}


def _timestamp_values(values: Sequence[Any], unit: str) -> np.ndarray | None:
    """int64 values of ``timestamp(unit)`` as pyarrow makes them from datetimes (naive:
    wall time taken as UTC; aware: the UTC instant); None when one is not a datetime or
    not exactly representable in ``unit``."""
    out = []
    for v in values:
        if not isinstance(v, dt.datetime):
            return None
        delta = v - (_EPOCH if v.tzinfo is None else _EPOCH_UTC)
        micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
        if unit == "ns":
            out.append(micros * 1000)
        elif micros % _MICROS_PER_UNIT[unit]:
            return None
        else:
            out.append(micros // _MICROS_PER_UNIT[unit])
    return np.array(out, dtype=np.int64)


def _string_array(values: Sequence[Any], type_: pa.DataType) -> pa.Array | None:
    import pyarrow as pa

    if not all(isinstance(v, str) for v in values):
        return None
    data = [v.encode("utf-8") for v in values]
    large = pa.types.is_large_string(type_)
    offsets = np.zeros(len(data) + 1, dtype=np.int64 if large else np.int32)
    np.cumsum([len(b) for b in data], out=offsets[1:])
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))]
    return pa.Array.from_buffers(type_, len(data), buffers)


def array_of(values: Sequence[Any], type_: pa.DataType) -> pa.Array:
    """``pa.array(values, type=type_)`` without pyarrow's Python conversion (which imports
    pandas) for non-null ints, floats, bools, strings, dates (date32) and timestamps;
    other values and types, and values numpy rejects, go through ``pa.array``."""
    import pyarrow as pa

    values = list(values)
    built: pa.Array | None = None
    try:
        if not values or any(v is None for v in values):
            built = None
        elif pa.types.is_boolean(type_) and all(isinstance(v, bool) for v in values):
            bits = np.packbits(np.array(values, dtype=bool), bitorder="little")
            built = pa.Array.from_buffers(type_, len(values), [None, pa.py_buffer(bits)])
        elif (pa.types.is_integer(type_) and all(type(v) is int for v in values)) or (
            pa.types.is_floating(type_)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        ):
            dtype = _numpy_dtype(type_)
            with np.errstate(over="raise"):
                built = numpy_to_arrow(np.array(values, dtype=dtype))
            if pa.types.is_integer(type_) and built.to_pylist() != values:
                built = None  # wrapped around: let pyarrow raise its overflow error
        elif pa.types.is_string(type_) or pa.types.is_large_string(type_):
            built = _string_array(values, type_)
        elif pa.types.is_date32(type_) and all(
            isinstance(v, dt.date) and not isinstance(v, dt.datetime) for v in values
        ):
            days = np.array([(v - _EPOCH_DATE).days for v in values], dtype=np.int32)
            built = pa.Array.from_buffers(type_, len(values), [None, pa.py_buffer(days)])
        elif pa.types.is_timestamp(type_):
            ticks = _timestamp_values(values, type_.unit)
            if ticks is not None:
                built = pa.Array.from_buffers(type_, len(values), [None, pa.py_buffer(ticks)])
    except (OverflowError, FloatingPointError, ValueError):
        built = None
    return built if built is not None else pa.array(values, type=type_)


def scalar_of(value: Any, type_: pa.DataType) -> pa.Scalar:
    """``pa.scalar(value, type_)``, built like :func:`array_of` (no pandas)."""
    return array_of([value], type_)[0]
