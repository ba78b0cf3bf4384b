"""clipsearch: cross-modal (text <-> image) retrieval with CLIP-style encoders and FAISS.

The front door a backend imports::

    import clipsearch

    engine = clipsearch.SearchEngine.open("my-index")
    results = engine.search("red striped t-shirt", k=5, where="price < 30 and in_stock")
    for hit in results.hits:
        print(hit.rank, hit.score, hit.doc_id, hit.metadata["title"])

Importing it is cheap: every name below is resolved on first use, so torch, open_clip,
faiss and fastapi load only when a function that needs them runs. The subpackages are
``clipsearch.retrieval`` (read side: encoders, store format, query engine, service),
``clipsearch.indexer`` (write side: sources, embed pipeline, shards, commits, training)
and ``clipsearch.cli`` (the ``clipsearch`` command).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> module that defines it (imported on first attribute access).
_EXPORTS: dict[str, str] = {
    # query side
    "SearchEngine": "clipsearch.retrieval.engine",
    "PlannerConfig": "clipsearch.retrieval.planner",
    "SearchOptions": "clipsearch.retrieval.options",
    "SearchResults": "clipsearch.retrieval.results",
    "Hit": "clipsearch.retrieval.results",
    "ComposedQuery": "clipsearch.retrieval.queries",
    "classify": "clipsearch.retrieval.queries",
    "load_encoder": "clipsearch.retrieval.encoders",
    "Encoder": "clipsearch.retrieval.encoders.base",
    "EncoderFingerprint": "clipsearch.retrieval.encoders.base",
    "open_snapshot": "clipsearch.retrieval.store",
    "verify": "clipsearch.retrieval.store",
    "VerifyReport": "clipsearch.retrieval.store",
    "Progress": "clipsearch.retrieval.progress",
    "ProgressCallback": "clipsearch.retrieval.progress",
    # write side
    "build": "clipsearch.indexer.build",
    "add": "clipsearch.indexer.build",
    "BuildOptions": "clipsearch.indexer.build",
    "IndexOptions": "clipsearch.indexer.ann",
    "SourceOptions": "clipsearch.indexer.sources",
    "IngestSummary": "clipsearch.indexer.build",
    "delete": "clipsearch.indexer.maintenance",
    "compact": "clipsearch.indexer.maintenance",
    "info": "clipsearch.indexer.maintenance",
    "DeleteSummary": "clipsearch.indexer.maintenance",
    "CompactSummary": "clipsearch.indexer.maintenance",
    # the error family
    "ClipsearchError": "clipsearch.retrieval.errors",
    "ConfigError": "clipsearch.retrieval.errors",
    "ModelNotFoundError": "clipsearch.retrieval.errors",
    "ImageDecodeError": "clipsearch.retrieval.errors",
    "FingerprintMismatchError": "clipsearch.retrieval.errors",
    "IndexFormatError": "clipsearch.retrieval.errors",
    "IndexNotFoundError": "clipsearch.retrieval.errors",
    "IndexLockedError": "clipsearch.retrieval.errors",
    "FilterError": "clipsearch.retrieval.errors",
    "QueryError": "clipsearch.retrieval.errors",
    "InvalidOptionError": "clipsearch.retrieval.errors",
    "IndexWriteError": "clipsearch.retrieval.errors",
    "SourceError": "clipsearch.retrieval.errors",
}
# Names whose defining function is called something else there.
_RENAMED = {"verify": "verify_index"}

# Literal so that type checkers and IDEs read it; a test keeps it equal to _EXPORTS.
__all__ = [
    "BuildOptions",
    "ClipsearchError",
    "CompactSummary",
    "ComposedQuery",
    "ConfigError",
    "DeleteSummary",
    "Encoder",
    "EncoderFingerprint",
    "FilterError",
    "FingerprintMismatchError",
    "Hit",
    "ImageDecodeError",
    "IndexFormatError",
    "IndexLockedError",
    "IndexNotFoundError",
    "IndexOptions",
    "IndexWriteError",
    "IngestSummary",
    "InvalidOptionError",
    "ModelNotFoundError",
    "PlannerConfig",
    "Progress",
    "ProgressCallback",
    "QueryError",
    "SearchEngine",
    "SearchOptions",
    "SearchResults",
    "SourceError",
    "SourceOptions",
    "VerifyReport",
    "__version__",
    "add",
    "build",
    "classify",
    "compact",
    "delete",
    "info",
    "load_encoder",
    "open_snapshot",
    "verify",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clipsearch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _RENAMED.get(name, name))
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # what type checkers and IDEs see; nothing here runs
    from clipsearch.indexer.ann import IndexOptions
    from clipsearch.indexer.build import BuildOptions, IngestSummary, add, build
    from clipsearch.indexer.maintenance import (
        CompactSummary,
        DeleteSummary,
        compact,
        delete,
        info,
    )
    from clipsearch.indexer.sources import SourceOptions
    from clipsearch.retrieval.encoders import load_encoder
    from clipsearch.retrieval.encoders.base import Encoder, EncoderFingerprint
    from clipsearch.retrieval.engine import SearchEngine
    from clipsearch.retrieval.errors import (
        ClipsearchError,
        ConfigError,
        FilterError,
        FingerprintMismatchError,
        ImageDecodeError,
        IndexFormatError,
        IndexLockedError,
        IndexNotFoundError,
        IndexWriteError,
        InvalidOptionError,
        ModelNotFoundError,
        QueryError,
        SourceError,
    )
    from clipsearch.retrieval.options import SearchOptions
    from clipsearch.retrieval.planner import PlannerConfig
    from clipsearch.retrieval.progress import Progress, ProgressCallback
    from clipsearch.retrieval.queries import ComposedQuery, classify
    from clipsearch.retrieval.results import Hit, SearchResults
    from clipsearch.retrieval.store import VerifyReport, open_snapshot
    from clipsearch.retrieval.store import verify_index as verify
