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

from clipsearch.retrieval.filters.compile import CompiledFilter, compile_filter
from clipsearch.retrieval.filters.jsonform import from_json, to_json
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
    columns_of,
)
from clipsearch.retrieval.filters.parser import parse, to_text

__all__ = [
    "COMPARE_OPS",
    "MAX_DEPTH",
    "MAX_FILTER_LENGTH",
    "MAX_IN_VALUES",
    "STRING_OPS",
    "And",
    "Between",
    "Compare",
    "CompiledFilter",
    "In",
    "IsNull",
    "Literal",
    "Node",
    "Not",
    "Or",
    "StringMatch",
    "columns_of",
    "compile_filter",
    "from_json",
    "parse",
    "to_json",
    "to_text",
]
