"""What ``build`` and ``add`` take and report: :class:`BuildOptions` (and the resume key
derived from it), :class:`IngestSummary`, and the two ways an ingest ends early
(:class:`IngestInterrupted`, :class:`TooManyErrorsError`). The ingest itself is
:mod:`clipsearch.indexer.build`, which re-exports these names.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from clipsearch.indexer.ann import IndexOptions
from clipsearch.indexer.fetch import FetchOptions
from clipsearch.indexer.sources import SourceOptions
from clipsearch.retrieval.errors import ClipsearchError, ConfigError
from clipsearch.retrieval.images import DEFAULT_MAX_PIXELS


class IngestInterrupted(KeyboardInterrupt):
    """Ctrl-C during build/add, after the work done so far was saved for resuming.

    A ``KeyboardInterrupt`` (so it stops a program as Ctrl-C does), whose message says
    how many items were kept, where, and that re-running the same command resumes.
    """

    def __init__(self, message: str, *, items_kept: int, total: int, staging: str) -> None:
        super().__init__(message)
        self.message = message
        # Input items whose outcome (vector, skip or flag) is saved for the re-run.
        self.items_kept = items_kept
        # Items of the scan.
        self.total = total
        # The staging folder holding the saved work.
        self.staging = staging

    def __str__(self) -> str:
        return self.message


class TooManyErrorsError(ClipsearchError, RuntimeError):
    """More items failed than ``max_errors`` allows; nothing was committed."""


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    """Options of ``build`` and ``add``."""

    # Rows per shard (per modality). Smaller shards resume faster after a crash and
    # parallelise queries; larger ones get better ANN indexes. 100k x 512 fp16 = 100 MB.
    shard_size: int = 100_000
    # Items per encoder forward pass; None: the encoder's own batch size.
    batch_size: int | None = None
    # Decode/preprocess worker threads.
    workers: int = field(default_factory=lambda: max(1, min(8, os.cpu_count() or 1)))
    # Index type and tuning.
    index: IndexOptions = field(default_factory=IndexOptions)
    # Manifest column mapping and duplicate policy.
    sources: SourceOptions = field(default_factory=SourceOptions)
    # Embedded rows are saved for resuming at least this often (seconds of work an
    # interrupt or a kill can lose), independent of the shard size.
    checkpoint_seconds: float = 30.0
    # ... and at least every this many items (bounds the rows held only in memory).
    checkpoint_items: int = 20_000
    # Largest image file or download read, in bytes; checked before reading.
    max_image_bytes: int = 64 * 1024 * 1024
    # Largest decoded image, in pixels (decompression bombs are refused per item).
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    # Fail (commit nothing) when more items are skipped for errors than this: a count
    # (int >= 0) or a fraction of the input items (float in (0, 1)). None: never fail.
    max_errors: int | float | None = None
    # How http(s) image URLs in manifests are fetched.
    fetch: FetchOptions = field(default_factory=FetchOptions)
    # Metadata columns indexed for lexical (BM25) search, in each shard's ``.lex`` folder
    # (clipsearch.indexer.lexical), e.g. ("title", "brand", "description", "sku");
    # "source" is a text row's text. None: a text row's text plus every string column,
    # when tantivy is installed (the ``hybrid`` extra); (): no lexical part. Given to
    # ``add``, it also gives the existing shards a lexical part over these fields.
    text_fields: tuple[str, ...] | None = None

    # Fields that cannot change the committed rows: a re-run that differs only in them
    # resumes. Every other field (and every field added later) is part of the resume key.
    NOT_IN_RESUME_KEY: ClassVar[frozenset[str]] = frozenset(
        {"workers", "checkpoint_seconds", "checkpoint_items", "max_errors"}
    )

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ConfigError(f"shard size must be >= 1, got {self.shard_size}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if not self.checkpoint_seconds > 0 or self.checkpoint_items < 1:
            raise ConfigError(
                "checkpoint_seconds must be > 0 and checkpoint_items >= 1, got "
                f"{self.checkpoint_seconds} and {self.checkpoint_items}"
            )
        if self.max_image_bytes < 1 or self.max_image_pixels < 1:
            raise ConfigError("max_image_bytes and max_image_pixels must be >= 1")
        if self.text_fields is not None:
            _check_text_field_names(self.text_fields)
        m = self.max_errors
        if m is not None and (
            isinstance(m, bool)
            or (isinstance(m, int) and m < 0)
            or (isinstance(m, float) and not 0 < m < 1)
            or not isinstance(m, int | float)
        ):
            raise ConfigError(
                f"max_errors must be a count >= 0 or a fraction in (0, 1), got {m!r} "
                "(e.g. --max-errors 10 or --max-errors 0.05)"
            )

    def error_limit(self, n_input: int) -> int | None:
        """Skipped items allowed for ``n_input`` input items (None: no limit)."""
        if self.max_errors is None:
            return None
        if isinstance(self.max_errors, float):
            return int(self.max_errors * n_input)
        return self.max_errors


def _check_text_field_names(fields: object) -> None:
    if isinstance(fields, str) or not isinstance(fields, tuple | list):
        raise ConfigError(
            f"text_fields must be a tuple of column names, got {fields!r} "
            "(e.g. --text-fields title,brand,sku)"
        )
    bad = [f for f in fields if not isinstance(f, str) or not f.strip()]
    if bad or len(set(fields)) != len(fields):
        raise ConfigError(
            f"text_fields must name distinct, non-empty columns, got {list(fields)!r} "
            "(e.g. --text-fields title,brand,sku)"
        )
    if fields:
        from clipsearch.retrieval.lexical import require_tantivy

        require_tantivy()


def resume_key(options: Any) -> Any:
    """The JSON-able value of an options object for resume keys: every dataclass field,
    recursively, except the ones its class lists in ``NOT_IN_RESUME_KEY``. A field added
    later is in the key unless declared harmless, so a stale journal is never resumed."""
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        skip: frozenset[str] = getattr(type(options), "NOT_IN_RESUME_KEY", frozenset())
        return {
            f.name: resume_key(getattr(options, f.name))
            for f in dataclasses.fields(options)
            if f.name not in skip
        }
    if isinstance(options, tuple | list):
        return [resume_key(v) for v in options]
    if isinstance(options, dict):
        return {str(k): resume_key(v) for k, v in sorted(options.items())}
    if isinstance(options, Path):
        return str(options)
    if options is None or isinstance(options, bool | int | float | str):
        return options
    raise TypeError(f"resume_key: cannot key a {type(options).__name__}")


@dataclass(frozen=True)
class IngestSummary:
    """What a build or add did. ``indexed + skipped + unchanged == input``."""

    root: str
    version: int
    operation: str
    input: int
    indexed: int
    skipped: int
    unchanged: int
    # Indexed but flagged in the errors report (e.g. truncated texts).
    flagged: int
    # Older rows tombstoned because their document changed.
    replaced: int
    shards_written: int
    shards_resumed: int
    errors_report: str | None
    seconds: float
    by_stage: dict[str, int] = field(default_factory=dict)
    # Most common skip reasons: (stage, reason, items), most items first.
    top_reasons: list[tuple[str, str, int]] = field(default_factory=list)
    # Files in source folders not considered: extension (or reason) -> files.
    not_considered: dict[str, int] = field(default_factory=dict)
    # Items whose outcome an interrupted earlier run had saved (not embedded again).
    items_resumed: int = 0
    # URL fetch counters (fetched, cached, failed, retried, bytes); empty without URLs.
    fetch: dict[str, int] = field(default_factory=dict)

    @property
    def items_per_second(self) -> float:
        return self.input / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "version": self.version,
            "operation": self.operation,
            "input": self.input,
            "indexed": self.indexed,
            "skipped": self.skipped,
            "unchanged": self.unchanged,
            "flagged": self.flagged,
            "replaced": self.replaced,
            "shards_written": self.shards_written,
            "shards_resumed": self.shards_resumed,
            "errors_report": self.errors_report,
            "skipped_by_stage": self.by_stage,
            "top_reasons": [
                {"stage": st, "reason": r, "items": n} for st, r, n in self.top_reasons
            ],
            "not_considered": self.not_considered,
            "items_resumed": self.items_resumed,
            "fetch": self.fetch,
            "seconds": round(self.seconds, 3),
            "items_per_second": round(self.items_per_second, 2),
        }
