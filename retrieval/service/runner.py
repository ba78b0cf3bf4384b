"""What the batch worker thread runs: one batch of queued jobs -> engine calls.

Every query of the batch is encoded in one pass (all texts in one encoder call, all
images in another, whatever their options), then the vectors of queries with equal
:class:`~clipsearch.retrieval.options.SearchOptions` (same ``key()``) go to one
``engine.search_batch`` call each, which scans every shard once for the whole group.
Vector queries search the same rows as the text/image queries they came from (the
engine's default target does not depend on the query type). If encoding the batch fails (one bad query among good ones),
its queries are answered one by one so each request gets its own answer or error.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from clipsearch.retrieval.options import SearchOptions

log = logging.getLogger(__name__)


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
    searches: list[tuple[int, SearchJob]] = []
    for i, job in enumerate(jobs):
        if isinstance(job, ClassifyJob):
            results[i] = _guard(lambda job=job: engine.classify(job.image, list(job.labels)))
        else:
            searches.append((i, job))
    if not searches:
        return results
    try:
        vectors, encode_ms = _encode_all(engine, [job for _, job in searches])
    except Exception as e:
        log.debug("batch encode failed (%s); answering its queries one by one", e)
        for i, job in searches:
            results[i] = _guard(lambda job=job: engine.search(job.query, job.options))
        return results
    groups: dict[str, list[int]] = {}
    for pos, (_, job) in enumerate(searches):
        groups.setdefault(job.options.key(), []).append(pos)
    for members in groups.values():
        options = searches[members[0]][1].options
        try:
            answers = engine.search_batch(list(vectors[members]), options)
            for pos, answer in zip(members, answers, strict=True):
                results[searches[pos][0]] = _with_encode_time(answer, encode_ms)
        except Exception as e:
            # The options are shared by the whole group (a bad filter fails every query
            # of it alike), so each query gets the same error.
            for pos in members:
                results[searches[pos][0]] = e
    return results


def _encode_all(engine: Any, jobs: list[SearchJob]) -> tuple[Any, float]:
    """One encoder pass for every query of the batch: float32 [n, dim] and its time (ms).

    ``encode_queries`` batches all texts into one ``encode_texts`` call and all images
    into one ``encode_images`` call, composed queries included, whatever their options.
    """
    from clipsearch.retrieval.queries import encode_queries

    t0 = time.perf_counter()
    vectors = encode_queries(engine.encoder, [j.query for j in jobs], engine.manifest.dim)
    return vectors, (time.perf_counter() - t0) * 1000


def _with_encode_time(results: Any, encode_ms: float) -> Any:
    """The engine saw vectors; put the batch's encode time back into the timings."""
    timings = dict(results.timings)
    timings["encode"] = round(encode_ms, 3)
    if "total" in timings:
        timings["total"] = round(timings["total"] + encode_ms, 3)
    return dataclasses.replace(results, timings=timings)


def _guard(call: Any) -> Any:
    try:
        return call()
    except Exception as e:
        return e
