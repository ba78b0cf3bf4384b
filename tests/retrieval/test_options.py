"""SearchOptions: validated once, canonical keys, dict round trip, keyword overrides."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from clipsearch.retrieval.errors import FilterError, QueryError
from clipsearch.retrieval.options import (
    MAX_K,
    MAX_POOL,
    InvalidOptionError,
    SearchOptions,
    resolve_options,
)

BAD_VALUES: list[tuple[str, dict[str, Any]]] = [
    ("k", {"k": 0}),
    ("k", {"k": MAX_K + 1}),
    ("k", {"k": True}),
    ("k", {"k": 2.5}),
    ("offset", {"offset": -1}),
    ("offset", {"offset": "3"}),
    ("offset", {"offset": MAX_POOL, "k": 1}),  # offset + k past the pool
    ("modality", {"modality": "audio"}),
    ("group_by_doc", {"group_by_doc": "median"}),
    ("mmr", {"mmr": 1.5}),
    ("mmr", {"mmr": math.nan}),
    ("mmr", {"mmr": "0.5"}),
    ("min_score", {"min_score": math.inf}),
    ("sort", {"sort": "price:up"}),
    ("sort", {"sort": ":asc"}),
    ("sort", {"sort": 3}),
    ("boosts", {"boosts": {"": 1.0}}),
    ("boosts", {"boosts": {"rating": math.inf}}),
    ("boosts", {"boosts": {"rating": "high"}}),
    ("boosts", {"boosts": [("rating", 1.0), ("rating", 2.0)]}),
    ("boosts", {"boosts": 5}),
    ("where", {"where": "   "}),
    ("where", {"where": 42}),
]


@pytest.mark.parametrize(("option", "values"), BAD_VALUES, ids=[repr(v) for _, v in BAD_VALUES])
def test_each_bad_value_is_a_query_error_naming_the_option(
    option: str, values: dict[str, Any]
) -> None:
    with pytest.raises(QueryError) as e:
        SearchOptions(**values)
    assert isinstance(e.value, InvalidOptionError) and e.value.option == option
    assert ("boost" if option == "boosts" else option) in str(e.value)


def test_a_malformed_filter_is_a_filter_error_before_any_index_is_open() -> None:
    with pytest.raises(FilterError):
        SearchOptions(where="price <")
    with pytest.raises(FilterError):
        SearchOptions(where={"op": "~"})


def test_values_are_normalised_so_equal_options_have_equal_keys() -> None:
    a = SearchOptions(
        k=5,
        group_by_doc=True,
        mmr=1,
        boosts={"rating": 1, "price": -0.5},
        where={"op": "<", "column": "price", "value": 30},
    )
    b = SearchOptions(
        k=5,
        group_by_doc="max",
        mmr=1.0,
        boosts=[("price", -0.5), ("rating", 1.0)],
        where={"value": 30, "column": "price", "op": "<"},
    )
    assert a == b and a.key() == b.key() and hash(a) == hash(b)
    assert a.boosts == (("price", -0.5), ("rating", 1.0)) and a.group_by_doc == "max"
    assert a.key() != a.replace(k=6).key()
    assert a.key() != a.replace(boosts={"rating": 1.0}).key()
    assert SearchOptions(group_by_doc=False).group_by_doc is None


def test_to_dict_from_dict_round_trip_through_json() -> None:
    options = SearchOptions(
        k=7,
        offset=14,
        where="price < 30 and in_stock",
        modality="text",
        group_by_doc="mean",
        mmr=0.4,
        sort="price:desc",
        min_score=0.1,
        boosts={"rating": 0.01},
    )
    d = options.to_dict()
    assert d["boosts"] == {"rating": 0.01} and d["where"] == "price < 30 and in_stock"
    assert SearchOptions.from_dict(json.loads(json.dumps(d))) == options
    assert SearchOptions.from_dict(SearchOptions().to_dict()) == SearchOptions()


def test_unknown_option_names_are_rejected_by_name() -> None:
    with pytest.raises(InvalidOptionError, match="top_k") as e:
        SearchOptions.from_dict({"k": 3, "top_k": 5})
    assert e.value.option == "top_k" and "known: " in str(e.value)
    with pytest.raises(QueryError, match="filter"):
        resolve_options(SearchOptions(), {"filter": "price < 3"})


def test_overrides_apply_on_top_of_options_and_are_validated() -> None:
    base = SearchOptions(k=3, mmr=0.5)
    assert resolve_options(base, {"k": 5}) == SearchOptions(k=5, mmr=0.5)
    assert resolve_options(None, None) == SearchOptions()
    with pytest.raises(InvalidOptionError, match="mmr"):
        resolve_options(base, {"mmr": 2.0})
    with pytest.raises(InvalidOptionError, match="SearchOptions"):
        resolve_options({"k": 5}, None)  # type: ignore[arg-type]


def test_engine_search_takes_options_and_keyword_overrides(
    built_index: Callable[[str], Path],
) -> None:
    from clipsearch.retrieval.engine import SearchEngine

    with SearchEngine.open(built_index("flat")) as engine:
        options = SearchOptions(k=3, modality="text")
        assert len(engine.search("red shirt", options)) == 3
        overridden = engine.search("red shirt", options, k=5)
        assert len(overridden) == 5 and {h.modality for h in overridden} == {"text"}
        assert [h.rank for h in overridden] == [1, 2, 3, 4, 5]
        page2 = engine.search("red shirt", options, offset=3)
        assert [h.rank for h in page2] == [4, 5, 6]
        assert page2.row_ids[:2] == overridden.row_ids[3:]
        batch = engine.search_batch(["red shirt", "blue shoe"], options)
        assert [len(r) for r in batch] == [3, 3]
        with pytest.raises(InvalidOptionError, match="top_k"):
            engine.search("red", options, top_k=5)  # type: ignore[call-arg]
        with pytest.raises(InvalidOptionError, match="k must be"):
            engine.search("red", k=0)
