"""Tokenizer and recursive-descent parser of the filter text form, and its printer.

User text is only ever tokenized here: it never reaches ``eval``, SQL or a shell.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from clipsearch.retrieval.errors import FilterError
from clipsearch.retrieval.filters.nodes import (
    _KEYWORDS,
    _OP_ALIASES,
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
            return parse_temporal(s.value, tok.value)
        raise self.error(tok, "expected a value (number, 'string', true, false, date '...')")


# --------------------------------------------------------------------------- text form


def to_text(node: Node) -> str:
    """Canonical expression text; ``parse(to_text(n)) == n`` for parsed trees."""
    if isinstance(node, Compare):
        return f"{_col(node.column)} {node.op} {literal_text(node.value)}"
    if isinstance(node, In):
        return f"{_col(node.column)} in ({', '.join(literal_text(v) for v in node.values)})"
    if isinstance(node, Between):
        return f"{_col(node.column)} between {literal_text(node.low)} and {literal_text(node.high)}"
    if isinstance(node, IsNull):
        return f"{_col(node.column)} is null"
    if isinstance(node, StringMatch):
        return f"{_col(node.column)} {node.op} {literal_text(node.value)}"
    if isinstance(node, And):
        return " and ".join(f"({to_text(x)})" for x in node.items)
    if isinstance(node, Or):
        return " or ".join(f"({to_text(x)})" for x in node.items)
    return f"not ({to_text(node.item)})"


def _col(name: str) -> str:
    return name if _IDENT.fullmatch(name) and name.lower() not in _KEYWORDS else f"`{name}`"


def literal_text(lit: Literal) -> str:
    if lit.kind == "bool":
        return "true" if lit.value else "false"
    if lit.kind in ("int", "float"):
        return repr(lit.value)
    if lit.kind in ("date", "timestamp"):
        return f"{lit.kind} '{lit.value.isoformat()}'"  # type: ignore[union-attr]
    return "'" + str(lit.value).replace("\\", "\\\\").replace("'", "''") + "'"
