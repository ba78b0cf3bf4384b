"""Reading the errors reports of an index: what was skipped or flagged, and why.

Every build/add that skipped or flagged items writes ``errors/vNNNNNN-<op>.parquet``
(columns source, doc_id, stage, reason, action) and lists it in the manifest; the live
manifest carries the reports of every operation behind it. :func:`read_errors` gathers
them for ``clipsearch index errors``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipsearch.indexer.sources import Problem
from clipsearch.retrieval.errors import IndexFormatError


@dataclass(frozen=True)
class ErrorRow:
    """One reported item."""

    version: int
    operation: str
    source: str
    doc_id: str
    stage: str
    reason: str
    action: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "operation": self.operation,
            "source": self.source,
            "doc_id": self.doc_id,
            "stage": self.stage,
            "reason": self.reason,
            "action": self.action,
        }


@dataclass(frozen=True)
class ErrorsReport:
    """The errors reports of the live version of an index."""

    root: str
    version: int
    # Every reported item, oldest operation first.
    rows: tuple[ErrorRow, ...]
    # The report files (relative to the index root).
    files: tuple[str, ...]
    # Most common skip reasons: (stage, reason, items).
    top_reasons: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return sum(r.action == "skipped" for r in self.rows)

    @property
    def flagged(self) -> int:
        return sum(r.action == "kept" for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "version": self.version,
            "files": list(self.files),
            "skipped": self.skipped,
            "flagged": self.flagged,
            "top_reasons": [
                {"stage": st, "reason": r, "items": n} for st, r, n in self.top_reasons
            ],
            "rows": [r.to_dict() for r in self.rows],
        }


def read_errors(root: str | Path) -> ErrorsReport:
    """Every errors report of the index's live version, as rows."""
    from clipsearch.indexer.build import top_reasons
    from clipsearch.retrieval.manifest import read_current
    from clipsearch.retrieval.store import read_metadata

    root = Path(root)
    manifest = read_current(root)
    rows: list[ErrorRow] = []
    for report in manifest.errors:
        path = root / report.file.path
        if not path.is_file():
            raise IndexFormatError(
                f"{path}: the errors report of version {report.version} is missing; "
                "`clipsearch index verify` checks every file"
            )
        table = read_metadata(path)
        for r in table.to_pylist():
            rows.append(
                ErrorRow(
                    version=report.version,
                    operation=report.operation,
                    source=str(r.get("source") or ""),
                    doc_id=str(r.get("doc_id") or ""),
                    stage=str(r.get("stage") or ""),
                    reason=str(r.get("reason") or ""),
                    action=str(r.get("action") or "skipped"),
                )
            )
    problems = [
        Problem(source=r.source, doc_id=r.doc_id, stage=r.stage, reason=r.reason, action=r.action)
        for r in rows
    ]
    return ErrorsReport(
        root=str(root),
        version=manifest.version,
        rows=tuple(rows),
        files=tuple(e.file.path for e in manifest.errors),
        top_reasons=top_reasons(problems),
    )
