"""Corpora, indexes and fault injection for the distributed tests."""

from __future__ import annotations

import io
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipsearch.indexer.build import BuildOptions
from clipsearch.indexer.sources import SourceOptions
from clipsearch.retrieval.encoders import FakeEncoder
from clipsearch.retrieval.store import open_snapshot

WORDS = ["red", "blue", "green", "shirt", "mug", "lamp", "striped", "wool", "soft", "dark"]
CATEGORIES = ("shirts", "mugs", "lamps")


def encoder() -> FakeEncoder:
    return FakeEncoder(32, seed=3)


def write_corpus(folder: Path, n_docs: int, *, seed: int = 0, bad: bool = True) -> Path:
    """A JSONL catalog of ``n_docs`` documents (image, title, price, category) plus, with
    ``bad``, one unreadable image and one empty title (two reported skips)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_docs):
        pixels = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).resize((16, 16), Image.Resampling.NEAREST).save(buf, "PNG")
        (folder / f"img{i:04d}.png").write_bytes(buf.getvalue())
        words = rng.choice(WORDS, size=3)
        row = {
            "doc_id": f"d{i:04d}",
            "image": f"img{i:04d}.png",
            "title": " ".join(words) + f" {i}",
            "price": round(float(rng.uniform(1, 100)), 2),
            "category": CATEGORIES[i % len(CATEGORIES)],
        }
        lines.append(json.dumps(row))
    if bad:
        (folder / "broken.png").write_bytes(b"not a png")
        lines.append(json.dumps({"doc_id": "bad1", "image": "broken.png", "title": "x"}))
        lines.append(json.dumps({"doc_id": "bad2", "image": "img0000.png", "title": " "}))
    manifest = folder / "catalog.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def build_options(shard_size: int = 40) -> BuildOptions:
    return BuildOptions(
        shard_size=shard_size,
        workers=1,
        sources=SourceOptions(image_col="image", text_cols=("title",), id_col="doc_id"),
    )


def index_content(root: Path) -> tuple[list[dict[str, Any]], np.ndarray, list[tuple[str, int]]]:
    """Live rows (metadata dicts by row_id), their vectors, and (shard, rows) per shard."""
    snap = open_snapshot(root, verify_hashes=True)
    dead = set(snap.tombstones.tolist())
    rows, vecs = [], []
    for s in snap.shards:
        for i, r in enumerate(s.metadata.to_pylist()):
            if r["row_id"] not in dead:
                rows.append(r)
                vecs.append(np.asarray(s.vectors[i], np.float32))
    order = np.argsort([r["row_id"] for r in rows], kind="stable")
    shards = [(s.record.name, s.record.rows) for s in snap.shards]
    return [rows[i] for i in order], np.stack(vecs)[order], shards


@dataclass(frozen=True)
class DyingEncoderFactory:
    """Builds the test encoder inside a Ray actor; the first actor process to reach its
    ``die_at``-th batch SIGKILLs itself (like a lost node or an OOM kill). ``marker`` is
    created exclusively, so exactly one process ever dies, whichever it is."""

    marker: str
    die_at: int = 2

    def __call__(self) -> FakeEncoder:
        return _DyingEncoder(self.marker, self.die_at)


class _DyingEncoder(FakeEncoder):
    def __init__(self, marker: str, die_at: int) -> None:
        super().__init__(32, seed=3)
        self._marker, self._die_at, self._batches = marker, die_at, 0

    def encode_prepared(self, batch: np.ndarray) -> np.ndarray:
        self._batches += 1
        if self._batches == self._die_at:
            try:
                fd = os.open(self._marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        return super().encode_prepared(batch)
