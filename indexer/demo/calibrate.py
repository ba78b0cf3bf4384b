"""Relevance thresholds that mean something: calibrated per model on held-out products.

A cosine score by itself says little: each model (and each direction, text->image or
image->image) has its own scale. This module finds, per direction, the score above which
the top result is the right product with :data:`PRECISION_TARGET` precision, on a
catalog the model was not trained on. "Right" means the same kind, colour and pattern.

Every query is asked twice: against the whole calibration catalog (the right product is
there) and with every product of the same kind, colour and pattern hidden (the best
answer is necessarily wrong: the shop does not have it). Synthetic non-product images
(noise and gradients, :mod:`clipsearch.indexer.training.junk`) and non-shop text queries
join as negatives. The evaluation then checks the thresholds on another seed and on
junk families that calibration never saw.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipsearch.indexer.demo.catalog import (
    COLOURS,
    KINDS,
    PATTERNS,
    attribute_caption,
    attribute_caption_zh,
)

log = logging.getLogger(__name__)

# The precision a result at or above the threshold must have.
PRECISION_TARGET = 0.90
# Text queries no shop product answers (negatives for text->image). Held apart from the
# evaluation, which uses photos, not text, for out-of-domain checks.
NON_SHOP_QUERIES: tuple[str, ...] = (
    "a cat sleeping on a sofa",
    "a rocket launch",
    "a cup of espresso with latte art",
    "mountain landscape at sunset",
    "a golden retriever puppy",
    "city skyline at night",
    "a bowl of ramen",
    "an airplane in the sky",
    "a bicycle leaning on a wall",
    "waves on a beach",
    "一只猫",
    "火箭发射",
    "一杯咖啡",
    "山",
)
# Junk images per family used as negatives of image queries.
JUNK_PER_FAMILY = 40


@dataclass(frozen=True)
class Trial:
    """One query's best answer: its score and whether it was the right product."""

    score: float
    correct: bool


def threshold_for(trials: list[Trial], target: float = PRECISION_TARGET) -> dict[str, float]:
    """The lowest score ``t`` such that answers scoring >= t are right with precision >=
    ``target`` (and stay so for every higher cut). Also reports precision and recall there."""
    if not trials:
        raise ValueError("no trials to calibrate on")
    order = sorted(trials, key=lambda t: -t.score)
    correct = np.array([t.correct for t in order], dtype=np.float64)
    scores = np.array([t.score for t in order])
    precision = np.cumsum(correct) / np.arange(1, len(order) + 1)
    # From the top down, the deepest cut where precision never dropped below the target.
    ok = np.minimum.accumulate(precision) >= target
    if not ok[0]:
        best = float(scores[0]) + 1e-4  # not even the top answer: nothing passes
        return {"threshold": best, "precision": 1.0, "recall": 0.0, "trials": len(order)}
    cut = int(np.nonzero(ok)[0].max())
    positives = max(1.0, correct.sum())
    return {
        "threshold": float(scores[cut]),
        "precision": float(precision[cut]),
        "recall": float(correct[: cut + 1].sum() / positives),
        "trials": float(len(order)),
    }


def best_trials(sims: np.ndarray, truth: np.ndarray, same: np.ndarray) -> list[Trial]:
    """Two trials per query row of ``sims`` [q, n]: with the whole index, and with the
    right answers (``same`` [q, n] bool) hidden. ``truth`` [q, n] marks right answers."""
    trials = []
    for i in range(sims.shape[0]):
        j = int(sims[i].argmax())
        trials.append(Trial(float(sims[i, j]), bool(truth[i, j])))
        hidden = np.where(same[i], -np.inf, sims[i])
        if np.isfinite(hidden).any():
            trials.append(Trial(float(hidden.max()), False))
    return trials


def calibrate(
    image_vectors: np.ndarray,
    image_attrs: np.ndarray,
    views: list[str],
    title_vectors: np.ndarray,
    title_attrs: np.ndarray,
    encode_texts: Any,
    junk_vectors: np.ndarray,
) -> dict[str, Any]:
    """Thresholds for text->image, image->image and image->text on one catalog.

    Args:
        image_vectors: float32 [n, d], one per photo; ``image_attrs`` object [n, 3]
            (kind, colour, pattern) and ``views`` ("front"/"back") per photo.
        title_vectors: float32 [m, d], one per product title; ``title_attrs`` [m, 3].
        encode_texts: texts -> float32 [k, d] (the model's text encoder).
        junk_vectors: float32 [j, d], non-product images (negatives of image queries).
    """
    combos = [(k, c, p) for k in KINDS for c in COLOURS for p in PATTERNS]
    queries = [attribute_caption(*x) for x in combos] + [attribute_caption_zh(*x) for x in combos]
    q_attrs = np.array(combos + combos, dtype=object)
    tq = encode_texts(queries)
    sims = tq @ image_vectors.T
    truth = (q_attrs[:, None, :] == image_attrs[None, :, :]).all(-1)
    t2i = best_trials(sims, truth, truth)
    junk_text = encode_texts(list(NON_SHOP_QUERIES)) @ image_vectors.T
    t2i += [Trial(float(s), False) for s in junk_text.max(1)]

    fronts = np.array([v == "front" for v in views])
    backs = np.nonzero(~fronts)[0]
    same_i = (image_attrs[backs][:, None, :] == image_attrs[fronts][None, :, :]).all(-1)
    sims_i = image_vectors[backs] @ image_vectors[fronts].T
    i2i = best_trials(sims_i, same_i, same_i)
    i2i += [Trial(float(s), False) for s in (junk_vectors @ image_vectors[fronts].T).max(1)]

    same_t = (image_attrs[:, None, :] == title_attrs[None, :, :]).all(-1)
    i2t = best_trials(image_vectors @ title_vectors.T, same_t, same_t)
    i2t += [Trial(float(s), False) for s in (junk_vectors @ title_vectors.T).max(1)]

    report = {
        "text->image": threshold_for(t2i),
        "image->image": threshold_for(i2i),
        "image->text": threshold_for(i2t),
    }
    for direction, r in report.items():
        log.info(
            "%s: threshold %.4f (precision %.3f, recall %.3f over %d trials)",
            direction,
            r["threshold"],
            r["precision"],
            r["recall"],
            r["trials"],
        )
    return report
