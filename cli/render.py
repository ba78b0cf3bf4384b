"""Rendering search results for people (a rich table) and scripts (JSON).

The default table is one line per hit: rank, score, doc_id, a title-like column and the
price when the index has one; ``--fields`` replaces the last two with columns of the
user's choice. Ranks are printed as the library reports them (1-based).

Importing this module is cheap (rich only): ``clipsearch --help`` imports it.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.table import Table

if TYPE_CHECKING:
    from clipsearch.retrieval.results import Hit, SearchResults

# Metadata columns that name a product, first match wins (case-insensitive).
TITLE_COLUMNS = ("title", "name", "caption", "text", "description", "label")
# Hit attributes that --fields may name besides metadata columns (rank, score and
# doc_id are always shown).
HIT_FIELDS = ("row_id", "modality", "source")


def title_column(columns: Sequence[str]) -> str | None:
    """The first of :data:`TITLE_COLUMNS` among ``columns`` (case-insensitive), or None."""
    by_lower = {c.lower(): c for c in reversed(columns)}
    return next((by_lower[t] for t in TITLE_COLUMNS if t in by_lower), None)


def default_fields(columns: Sequence[str]) -> list[str]:
    """The default table's extra columns: a title-like column (or ``source``), then price."""
    fields = [title_column(columns) or "source"]
    price = next((c for c in columns if c.lower() == "price"), None)
    return fields + ([price] if price else [])


def parse_fields(spec: str, columns: Sequence[str]) -> list[str]:
    """``"title,price"`` -> ``["title", "price"]``, each a metadata column or hit field.

    Raises ValueError naming an unknown field, a close spelling and every known field.
    """
    wanted = [f.strip() for f in spec.split(",") if f.strip()]
    if not wanted:
        raise ValueError("--fields needs at least one field name, e.g. --fields title,price")
    known = [*columns, *HIT_FIELDS]
    for name in wanted:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown field {name!r}{hint}; fields: {', '.join(known)}")
    return wanted


def _value(hit: Hit, name: str, text_column: str | None) -> Any:
    if name in HIT_FIELDS:
        return getattr(hit, name)
    if name == text_column and hit.modality == "text":
        return hit.source  # the text that matched, not the document's title
    return hit.metadata.get(name)


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def results_table(
    results: SearchResults, fields: Sequence[str], *, text_column: str | None = None
) -> Table:
    """One row per hit: ``#`` (hit.rank), score, doc_id, then ``fields``.

    ``text_column``: the field in which text rows show their own text (the default
    table's title-like column), so a text hit says which text matched.
    """
    table = Table(title=f"{len(results)} results (index version {results.index_version})")
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("doc_id", overflow="fold")
    for name in fields:
        table.add_column(name, overflow="fold")
    for hit in results:
        cells = [_cell(_value(hit, name, text_column)) for name in fields]
        table.add_row(str(hit.rank), f"{hit.score:.3f}", hit.doc_id, *cells)
    return table


def results_json(results: SearchResults, fields: Sequence[str] | None) -> dict[str, Any]:
    """``results.to_dict()``; with ``fields``, each hit's metadata keeps only those columns.

    The hit's own keys (rank, score, doc_id, row_id, modality, source) always stay.
    """
    out = results.to_dict()
    if fields is not None:
        for hit in out["hits"]:
            hit["metadata"] = {k: v for k, v in hit["metadata"].items() if k in fields}
    return out
