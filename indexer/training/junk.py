"""Synthetic non-product images: the stand-in for "a photo of a cat" when none exist.

Real out-of-domain photos (animals, rockets, coffee) cannot be downloaded on the
machines that build clipsearch, so training and evaluation draw their own from four
families. Training uses ``TRAIN_FAMILIES`` as negatives of every caption; the evaluation
reports every family, and ``shapes`` and ``blobs`` are never seen in training, so they
measure how far the rejection generalises.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

FAMILIES = ("noise", "gradient", "shapes", "blobs")
TRAIN_FAMILIES = ("noise", "gradient")
HELD_OUT_FAMILIES = ("shapes", "blobs")


def junk_image(family: str, rng: np.random.Generator, size: int = 128) -> Image.Image:
    """One RGB image of ``family`` (see :data:`FAMILIES`), ``size`` px square."""
    from PIL import Image, ImageDraw, ImageFilter

    if family == "noise":
        # Coloured noise at a random grain: from pixel static to coarse blocks.
        grain = int(rng.choice([1, 2, 4, 8, 16]))
        small = rng.integers(0, 256, (size // grain, size // grain, 3), dtype=np.uint8)
        return Image.fromarray(small).resize((size, size), Image.Resampling.NEAREST)
    if family == "gradient":
        a, b = rng.integers(0, 256, (2, 3))
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
        t = np.clip((np.cos(angle) * xx + np.sin(angle) * yy + 1) / 2, 0, 1)[..., None]
        return Image.fromarray((a * (1 - t) + b * t).astype(np.uint8))
    if family == "shapes":
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 9))):
            x0, y0 = rng.integers(0, size, 2)
            w, h = rng.integers(8, size // 2, 2)
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
            if rng.random() < 0.5:
                draw.ellipse(box, fill=fill)
            else:
                draw.line(box, fill=fill, width=int(rng.integers(2, 10)))
        return image
    if family == "blobs":
        low = rng.normal(0, 1, (6, 6, 3))
        field = np.asarray(
            Image.fromarray(((low - low.min()) / np.ptp(low) * 255).astype(np.uint8)).resize(
                (size, size), Image.Resampling.BICUBIC
            )
        )
        return Image.fromarray(field).filter(ImageFilter.GaussianBlur(2))
    raise ValueError(f"unknown junk family {family!r}; known: {FAMILIES}")


def junk_batch(
    n: int, rng: np.random.Generator, *, size: int, families: tuple[str, ...] = TRAIN_FAMILIES
) -> np.ndarray:
    """uint8 ``[n, 3, size, size]`` images drawn from ``families`` (model input side)."""
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    for i in range(n):
        family = families[int(rng.integers(len(families)))]
        image = junk_image(family, rng, size=size)
        out[i] = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    return out
