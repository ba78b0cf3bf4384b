"""Safe image decoding and conversion to 8-bit RGB.

Every image, at index time and at query time, goes through :func:`load_image` (bytes or
path -> PIL) and :func:`to_rgb` (any mode -> RGB) before an encoder's own preprocessing,
so that a photo is embedded the same way whatever container it arrived in.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import warnings
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps

from clipsearch.retrieval.errors import ImageDecodeError

log = logging.getLogger(__name__)

# Pillow warns from MAX_IMAGE_PIXELS and refuses from twice that. We refuse from the
# warning band already: a 90-megapixel product photo is far more likely an attack or a
# mistake than a photo, and decoding it costs ~270 MB.
DEFAULT_MAX_PIXELS = 89_478_485
# A side this long is absurd for any photo (it is also where some decoders overflow).
MAX_SIDE = 65_500
# Where transparent pixels land: white, as on a product page.
BACKGROUND = (255, 255, 255)

# Images meant for a model are decoded to at least this many times the model's input
# side: libjpeg's DCT scaling then decodes a large JPEG at 1/2, 1/4 or 1/8 scale for a
# fraction of the cost (a 640x480 photo for a 64 px model: ~5x faster), while the final
# resize to the input side stays a real, anti-aliased downscale.
DRAFT_FACTOR = 2

ImageInput = str | os.PathLike[str] | bytes | IO[bytes] | Image.Image


def load_image(
    source: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None
) -> Image.Image:
    """Decode an image from a path, raw bytes, a binary file object, or a PIL image.

    Returns a fully decoded, EXIF-oriented RGB image. This is the one place EXIF
    orientation is applied (encoders' ``to_rgb`` / ``prepare_image`` do not apply it
    again); broken EXIF is ignored, the pixels still decode. Raises :class:`ImageDecodeError`
    (naming the source) for empty, truncated, corrupt, non-image, oversized files.
    ``min_side``: the image is only needed with both sides at least this long (in
    pixels), so a JPEG may be decoded at a reduced scale; None decodes at full size.
    Index and query paths pass the same value for one encoder (see
    ``clipsearch.retrieval.encoders.base.decode_side``), so one file always gives one embedding.
    """
    if isinstance(source, Image.Image):
        return to_rgb(apply_exif_orientation(source))
    name = _describe(source)
    try:
        if isinstance(source, bytes):
            if not source:
                raise ImageDecodeError(f"{name}: empty input (0 bytes); expected an image file")
            fp: IO[bytes] | Path = io.BytesIO(source)
        elif isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if path.stat().st_size == 0:
                raise ImageDecodeError(f"{name}: file is empty (0 bytes); re-export or remove it")
            fp = path  # Image.open owns (and closes) a file it opened from a path
        else:
            fp = source
        with warnings.catch_warnings():
            # Escalate Pillow's DecompressionBombWarning band to an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Broken EXIF is ignored (apply_exif_orientation); Pillow warns as it parses.
            warnings.filterwarnings("ignore", "Corrupt EXIF data", UserWarning)
            with Image.open(fp) as im:
                _check_size(im, name, max_pixels)
                if min_side is not None and im.format == "JPEG":
                    im.draft("RGB", (min_side, min_side))
                im.load()
                return to_rgb(apply_exif_orientation(im))
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageDecodeError(
            f"{name}: refused as a possible decompression bomb ({e}); "
            f"images above {max_pixels:,} pixels are not indexed"
        ) from e
    except OSError as e:  # UnidentifiedImageError and truncated files are OSErrors
        raise ImageDecodeError(f"{name}: cannot decode image ({e})") from e
    except (ValueError, SyntaxError, EOFError) as e:  # corrupt headers surface as these
        raise ImageDecodeError(f"{name}: corrupt image data ({e})") from e


def _describe(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    return getattr(source, "name", "<image stream>")


def _check_size(im: Image.Image, name: str, max_pixels: int) -> None:
    w, h = im.size
    if w <= 0 or h <= 0 or w > MAX_SIDE or h > MAX_SIDE:
        raise ImageDecodeError(f"{name}: absurd dimensions {w}x{h}; sides must be 1..{MAX_SIDE}")
    if w * h > max_pixels:
        raise ImageDecodeError(
            f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,}; "
            "downscale the image or raise max_pixels"
        )


def apply_exif_orientation(im: Image.Image) -> Image.Image:
    """``im`` turned upright by its EXIF orientation tag; unchanged when EXIF is absent or broken.

    Real photos carry malformed EXIF (a block that is not TIFF, truncated entries) that
    Pillow decodes fine but cannot parse: their pixels are still good, so the orientation
    is skipped (logged at debug level) rather than the image rejected.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns "Corrupt EXIF data" as it parses
            return ImageOps.exif_transpose(im) or im
    except (SyntaxError, ValueError, TypeError, KeyError, IndexError, OSError, struct.error) as e:
        log.debug("ignoring unreadable EXIF orientation: %s: %s", type(e).__name__, e)
        return im


def to_rgb(im: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Any PIL image -> 8-bit RGB, alpha composited on ``background``.

    Handles palette images with transparency, LA/RGBA/PA, CMYK, 16-bit and 32-bit integer
    and float grayscale (scaled by their actual range), 1-bit, and YCbCr/LAB/HSV. EXIF
    orientation is not applied here: :func:`load_image` applies it, once.
    """
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        im = _scale_to_8bit(im)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return im.convert("RGB")


def _scale_to_8bit(im: Image.Image) -> Image.Image:
    """Map a high-bit-depth grayscale image onto 0..255 using its nominal range."""
    a = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16"):
        lo, hi = 0.0, 65535.0
    else:  # "I" and "F" have no nominal range: use the data's own.
        lo, hi = float(a.min()), float(a.max())
    scaled = np.zeros_like(a) if hi <= lo else (a - lo) * (255.0 / (hi - lo))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
