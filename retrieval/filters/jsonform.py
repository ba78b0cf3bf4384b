"""The JSON form of the filter AST (for the HTTP API), validated strictly."""

from __future__ import annotations

import math
from typing import Any

from clipsearch.retrieval.errors import FilterError
from clipsearch.retrieval.filters.nodes import (
    COMPARE_OPS,
    MAX_DEPTH,
    MAX_FILTER_LENGTH,
    MAX_IN_VALUES,
    STRING_OPS,
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

# --------------------------------------------------------------------------- JSON form


def to_json(node: Node) -> dict[str, Any]:
    """The JSON form of an AST (see :func:`from_json` for the shape)."""
    if isinstance(node, Compare):
        return {"op": node.op, "column": node.column, "value": _lit_json(node.value)}
    if isinstance(node, In):
        return {"op": "in", "column": node.column, "values": [_lit_json(v) for v in node.values]}
    if isinstance(node, Between):
        return {
            "op": "between",
            "column": node.column,
            "low": _lit_json(node.low),
            "high": _lit_json(node.high),
        }
    if isinstance(node, IsNull):
        return {"op": "is_null", "column": node.column}
    if isinstance(node, StringMatch):
        return {"op": node.op, "column": node.column, "value": _lit_json(node.value)}
    if isinstance(node, (And, Or)):
        return {
            "op": "and" if isinstance(node, And) else "or",
            "args": [to_json(x) for x in node.items],
        }
    return {"op": "not", "arg": to_json(node.item)}


def _lit_json(lit: Literal) -> Any:
    if lit.kind in ("date", "timestamp"):
        return {lit.kind: lit.value.isoformat()}  # type: ignore[union-attr]
    return lit.value


_JSON_KEYS: dict[str, frozenset[str]] = {
    **{op: frozenset({"op", "column", "value"}) for op in (*COMPARE_OPS, *STRING_OPS)},
    "in": frozenset({"op", "column", "values"}),
    "between": frozenset({"op", "column", "low", "high"}),
    "is_null": frozenset({"op", "column"}),
    "is_not_null": frozenset({"op", "column"}),
    "and": frozenset({"op", "args"}),
    "or": frozenset({"op", "args"}),
    "not": frozenset({"op", "arg"}),
}


def from_json(obj: Any) -> Node:
    """Validate and convert the JSON form into an AST.

    Shapes: ``{"op": "<", "column": "price", "value": 30}`` (ops = != < <= > >=
    startswith contains), ``{"op": "in", "column": c, "values": [...]}``,
    ``{"op": "between", "column": c, "low": a, "high": b}``, ``{"op": "is_null" |
    "is_not_null", "column": c}``, ``{"op": "and" | "or", "args": [...]}``,
    ``{"op": "not", "arg": {...}}``. Values are JSON numbers, strings, booleans, or
    ``{"date": "2024-05-31"}`` / ``{"timestamp": "2024-05-31T12:00:00"}``. Anything else
    raises :class:`FilterError` saying where (a JSON path like ``$.args[1].value``).
    """
    return _from_json(obj, "$", 0)


def _from_json(obj: Any, path: str, depth: int) -> Node:
    if depth > MAX_DEPTH:
        raise FilterError(f"filter JSON nests deeper than {MAX_DEPTH} levels at {path}")
    if not isinstance(obj, dict):
        raise FilterError(f"{path}: expected an object with an 'op' key, got {type(obj).__name__}")
    op = obj.get("op")
    if not isinstance(op, str) or op not in _JSON_KEYS:
        raise FilterError(
            f"{path}.op: unknown operator {op!r}; expected one of {sorted(_JSON_KEYS)}"
        )
    keys = set(obj)
    if keys != _JSON_KEYS[op]:
        extra, missing = sorted(keys - _JSON_KEYS[op]), sorted(_JSON_KEYS[op] - keys)
        raise FilterError(f"{path}: operator {op!r} has unexpected keys {extra} / lacks {missing}")
    if op in ("and", "or"):
        args = obj["args"]
        if not isinstance(args, list) or not args:
            raise FilterError(f"{path}.args: expected a non-empty list")
        items = tuple(_from_json(a, f"{path}.args[{i}]", depth + 1) for i, a in enumerate(args))
        if len(items) == 1:
            return items[0]
        return And(items) if op == "and" else Or(items)
    if op == "not":
        return Not(_from_json(obj["arg"], f"{path}.arg", depth + 1))
    column = obj["column"]
    if not isinstance(column, str) or not column or len(column) > 256:
        raise FilterError(f"{path}.column: expected a column name (a non-empty string)")
    if op == "in":
        values = obj["values"]
        if not isinstance(values, list) or not values or len(values) > MAX_IN_VALUES:
            raise FilterError(f"{path}.values: expected a list of 1..{MAX_IN_VALUES} values")
        return In(
            column, tuple(_lit_from_json(v, f"{path}.values[{i}]") for i, v in enumerate(values))
        )
    if op == "between":
        low = _lit_from_json(obj["low"], f"{path}.low")
        return Between(column, low, _lit_from_json(obj["high"], f"{path}.high"))
    if op == "is_null":
        return IsNull(column)
    if op == "is_not_null":
        return Not(IsNull(column))
    value = _lit_from_json(obj["value"], f"{path}.value")
    if op in STRING_OPS:
        if value.kind != "string":
            raise FilterError(f"{path}.value: '{op}' needs a string")
        return StringMatch(column, op, value)
    return Compare(column, op, value)


def _lit_from_json(v: Any, path: str) -> Literal:
    if isinstance(v, bool):
        return Literal(v, "bool")
    if isinstance(v, int):
        return Literal(v, "int")
    if isinstance(v, float):
        if not math.isfinite(v):
            raise FilterError(f"{path}: number must be finite")
        return Literal(v, "float")
    if isinstance(v, str):
        if len(v) > MAX_FILTER_LENGTH:
            raise FilterError(f"{path}: string longer than {MAX_FILTER_LENGTH} characters")
        return Literal(v, "string")
    if isinstance(v, dict) and len(v) == 1:
        ((kind, text),) = v.items()
        if kind in ("date", "timestamp") and isinstance(text, str):
            return parse_temporal(text, kind)
    raise FilterError(
        f"{path}: expected a number, string, boolean, {{'date': ...}} or {{'timestamp': ...}}, "
        f"got {type(v).__name__}"
    )
