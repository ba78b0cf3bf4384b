"""A deterministic, dependency-light encoder for tests and examples.

It behaves cross-modally in one simple, documented way, so tests can check text->image
search without a trained model:

* The first ``len(PALETTE)`` dimensions are *colour slots*. An image puts, in each slot,
  the fraction of its pixels nearest to that palette colour. A text puts 1.0 in the slot
  of every colour word it contains ("red", "grey"/"gray", ...).
* The remaining dimensions are a fixed random projection of the image's 16x16 thumbnail
  (images) or a sum of per-token hash vectors (texts), scaled by ``detail_weight``; they
  make distinct inputs distinct and make texts sharing words close.

So "a red shirt" ranks mostly-red images above mostly-blue ones, and two captions that
share words rank near each other. Vectors are L2-normalised. No torch, no faiss.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from clipsearch.retrieval.encoders.base import (
    BaseEncoder,
    EncoderFingerprint,
    TextEncoding,
    l2_normalize,
)
from clipsearch.retrieval.errors import ConfigError
from clipsearch.retrieval.images import to_rgb

if TYPE_CHECKING:
    from PIL import Image

# Named colours and their sRGB anchors. Order fixes the slot of each colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "blue": (30, 70, 220),
    "purple": (130, 40, 170),
    "pink": (245, 130, 190),
    "brown": (120, 70, 30),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
    "gray": (128, 128, 128),
}
SYNONYMS = {"grey": "gray", "violet": "purple", "navy": "blue"}
_THUMB = 16
_TOKEN = re.compile(r"[a-z0-9]+")


class FakeEncoder(BaseEncoder):
    """Deterministic colour-aware encoder; see the module docstring for its geometry."""

    def __init__(
        self,
        dim: int = 64,
        *,
        seed: int = 0,
        context_length: int = 16,
        detail_weight: float = 0.35,
        batch_size: int = 64,
    ) -> None:
        """
        Args:
            dim: embedding dimension; must leave room for the colour slots.
            seed: changes the detail projections (and so the fingerprint), like new weights.
            context_length: "tokens" per text including start/end, as in CLIP; words beyond
                ``context_length - 2`` are truncated and reported.
            detail_weight: scale of the non-colour dimensions relative to the colour slots.
            batch_size: images per ``encode_prepared`` call in ``encode_images``.
        """
        if dim < len(PALETTE) + 4:
            raise ConfigError(f"FakeEncoder dim must be >= {len(PALETTE) + 4}, got {dim}")
        if context_length < 3:
            raise ConfigError(f"FakeEncoder context_length must be >= 3, got {context_length}")
        self.seed = seed
        self.context_length = context_length
        self.detail_weight = detail_weight
        self.batch_size = batch_size
        self._n_detail = dim - len(PALETTE)
        rng = np.random.default_rng(seed)
        self._projection = rng.standard_normal((3 * _THUMB * _THUMB, self._n_detail)).astype(
            np.float32
        ) / np.sqrt(3 * _THUMB * _THUMB)
        self._anchors = np.array(list(PALETTE.values()), dtype=np.float32) / 255.0
        self._fingerprint = EncoderFingerprint(
            kind="fake",
            arch=f"fake-{dim}",
            pretrained=f"seed={seed};detail={detail_weight}",
            weights_sha256=None,
            dim=dim,
            normalize=True,
            image_size=_THUMB,
            image_mean=(0.0, 0.0, 0.0),
            image_std=(1.0, 1.0, 1.0),
            interpolation="bilinear",
            resize_mode="squash",
            tokenizer="fake-words",
            context_length=context_length,
            backend="numpy",
        )

    def prepare_image(self, image: Image.Image) -> np.ndarray:
        from PIL import Image as PILImage

        thumb = to_rgb(image).resize((_THUMB, _THUMB), PILImage.Resampling.BILINEAR)
        return np.asarray(thumb, dtype=np.float32).transpose(2, 0, 1) / 255.0

    def encode_prepared(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        n = batch.shape[0]
        pixels = batch.reshape(n, 3, -1).transpose(0, 2, 1)  # [n, p, 3]
        dist = ((pixels[:, :, None, :] - self._anchors[None, None]) ** 2).sum(-1)
        nearest = dist.argmin(-1)  # [n, p]
        counts = np.stack([np.bincount(r, minlength=len(PALETTE)) for r in nearest])
        colour = counts.astype(np.float32) / np.float32(pixels.shape[1])
        detail = batch.reshape(n, -1) @ self._projection
        detail = l2_normalize(detail) * self.detail_weight
        return l2_normalize(np.concatenate([colour, detail], axis=1))

    def encode_texts_detailed(self, texts: Sequence[str]) -> TextEncoding:
        if isinstance(texts, str):
            raise TypeError("encode_texts_detailed takes a sequence of strings, not one string")
        limit = self.context_length - 2
        rows, truncated, n_tokens = [], [], []
        for text in texts:
            words = _TOKEN.findall(text.lower())
            n_tokens.append(len(words) + 2)
            truncated.append(len(words) > limit)
            rows.append(self._text_vector(words[:limit]))
        vectors = np.stack(rows) if rows else np.zeros((0, self.dim), np.float32)
        return TextEncoding(
            vectors=vectors,
            truncated=np.array(truncated, dtype=bool),
            n_tokens=np.array(n_tokens, dtype=np.int64),
        )

    def _text_vector(self, words: list[str]) -> np.ndarray:
        colour = np.zeros(len(PALETTE), np.float32)
        detail = np.zeros(self._n_detail, np.float32)
        slots = list(PALETTE)
        for w in words:
            name = SYNONYMS.get(w, w)
            if name in PALETTE:
                colour[slots.index(name)] = 1.0
            detail += self._token_vector(w)
        if detail.any():
            detail = (detail / np.linalg.norm(detail) * self.detail_weight).astype(np.float32)
        v = np.concatenate([colour, detail])
        if not v.any():  # empty text: a fixed unit vector rather than NaN
            v[-1] = 1.0
        return l2_normalize(v[None])[0]

    def _token_vector(self, word: str) -> np.ndarray:
        digest = hashlib.blake2b(f"{self.seed}:{word}".encode(), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        return rng.standard_normal(self._n_detail).astype(np.float32)
