"""The metadata filter language: tokenizer, parser, typed AST, type checker, compiler.

A filter is a boolean expression over metadata columns::

    price < 30 and in_stock and category in ('shirts', 'tops')
    not (brand = 'acme' or title contains 'striped') and added >= date '2024-01-01'
    rating between 4 and 5 and discount is not null and sku startswith 'TS-'

Grammar (keywords are case-insensitive; columns are identifiers or `back quoted`)::

    expr      := or
    or        := and ("or" and)*
    and       := not ("and" not)*
    not       := "not" not | "(" expr ")" | predicate
    predicate := column op literal                  op: = == != <> < <= > >=
               | column ["not"] "in" "(" literal ("," literal)* ")"
               | column ["not"] "between" literal "and" literal
               | column ["not"] ("startswith" | "contains") string
               | column "is" ["not"] "null"
               | column                             (a boolean column, = true)
    literal   := number | string | true | false | null-free
               | "date" string | "timestamp" string

Strings are single- or double-quoted; a quote is doubled to include it (``'it''s'``) and
backslash escapes ``\\'``, ``\\"`` and ``\\\\``. A plain string compared with a date or
timestamp column is read as an ISO date.

User text is only ever tokenized by this module: it never reaches ``eval``, SQL or a
shell. The parser produces frozen dataclasses; :func:`compile_filter` checks them
against a pyarrow schema (unknown columns and type mismatches raise :class:`FilterError`
naming the column and the expected type) and turns them into pyarrow compute calls.
Comparisons follow SQL null semantics: a null value never matches, not even ``!=``.

The same AST has a JSON form (:func:`to_json` / :func:`from_json`) for the HTTP API.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retrieval.errors import FilterError

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


# --------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class _Token:
    # "ident", "keyword", "string", "number", "op", "(", ")", ",", "end".
    kind: str
    text: str
    value: Any
    pos: int


_NUMBER = re.compile(r"-?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_OPS = ("<=", ">=", "!=", "<>", "==", "=", "<", ">")


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "(),":
            tokens.append(_Token(c, c, c, i))
            i += 1
        elif c in "'\"":
            value, end = _read_string(text, i)
            tokens.append(_Token("string", text[i:end], value, i))
            i = end
        elif c == "`":
            end = text.find("`", i + 1)
            if end < 0 or end == i + 1:
                raise FilterError(f"unterminated or empty `quoted column` at position {i}")
            tokens.append(_Token("ident", text[i : end + 1], text[i + 1 : end], i))
            i = end + 1
        elif (m := _NUMBER.match(text, i)) and (c != "-" or _sign_allowed(tokens)):
            tokens.append(_Token("number", m.group(), _number(m.group(), i), i))
            i = m.end()
        elif m := _IDENT.match(text, i):
            word = m.group()
            kind = "keyword" if word.lower() in _KEYWORDS else "ident"
            tokens.append(_Token(kind, word, word.lower() if kind == "keyword" else word, i))
            i = m.end()
        else:
            op = next((o for o in _OPS if text.startswith(o, i)), None)
            if op is None:
                raise FilterError(
                    f"unexpected character {c!r} at position {i} in filter {_excerpt(text, i)}; "
                    "a filter is comparisons joined by and/or, e.g. \"price < 30 and color = 'red'\""
                )
            tokens.append(_Token("op", op, _OP_ALIASES.get(op, op), i))
            i += len(op)
    tokens.append(_Token("end", "", None, n))
    return tokens


def _sign_allowed(tokens: list[_Token]) -> bool:
    # A leading '-' belongs to a number only where a literal may start.
    return bool(tokens) and tokens[-1].kind in ("op", "(", ",", "keyword")


def _number(text: str, pos: int) -> int | float:
    try:
        if re.fullmatch(r"-?\d+", text):
            return int(text)
        value = float(text)
    except ValueError as e:  # pragma: no cover - the regex only admits valid numbers
        raise FilterError(f"bad number {text!r} at position {pos}") from e
    if not math.isfinite(value):
        raise FilterError(f"number {text!r} at position {pos} is out of range")
    return value


def _read_string(text: str, start: int) -> tuple[str, int]:
    quote = text[start]
    out: list[str] = []
    i = start + 1
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "'\"\\":
            out.append(text[i + 1])
            i += 2
        elif c == quote:
            if i + 1 < len(text) and text[i + 1] == quote:
                out.append(quote)
                i += 2
            else:
                return "".join(out), i + 1
        else:
            out.append(c)
            i += 1
    raise FilterError(f"unterminated string starting at position {start}: {_excerpt(text, start)}")


def _excerpt(text: str, pos: int) -> str:
    lo = max(0, pos - 20)
    return repr(("…" if lo else "") + text[lo : pos + 20] + ("…" if pos + 20 < len(text) else ""))


# --------------------------------------------------------------------------- parser


def parse(text: str) -> Node:
    """Parse a filter expression into its AST. Raises :class:`FilterError` with a position."""
    if not isinstance(text, str):
        raise FilterError(f"a filter expression must be a string, got {type(text).__name__}")
    if len(text) > MAX_FILTER_LENGTH:
        raise FilterError(
            f"filter is {len(text)} characters long; the limit is {MAX_FILTER_LENGTH}"
        )
    if not text.strip():
        raise FilterError("empty filter expression; omit the filter to match every row")
    return _Parser(text).parse()


class _Parser:
    """Recursive descent over the token list; depth-limited."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0
        self.depth = 0

    def parse(self) -> Node:
        node = self.expr()
        tok = self.peek()
        if tok.kind != "end":
            raise self.error(tok, "expected 'and', 'or' or the end of the filter")
        return node

    # helpers
    def peek(self) -> _Token:
        return self.tokens[self.i]

    def next(self) -> _Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def is_kw(self, word: str) -> bool:
        tok = self.peek()
        return tok.kind == "keyword" and tok.value == word

    def expect_kw(self, word: str) -> None:
        if not self.is_kw(word):
            raise self.error(self.peek(), f"expected '{word}'")
        self.i += 1

    def expect(self, kind: str) -> _Token:
        tok = self.peek()
        if tok.kind != kind:
            raise self.error(tok, f"expected '{kind}'")
        return self.next()

    def error(self, tok: _Token, what: str) -> FilterError:
        found = "the end of the filter" if tok.kind == "end" else repr(tok.text)
        return FilterError(
            f"{what} at position {tok.pos}, found {found} in filter {_excerpt(self.text, tok.pos)}"
        )

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FilterError(f"filter nests deeper than {MAX_DEPTH} levels; simplify it")

    # grammar
    def expr(self) -> Node:
        self.enter()
        items = [self.and_()]
        while self.is_kw("or"):
            self.i += 1
            items.append(self.and_())
        self.depth -= 1
        return items[0] if len(items) == 1 else Or(tuple(items))

    def and_(self) -> Node:
        items = [self.not_()]
        while self.is_kw("and"):
            self.i += 1
            items.append(self.not_())
        return items[0] if len(items) == 1 else And(tuple(items))

    def not_(self) -> Node:
        if self.is_kw("not"):
            self.i += 1
            self.enter()
            negated = Not(self.not_())
            self.depth -= 1
            return negated
        if self.peek().kind == "(":
            self.i += 1
            node = self.expr()
            self.expect(")")
            return node
        return self.predicate()

    def predicate(self) -> Node:
        tok = self.peek()
        if tok.kind != "ident":
            raise self.error(tok, "expected a column name")
        column = self.next().value
        tok = self.peek()
        if tok.kind == "op":
            self.i += 1
            return Compare(column, tok.value, self.literal())
        if tok.kind == "keyword" and tok.value == "is":
            self.i += 1
            negated = self.is_kw("not")
            if negated:
                self.i += 1
            self.expect_kw("null")
            return Not(IsNull(column)) if negated else IsNull(column)
        negated = self.is_kw("not")
        if negated:
            self.i += 1
            tok = self.peek()
        node: Node
        if tok.kind == "keyword" and tok.value == "in":
            self.i += 1
            node = In(column, self.literal_list())
        elif tok.kind == "keyword" and tok.value == "between":
            self.i += 1
            low = self.literal()
            self.expect_kw("and")
            node = Between(column, low, self.literal())
        elif tok.kind == "keyword" and tok.value in STRING_OPS:
            self.i += 1
            value = self.literal()
            if value.kind != "string":
                raise FilterError(f"'{tok.value}' on column {column!r} needs a quoted string")
            node = StringMatch(column, tok.value, value)
        elif negated:
            raise self.error(
                tok, "expected 'in', 'between', 'startswith' or 'contains' after 'not'"
            )
        elif tok.kind in ("end", ")") or (tok.kind == "keyword" and tok.value in ("and", "or")):
            return Compare(column, "=", Literal(True, "bool"))  # bare boolean column
        else:
            raise self.error(tok, f"expected an operator after column {column!r}")
        return Not(node) if negated else node

    def literal_list(self) -> tuple[Literal, ...]:
        self.expect("(")
        values = [self.literal()]
        while self.peek().kind == ",":
            self.i += 1
            values.append(self.literal())
            if len(values) > MAX_IN_VALUES:
                raise FilterError(f"an 'in' list may hold at most {MAX_IN_VALUES} values")
        self.expect(")")
        return tuple(values)

    def literal(self) -> Literal:
        tok = self.next()
        if tok.kind == "number":
            return Literal(tok.value, "int" if isinstance(tok.value, int) else "float")
        if tok.kind == "string":
            return Literal(tok.value, "string")
        if tok.kind == "keyword" and tok.value in ("true", "false"):
            return Literal(tok.value == "true", "bool")
        if tok.kind == "keyword" and tok.value in ("date", "timestamp"):
            s = self.peek()
            if s.kind != "string":
                raise self.error(s, f"expected a quoted ISO {tok.value} after '{tok.value}'")
            self.i += 1
            return _temporal(s.value, tok.value)
        raise self.error(tok, "expected a value (number, 'string', true, false, date '...')")


