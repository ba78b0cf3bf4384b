"""What the batch worker thread runs: groups of queued jobs -> engine calls.

Jobs with identical search options (k, filter, modality, reranking) are answered by one
``engine.search_batch`` call, which encodes all their texts in one encoder call and all
their images in another, and searches every shard once for the whole batch. When a
group's batch call fails (one bad query among good ones), its jobs are retried one by
one so each request gets its own answer or its own error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SearchOptions:
    """Engine keyword arguments shared by every query of one batch group."""

    k: int
    offset: int = 0
    where: str | dict[str, Any] | None = None
    modality: str | None = None
    group_by_doc: bool = False
    mmr: float | None = None
    sort: str | None = None
    min_score: float | None = None

    def group_key(self) -> str:
        """Equal keys <=> the same engine call can answer both (dict filters included)."""
        d = self.kwargs()
        return json.dumps(d, sort_keys=True, default=str)

    def kwargs(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "offset": self.offset,
            "where": self.where,
            "modality": self.modality,
            "group_by_doc": self.group_by_doc,
            "mmr": self.mmr,
            "sort": self.sort,
            "min_score": self.min_score,
        }


@dataclass(frozen=True, kw_only=True, eq=False)
class SearchJob:
    """One query: a str, PIL image, float32 vector or ComposedQuery, plus its options."""

    query: Any
    options: SearchOptions


@dataclass(frozen=True, kw_only=True, eq=False)
class ClassifyJob:
    """Zero-shot classification of one decoded image."""

    image: Any
    labels: tuple[str, ...] = field(default_factory=tuple)


Job = SearchJob | ClassifyJob


def run_jobs(engine: Any, jobs: Sequence[Job]) -> list[Any]:
    """Answer ``jobs`` in order: SearchResults / [(label, p)] or the exception to raise."""
    results: list[Any] = [None] * len(jobs)
    groups: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        if isinstance(job, ClassifyJob):
            results[i] = _guard(lambda job=job: engine.classify(job.image, list(job.labels)))
        else:
            groups.setdefault(job.options.group_key(), []).append(i)
    for members in groups.values():
        options = jobs[members[0]].options  # type: ignore[union-attr]
        queries = [jobs[i].query for i in members]  # type: ignore[union-attr]
        try:
            answers = engine.search_batch(queries, **options.kwargs())
            for i, answer in zip(members, answers, strict=True):
                results[i] = answer
        except Exception as e:
            if len(members) == 1:
                results[members[0]] = e
                continue
            log.debug("batch of %d failed (%s); answering its queries one by one", len(members), e)
            for i in members:
                q = queries[members.index(i)]
                results[i] = _guard(lambda q=q, o=options: engine.search(q, **o.kwargs()))
    return results


def _guard(call: Any) -> Any:
    try:
        return call()
    except Exception as e:
        return e
