"""Retrieval evaluation: cross-modal recall and ranks on labelled pairs, index recall.

``pair_metrics`` scores an encoder on labelled (image, text) pairs the standard CLIP way:
every image ranks every text and vice versa; R@k is the share of queries whose partner
ranks in the top k, plus the median and mean rank (1 = first) in both directions.
``index_recall`` measures what an approximate index loses: recall@k of the engine's
results against exact numpy search over the same live rows.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsearch.retrieval.encoders.base import load_image_for
from clipsearch.retrieval.errors import SourceError
from clipsearch.retrieval.kernels import exact_search

if TYPE_CHECKING:
    from clipsearch.retrieval.encoders import Encoder
    from clipsearch.retrieval.engine import SearchEngine

KS = (1, 5, 10)


@dataclass(frozen=True)
class DirectionMetrics:
    # k -> share of queries whose partner ranks in the top k.
    recall: dict[int, float]
    median_rank: float
    mean_rank: float

    def to_dict(self) -> dict[str, Any]:
        return {
            **{f"R@{k}": v for k, v in self.recall.items()},
            "median_rank": self.median_rank,
            "mean_rank": self.mean_rank,
        }


def ranks_of_partners(xq: np.ndarray, xb: np.ndarray) -> np.ndarray:
    """1-based rank of ``xb[i]`` among all ``xb`` for query ``xq[i]`` (ties count against)."""
    scores = xq @ xb.T
    own = scores[np.arange(len(xq)), np.arange(len(xq))]
    return (scores > own[:, None]).sum(axis=1) + 1


def direction_metrics(ranks: np.ndarray, ks: Sequence[int] = KS) -> DirectionMetrics:
    return DirectionMetrics(
        recall={k: float(np.mean(ranks <= k)) for k in ks},
        median_rank=float(np.median(ranks)),
        mean_rank=float(np.mean(ranks)),
    )


def pair_metrics(image_vectors: np.ndarray, text_vectors: np.ndarray) -> dict[str, Any]:
    """Metrics for aligned pairs: row i of both arrays is one (image, text) pair."""
    if image_vectors.shape != text_vectors.shape or len(image_vectors) == 0:
        raise SourceError("pair evaluation needs the same non-zero number of images and texts")
    return {
        "pairs": len(image_vectors),
        "image_to_text": direction_metrics(
            ranks_of_partners(image_vectors, text_vectors)
        ).to_dict(),
        "text_to_image": direction_metrics(
            ranks_of_partners(text_vectors, image_vectors)
        ).to_dict(),
    }


def read_pairs(path: str | Path) -> list[tuple[Path, str]]:
    """(image path, text) pairs from a CSV (columns ``image,text``) or JSONL file.

    Relative image paths are resolved against the file's folder.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SourceError(f"{path}: cannot read pairs file ({e.strerror})") from e
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SourceError(f"{path}:{n}: not JSON ({e.msg})") from e
    elif path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        raise SourceError(
            f"{path}: pairs must be a .csv or .jsonl file with image and text columns"
        )
    pairs = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not row.get("image") or not row.get("text"):
            raise SourceError(f"{path}: row {n} lacks a non-empty 'image' or 'text'")
        image = Path(str(row["image"]))
        pairs.append((image if image.is_absolute() else path.parent / image, str(row["text"])))
    if not pairs:
        raise SourceError(f"{path}: no pairs")
    return pairs


def evaluate_pairs(encoder: Encoder, pairs: Sequence[tuple[Path, str]]) -> dict[str, Any]:
    """Encode labelled pairs and compute :func:`pair_metrics`."""
    images = encoder.encode_images([load_image_for(encoder, p) for p, _ in pairs])
    texts = encoder.encode_texts([t for _, t in pairs])
    return pair_metrics(images, texts)


def index_recall(
    engine: SearchEngine, queries: np.ndarray, *, k: int = 10, modality: str | None = None
) -> float:
    """Mean recall@k of the engine's top-k against exact search over the same live rows."""
    state = engine._state
    target = engine.target_modality(modality)
    shards = [s for s in state.shards if s.record.modality == target]
    if not shards:
        return 1.0
    xb = np.concatenate([np.asarray(s.vectors, np.float32) for s in shards])
    row_ids = np.concatenate([s.record.row_id_start + np.arange(s.rows) for s in shards])
    live = np.concatenate([np.ones(s.rows, bool) if s.live is None else s.live for s in shards])
    _, idx = exact_search(queries, xb, k, mask=live)
    results = engine.search_batch(list(queries), k=k, modality=target)
    hits = []
    for truth, res in zip(idx, results, strict=True):
        expected = set(row_ids[truth].tolist())
        hits.append(len(expected & set(res.row_ids)) / max(1, len(expected)))
    return float(np.mean(hits))


def evaluate_index(engine: SearchEngine, pairs_file: str | Path, *, k: int = 10) -> dict[str, Any]:
    """What ``clipsearch eval`` prints: pair metrics plus index recall@k on the pair queries."""
    if engine.encoder is None:
        raise SourceError("evaluation needs the index's encoder")
    pairs = read_pairs(pairs_file)
    images = engine.encoder.encode_images([load_image_for(engine.encoder, p) for p, _ in pairs])
    texts = engine.encoder.encode_texts([t for _, t in pairs])
    out = pair_metrics(images, texts)
    out[f"index_recall@{k}"] = {
        "text_to_image": index_recall(engine, texts, k=k, modality="image"),
        "image_to_image": index_recall(engine, images, k=k, modality="image"),
    }
    out["index_version"] = engine.version
    return out
