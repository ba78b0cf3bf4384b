"""Procedural product photos for the demo catalog, drawn with PIL.

A photo is a product silhouette (one per kind) filled with a colour and a pattern, on a
random two-tone background, at a random position and scale, under random lighting (a
brightness factor and a directional gradient), sometimes slightly blurred. The random
parts are there so that a model trained on these photos has to learn kind, colour and
pattern rather than memorise pixels. The back view of a product is drawn mirrored, with
a different camera and background, so its two photos are not near-duplicates.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from clipsearch.indexer.demo.catalog import COLOURS, Product

# Rendering side in pixels. Small on purpose: thousands of photos render in seconds and
# the demo model sees 64x64 anyway.
IMAGE_SIZE = 128
# Work in a unit box [0, 1]^2 scaled onto the object's square on the canvas.
Box = tuple[float, float, float]  # (left, top, side) in pixels
Shape = Callable[[ImageDraw.ImageDraw, Box, bool], None]


def _p(box: Box, x: float, y: float) -> tuple[float, float]:
    left, top, side = box
    return (left + x * side, top + y * side)


def _poly(draw: ImageDraw.ImageDraw, box: Box, pts: list[tuple[float, float]]) -> None:
    draw.polygon([_p(box, x, y) for x, y in pts], fill=255)


def _rect(draw: ImageDraw.ImageDraw, box: Box, x0: float, y0: float, x1: float, y1: float) -> None:
    draw.rectangle([_p(box, x0, y0), _p(box, x1, y1)], fill=255)


def _ellipse(
    draw: ImageDraw.ImageDraw, box: Box, x0: float, y0: float, x1: float, y1: float
) -> None:
    draw.ellipse([_p(box, x0, y0), _p(box, x1, y1)], fill=255)


def _tshirt(d: ImageDraw.ImageDraw, b: Box, back: bool) -> None:
    _poly(
        d,
        b,
        [(0.3, 0.08), (0.42, 0.12), (0.58, 0.12), (0.7, 0.08), (0.98, 0.28), (0.86, 0.44),
         (0.76, 0.36), (0.76, 0.95), (0.24, 0.95), (0.24, 0.36), (0.14, 0.44), (0.02, 0.28)],
    )  # fmt: skip


def _dress(d: ImageDraw.ImageDraw, b: Box, back: bool) -> None:
    _poly(d, b, [(0.36, 0.05), (0.42, 0.05), (0.44, 0.16), (0.56, 0.16), (0.58, 0.05),
                 (0.64, 0.05), (0.66, 0.42), (0.9, 0.96), (0.1, 0.96), (0.34, 0.42)])  # fmt: skip


def _sneaker(d: ImageDraw.ImageDraw, b: Box, back: bool) -> None:
    _poly(d, b, [(0.04, 0.62), (0.08, 0.36), (0.36, 0.3), (0.5, 0.42), (0.8, 0.5),
                 (0.97, 0.6), (0.97, 0.74), (0.04, 0.74)])  # fmt: skip


def _boot(d: ImageDraw.ImageDraw, b: Box, back: bool) -> None:
    _poly(d, b, [(0.22, 0.04), (0.56, 0.04), (0.58, 0.56), (0.9, 0.7), (0.94, 0.88),
                 (0.2, 0.88)])  # fmt: skip


def _hat(d: ImageDraw.ImageDraw, b: Box, back: bool) -> None:
    _ellipse(d, b, 0.02, 0.58, 0.98, 0.86)
    _poly(d, b, [(0.24, 0.72), (0.28, 0.22), (0.5, 0.14), (0.72, 0.22), (0.76, 0.72)])


def _bag(d: ImageDraw.ImageDraw, b: Box, back: bool) -> None:
    _left, _top, side = b
    d.arc([_p(b, 0.28, 0.06), _p(b, 0.72, 0.5)], 180, 360, fill=255, width=max(3, int(side * 0.07)))
    _poly(d, b, [(0.12, 0.3), (0.88, 0.3), (0.96, 0.94), (0.04, 0.94)])


def _mug(d: ImageDraw.ImageDraw, b: Box, back: bool) -> None:
    _left, _top, side = b
    d.ellipse([_p(b, 0.6, 0.3), _p(b, 0.96, 0.72)], outline=255, width=max(3, int(side * 0.09)))
    _rect(d, b, 0.1, 0.14, 0.74, 0.92)


def _lamp(d: ImageDraw.ImageDraw, b: Box, back: bool) -> None:
    _poly(d, b, [(0.3, 0.04), (0.7, 0.04), (0.92, 0.5), (0.08, 0.5)])
    _rect(d, b, 0.46, 0.5, 0.54, 0.86)
    _ellipse(d, b, 0.24, 0.82, 0.76, 0.96)


def _chair(d: ImageDraw.ImageDraw, b: Box, back: bool) -> None:
    _rect(d, b, 0.2, 0.04, 0.8, 0.5)
    _rect(d, b, 0.12, 0.48, 0.88, 0.66)
    for x0 in (0.14, 0.76):
        _rect(d, b, x0, 0.64, x0 + 0.1, 0.97)


def _watch(d: ImageDraw.ImageDraw, b: Box, back: bool) -> None:
    _rect(d, b, 0.32, 0.0, 0.68, 1.0)
    _ellipse(d, b, 0.16, 0.22, 0.84, 0.78)


SHAPES: dict[str, Shape] = {
    "t-shirt": _tshirt,
    "dress": _dress,
    "sneaker": _sneaker,
    "boot": _boot,
    "hat": _hat,
    "bag": _bag,
    "mug": _mug,
    "lamp": _lamp,
    "chair": _chair,
    "watch": _watch,
}


def _luminance(rgb: tuple[int, int, int]) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def _texture(product: Product, rng: np.random.Generator, size: int) -> Image.Image:
    """The product's colour and pattern over the whole canvas (the silhouette cuts it)."""
    base = np.array(COLOURS[product.colour], dtype=np.float64)
    base = np.clip(base + rng.normal(0, 8, 3), 0, 255)
    base_rgb = (int(base[0]), int(base[1]), int(base[2]))
    # Stripes and dots contrast with the base; checks use a shade of the base, so that a
    # checked item still reads as its own colour.
    contrast = (35, 35, 45) if _luminance(base_rgb) > 170 else (245, 245, 240)
    shade_factor = 0.55 if _luminance(base_rgb) > 60 else 3.2
    shade = tuple(
        int(min(255, c * shade_factor + (40 if shade_factor > 1 else 0))) for c in base_rgb
    )
    img = Image.new("RGB", (size, size), base_rgb)
    draw = ImageDraw.Draw(img)
    period = int(rng.integers(13, 21))
    offset = int(rng.integers(period))
    if product.pattern == "striped":
        width = max(3, period // 3)
        vertical = rng.random() < 0.3
        for pos in range(-period + offset, size, period):
            if vertical:
                draw.rectangle([pos, 0, pos + width - 1, size], fill=contrast)
            else:
                draw.rectangle([0, pos, size, pos + width - 1], fill=contrast)
    elif product.pattern == "dotted":
        radius = max(2, period // 5)
        for row, y in enumerate(range(-period + offset, size + period, period)):
            shift = period // 2 if row % 2 else 0
            for x in range(-period + offset + shift, size + period, period):
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=contrast)
    elif product.pattern == "checked":
        cell = max(6, period // 2 + 2)
        for i, y in enumerate(range(-cell + offset, size, cell)):
            for j, x in enumerate(range(-cell + offset, size, cell)):
                if (i + j) % 2:
                    draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=shade)
    return img


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A muted two-tone vertical gradient (wall to floor), like a studio backdrop."""
    # Near-grey with a faint tint: a saturated backdrop would compete with the product.
    top = rng.uniform(145, 230) + rng.normal(0, 9, 3)
    bottom = top * rng.uniform(0.7, 0.95) + rng.normal(0, 10, 3)
    t = np.linspace(0, 1, size)[:, None, None]
    grad = top[None, None, :] * (1 - t) + bottom[None, None, :] * t
    arr = np.broadcast_to(grad, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def render_photo(product: Product, view: str, seed: int, index: int) -> Image.Image:
    """One photo of ``product`` (``view`` is "front" or "back"), deterministic per arguments."""
    view_no = 0 if view == "front" else 1
    rng = np.random.default_rng([seed, index, 1, view_no])
    size = IMAGE_SIZE
    canvas = _background(rng, size)
    side = float(rng.uniform(0.58, 0.9)) * size
    left = float(rng.uniform(0.02 * size, size - side - 0.02 * size))
    top = float(rng.uniform(0.02 * size, size - side - 0.02 * size))
    mask = Image.new("L", (size, size), 0)
    SHAPES[product.kind](ImageDraw.Draw(mask), (left, top, side), view == "back")
    if view == "back":
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # A soft drop shadow under the object grounds it on the backdrop.
    shadow = mask.filter(ImageFilter.GaussianBlur(3)).point(lambda v: int(v * 0.35))
    dx, dy = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    canvas.paste((20, 20, 20), (dx, dy), shadow)
    canvas.paste(_texture(product, rng, size), (0, 0), mask)
    outline = mask.filter(ImageFilter.FIND_EDGES).point(lambda v: 90 if v > 60 else 0)
    canvas.paste((15, 15, 15), (0, 0), outline)
    return _light(canvas, rng)


def _light(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Random exposure, a directional light gradient, and sometimes a little blur."""
    arr = np.asarray(img, dtype=np.float32)
    size = arr.shape[0]
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) * rng.uniform(0.0, 0.3)
    gain = rng.uniform(0.82, 1.12) * (1.0 + ramp)
    arr = arr * gain[:, :, None] + rng.normal(0, 2.0, arr.shape)
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.25:
        out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.8))))
    return out


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes of ``img``; deterministic for a given Pillow/libjpeg build."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()
