"""Retrieval metrics for validation: recall@k and median rank in both directions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def retrieval_metrics(
    image_vectors: np.ndarray, text_vectors: np.ndarray, image_captions: Sequence[str]
) -> dict[str, float]:
    """R@1/R@5/R@10 and median rank (1 = best), image->text and text->image.

    ``image_vectors`` float32 [n, d] and ``text_vectors`` float32 [m, d] are normalised;
    text ``j`` is the j-th distinct caption in order of first appearance in
    ``image_captions`` (length n). Several images may share a caption: image->text asks
    where an image's own caption ranks among all distinct captions; text->image asks
    where the best-ranked image carrying that caption lands among all images.
    """
    distinct = list(dict.fromkeys(image_captions))
    if len(distinct) != text_vectors.shape[0]:
        raise ValueError(
            f"{len(distinct)} distinct captions but {text_vectors.shape[0]} text vectors"
        )
    col = {c: j for j, c in enumerate(distinct)}
    truth = np.array([col[c] for c in image_captions])
    sims = image_vectors @ text_vectors.T  # [n, m]
    own = sims[np.arange(len(truth)), truth]
    i2t_rank = 1 + (sims > own[:, None]).sum(axis=1)
    # For caption j: the rank of its best image among all images.
    t2i_rank = np.empty(len(distinct), dtype=np.int64)
    for j in range(len(distinct)):
        column = sims[:, j]
        best = column[truth == j].max()
        t2i_rank[j] = 1 + int((column > best).sum())
    out: dict[str, float] = {}
    for name, ranks in (("image_to_text", i2t_rank), ("text_to_image", t2i_rank)):
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = float((ranks <= k).mean())
        out[f"{name}_median_rank"] = float(np.median(ranks))
    return out
