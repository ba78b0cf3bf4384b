"""The end-to-end demo: generate a shop, embed it, ask it shopping-assistant questions.

Two functions carry the search, so that the in-memory version here can be swapped for
the real indexer and query engine without touching the rest: :func:`build_demo_index`
(catalog -> searchable index) and :func:`search_demo_index` (query -> hits). The index
here is exact: a numpy matrix of image vectors beside the Parquet metadata, filtered by
a pyarrow boolean mask.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.demo.evaluate import all_captions, encode_photos
from indexer.demo.generate import MANIFEST_NAME, CatalogSummary, generate_catalog
from retrieval.encoders.base import Encoder
from retrieval.errors import QueryError
from retrieval.images import load_image

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

# Seed of the demo's catalog: deliberately not the training seed (1), so the demo shows
# the model on products it has never seen.
DEMO_SEED = 7
DEMO_PRODUCTS = 3000
# Logit scale used to turn "what is this?" similarities into probabilities (CLIP's cap).
CLASSIFY_SCALE = 100.0

Progress = Callable[[str, int, int], None]
# A filter: metadata table -> boolean mask (pyarrow array or numpy), one entry per row.
Where = Callable[["pa.Table"], Any]


@dataclass(frozen=True, kw_only=True)
class DemoIndex:
    """An exact in-memory index of a catalog's photos."""

    root: Path
    # float32 [n, dim], L2-normalised, row i = photo i of ``metadata``.
    vectors: np.ndarray
    # The catalog's products.parquet (one row per photo).
    metadata: pa.Table


@dataclass(frozen=True, kw_only=True)
class DemoQuery:
    """One question the demo asks, and its answer."""

    # Heading shown above the result table.
    title: str
    # "text", "image" or "image->text".
    kind: str
    # What was asked: the text, the image path, or the filter in words.
    query: str
    filter: str | None
    # Result rows: rank, score, and the product's metadata (or caption + probability).
    hits: list[dict[str, Any]]
    # Rows passing the filter (None without a filter), and milliseconds taken.
    matches: int | None
    ms: float


@dataclass(frozen=True, kw_only=True)
class DemoReport:
    catalog: CatalogSummary
    model: dict[str, Any]
    # Seconds per stage: generate, load model, embed, queries.
    timings: dict[str, float]
    queries: list[DemoQuery] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "catalog": self.catalog.to_dict(),
            "model": self.model,
            "timings_s": {k: round(v, 2) for k, v in self.timings.items()},
            "queries": [
                {
                    "title": q.title,
                    "kind": q.kind,
                    "query": q.query,
                    "filter": q.filter,
                    "matches": q.matches,
                    "ms": round(q.ms, 1),
                    "hits": q.hits,
                }
                for q in self.queries
            ],
        }


def build_demo_index(
    catalog_dir: Path, encoder: Encoder, *, progress: Progress | None = None
) -> DemoIndex:
    """Embed every photo of the catalog in ``catalog_dir``."""
    import pyarrow.parquet as pq

    table = pq.read_table(catalog_dir / MANIFEST_NAME)
    paths = [catalog_dir / p for p in table.column("image_path").to_pylist()]
    vectors = encode_photos(encoder, paths, progress)
    return DemoIndex(root=catalog_dir, vectors=vectors, metadata=table)


def search_demo_index(
    index: DemoIndex,
    encoder: Encoder,
    query: str | Path,
    *,
    k: int = 5,
    where: Where | None = None,
    group_by_product: bool = True,
) -> tuple[list[dict[str, Any]], int | None]:
    """Top ``k`` photos for a text or an image (path) query, best photo per product.

    Returns (hits, number of rows passing ``where`` or None). Each hit holds rank,
    score (cosine), and the photo's metadata row.
    """
    if k < 1:
        raise QueryError(f"k must be >= 1, got {k}")
    if isinstance(query, Path):
        qv = encoder.encode_images([load_image(query)])[0]
    else:
        if not query.strip():
            raise QueryError("empty text query; type what you are looking for")
        qv = encoder.encode_texts([query])[0]
    scores = index.vectors @ qv
    matches = None
    if where is not None:
        mask = np.asarray(where(index.metadata), dtype=bool)
        matches = int(mask.sum())
        scores = np.where(mask, scores, -np.inf)
    hits: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i in np.argsort(-scores, kind="stable"):
        if not np.isfinite(scores[i]) or len(hits) == k:
            break
        row = index.metadata.slice(int(i), 1).to_pylist()[0]
        if group_by_product and row["sku"] in seen:
            continue
        seen.add(row["sku"])
        hits.append({"rank": len(hits) + 1, "score": round(float(scores[i]), 4), **row})
    return hits, matches


