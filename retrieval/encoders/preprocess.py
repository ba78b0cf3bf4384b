"""open_clip's evaluation image transform in Pillow and numpy (no torch, no torchvision).

open_clip evaluates with ``Resize`` (shortest side to the input size, or both sides for
``squash``), ``CenterCrop``, ``ToTensor`` and ``Normalize``. torchvision applies the
resize to PIL images with Pillow itself, so repeating its size arithmetic, crop offsets
and float32 arithmetic here gives the same array bit for bit (tested on odd images).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from clipsearch.retrieval.errors import ConfigError
from clipsearch.retrieval.images import to_rgb

if TYPE_CHECKING:
    from PIL import Image

RESIZE_MODES = ("shortest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")


@dataclass(frozen=True, kw_only=True)
class ImagePreprocess:
    """One PIL image -> float32 ``[3, size, size]``, normalised like open_clip's eval transform."""

    # Side of the square model input, in pixels.
    size: int
    # Per-channel mean and std applied after scaling pixels to [0, 1].
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Pillow resampling filter name (open_clip uses "bicubic" for nearly every model).
    interpolation: str = "bicubic"
    # "shortest": shortest side to `size`, then centre crop; "squash": both sides to `size`.
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"image size must be >= 1, got {self.size}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"unsupported interpolation {self.interpolation!r}; expected one of {INTERPOLATIONS}"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(
                f"resize mode {self.resize_mode!r} is not supported outside torch; "
                f"expected one of {RESIZE_MODES} (use the torch backend for this model)"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"mean/std must be 3 numbers (std > 0), got {self.mean}/{self.std}")

    def __call__(self, image: Image.Image) -> np.ndarray:
        from PIL import Image

        im = to_rgb(image)
        resample = getattr(Image.Resampling, self.interpolation.upper())
        s = self.size
        if self.resize_mode == "squash":
            if im.size != (s, s):
                im = im.resize((s, s), resample)
        else:
            im = self._resize_shortest(im, resample)
            im = _center_crop(im, s)
        x = np.asarray(im, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        x = (x - mean) / std
        return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)

    def _resize_shortest(self, im: Image.Image, resample: int) -> Image.Image:
        # torchvision's _compute_resized_output_size: the long side is truncated, not rounded.
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.size * long / short)
        new_w, new_h = (self.size, new_long) if w <= h else (new_long, self.size)
        if (new_w, new_h) == (w, h):
            return im
        return im.resize((new_w, new_h), resample)


def _center_crop(im: Image.Image, s: int) -> Image.Image:
    """torchvision's CenterCrop on PIL: zero-pad when smaller, offsets rounded half to even."""
    from PIL import Image

    w, h = im.size
    if w < s or h < s:
        pad_l, pad_t = (s - w) // 2 if w < s else 0, (s - h) // 2 if h < s else 0
        canvas = Image.new("RGB", (max(w, s), max(h, s)), (0, 0, 0))
        canvas.paste(im, (pad_l, pad_t))
        im = canvas
        w, h = im.size
        if (w, h) == (s, s):
            return im
    top = round((h - s) / 2.0)
    left = round((w - s) / 2.0)
    return im.crop((left, top, left + s, top + s))
