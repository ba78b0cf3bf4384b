"""What the batch worker threads run: one batch of queued jobs -> engine calls.

Two stages, so the batcher can pipeline them (:mod:`clipsearch.retrieval.service.batching`):
:func:`encode_jobs` (the encoder) and :func:`search_encoded` (the index, facets);
:func:`run_jobs` is both in one call. Every query of the batch is encoded in one pass
(all texts in one encoder call, all images in another, whatever their options), except
lexical-mode queries without MMR, which BM25 alone ranks (no encoder pass: the engine
gets their texts). Then the queries with equal
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

import numpy as np

from clipsearch.retrieval.hybrid import needs_query_vectors, query_text
from clipsearch.retrieval.options import SearchOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, eq=False)
class SearchJob:
    """One query: a str, PIL image, float32 vector or ComposedQuery, plus its options."""

    query: Any
    options: SearchOptions
    # Columns to count facets of (empty: none).
    facets: tuple[str, ...] = ()
    # Facets count the rows scoring at or above this (the query's relevant rows);
    # None: every row the filter allows.
    relevance_cutoff: float | None = None


@dataclass(frozen=True, kw_only=True)
class FacetedResults:
    """A search's results and the facets of its filter / relevant rows."""

    results: Any
    facets: Any  # clipsearch.retrieval.facets.FacetCounts


# Facets over a query's relevant rows count at most this many rows (the best ones):
# the page's numbers describe the results a shopper could page through.
RELEVANT_ROWS = 1000


@dataclass(frozen=True, kw_only=True, eq=False)
class ClassifyJob:
    """Zero-shot classification of one decoded image."""

    image: Any
    labels: tuple[str, ...] = field(default_factory=tuple)


Job = SearchJob | ClassifyJob


@dataclass(eq=False)
class EncodedBatch:
    """Stage 1's output: the jobs, their query vectors (per search, None for a job that
    is not encoded: lexical mode without MMR), or the error that stopped the batch
    encode, and the answers already known (classify jobs)."""

    jobs: Sequence[Job]
    searches: list[tuple[int, SearchJob]]
    vectors: Any = None
    encode_ms: float = 0.0
    error: Exception | None = None
    results: list[Any] = field(default_factory=list)


def run_jobs(engine: Any, jobs: Sequence[Job], faceter: Any = None) -> list[Any]:
    """Answer ``jobs`` in order: SearchResults (FacetedResults when facets were asked
    for) / [(label, p)], or the exception to raise."""
    return search_encoded(engine, encode_jobs(engine, jobs), faceter)


def encode_jobs(engine: Any, jobs: Sequence[Job]) -> EncodedBatch:
    """Stage 1: classify jobs answered, every search query encoded in one pass."""
    results: list[Any] = [None] * len(jobs)
    searches: list[tuple[int, SearchJob]] = []
    for i, job in enumerate(jobs):
        if isinstance(job, ClassifyJob):
            results[i] = _guard(lambda job=job: engine.classify(job.image, list(job.labels)))
        else:
            searches.append((i, job))
    batch = EncodedBatch(jobs=jobs, searches=searches, results=results)
    # Lexical-mode jobs without MMR are not encoded: the engine answers them from the
    # query text (their facets count the word matches).
    encode = [pos for pos, (_, job) in enumerate(searches) if needs_query_vectors(job.options)]
    batch.vectors = [None] * len(searches)
    if encode:
        try:
            vectors, batch.encode_ms = _encode_all(engine, [searches[pos][1] for pos in encode])
        except Exception as e:
            log.debug("batch encode failed (%s); answering its queries one by one", e)
            batch.error = e
        else:
            for row, pos in enumerate(encode):
                batch.vectors[pos] = vectors[row]
    return batch


