"""The typed AST of filter expressions (frozen dataclasses) and shared limits."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TypeAlias

from clipsearch.retrieval.errors import FilterError

# Longer filter texts are refused: a product-search filter is a few dozen characters,
# and the limit bounds parser time and memory for hostile input.
MAX_FILTER_LENGTH = 8192
# Nesting depth of and/or/not/parentheses; Python's recursion limit is far above this.
MAX_DEPTH = 32
# Values in one `in (...)` list.
MAX_IN_VALUES = 10_000

COMPARE_OPS = ("=", "!=", "<", "<=", ">", ">=")
STRING_OPS = ("startswith", "contains")
_OP_ALIASES = {"==": "=", "<>": "!="}
_KEYWORDS = frozenset(
    {"and", "or", "not", "in", "between", "is", "null", "true", "false"}
    | {"startswith", "contains", "date", "timestamp"}
)

Scalar: TypeAlias = int | float | str | bool | dt.date | dt.datetime


# --------------------------------------------------------------------------- AST


@dataclass(frozen=True)
class Literal:
    """A typed constant. ``kind`` disambiguates ``True`` from ``1`` and dates from strings."""

    # The value: int, float, str, bool, datetime.date or datetime.datetime.
    value: Scalar
    # One of "int", "float", "string", "bool", "date", "timestamp".
    kind: str


@dataclass(frozen=True)
class Compare:
    column: str
    # One of COMPARE_OPS.
    op: str
    value: Literal


@dataclass(frozen=True)
class In:
    column: str
    values: tuple[Literal, ...]


@dataclass(frozen=True)
class Between:
    """``low <= column <= high`` (inclusive on both ends, as in SQL)."""

    column: str
    low: Literal
    high: Literal


@dataclass(frozen=True)
class IsNull:
    column: str


@dataclass(frozen=True)
class StringMatch:
    column: str
    # "startswith" or "contains"; both case-sensitive.
    op: str
    value: Literal


@dataclass(frozen=True)
class And:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Not:
    item: Node


Node: TypeAlias = Compare | In | Between | IsNull | StringMatch | And | Or | Not


def parse_temporal(text: str, kind: str) -> Literal:
    try:
        if kind == "date":
            return Literal(dt.date.fromisoformat(text), "date")
        return Literal(dt.datetime.fromisoformat(text), "timestamp")
    except ValueError as e:
        example = "2024-05-31" if kind == "date" else "2024-05-31T12:00:00"
        raise FilterError(f"{text!r} is not an ISO {kind} (like {example!r})") from e


def columns_of(node: Node) -> frozenset[str]:
    """The column names a filter reads."""
    if isinstance(node, (And, Or)):
        return frozenset().union(*(columns_of(x) for x in node.items))
    if isinstance(node, Not):
        return columns_of(node.item)
    return frozenset({node.column})
