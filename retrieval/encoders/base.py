"""The encoder protocol and the fingerprint that ties an index to its encoder.

An encoder turns images and texts into float32 vectors of one dimension ``dim``, L2
normalised unless its fingerprint says otherwise. Two encoders with equal fingerprints
produce interchangeable vectors; an index refuses an encoder whose fingerprint differs.

Images go through two steps so the indexer can overlap them: ``prepare_image`` (decode
side, thread-safe, runs in worker threads) turns one PIL image into a float32 array
``[C, H, W]``; ``encode_prepared`` turns a stacked batch ``[n, C, H, W]`` into vectors.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from clipsearch.retrieval.errors import ConfigError
from clipsearch.retrieval.images import DRAFT_FACTOR, ImageInput, load_image

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

# Fingerprint fields that say how vectors were computed, not which vectors come out.
RECORDED_ONLY = ("backend",)
# Calls with at most this many items are queries (a search encodes 1-4 items); larger
# ones are indexing batches. Encoders run them with different thread counts.
QUERY_BATCH = 4
# Intra-op threads per query forward pass by default. A one-query pass gains little from
# more threads, and a pool spinning on a loaded CPU made a filtered query's p90 524 ms
# against 12.7 ms on one thread (issue 11; ``benchmarks/query_threads.py``).
QUERY_THREADS = 1


@dataclass(frozen=True, kw_only=True)
class EncoderFingerprint:
    """Everything that determines the vectors an encoder produces.

    Stored in every index manifest; compared field by field when an index is opened.
    """

    # Encoder family: "open_clip" or "fake".
    kind: str
    # open_clip architecture name (e.g. "ViT-B-32", "clipsearch-demo"); "fake-<dim>" for fakes.
    arch: str
    # Pretrained tag ("laion2b_s34b_b79k"), checkpoint path, "hf-hub:..." id, or "" for random init.
    pretrained: str
    # sha256 of the weights file, when the weights come from one file; None otherwise.
    weights_sha256: str | None
    # Embedding dimension.
    dim: int
    # Whether output vectors are L2-normalised (the metric is then cosine == inner product).
    normalize: bool
    # Side of the square image the model sees, in pixels.
    image_size: int
    # Per-channel normalisation applied after scaling pixels to [0, 1].
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    # Resize interpolation ("bicubic", "bilinear") and mode ("shortest", "squash", ...).
    interpolation: str
    resize_mode: str
    # Tokenizer identity (e.g. "clip-bpe") and the text context length in tokens.
    tokenizer: str
    context_length: int
    # What computed the vectors: "torch", "onnx" or "numpy" (the fake). Recorded, but not
    # compared (like precision): an ONNX export is checked against its torch model at
    # cosine >= 0.999 when exported, so either backend answers an index built by the other.
    backend: str = field(default="torch", compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderFingerprint:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they mean a newer format)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        # Manifests written before backends were recorded lack "backend": torch made them.
        missing = names - set(d) - {"backend"}
        if unknown or missing:
            raise ConfigError(
                f"encoder fingerprint has unknown fields {sorted(unknown)} and lacks {sorted(missing)}; "
                "the index was written by a different clipsearch version"
            )
        d = dict(d)
        d["image_mean"] = tuple(float(x) for x in d["image_mean"])
        d["image_std"] = tuple(float(x) for x in d["image_std"])
        return cls(**d)

    def diff(self, other: EncoderFingerprint) -> dict[str, tuple[Any, Any]]:
        """Fields that differ, as ``{name: (self_value, other_value)}``; empty when equal.

        Only fields that change the vectors count: ``backend`` is recorded, not compared.
        """
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k] and k not in RECORDED_ONLY}


@dataclass(frozen=True)
class TextEncoding:
    """Result of :meth:`Encoder.encode_texts_detailed`."""

    # float32 [n, dim].
    vectors: np.ndarray
    # bool [n]: True where the text was longer than the context and was cut.
    truncated: np.ndarray
    # int [n]: tokens the text needed (including start/end tokens) before truncation.
    n_tokens: np.ndarray


@runtime_checkable
class Encoder(Protocol):
    """What the indexer and the query engine need from an encoder."""

    @property
    def dim(self) -> int: ...

    @property
    def fingerprint(self) -> EncoderFingerprint: ...

    def prepare_image(self, image: Image.Image) -> np.ndarray:
        """One PIL image (any mode) -> float32 ``[C, H, W]`` model input. Thread-safe."""
        ...

    def encode_prepared(self, batch: np.ndarray) -> np.ndarray:
        """float32 ``[n, C, H, W]`` -> float32 ``[n, dim]``."""
        ...

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> float32 ``[n, dim]``."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> float32 ``[n, dim]``; over-long texts are truncated (see detailed)."""
        ...

    def encode_texts_detailed(self, texts: Sequence[str]) -> TextEncoding:
        """Texts -> vectors plus which texts were truncated to the context length."""
        ...


