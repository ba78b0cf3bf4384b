"""Query inputs -> query vectors, composed queries, and zero-shot classification.

A query is one of:

* ``str``: a text query;
* an image: ``pathlib.Path``, ``bytes``, a binary file object or a PIL image (a plain
  ``str`` is always text; wrap image paths in ``Path``);
* a raw vector: numpy float ``[dim]`` (normalised here);
* a :class:`ComposedQuery`: a weighted sum of text and image terms, negatives allowed
  ("this photo + 'red' - 'striped'").
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipsearch.retrieval.encoders.base import Encoder, l2_normalize, load_image_for
from clipsearch.retrieval.errors import QueryError

# Prompt templates of the CLIP zero-shot recipe (a subset of the ImageNet ensemble);
# averaging several phrasings makes label embeddings less sensitive to wording.
ZERO_SHOT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a good photo of a {}.",
    "a product photo of a {}.",
    "{}",
)
# CLIP's learned logit scale saturates at 100; used when the encoder exposes none.
DEFAULT_LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class ComposedQuery:
    """A weighted sum of query terms; the sum is re-normalised.

    ``terms``: ``(weight, term)`` pairs; a term is a text (str), an image (Path, bytes,
    PIL) or a vector. Negative weights push results away from a term.
    """

    terms: tuple[tuple[float, Any], ...]

    def __post_init__(self) -> None:
        if not self.terms:
            raise QueryError("a composed query needs at least one (weight, term) pair")
        for w, term in self.terms:
            if not isinstance(w, (int, float)) or not np.isfinite(w):
                raise QueryError(f"composed query weight must be a finite number, got {w!r}")
            if isinstance(term, ComposedQuery):
                raise QueryError("composed queries do not nest; list all terms in one")


def is_image(query: Any) -> bool:
    from PIL import Image

    return isinstance(query, (bytes, bytearray, os.PathLike, Image.Image, io.IOBase))


def query_kind(query: Any) -> str:
    """'text', 'image', 'vector' or 'composed'; QueryError for anything else."""
    if isinstance(query, ComposedQuery):
        return "composed"
    if isinstance(query, str):
        if not query.strip():
            raise QueryError("empty text query; type some words or pass an image")
        return "text"
    if isinstance(query, np.ndarray):
        return "vector"
    if is_image(query):
        return "image"
    raise QueryError(
        f"unsupported query type {type(query).__name__}: pass text (str), an image "
        "(pathlib.Path, bytes, PIL image), a numpy vector or a ComposedQuery"
    )


def encode_queries(encoder: Encoder | None, queries: Sequence[Any], dim: int) -> np.ndarray:
    """float32 ``[len(queries), dim]`` unit vectors; texts and images encoded in batches."""
    kinds = [query_kind(q) for q in queries]
    flat: list[tuple[int, float, Any, str]] = []  # (query index, weight, term, kind)
    for qi, (q, kind) in enumerate(zip(queries, kinds, strict=True)):
        if kind == "composed":
            for w, term in q.terms:
                flat.append((qi, float(w), term, query_kind(term)))
        else:
            flat.append((qi, 1.0, q, kind))
    out = np.zeros((len(queries), dim), np.float32)
    texts = [(qi, w, t) for qi, w, t, k in flat if k == "text"]
    images = [(qi, w, t) for qi, w, t, k in flat if k == "image"]
    if (texts or images) and encoder is None:
        raise QueryError("this engine has no encoder; pass raw vectors")
    if texts:
        vecs = encoder.encode_texts([t for _, _, t in texts])  # type: ignore[union-attr]
        for (qi, w, _), v in zip(texts, vecs, strict=True):
            out[qi] += w * v
    if images:
        pils = [
            load_image_for(encoder, bytes(t) if isinstance(t, bytearray) else t)
            for _, _, t in images
        ]
        vecs = encoder.encode_images(pils)  # type: ignore[union-attr]
        for (qi, w, _), v in zip(images, vecs, strict=True):
            out[qi] += w * v
    for qi, w, term, kind in flat:
        if kind == "vector":
            out[qi] += w * _vector(term, dim)
    if not np.all(np.isfinite(out)) or (np.linalg.norm(out, axis=1) < 1e-6).any():
        raise QueryError("a query vector is zero or not finite (weights cancel out?)")
    return l2_normalize(out)


def _vector(v: np.ndarray, dim: int) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    if v.shape[0] != dim:
        raise QueryError(f"query vector has dimension {v.shape[0]}, the index has {dim}")
    if not np.all(np.isfinite(v)) or not v.any():
        raise QueryError("query vector must be finite and non-zero")
    return l2_normalize(v[None])[0]


def classify(
    encoder: Encoder,
    image: Any,
    labels: Sequence[str],
    *,
    templates: Sequence[str] = ZERO_SHOT_TEMPLATES,
) -> list[tuple[str, float]]:
    """CLIP zero-shot classification: label probabilities, highest first.

    Each label is embedded as the normalised mean of its prompt templates; the
    probabilities are ``softmax(logit_scale * cos(image, label))``.
    """
    labels = [str(label).strip() for label in labels]
    if len(labels) < 2 or any(not label for label in labels):
        raise QueryError("classify needs at least two non-empty labels")
    if len(set(labels)) != len(labels):
        raise QueryError("classify labels must be distinct")
    if not templates or any("{}" not in t for t in templates):
        raise QueryError("every prompt template must contain '{}' where the label goes")
    prompts = [t.format(label) for label in labels for t in templates]
    text = encoder.encode_texts(prompts).reshape(len(labels), len(templates), -1).mean(axis=1)
    text = l2_normalize(text)
    img = encoder.encode_images([load_image_for(encoder, image)])[0]
    scale = float(getattr(encoder, "logit_scale", DEFAULT_LOGIT_SCALE) or DEFAULT_LOGIT_SCALE)
    logits = scale * (text @ img)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    return [(labels[i], float(probs[i])) for i in order]
