"""Decoding query images under a memory budget shared by every request.

A 113 KB PNG can declare 40 MP of zeros: decoding it costs ~160 MB (Pillow keeps RGB
as 4 bytes per pixel) plus a converted copy, and the decoded image lives until the
encoder has seen it. Limits per request (bytes, pixels) do not bound what N concurrent
requests hold together, so decoding goes through one :class:`PixelBudget` per app:

1. the header is read (in a worker thread) and the pixel cost computed, at the size
   the image will really be decoded at (JPEGs are decoded at a reduced DCT scale when
   the encoder needs fewer pixels, see ``load_image``'s ``min_side``);
2. the request waits, first come first served, until that many pixels fit in the
   budget (or gets 504 at its deadline);
3. the image is decoded in a worker thread, and its pixels stay charged to the budget
   until the decoded image is freed (the encoder has embedded it, or the request gave
   up), whoever drops it last;
4. when the budget falls idle after large images, freed heap memory is handed back to
   the operating system (glibc ``malloc_trim``), so one burst does not leave the
   process gigabytes larger.

Any bytes at all give either an RGB image or a 4xx :class:`ApiError`: a decoder bug on
hostile input is a ``bad_image``, never a 500.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import io
import logging
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clipsearch.retrieval.errors import ImageDecodeError
from clipsearch.retrieval.images import load_image
from clipsearch.retrieval.service.admission import check_image_bytes, remaining
from clipsearch.retrieval.service.errors import ApiError, scrub

if TYPE_CHECKING:
    from PIL import Image

    from clipsearch.retrieval.service.config import ServiceConfig

log = logging.getLogger(__name__)

# Longest side over shortest side beyond which an image is refused: an encoder that
# resizes the shortest side to 224 px would blow a 1 x 40,000 strip up to 224 x 9 M.
MAX_ASPECT_RATIO = 32
# Pixels released since the last trim after which an idle budget trims the heap
# (~a 16 MP photo); small images are not worth the system call.
TRIM_AFTER_PIXELS = 16_000_000


@dataclass(eq=False)
class _Waiter:
    pixels: int
    future: asyncio.Future[None]
    loop: asyncio.AbstractEventLoop
    granted: bool = False


class PixelBudget:
    """A counting semaphore on decoded pixels, shared by all requests of one app.

    ``acquire`` waits in arrival order (a large image at the head is not starved by a
    stream of small ones); ``release`` may be called from any thread (the batch worker
    often drops the last reference to an image). ``on_idle`` runs (in a daemon thread)
    when the budget falls to zero in use after at least ``trim_after`` pixels were
    released since it last ran.
    """

    def __init__(
        self,
        capacity: int,
        *,
        on_idle: Callable[[], object] | None = None,
        trim_after: int = TRIM_AFTER_PIXELS,
    ) -> None:
        # Pixels that may be held at once.
        self.capacity = capacity
        self.on_idle = on_idle
        self.trim_after = trim_after
        self._used = 0
        self._released = 0
        self._lock = threading.Lock()
        self._waiters: collections.deque[_Waiter] = collections.deque()

    @property
    def in_use(self) -> int:
        return self._used

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self, pixels: int) -> bool:
        """Take ``pixels`` if they fit now and nobody waits; never blocks. Thread-safe."""
        with self._lock:
            if self._waiters or self._used + pixels > self.capacity:
                return False
            self._used += pixels
            return True

    async def acquire(self, pixels: int, *, timeout: float) -> None:
        """Take ``pixels`` (1..capacity) from the budget; TimeoutError after ``timeout`` s."""
        if not 0 < pixels <= self.capacity:
            raise ValueError(f"pixels must be in 1..{self.capacity}, got {pixels}")
        loop = asyncio.get_running_loop()
        if self.try_acquire(pixels):
            return
        with self._lock:
            if not self._waiters and self._used + pixels <= self.capacity:  # freed meanwhile
                self._used += pixels
                return
            waiter = _Waiter(pixels, loop.create_future(), loop)
            self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter.future, timeout=max(timeout, 0.0))
        except BaseException:
            with self._lock:
                granted = waiter.granted
                if not granted:
                    self._waiters.remove(waiter)
                    self._grant()  # the head may have left: those behind it may fit
            if granted:
                self.release(pixels)
            raise

    def release(self, pixels: int) -> None:
        """Give back ``pixels`` taken by :meth:`acquire`. Thread-safe."""
        with self._lock:
            self._used -= pixels
            self._released += pixels
            self._grant()
            idle = self._used == 0 and self._released >= self.trim_after
            if idle:
                self._released = 0
        if idle and self.on_idle is not None:
            threading.Thread(target=self.on_idle, name="clipsearch-trim", daemon=True).start()

    def hold(self, image: Image.Image, pixels: int) -> Image.Image:
        """Keep ``pixels`` charged until ``image`` is garbage: its finalizer releases them."""
        weakref.finalize(image, self.release, pixels)
        return image

    def _grant(self) -> None:
        # Called with the lock held: admit waiters from the head while they fit.
        while self._waiters and self._used + self._waiters[0].pixels <= self.capacity:
            waiter = self._waiters.popleft()
            self._used += waiter.pixels
            waiter.granted = True
            try:
                waiter.loop.call_soon_threadsafe(_resolve, waiter.future)
            except RuntimeError:  # its loop has closed: nobody waits for these pixels
                self._used -= waiter.pixels


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_trim_lock = threading.Lock()
# glibc mallopt parameter: allocations at least this large are mmapped.
_M_MMAP_THRESHOLD = -3
# Pillow allocates image memory in 16 MB blocks. Above this threshold they are mmapped
# and unmapped on free, instead of landing in the heap arena of whichever worker thread
# decoded them, where glibc keeps them (each of the executor's threads keeps its own
# arena: N threads can retain N decodes' worth). Smaller allocations are unaffected.
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 (glibc only)
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
    return libc


def map_large_allocations() -> bool:
    """Make glibc mmap allocations of ``MMAP_THRESHOLD_BYTES`` and more (decoded images),
    so freeing one returns its memory at once. Process-wide; False when not glibc."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def return_memory() -> bool:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim(0)``); False elsewhere."""
    libc = _libc()
    if libc is None:
        return False
    trim = libc.malloc_trim
    if not _trim_lock.acquire(blocking=False):
        return True  # another thread is trimming right now
    try:
        trim(ctypes.c_size_t(0))
    finally:
        _trim_lock.release()
    return True