class BaseEncoder(ABC):
    """Builds the convenience methods of :class:`Encoder` on two primitives.

    Subclasses implement ``prepare_image``, ``encode_prepared``, ``encode_texts_detailed``
    and set ``self._fingerprint``; this class batches by ``batch_size``.
    """

    _fingerprint: EncoderFingerprint
    batch_size: int = 64

    @property
    def dim(self) -> int:
        return self._fingerprint.dim

    @property
    def fingerprint(self) -> EncoderFingerprint:
        return self._fingerprint

    @abstractmethod
    def prepare_image(self, image: Image.Image) -> np.ndarray:
        """One PIL image -> float32 ``[C, H, W]`` model input. Must be thread-safe."""

    @abstractmethod
    def encode_prepared(self, batch: np.ndarray) -> np.ndarray:
        """float32 ``[n, C, H, W]`` -> float32 ``[n, dim]``."""

    @abstractmethod
    def encode_texts_detailed(self, texts: Sequence[str]) -> TextEncoding:
        """Texts -> vectors plus the truncation report."""

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> float32 ``[n, dim]``; each goes through ``load_image`` (EXIF
        orientation, RGB) unless it already did (its orientation tag is then gone)."""
        out = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch = np.stack([self.prepare_image(load_image(im)) for im in chunk])
            out.append(self.encode_prepared(batch))
        return np.concatenate(out)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a sequence of strings, not one string")
        return self.encode_texts_detailed(texts).vectors


def decode_side(encoder: Encoder | None) -> int | None:
    """The ``min_side`` to decode images at for ``encoder`` (see ``load_image``).

    Every path that decodes an image for an encoder (indexing, queries, the service,
    evaluation) uses this, so the same file is embedded identically everywhere.
    """
    return None if encoder is None else DRAFT_FACTOR * encoder.fingerprint.image_size


def load_image_for(encoder: Encoder | None, source: ImageInput) -> Image.Image:
    """:func:`clipsearch.retrieval.images.load_image` at the decode side of ``encoder``."""
    return load_image(source, min_side=decode_side(encoder))


def truncated_texts(n_tokens: np.ndarray, context_length: int, model: str) -> np.ndarray:
    """Which texts (token counts ``n_tokens``) exceed ``context_length`` and are cut to it;
    logs one warning naming how many, for every backend's ``encode_texts_detailed``."""
    truncated = n_tokens > context_length
    if truncated.any():
        log.warning(
            "%d of %d texts exceed the %d-token context of %s and were truncated",
            int(truncated.sum()),
            len(n_tokens),
            context_length,
            model,
        )
    return truncated


def check_prepared(batch: np.ndarray, size: int) -> np.ndarray:
    """``batch`` as contiguous float32 ``[n, 3, size, size]``; ConfigError for any other shape
    (what every backend's ``encode_prepared`` takes)."""
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    if batch.ndim != 4 or batch.shape[1:] != (3, size, size):
        raise ConfigError(
            f"encode_prepared expects float32 [n, 3, {size}, {size}], got {batch.shape}; "
            "prepare images with this encoder's prepare_image"
        )
    return batch


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float32; zero rows stay zero instead of becoming NaN."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)