def search_encoded(engine: Any, batch: EncodedBatch, faceter: Any = None) -> list[Any]:
    """Stage 2: one ``search_batch`` per group of equal options, then facets."""
    results, searches = batch.results, batch.searches
    if not searches:
        return results
    if batch.error is not None:
        for i, job in searches:
            results[i] = _guard(lambda job=job: engine.search(job.query, job.options))
        return results
    vectors = batch.vectors
    groups: dict[str, list[int]] = {}
    for pos, (_, job) in enumerate(searches):
        groups.setdefault(job.options.key(), []).append(pos)
    for members in groups.values():
        options = searches[members[0]][1].options
        try:
            if vectors[members[0]] is None:  # lexical mode: the engine reads the texts
                answers = engine.search_batch([searches[pos][1].query for pos in members], options)
            else:
                # The query texts ride along: lexical / hybrid modes match them by BM25.
                texts = [query_text(searches[pos][1].query) for pos in members]
                queries = [vectors[pos] for pos in members]
                answers = engine.search_batch(queries, options, texts=texts)
                answers = [_with_encode_time(a, batch.encode_ms) for a in answers]
            for pos, answer in zip(members, answers, strict=True):
                results[searches[pos][0]] = answer
        except Exception as e:
            # The options are shared by the whole group (a bad filter fails every query
            # of it alike), so each query gets the same error.
            for pos in members:
                results[searches[pos][0]] = e
    for pos, (i, job) in enumerate(searches):
        if job.facets and not isinstance(results[i], BaseException):
            results[i] = _guard(
                lambda job=job, pos=pos, i=i: _faceted(
                    engine, faceter, job, vectors[pos], results[i]
                )
            )
    return results


def _faceted(engine: Any, faceter: Any, job: SearchJob, vector: Any, results: Any) -> Any:
    """The job's results with facets: over the rows its filter allows or, with a
    relevance cutoff, over its relevant rows: the best RELEVANT_ROWS at or above it, plus
    in hybrid mode the rows holding every query word (a SKU or brand match whose photo
    scores low is listed, so it is counted), and in lexical mode the word matches
    instead (:func:`_word_matches`)."""
    from clipsearch.retrieval.facets import Faceter

    faceter = faceter or Faceter()
    t0 = time.perf_counter()
    opts = job.options
    relevant = None
    if job.relevance_cutoff is not None:
        query = job.query if vector is None else vector  # None: a lexical job, not encoded
        words = _word_matches(engine, job, query, results)
        if words is not None and words[0] == "lexical":
            relevant = words[1]
        else:
            found = _best_rows(engine, query, opts, min_score=job.relevance_cutoff)
            relevant = np.asarray(found.row_ids, np.int64)
            if words is not None:
                relevant = np.union1d(relevant, words[1])
    counts = faceter.count(
        engine,
        job.facets,
        where=opts.where,
        modality=opts.modality,
        relevant_row_ids=relevant,
    )
    timings = dict(results.timings)
    timings["facets"] = round((time.perf_counter() - t0) * 1000, 3)
    return FacetedResults(results=dataclasses.replace(results, timings=timings), facets=counts)


def _best_rows(
    engine: Any, query: Any, opts: SearchOptions, texts: list[str] | None = None, **kw: Any
) -> Any:
    """The best RELEVANT_ROWS rows for ``query`` (its vector, or the query itself; and
    ``texts``) under ``opts``'s filter and modality, with the options ``kw`` (no rerank,
    no paging): facets' view of an answer."""
    options = SearchOptions(k=RELEVANT_ROWS, where=opts.where, modality=opts.modality, **kw)
    return engine.search_batch([query], options, texts=texts)[0]


def _word_matches(
    engine: Any, job: SearchJob, query: Any, results: Any
) -> tuple[str, np.ndarray] | None:
    """``(mode, row ids)`` of the rows an answer in lexical or hybrid mode lists as
    matching the query's words, whatever their photo scores: in lexical mode every row
    holding a word (that is what Words mode lists), in hybrid mode the rows holding every
    word (ranked first, shown as word matches). None for a vector answer (its hits carry
    no ``explain``) or a query without text. At most RELEVANT_ROWS rows."""
    mode = next((h.explain.get("mode") for h in results.hits if h.explain), None)
    text = query_text(job.query)
    if mode not in ("lexical", "hybrid") or not text:
        return None
    # all_words_first marks (and ranks first) the rows holding every word.
    found = _best_rows(engine, query, job.options, [text], mode=mode, all_words_first=True)
    rows = [h.row_id for h in found.hits if mode == "lexical" or (h.explain or {}).get("all_words")]
    return mode, np.asarray(rows, np.int64)


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