def _temporal(text: str, kind: str) -> Literal:
    try:
        if kind == "date":
            return Literal(dt.date.fromisoformat(text), "date")
        return Literal(dt.datetime.fromisoformat(text), "timestamp")
    except ValueError as e:
        example = "2024-05-31" if kind == "date" else "2024-05-31T12:00:00"
        raise FilterError(f"{text!r} is not an ISO {kind} (like {example!r})") from e


# --------------------------------------------------------------------------- text form


def to_text(node: Node) -> str:
    """Canonical expression text; ``parse(to_text(n)) == n`` for parsed trees."""
    if isinstance(node, Compare):
        return f"{_col(node.column)} {node.op} {_lit(node.value)}"
    if isinstance(node, In):
        return f"{_col(node.column)} in ({', '.join(_lit(v) for v in node.values)})"
    if isinstance(node, Between):
        return f"{_col(node.column)} between {_lit(node.low)} and {_lit(node.high)}"
    if isinstance(node, IsNull):
        return f"{_col(node.column)} is null"
    if isinstance(node, StringMatch):
        return f"{_col(node.column)} {node.op} {_lit(node.value)}"
    if isinstance(node, And):
        return " and ".join(f"({to_text(x)})" for x in node.items)
    if isinstance(node, Or):
        return " or ".join(f"({to_text(x)})" for x in node.items)
    return f"not ({to_text(node.item)})"


