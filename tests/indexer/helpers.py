"""Small corpora and snapshot comparison helpers for the indexer tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipsearch.retrieval.store import open_snapshot

COLOURS = {
    "red": (220, 30, 30),
    "green": (40, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (130, 40, 170),
}


def make_images(folder: Path, n: int, *, seed: int = 0, prefix: str = "img") -> list[Path]:
    """``n`` distinct 24x24 JPEGs: a dominant palette colour plus noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    paths = []
    for i in range(n):
        base = np.array(COLOURS[names[i % len(names)]], dtype=np.int16)
        noise = rng.integers(-40, 40, (24, 24, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        p = folder / f"{prefix}{i:04d}.jpg"
        Image.fromarray(pixels).save(p, quality=90)
        paths.append(p)
    return paths


def write_products(folder: Path, n: int) -> Path:
    """A CSV catalog: sku, image_path (relative), title, price, category."""
    images = make_images(folder / "photos", n)
    lines = ["sku,image_path,title,price,category"]
    names = list(COLOURS)
    for i, p in enumerate(images):
        colour = names[i % len(names)]
        lines.append(f"SKU{i:04d},photos/{p.name},{colour} shirt number {i},{10 + i}.5,{colour}")
    path = folder / "products.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def snapshot_rows(root: Path) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Every live row of the index (metadata dicts sorted by row_id) and their vectors."""
    snap = open_snapshot(root, verify_hashes=True)
    dead = set(snap.tombstones.tolist())
    rows: list[dict[str, Any]] = []
    vecs = []
    for s in snap.shards:
        for i, r in enumerate(s.metadata.to_pylist()):
            if r["row_id"] not in dead:
                rows.append(r)
                vecs.append(np.asarray(s.vectors[i], dtype=np.float32))
    order = np.argsort([r["row_id"] for r in rows], kind="stable")
    rows = [rows[i] for i in order]
    dim = snap.dim
    return rows, (np.stack(vecs)[order] if vecs else np.zeros((0, dim), np.float32))


def canonical(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, sort_keys=True, default=str)