# ---------------------------------------------------------------------------- decoding


def too_many_pixels(
    field: str, config: ServiceConfig, width: int | None = None, height: int | None = None
) -> ApiError:
    size = f"{width}x{height} = {width * height:,} pixels" if width and height else "too large"
    return ApiError(
        413,
        "image_too_many_pixels",
        f"{field}: image is {size}; the limit is {config.max_image_pixels:,} pixels. "
        "Downscale it before searching",
        details={
            "field": field,
            "limit": config.max_image_pixels,
            **({"width": width, "height": height} if width and height else {}),
        },
    )


def bad_image(field: str, message: str, raw: bytes) -> ApiError:
    return ApiError(
        400, "bad_image", f"{field}: {scrub(message)}", details={"field": field, "bytes": len(raw)}
    )


def decode_cost(
    raw: bytes, config: ServiceConfig, *, field: str, min_side: int | None = None
) -> int:
    """Pixels decoding ``raw`` will allocate, from its header alone. Blocking.

    413 when the declared size exceeds ``max_image_pixels`` (whatever Pillow's own bomb
    limit says), 400 for an absurd aspect ratio; 1 when the header does not parse (the
    decoder then reports why, at no cost).
    """
    from PIL import Image

    check_image_bytes(raw, config, field=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as probe:
                width, height = probe.size
                if width * height > config.max_image_pixels:
                    raise too_many_pixels(field, config, width, height)
                if min(width, height) > 0 and max(width, height) > MAX_ASPECT_RATIO * min(
                    width, height
                ):
                    raise ApiError(
                        400,
                        "bad_image",
                        f"{field}: image is {width}x{height}; one side may be at most "
                        f"{MAX_ASPECT_RATIO}x the other. Crop or pad it",
                        details={"field": field, "width": width, "height": height},
                    )
                if min_side is not None and probe.format == "JPEG":
                    probe.draft("RGB", (min_side, min_side))  # what load_image will do
                    width, height = probe.size
    except ApiError:
        raise
    except Image.DecompressionBombError:
        # Pillow refuses to even open beyond twice its MAX_IMAGE_PIXELS.
        raise too_many_pixels(field, config) from None
    except Exception:
        return 1
    return max(1, width * height)


def decode_image(
    raw: bytes, config: ServiceConfig, *, field: str, min_side: int | None = None
) -> Image.Image:
    """Image bytes -> RGB PIL image, or a 4xx ApiError for anything else. Blocking.

    Enforces the byte and pixel limits (the header is checked before decoding, so a
    decompression bomb costs nothing). Whatever the decoder raises on hostile bytes
    becomes 400 ``bad_image``; unexpected exception types are logged, since they point
    at a decoder bug.
    """
    decode_cost(raw, config, field=field, min_side=min_side)  # the 413s, before decoding
    try:
        image = load_image(raw, max_pixels=config.max_image_pixels, min_side=min_side)
        if image.mode != "RGB" or min(image.size) < 1:
            raise ImageDecodeError(f"decoded to an unusable {image.mode} {image.size} image")
        return image
    except ImageDecodeError as e:
        raise bad_image(field, str(e), raw) from e
    except MemoryError as e:
        raise ApiError(
            503, "out_of_memory", f"{field}: not enough memory to decode the image now"
        ) from e
    except Exception as e:
        log.warning("decoder failed on a %d-byte query image", len(raw), exc_info=True)
        raise bad_image(field, f"cannot decode image ({type(e).__name__})", raw) from e


def _decode_held(
    raw: bytes,
    config: ServiceConfig,
    budget: PixelBudget,
    cost: int,
    *,
    field: str,
    min_side: int | None,
) -> Image.Image:
    try:
        image = decode_image(raw, config, field=field, min_side=min_side)
    except BaseException:
        budget.release(cost)
        raise
    return budget.hold(image, cost)


async def decode_image_async(
    raw: bytes,
    config: ServiceConfig,
    budget: PixelBudget,
    *,
    field: str,
    deadline: float,
    min_side: int | None = None,
    held: int = 0,
) -> Image.Image:
    """Decode ``raw`` in a worker thread within ``budget`` and the request deadline.

    The returned image's pixels stay charged to ``budget`` until it is garbage.
    504 ``deadline_exceeded`` when the budget or the decoder do not make it in time.
    ``held``: pixels this request already holds (earlier terms of a composed query);
    an image that could never fit beside them is 413 at once instead of a wait that
    only the deadline ends.
    """
    try:
        cost = await asyncio.wait_for(
            asyncio.to_thread(decode_cost, raw, config, field=field, min_side=min_side),
            timeout=remaining(deadline),
        )
        cost = min(cost, budget.capacity)
        if held + cost > budget.capacity:
            raise ApiError(
                413,
                "image_too_many_pixels",
                f"{field}: the images of this request together exceed the server's decode "
                f"budget of {budget.capacity:,} pixels; send smaller images",
                details={"field": field, "limit": budget.capacity},
            )
        try:
            await budget.acquire(cost, timeout=remaining(deadline))
        except TimeoutError as e:
            raise ApiError(
                504,
                "deadline_exceeded",
                f"{field}: the server is decoding other large images; the request deadline "
                "passed while it waited. Retry, or send a smaller image",
            ) from e
        return await asyncio.wait_for(
            asyncio.to_thread(
                _decode_held, raw, config, budget, cost, field=field, min_side=min_side
            ),
            timeout=remaining(deadline),
        )
    except TimeoutError as e:
        raise ApiError(504, "deadline_exceeded", f"{field}: decoding took too long") from e
