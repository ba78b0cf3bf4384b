"""Arrow <-> numpy / Python on the query path: same values as pyarrow, pandas left asleep."""

from __future__ import annotations

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
from clipsearch.retrieval.arrow_convert import arrow_to_numpy, numpy_to_arrow, table_to_pylist
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