def _col(name: str) -> str:
    return name if _IDENT.fullmatch(name) and name.lower() not in _KEYWORDS else f"`{name}`"


def _lit(lit: Literal) -> str:
    if lit.kind == "bool":
        return "true" if lit.value else "false"
    if lit.kind in ("int", "float"):
        return repr(lit.value)
    if lit.kind in ("date", "timestamp"):
        return f"{lit.kind} '{lit.value.isoformat()}'"  # type: ignore[union-attr]
    return "'" + str(lit.value).replace("\\", "\\\\").replace("'", "''") + "'"


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
            return _temporal(text, kind)
    raise FilterError(
        f"{path}: expected a number, string, boolean, {{'date': ...}} or {{'timestamp': ...}}, "
        f"got {type(v).__name__}"
    )


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
        result = pc.fill_null(result, False)
        if isinstance(result, pa.ChunkedArray):
            result = result.combine_chunks() if result.num_chunks != 1 else result.chunk(0)
        return np.asarray(result.to_numpy(zero_copy_only=False), dtype=bool)


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
                f"got {_lit(lit)}"
            )


def _scalar(lit: Literal, t: pa.DataType) -> pa.Scalar:
    """The literal as an Arrow scalar comparable with a column of type ``t``."""
    family = _family(t)
    value = lit.value
    if lit.kind == "string" and family in ("date", "timestamp"):
        value = _temporal(str(value), "timestamp" if family == "timestamp" else "date").value
    if family == "date":
        if isinstance(value, dt.datetime):
            value = value.date()
        return pa.scalar(value, pa.date32())
    if family == "timestamp":
        if not isinstance(value, dt.datetime) and isinstance(value, dt.date):
            value = dt.datetime(value.year, value.month, value.day)
        if t.tz is not None and isinstance(value, dt.datetime) and value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return pa.scalar(value, t)
    if lit.kind == "int":
        return pa.scalar(value, pa.int64())
    if lit.kind == "float":
        return pa.scalar(value, pa.float64())
    if lit.kind == "bool":
        return pa.scalar(value, pa.bool_())
    return pa.scalar(value, pa.string())


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
        pa.scalar(None, pa.bool_()),
    )


def _value_set(values: tuple[Literal, ...], t: pa.DataType) -> pa.Array:
    scalars = [_scalar(v, t) for v in values]
    if _family(t) != "number":
        return pa.array([s.as_py() for s in scalars], type=scalars[0].type)
    if pa.types.is_integer(t):
        # 2.5 can never equal an integer; 3.0 equals 3. Keeps the set in the column's type.
        ints = [int(v) for v in (s.as_py() for s in scalars) if float(v).is_integer()]
        return pa.array(ints, type=pa.int64())
    return pa.array([float(s.as_py()) for s in scalars], type=pa.float64())


def columns_of(node: Node) -> frozenset[str]:
    """The column names a filter reads."""
    if isinstance(node, (And, Or)):
        return frozenset().union(*(columns_of(x) for x in node.items))
    if isinstance(node, Not):
        return columns_of(node.item)
    return frozenset({node.column})