def what_is_this(encoder: Encoder, image: Path, *, k: int = 3) -> list[dict[str, Any]]:
    """Rank every attribute caption for a photo; top ``k`` with softmax probabilities."""
    captions = [c[0] for c in all_captions()]
    sims = encoder.encode_texts(captions) @ encoder.encode_images([load_image(image)])[0]
    logits = CLASSIFY_SCALE * (sims - sims.max())
    probs = np.exp(logits) / np.exp(logits).sum()
    top = np.argsort(-probs, kind="stable")[:k]
    return [
        {"rank": r + 1, "caption": captions[i], "probability": round(float(probs[i]), 4)}
        for r, i in enumerate(top)
    ]


def run_demo(
    out_dir: Path,
    *,
    products: int = DEMO_PRODUCTS,
    seed: int = DEMO_SEED,
    model: str = "clipsearch-demo",
    pretrained: str | None = None,
    progress: Progress | None = None,
) -> DemoReport:
    """Generate a catalog in ``out_dir/catalog``, index it, and answer the demo questions.

    Also writes ``out_dir/demo_report.json``.
    """
    import pyarrow.compute as pc

    from retrieval.encoders import load_encoder

    timings: dict[str, float] = {}
    t = time.monotonic()
    catalog = generate_catalog(
        out_dir / "catalog",
        products=products,
        seed=seed,
        progress=(lambda d, n: progress("generating catalog", d, n)) if progress else None,
    )
    timings["generate"] = time.monotonic() - t
    t = time.monotonic()
    encoder = load_encoder(model, pretrained, device="cpu")
    timings["load_model"] = time.monotonic() - t
    t = time.monotonic()
    index = build_demo_index(catalog.out_dir, encoder, progress=progress)
    timings["embed"] = time.monotonic() - t
    t = time.monotonic()
    queries: list[DemoQuery] = []

    def ask(
        title: str, query: str | Path, where: Where | None = None, said: str | None = None
    ) -> None:
        t0 = time.monotonic()
        hits, matches = search_demo_index(index, encoder, query, where=where)
        kind = "image" if isinstance(query, Path) else "text"
        shown = str(query.relative_to(out_dir)) if isinstance(query, Path) else query
        ms = 1000 * (time.monotonic() - t0)
        queries.append(
            DemoQuery(
                title=title, kind=kind, query=shown, filter=said, hits=hits, matches=matches, ms=ms
            )
        )

    ask("Plain text search", "red striped t-shirt")
    ask("Plain text search", "a white dotted mug")
    ask(
        "Text with filters",
        "blue checked dress",
        where=lambda tb: pc.and_(pc.less(tb["price"], 60.0), tb["in_stock"]),
        said="price < 60 and in stock",
    )
    ask(
        "Text with filters",
        "black boot",
        where=lambda tb: pc.and_(pc.greater_equal(tb["rating"], 4.5), tb["in_stock"]),
        said="rating >= 4.5 and in stock",
    )
    probe = _probe_photo(index)
    ask("Image query: more like this photo", probe)
    t0 = time.monotonic()
    guesses = what_is_this(encoder, probe)
    queries.append(
        DemoQuery(
            title="Image -> text: what is this?",
            kind="image->text",
            query=str(probe.relative_to(out_dir)),
            filter=None,
            hits=guesses,
            matches=None,
            ms=1000 * (time.monotonic() - t0),
        )
    )
    timings["queries"] = time.monotonic() - t
    report = DemoReport(
        catalog=catalog,
        model=encoder.fingerprint.to_dict(),
        timings=timings,
        queries=queries,
    )
    _write_json(out_dir / "demo_report.json", report.to_dict())
    return report


def _probe_photo(index: DemoIndex) -> Path:
    """A back photo of some product: a query image whose front twin is in the index."""
    views = index.metadata.column("view").to_pylist()
    i = views.index("back") if "back" in views else 0
    return index.root / str(index.metadata.column("image_path")[i].as_py())


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
