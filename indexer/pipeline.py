"""The embed pipeline: read -> hash -> decode -> prepare (worker threads) -> encode (batches).

Image items are read, hashed, decoded (``clipsearch.retrieval.images.load_image``) and prepared
(``encoder.prepare_image``) in a thread pool; Pillow and numpy release the GIL, so the
workers decode the next batches while the calling thread runs the encoder on the
current one. Results come back in item order, so the shards a build writes do not
depend on thread timing. Every per-item failure becomes a :class:`Embedded` with a
``problem``; nothing raises for one bad file.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipsearch.indexer.sources import Item, Problem
from clipsearch.retrieval.encoders.base import Encoder, decode_side
from clipsearch.retrieval.errors import ImageDecodeError
from clipsearch.retrieval.images import load_image

log = logging.getLogger(__name__)

_BYTESIO = re.compile(r"<_io\.BytesIO object at 0x[0-9a-f]+>")

# Called with an item and its content hash; True means "already indexed unchanged, skip".
SkipFn = Callable[[Item, str], bool]


@dataclass(frozen=True)
class Embedded:
    """The outcome of one item."""

    # Position of the item in the list given to embed_items.
    position: int
    item: Item
    # sha256 hex of the image bytes / UTF-8 text ("" when the file could not be read).
    content_hash: str
    # float32 [dim], or None when the item is skipped.
    vector: np.ndarray | None
    # Why it was skipped, or a flag on a kept item (truncated text); None when clean.
    problem: Problem | None = None
    # True when skip() said the item is already indexed with this content.
    unchanged: bool = False


@dataclass
class _Prepared:
    position: int
    item: Item
    content_hash: str
    array: np.ndarray | None
    problem: Problem | None
    unchanged: bool


def embed_items(
    items: list[Item],
    encoder: Encoder,
    *,
    start: int = 0,
    batch_size: int = 64,
    workers: int = 2,
    skip: SkipFn | None = None,
) -> Iterator[Embedded]:
    """Embed ``items[start:]`` in order. Images and texts may be mixed; each is batched
    separately (a batch flushes when the modality changes)."""
    pos = start
    while pos < len(items):
        end = pos
        modality = items[pos].modality
        while end < len(items) and items[end].modality == modality:
            end += 1
        if modality == "image":
            yield from _embed_images(items, pos, end, encoder, batch_size, workers, skip)
        else:
            yield from _embed_texts(items, pos, end, encoder, batch_size, skip)
        pos = end


def _prepare_one(position: int, item: Item, encoder: Encoder, skip: SkipFn | None) -> _Prepared:
    """Worker: read, hash, skip-check, decode, prepare. Never raises for bad input."""
    try:
        data = Path(item.source).read_bytes()
    except OSError as e:
        reason = f"cannot read file: {e.strerror or e}"
        return _Prepared(position, item, "", None, _problem(item, "read", reason), False)
    digest = hashlib.sha256(data).hexdigest()
    if skip is not None and skip(item, digest):
        return _Prepared(position, item, digest, None, None, True)
    try:
        image = load_image(data, min_side=decode_side(encoder))
        array = encoder.prepare_image(image)
    except ImageDecodeError as e:
        reason = _BYTESIO.sub("the file", str(e).removeprefix(f"<{len(data)} bytes>: "))
        return _Prepared(position, item, digest, None, _problem(item, "decode", reason), False)
    except Exception as e:  # a preprocessing bug in one image must not abort the build
        reason = f"preprocessing failed: {type(e).__name__}: {e}"
        return _Prepared(position, item, digest, None, _problem(item, "decode", reason), False)
    return _Prepared(position, item, digest, array, None, False)


def _problem(item: Item, stage: str, reason: str, action: str = "skipped") -> Problem:
    return Problem(
        source=item.origin or item.source,
        doc_id=item.doc_id,
        stage=stage,
        reason=reason,
        action=action,
    )


def _embed_images(
    items: list[Item],
    start: int,
    end: int,
    encoder: Encoder,
    batch_size: int,
    workers: int,
    skip: SkipFn | None,
) -> Iterator[Embedded]:
    # Enough decoded work queued ahead that the encoder never waits on the workers.
    window = 2 * batch_size + 4 * workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clipsearch-decode") as pool:
        futures: deque[Future[_Prepared]] = deque()
        nxt = start
        pending: list[_Prepared] = []
        n_arrays = 0
        while futures or nxt < end:
            while nxt < end and len(futures) < window:
                futures.append(pool.submit(_prepare_one, nxt, items[nxt], encoder, skip))
                nxt += 1
            prepared = futures.popleft().result()
            pending.append(prepared)
            n_arrays += prepared.array is not None
            if n_arrays >= batch_size:
                yield from _encode_pending(pending, encoder)
                pending, n_arrays = [], 0
        yield from _encode_pending(pending, encoder)


def _encode_pending(pending: list[_Prepared], encoder: Encoder) -> Iterator[Embedded]:
    arrays = [p.array for p in pending if p.array is not None]
    vectors = encoder.encode_prepared(np.stack(arrays)) if arrays else None
    i = 0
    for p in pending:
        vec = None
        if p.array is not None and vectors is not None:
            vec = vectors[i]
            i += 1
        yield Embedded(p.position, p.item, p.content_hash, vec, p.problem, p.unchanged)


def _embed_texts(
    items: list[Item],
    start: int,
    end: int,
    encoder: Encoder,
    batch_size: int,
    skip: SkipFn | None,
) -> Iterator[Embedded]:
    for b0 in range(start, end, batch_size):
        batch = range(b0, min(end, b0 + batch_size))
        hashes = {p: hashlib.sha256(items[p].source.encode("utf-8")).hexdigest() for p in batch}
        todo: list[int] = []
        results: dict[int, Embedded] = {}
        for p in batch:
            item = items[p]
            if not item.source.strip():
                results[p] = Embedded(
                    p, item, hashes[p], None, _problem(item, "text", "empty text")
                )
            elif skip is not None and skip(item, hashes[p]):
                results[p] = Embedded(p, item, hashes[p], None, None, unchanged=True)
            else:
                todo.append(p)
        if todo:
            enc = encoder.encode_texts_detailed([items[p].source for p in todo])
            for j, p in enumerate(todo):
                problem = None
                if bool(enc.truncated[j]):
                    reason = (
                        f"text of {int(enc.n_tokens[j])} tokens truncated to the encoder's "
                        f"context length; indexed from its beginning"
                    )
                    problem = _problem(items[p], "text", reason, action="kept")
                results[p] = Embedded(p, items[p], hashes[p], enc.vectors[j], problem)
        for p in batch:
            yield results[p]
