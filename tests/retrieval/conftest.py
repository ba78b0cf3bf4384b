"""Indexes shared by the query-engine test modules, built once per session.

One random corpus (``query_fixtures.write_corpus``) and, on demand, one index of each
kind built from it with the real indexer. Tests only read them; tests that delete or
add rows build their own index under ``tmp_path``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from query_fixtures import build_index, write_corpus

N_DOCS = 300


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), N_DOCS)


@pytest.fixture(scope="session")
def built_index(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``built_index(kind)``: the shared index of that kind, built on first request."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = build_index(tmp_path_factory.mktemp(kind), corpus, kind)
        return built[kind]

    return get


@pytest.fixture(params=["flat", "ivf", "hnsw", "ivfpq"])
def index(request: pytest.FixtureRequest, built_index: Callable[[str], Path]) -> Path:
    return built_index(request.param)
