"""Arrow <-> numpy / Python on the query path: same values as pyarrow, pandas left asleep."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsearch.indexer.build import BuildOptions, build
from clipsearch.retrieval.arrow_convert import (
    array_of,
    arrow_to_numpy,
    numpy_to_arrow,
    scalar_of,
    table_to_pylist,
)
from clipsearch.retrieval.encoders import FakeEncoder
from clipsearch.retrieval.manifest import read_current
from clipsearch.retrieval.store import _shape_problems, open_snapshot
from tests.indexer.helpers import make_images

NUMERIC = ("int8", "int16", "int32", "int64", "uint8", "uint32", "uint64")
FLOATS = ("float16", "float32", "float64")


@pytest.mark.parametrize("dtype", NUMERIC + FLOATS)
def test_numbers_round_trip_like_pyarrow(dtype: str) -> None:
    x = (np.arange(11) * 7 % 13).astype(dtype)
    a = numpy_to_arrow(x)
    assert a.type == pa.from_numpy_dtype(np.dtype(dtype)) and a.to_pylist() == x.tolist()
    assert a.equals(pa.array(x))
    back = arrow_to_numpy(a)
    assert back.dtype == x.dtype and np.array_equal(back, x)
    # offsets (slices) and several chunks
    assert np.array_equal(arrow_to_numpy(a.slice(3, 5)), x[3:8])
    chunked = pa.chunked_array([a.slice(0, 4), a.slice(4)])
    assert np.array_equal(arrow_to_numpy(chunked), x)
    # a strided view is copied, not read with the wrong stride
    assert numpy_to_arrow(x[::3]).to_pylist() == x[::3].tolist()


def test_other_columns_fall_back_to_pyarrow() -> None:
    with_nulls = pa.array([1.5, None, 3.0])
    assert np.isnan(arrow_to_numpy(with_nulls)[1])
    assert arrow_to_numpy(pa.chunked_array([pa.array(["a", "b"])])).tolist() == ["a", "b"]
    assert arrow_to_numpy(pa.chunked_array([], pa.int64())).shape == (0,)
    assert numpy_to_arrow(np.array([True, False])).to_pylist() == [True, False]
    with pytest.raises(ValueError, match="1-d"):
        numpy_to_arrow(np.zeros((2, 2)))


def test_table_rows_match_pyarrow_for_time_zones_units_and_nulls() -> None:
    ms = np.array([0, 1_700_000_000_123, -86_400_000 * 400, 951_782_400_000], np.int64)
    columns, names = [], []
    for tz in ("UTC", "Europe/Paris", "America/New_York", "Asia/Shanghai", "+07:30", None):
        for unit, scale in (("s", None), ("ms", 1), ("us", 1000)):
            values = ms // 1000 if scale is None else ms * scale
            mask = np.array([False, False, True, False])
            columns.append(pa.array(values, pa.timestamp(unit, tz), mask=mask))
            names.append(f"{tz}/{unit}")
    columns += [pa.array(["a", None, "c", "d"]), pa.array([1.5, 2.0, None, 4.0])]
    names += ["text", "price"]
    table = pa.Table.from_arrays(columns, names=names)
    got, expected = table_to_pylist(table), table.to_pylist()
    assert got == expected
    for g, e in zip(got, expected, strict=True):
        for name in names:
            if isinstance(e[name], datetime):
                assert g[name].isoformat() == e[name].isoformat()
                assert type(g[name].tzinfo) is type(e[name].tzinfo)
    assert table_to_pylist(table.slice(0, 0)) == []


UTC_MINUS_3 = dt.timezone(dt.timedelta(hours=-3))
LITERALS = [
    ([1, -5, 2**62], pa.int64()),
    ([3, -7], pa.int32()),
    ([1.5, -2, 3], pa.float64()),
    ([0.1], pa.float32()),
    ([True, False, True] * 5, pa.bool_()),
    (["a", "", "红色连衣裙", "x" * 300], pa.string()),
    (["q", "r"], pa.large_string()),
    ([dt.date(2020, 2, 29), dt.date(1900, 1, 1)], pa.date32()),
    ([dt.datetime(2020, 1, 1, 12, 30, 5, 123000), dt.datetime(1950, 6, 1, tzinfo=UTC_MINUS_3)],
     pa.timestamp("ms", "UTC")),
    ([dt.datetime(2020, 1, 1, 12, 30, 5, 123456)], pa.timestamp("us")),
    ([dt.datetime(1969, 12, 31, 23, 59, 59, 1)], pa.timestamp("ns", "Asia/Shanghai")),
    ([dt.datetime(2020, 1, 1, 12, 30, 5)], pa.timestamp("s", "Europe/Paris")),
    # not exactly representable / not built from buffers: pyarrow's own conversion
    ([dt.datetime(1969, 12, 31, 23, 59, 59, 500000)], pa.timestamp("s")),
    ([1, None], pa.int64()),
]  # fmt: skip


@pytest.mark.parametrize(("values", "type_"), LITERALS)
def test_filter_literals_are_what_pyarrow_makes(values: list[object], type_: pa.DataType) -> None:
    got = array_of(values, type_)
    assert got.equals(pa.array(values, type=type_)) and got.type == type_
    assert scalar_of(values[0], type_).equals(pa.scalar(values[0], type_))


def test_out_of_range_literals_fail_like_pyarrow() -> None:
    with pytest.raises(pa.ArrowInvalid, match="too large"):
        array_of([300], pa.int8())
    with pytest.raises(OverflowError):
        array_of([2**63], pa.int64())


def test_booleans_unpack_from_any_offset() -> None:
    bits = [bool(i % 3 == 0 or i % 7 == 0) for i in range(70)]
    a = pa.array(bits)
    for start, length in ((0, 70), (5, 13), (9, 0), (63, 7)):
        assert arrow_to_numpy(a.slice(start, length)).tolist() == bits[start : start + length]
    chunked = pa.chunked_array([a.slice(0, 9), a.slice(9)])
    got = arrow_to_numpy(chunked)
    assert got.dtype == bool and got.tolist() == bits


def test_conversions_do_not_import_pandas() -> None:
    pytest.importorskip("pandas")  # without pandas there is nothing to avoid
    code = (
        "import sys, numpy as np, pyarrow as pa\n"
        "from clipsearch.retrieval.arrow_convert import *\n"
        "t = pa.Table.from_arrays([numpy_to_arrow(np.arange(5)),"
        " pa.chunked_array([numpy_to_arrow(np.arange(5) * 1000)]).cast(pa.timestamp('ms', 'UTC'))],"
        " names=['i', 'ts'])\n"
        "rows = table_to_pylist(t.take(numpy_to_arrow(np.array([4, 0]))))\n"
        "assert rows[0]['i'] == 4 and rows[0]['ts'].year == 1970, rows\n"
        "assert arrow_to_numpy(t.column('i')).sum() == 10\n"
        "import datetime as dt\n"
        "v = array_of(['red', 'blue'], pa.string())\n"
        "assert array_of([dt.datetime(2024, 1, 1)], pa.timestamp('ms', 'UTC'))[0].value > 0\n"
        "assert scalar_of(3.5, pa.float64()).as_py() == 3.5 and v[1].as_py() == 'blue'\n"
        "assert arrow_to_numpy(pa.chunked_array([array_of([True, False], pa.bool_())])).sum() == 1\n"
        "print('pandas' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_shard_checks_still_catch_bad_row_ids_and_modalities(tmp_path: Path) -> None:
    make_images(tmp_path / "imgs", 6)
    out = tmp_path / "idx"
    build([tmp_path / "imgs"], out, encoder=FakeEncoder(16), options=BuildOptions(shard_size=6))
    shard = open_snapshot(out).shards[0]
    record = read_current(out).shards[0]
    meta = pq.read_table(out / record.metadata.path)
    assert _shape_problems(record, shard.index, shard.vectors, meta) == []
    shifted = meta.set_column(0, "row_id", pa.array(np.arange(1, 7), pa.int64()))
    assert any(
        "row_id column is not 0..5" in p
        for p in _shape_problems(record, shard.index, shard.vectors, shifted)
    )
    i = meta.column_names.index("modality")
    mixed = meta.set_column(i, "modality", pa.array(["image"] * 5 + ["text"]))
    problems = _shape_problems(record, shard.index, shard.vectors, mixed)
    assert problems == ["metadata has modalities ['image', 'text'], shard is image"], json.dumps(
        problems
    )


def test_filters_compile_and_mask_without_pandas() -> None:
    pytest.importorskip("pandas")
    code = (
        "import sys, datetime as dt, numpy as np, pyarrow as pa\n"
        "from clipsearch.retrieval.arrow_convert import array_of, numpy_to_arrow\n"
        "from clipsearch.retrieval.filters import compile_filter\n"
        "t = pa.Table.from_arrays([numpy_to_arrow(np.array([10.0, 60.0, 30.0])),\n"
        "    array_of(['dress', 'top', 'dress'], pa.string()),\n"
        "    array_of([True, True, False], pa.bool_()),\n"
        "    array_of([dt.datetime(2024, 5, d) for d in (1, 2, 3)], pa.timestamp('ms', 'UTC'))],\n"
        "    names=['price', 'kind', 'in_stock', 'created_at'])\n"
        "f = compile_filter(\"price < 50 and kind in ('dress', 'coat') and in_stock = true\"\n"
        "    \" and created_at >= timestamp '2024-05-01T00:00:00' and not kind is null\", t.schema)\n"
        "print(f.mask(t).tolist(), 'pandas' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[True,", "False,", "False]", "False"]
