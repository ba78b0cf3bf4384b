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
  their UTC values (a cast to naive timestamps) and the zone pyarrow would attach.

Anything else (nulls, strings, nanosecond timestamps) falls back to pyarrow's own
conversion, which stays correct and merely imports pandas. Other Arrow -> Python
conversions (``to_pylist``, ``as_py``) and compute functions on Arrow inputs only do not
import pandas.
"""

from __future__ import annotations

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


def arrow_to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An Arrow integer or float column without nulls as a numpy array.

    One chunk: a read-only view of the Arrow memory; several chunks: one concatenated
    copy. Columns with nulls or of other types go through pyarrow's ``to_numpy``
    (nulls become NaN / objects as pyarrow does it).
    """
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    numeric = pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
    if not numeric or column.null_count:
        if isinstance(column, pa.ChunkedArray):
            return column.to_numpy()
        return column.to_numpy(zero_copy_only=False)
    if not chunks:
        return np.zeros(0, dtype=column.type.to_pandas_dtype())
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
