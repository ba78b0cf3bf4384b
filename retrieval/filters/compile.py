"""Type checking against a pyarrow schema and compilation to Arrow compute."""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsearch.retrieval.arrow_convert import array_of, arrow_to_numpy, scalar_of
from clipsearch.retrieval.errors import FilterError
from clipsearch.retrieval.filters.jsonform import from_json
from clipsearch.retrieval.filters.nodes import (
    And,
    Between,
    Compare,
    In,
    IsNull,
    Literal,
    Node,
    Not,
    Or,
    StringMatch,
    parse_temporal,
)
from clipsearch.retrieval.filters.parser import literal_text, parse

# --------------------------------------------------------------------------- type check + compile


def _family(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        return _family(t.value_type)
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_timestamp(t):
        return "timestamp"
    return "other"


_ACCEPTS: dict[str, frozenset[str]] = {
    "number": frozenset({"int", "float"}),
    "string": frozenset({"string"}),
    "bool": frozenset({"bool"}),
    "date": frozenset({"date", "string"}),
    "timestamp": frozenset({"timestamp", "date", "string"}),
    "other": frozenset(),
}
_EXAMPLE = {
    "number": "a number like 30 or 4.5",
    "string": "a quoted string like 'red'",
    "bool": "true or false",
    "date": "date '2024-05-31'",
    "timestamp": "timestamp '2024-05-31T12:00:00'",
    "other": "nothing (this column type cannot be filtered on)",
}


@dataclass(frozen=True)
class CompiledFilter:
    """A type-checked filter, ready to evaluate on tables of one schema."""

    # The validated AST.
    node: Node
    # Equivalent pyarrow expression, usable as ``table.filter(expression)``.
    expression: pc.Expression

    def mask(self, table: pa.Table) -> np.ndarray:
        """bool ``[table.num_rows]``: True where the row matches (null counts as False)."""
        result = _build(self.node, table.schema, lambda name: table.column(name))
        # Literals and results cross through arrow_convert: pa.scalar / to_numpy would
        # import pandas (~0.25 s of a cold filtered search).
        return arrow_to_numpy(pc.fill_null(result, scalar_of(False, pa.bool_())))


def compile_filter(where: str | dict[str, Any] | Node, schema: pa.Schema) -> CompiledFilter:
    """Parse (text or JSON form), type-check against ``schema``, and compile.

    Raises :class:`FilterError` naming the column, its type and what it accepts.
    """
    if isinstance(where, str):
        node = parse(where)
    elif isinstance(where, dict):
        node = from_json(where)
    elif dataclasses.is_dataclass(where) and isinstance(where, (*_LEAVES, And, Or, Not)):
        node = where
    else:
        raise FilterError(f"a filter must be a string or its JSON form, got {type(where).__name__}")
    _check(node, schema)
    expression = _build(node, schema, pc.field)
    return CompiledFilter(node=node, expression=expression)


_LEAVES = (Compare, In, Between, IsNull, StringMatch)


def _column_type(schema: pa.Schema, column: str) -> pa.DataType:
    idx = schema.get_field_index(column)
    if idx < 0:
        close = difflib.get_close_matches(column, schema.names, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise FilterError(
            f"unknown column {column!r} in filter; {hint}columns are: {', '.join(schema.names)}"
        )
    return schema.field(idx).type


def _check(node: Node, schema: pa.Schema) -> None:
    if isinstance(node, (And, Or)):
        for item in node.items:
            _check(item, schema)
        return
    if isinstance(node, Not):
        _check(node.item, schema)
        return
    t = _column_type(schema, node.column)
    family = _family(t)
    if isinstance(node, IsNull):
        return
    if isinstance(node, StringMatch):
        if family != "string":
            raise FilterError(
                f"'{node.op}' needs a string column, but {node.column!r} is {t}; "
                "use = or 'in' for non-string columns"
            )
        return
    if isinstance(node, Compare):
        values: tuple[Literal, ...] = (node.value,)
        if family == "bool" and node.op not in ("=", "!="):
            raise FilterError(f"column {node.column!r} is boolean: only = and != apply to it")
    elif isinstance(node, In):
        values = node.values
    else:
        values = (node.low, node.high)
        if family == "bool":
            raise FilterError(f"'between' does not apply to boolean column {node.column!r}")
    for lit in values:
        if lit.kind not in _ACCEPTS[family]:
            raise FilterError(
                f"column {node.column!r} has type {t}, so it is compared with {_EXAMPLE[family]}; "
                f"got {literal_text(lit)}"
            )


def _scalar(lit: Literal, t: pa.DataType) -> pa.Scalar:
    """The literal as an Arrow scalar comparable with a column of type ``t``."""
    family = _family(t)
    value = lit.value
    if lit.kind == "string" and family in ("date", "timestamp"):
        value = parse_temporal(str(value), "timestamp" if family == "timestamp" else "date").value
    if family == "date":
        if isinstance(value, dt.datetime):
            value = value.date()
        return scalar_of(value, pa.date32())
    if family == "timestamp":
        if not isinstance(value, dt.datetime) and isinstance(value, dt.date):
            value = dt.datetime(value.year, value.month, value.day)
        if t.tz is not None and isinstance(value, dt.datetime) and value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return scalar_of(value, t)
    if lit.kind == "int":
        return scalar_of(value, pa.int64())
    if lit.kind == "float":
        return scalar_of(value, pa.float64())
    if lit.kind == "bool":
        return scalar_of(value, pa.bool_())
    return scalar_of(value, pa.string())


_COMPARE_FUNCS: dict[str, Callable[..., Any]] = {
    "=": pc.equal,
    "!=": pc.not_equal,
    "<": pc.less,
    "<=": pc.less_equal,
    ">": pc.greater,
    ">=": pc.greater_equal,
}


def _build(node: Node, schema: pa.Schema, col: Callable[[str], Any]) -> Any:
    """Compile ``node`` with pyarrow compute; ``col`` gives an Expression or an array."""
    if isinstance(node, And):
        out = _build(node.items[0], schema, col)
        for item in node.items[1:]:
            out = pc.and_kleene(out, _build(item, schema, col))
        return out
    if isinstance(node, Or):
        out = _build(node.items[0], schema, col)
        for item in node.items[1:]:
            out = pc.or_kleene(out, _build(item, schema, col))
        return out
    if isinstance(node, Not):
        return pc.invert(_build(node.item, schema, col))
    x = col(node.column)
    t = schema.field(node.column).type
    if isinstance(node, IsNull):
        return pc.is_null(x)
    if isinstance(node, Compare):
        return _COMPARE_FUNCS[node.op](x, _scalar(node.value, t))
    if isinstance(node, Between):
        low, high = _scalar(node.low, t), _scalar(node.high, t)
        return pc.and_kleene(pc.greater_equal(x, low), pc.less_equal(x, high))
    if isinstance(node, StringMatch):
        fn = pc.starts_with if node.op == "startswith" else pc.match_substring
        return fn(x, pattern=str(node.value.value))
    # In: SQL semantics, a null value is neither in nor "not in" the list.
    return pc.if_else(
        pc.is_valid(x),
        pc.is_in(x, value_set=_value_set(node.values, t)),
        pa.nulls(1, pa.bool_())[0],
    )


def _value_set(values: tuple[Literal, ...], t: pa.DataType) -> pa.Array:
    scalars = [_scalar(v, t) for v in values]
    if _family(t) != "number":
        return array_of([s.as_py() for s in scalars], scalars[0].type)
    if pa.types.is_integer(t):
        # 2.5 can never equal an integer; 3.0 equals 3. Keeps the set in the column's type.
        ints = [int(v) for v in (s.as_py() for s in scalars) if float(v).is_integer()]
        return array_of(ints, pa.int64())
    return array_of([float(s.as_py()) for s in scalars], pa.float64())
