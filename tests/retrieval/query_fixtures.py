"""Random indexes for the query-engine tests, built with the real indexer.

Each document has one image (a random blocky PNG), a title and a description (two text
rows sharing its doc_id) and typed metadata. The oracle reads the stored fp16 vectors
back through ``open_snapshot`` and ranks them with exact numpy search.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from clipsearch.indexer.ann import IndexOptions
from clipsearch.indexer.build import BuildOptions, build
from clipsearch.indexer.sources import SourceOptions
from clipsearch.retrieval.encoders import FakeEncoder
from clipsearch.retrieval.filters import compile_filter
from clipsearch.retrieval.kernels import exact_search
from clipsearch.retrieval.store import open_snapshot

WORDS = [
    "red",
    "blue",
    "green",
    "black",
    "white",
    "shirt",
    "dress",
    "mug",
    "lamp",
    "chair",
    "striped",
    "plain",
    "cotton",
    "wool",
    "soft",
    "large",
    "small",
    "vintage",
    "modern",
    "classic",
    "bright",
    "dark",
    "summer",
    "winter",
    "linen",
]
CATEGORIES = ("shirts", "dresses", "mugs", "lamps", "chairs")


def encoder() -> FakeEncoder:
    return FakeEncoder(32, seed=3)


def write_corpus(folder: Path, n_docs: int, seed: int = 0) -> Path:
    """A JSONL manifest of ``n_docs`` documents plus their images; returns the manifest."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_docs):
        pixels = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(pixels).resize((16, 16), Image.Resampling.NEAREST)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        (folder / f"img{i:04d}.png").write_bytes(buf.getvalue())
        words = rng.choice(WORDS, size=5)
        row = {
            "doc_id": f"d{i:04d}",
            "image": f"img{i:04d}.png",
            "title": " ".join(words[:3]) + f" {i}",
            "description": " ".join(words[2:]) + f" item {i}",
            "price": round(float(rng.uniform(1, 100)), 2),
            "rating": int(rng.integers(1, 6)),
            "category": str(CATEGORIES[i % len(CATEGORIES)]),
            "in_stock": bool(i % 3 != 0),
            "added": (dt.date(2024, 1, 1) + dt.timedelta(days=i % 365)).isoformat(),
        }
        lines.append(json.dumps(row))
    manifest = folder / "catalog.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def build_index(root: Path, manifest: Path, kind: str, shard_size: int = 150) -> Path:
    options = BuildOptions(
        shard_size=shard_size,
        workers=1,
        index=IndexOptions(index=kind, tune_queries=50, target_recall=0.9),
        sources=SourceOptions(
            image_col="image", text_cols=("title", "description"), id_col="doc_id"
        ),
    )
    build([manifest], root, encoder=encoder(), options=options)
    return root


@dataclass(frozen=True)
class Oracle:
    """Exact search over the live rows of one modality of a pinned version."""

    vectors: np.ndarray  # float32 [n, d]
    row_ids: np.ndarray  # int64 [n]
    metadata: pa.Table
    live: np.ndarray  # bool [n]

    @classmethod
    def load(cls, root: Path, modality: str) -> Oracle:
        snap = open_snapshot(root)
        shards = [s for s in snap.shards if s.record.modality == modality]
        row_ids = np.concatenate([s.metadata.column("row_id").to_numpy() for s in shards])
        return cls(
            vectors=np.concatenate([np.asarray(s.vectors, np.float32) for s in shards]),
            row_ids=row_ids,
            metadata=pa.concat_tables([s.metadata for s in shards]),
            live=~np.isin(row_ids, snap.tombstones),
        )

    def mask(self, where: str | None) -> np.ndarray:
        if where is None:
            return self.live
        return compile_filter(where, self.metadata.schema).mask(self.metadata) & self.live

    def search(self, xq: np.ndarray, k: int, where: str | None = None) -> list[list[int]]:
        _, idx = exact_search(np.atleast_2d(xq), self.vectors, k, mask=self.mask(where))
        return [self.row_ids[i].tolist() for i in idx]


def noisy_queries(oracle: Oracle, n: int, seed: int = 0) -> np.ndarray:
    """In-distribution queries: stored vectors plus noise, re-normalised."""
    rng = np.random.default_rng(seed)
    base = oracle.vectors[rng.integers(0, len(oracle.vectors), n)]
    q = base + 0.3 * rng.standard_normal(base.shape).astype(np.float32) / np.sqrt(base.shape[1])
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def mean_recall(results: list, expected: list[list[int]]) -> float:
    """Mean over queries of |returned row ids & expected| / |expected|."""
    return float(
        np.mean(
            [
                len(set(r.row_ids) & set(e)) / max(1, len(e))
                for r, e in zip(results, expected, strict=True)
            ]
        )
    )
