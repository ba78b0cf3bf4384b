"""Synthetic catalogs for benchmarks: what several scripts generate alike."""

from __future__ import annotations

import numpy as np


def clustered_vectors(
    rng: np.random.Generator, n: int, dim: int, clusters: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """``(centres, vectors)``: ``n`` unit float32 vectors of ``dim`` around ``clusters``
    random centres (noise 0.6 per coordinate), generated 100k rows at a time. Draws from
    ``rng`` in a fixed order, so a seed gives the same vectors in every script."""
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    labels = rng.integers(0, clusters, n)
    xb = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        end = min(n, start + 100_000)
        noise = rng.standard_normal((end - start, dim)).astype(np.float32)
        block = centres[labels[start:end]] + 0.6 * noise
        xb[start:end] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return centres, xb
