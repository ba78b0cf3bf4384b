"""The embed pipeline: read -> hash -> decode -> prepare (worker threads) -> encode (batches).

Image items are read, hashed, decoded (``clipsearch.retrieval.images.load_image``) and prepared
(``encoder.prepare_image``) in a thread pool; Pillow and numpy release the GIL, so the
workers decode the next batches while the calling thread runs the encoder on the
current one. Results come back in item order, so the shards a build writes do not
depend on thread timing. Every per-item failure becomes a :class:`Embedded` with a
``problem``; nothing raises for one bad file.

Only regular files are read (a FIFO named ``pipe.jpg`` or a row naming ``/dev/zero``
is reported, never opened for a blocking read), and a file's size is checked against
``max_bytes`` before a byte is read. Image URLs go through a
:class:`clipsearch.indexer.fetch.UrlFetcher` (its own concurrency cap, retries, cache).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import stat
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from clipsearch.indexer.fetch import UrlFetcher, is_fetchable
from clipsearch.indexer.sources import Item, Problem
from clipsearch.retrieval.encoders.base import Encoder, decode_side
from clipsearch.retrieval.errors import ImageDecodeError
from clipsearch.retrieval.images import DEFAULT_MAX_PIXELS, load_image
from clipsearch.retrieval.netguard import NetFetchError

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


@dataclass(frozen=True)
class ReadLimits:
    """What an image item may cost to read and decode."""

    # Largest file or download accepted, in bytes (checked before reading).
    max_bytes: int = 64 * 1024 * 1024
    # Largest decoded image, in pixels (Pillow's bomb limit by default).
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Fetches http(s) sources; None: URL items are skipped with a reason.
    fetcher: UrlFetcher | None = None


class ReadError(Exception):
    """Internal: one item could not be read; ``stage`` and ``reason`` go to the report."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


def read_regular_file(path: str, max_bytes: int) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``max_bytes``.

    Opened non-blocking and checked with ``fstat`` on the open descriptor (no race
    between the check and the read); a FIFO, device, socket or folder is refused
    without reading, and so is a file over the cap. Raises :class:`ReadError`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.EISDIR:
            raise ReadError("read", "not a regular file (a folder)") from e
        raise ReadError("read", f"cannot read file: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a plain file")
            raise ReadError("read", f"not a regular file ({kind}); only regular files are read")
        if st.st_size > max_bytes:
            raise ReadError(
                "read",
                f"file is {st.st_size:,} bytes, over the limit of {max_bytes:,} "
                "(raise max_image_bytes / --max-image-mb to index it)",
            )
        os.set_blocking(fd, True)
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:  # grew while we read it
                raise ReadError("read", f"file grew past the limit of {max_bytes:,} bytes")
        return b"".join(chunks)
    except OSError as e:
        raise ReadError("read", f"cannot read file: {e.strerror or e}") from e
    finally:
        os.close(fd)


def read_item_bytes(item: Item, limits: ReadLimits) -> bytes:
    """An image item's bytes: a local regular file, or an http(s) URL through the fetcher."""
    if is_fetchable(item.source):
        if limits.fetcher is None:
            raise ReadError("fetch", "image URLs are not fetched in this run")
        try:
            return limits.fetcher.fetch(item.source)
        except NetFetchError as e:
            raise ReadError("fetch", f"cannot fetch image: {e}") from e
    return read_regular_file(item.source, limits.max_bytes)


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
    limits: ReadLimits | None = None,
) -> Generator[Embedded, None, None]:
    """Embed ``items[start:]`` in order. Images and texts may be mixed; each is batched
    separately (a batch flushes when the modality changes)."""
    limits = limits or ReadLimits()
    pos = start
    while pos < len(items):
        end = pos
        modality = items[pos].modality
        while end < len(items) and items[end].modality == modality:
            end += 1
        if modality == "image":
            yield from _embed_images(items, pos, end, encoder, batch_size, workers, skip, limits)
        else:
            yield from _embed_texts(items, pos, end, encoder, batch_size, skip)
        pos = end


def _prepare_one(
    position: int, item: Item, encoder: Encoder, skip: SkipFn | None, limits: ReadLimits
) -> _Prepared:
    """Worker: read, hash, skip-check, decode, prepare. Never raises for bad input."""
    try:
        data = read_item_bytes(item, limits)
    except ReadError as e:
        return _Prepared(position, item, "", None, _problem(item, e.stage, e.reason), False)
    digest = hashlib.sha256(data).hexdigest()
    if skip is not None and skip(item, digest):
        return _Prepared(position, item, digest, None, None, True)
    try:
        image = load_image(data, max_pixels=limits.max_pixels, min_side=decode_side(encoder))
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
    limits: ReadLimits,
) -> Iterator[Embedded]:
    # URL items wait on the network, not the CPU: extra threads (the fetcher caps how
    # many fetch at once) keep the decoders busy meanwhile.
    if limits.fetcher is not None and any(is_fetchable(items[p].source) for p in range(start, end)):
        workers += limits.fetcher.options.concurrency
    # Enough decoded work queued ahead that the encoder never waits on the workers.
    window = 2 * batch_size + 4 * workers
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clipsearch-decode")
    futures: deque[Future[_Prepared]] = deque()
    try:
        nxt = start
        pending: list[_Prepared] = []
        n_arrays = 0
        while futures or nxt < end:
            while nxt < end and len(futures) < window:
                futures.append(pool.submit(_prepare_one, nxt, items[nxt], encoder, skip, limits))
                nxt += 1
            prepared = futures.popleft().result()
            pending.append(prepared)
            n_arrays += prepared.array is not None
            if n_arrays >= batch_size:
                yield from _encode_pending(pending, encoder)
                pending, n_arrays = [], 0
        yield from _encode_pending(pending, encoder)
    finally:
        # Interrupted (Ctrl-C, consumer stopped): drop the queued work instead of
        # decoding the whole window before returning.
        for f in futures:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


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
