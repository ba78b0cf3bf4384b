"""The end-to-end demo: generate a shop, index it, ask it shopping-assistant questions.

Two functions carry the search: :func:`build_demo_index` (catalog -> a real clipsearch
index, built by :func:`clipsearch.indexer.build.build` from ``products.parquet``: one image row per
photo and one text row per title, all rows of a product sharing its ``sku`` as doc_id)
and :func:`search_demo_index` (query -> hits, through
:class:`clipsearch.retrieval.engine.SearchEngine` with its filter language, one hit per product).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipsearch.indexer.demo.evaluate import all_captions
from clipsearch.indexer.demo.generate import MANIFEST_NAME, CatalogSummary, generate_catalog
from clipsearch.indexer.fsutil import atomic_write_text
from clipsearch.retrieval.encoders.base import Encoder
from clipsearch.retrieval.errors import QueryError
from clipsearch.retrieval.progress import Progress, ProgressCallback, ignore, prefixed

if TYPE_CHECKING:
    from clipsearch.retrieval.engine import SearchEngine

log = logging.getLogger(__name__)

# Seed of the demo's catalog: deliberately not the training seed (1), so the demo shows
# the model on products it has never seen.
DEMO_SEED = 7
DEMO_PRODUCTS = 3000
INDEX_DIR = "index"
# Questions run_demo asks (ten searches and one zero-shot classification).
_N_QUESTIONS = 11
# What the demo says when the best answer is below the model's relevance threshold.
NO_GOOD_MATCH = "no good match"
DEMO_SHOP_ONLY = (
    "the demo model only knows the demo shop (t-shirts, dresses, sneakers, boots, hats, "
    "bags, watches, mugs, lamps and chairs in ten colours and four patterns)"
)


@dataclass(frozen=True, kw_only=True)
class DemoQuery:
    """One question the demo asks, and its answer."""

    # Heading shown above the result table.
    title: str
    # "text", "image", "image->text" (titles) or "classify" (attribute captions).
    kind: str
    # What was asked: the text, or the image path relative to the demo folder.
    query: str
    # The filter expression, in clipsearch's filter language.
    filter: str | None
    # Result rows: rank, score and the product's metadata (or caption + probability).
    hits: list[dict[str, Any]]
    # Rows passing the filter (None without a filter), and milliseconds taken.
    matches: int | None
    ms: float
    # Sort field applied after the relevance cutoff, e.g. "price".
    sort: str | None = None
    # The model's calibrated relevance threshold for this query's direction (None: the
    # model has none); hits below it carry ``low_confidence: True``.
    threshold: float | None = None
    # True when no hit reaches the threshold: the demo says "no good match".
    no_good_match: bool = False


@dataclass(frozen=True, kw_only=True)
class DemoReport:
    catalog: CatalogSummary
    index: Path
    model: dict[str, Any]
    # Seconds per stage: generate, load_model, index, queries.
    timings: dict[str, float]
    queries: list[DemoQuery] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "catalog": self.catalog.to_dict(),
            "index": str(self.index),
            "model": self.model,
            "timings_s": {k: round(v, 2) for k, v in self.timings.items()},
            "queries": [
                {
                    "title": q.title,
                    "kind": q.kind,
                    "query": q.query,
                    "filter": q.filter,
                    "sort": q.sort,
                    "matches": q.matches,
                    "ms": round(q.ms, 1),
                    "threshold": q.threshold,
                    "no_good_match": q.no_good_match,
                    "hits": q.hits,
                }
                for q in self.queries
            ],
        }


def build_demo_index(
    catalog_dir: Path,
    index_dir: Path,
    encoder: Encoder,
    *,
    progress: ProgressCallback | None = None,
) -> SearchEngine:
    """Index the catalog's photos and titles into ``index_dir``; open an engine on it.
    ``progress`` gets the stages of :func:`clipsearch.indexer.build.build`, prefixed
    "index: " ("index: embed")."""
    from clipsearch.indexer.build import BuildOptions, build
    from clipsearch.indexer.sources import SourceOptions
    from clipsearch.retrieval.engine import SearchEngine

    # doc_id = sku: a product's front and back photos and its title form one document.
    sources = SourceOptions(
        image_col="image_path", text_cols=("title",), id_col="sku", on_duplicate="group"
    )
    options = BuildOptions(sources=sources)
    build(
        [catalog_dir / MANIFEST_NAME],
        index_dir,
        encoder=encoder,
        options=options,
        progress=prefixed(progress, "index: "),
    )
    return SearchEngine.open(index_dir, encoder=encoder)


def search_demo_index(
    engine: SearchEngine,
    query: str | Path,
    *,
    k: int = 5,
    where: str | None = None,
    modality: str = "image",
    threshold: float | None = None,
    sort: str | None = None,
) -> tuple[list[dict[str, Any]], int | None]:
    """Top ``k`` products for a text or image (path) query: best row per ``sku``.

    Returns (hits, rows passing ``where`` or None). A hit is rank, score (cosine), the
    row's source, its product metadata, and ``low_confidence`` (score below
    ``threshold``, the model's calibrated relevance threshold; False without one).
    With ``sort`` (a metadata field), hits below the threshold are cut first and the rest
    sorted, so "red striped t-shirt" by price lists red striped t-shirts, cheapest first.
    """
    if k < 1:
        raise QueryError(f"k must be >= 1, got {k}")
    # Vector scores (cosines) are what the thresholds were calibrated on; the index's
    # lexical side would make a text query hybrid, with fused rank scores instead.
    options: dict[str, Any] = {"mode": "vector"}
    if sort is not None:
        options["sort"] = sort
        if threshold is not None:
            options["min_score"] = threshold
    res = engine.search(query, k=k, where=where, modality=modality, group_by_doc=True, **options)
    hits = [
        {
            "rank": h.rank,
            "score": round(h.score, 4),
            "low_confidence": threshold is not None and h.score < threshold,
            "sku": h.doc_id,
            "source": h.source,
        }
        | h.metadata
        for h in res.hits
    ]
    return hits, res.total_matches


def demo_thresholds(encoder: Encoder) -> dict[str, float]:
    """The encoder's calibrated relevance thresholds by direction (``text->image``...);
    empty when its model has no calibration for these very weights."""
    from clipsearch.retrieval.models import DIRECTIONS, calibrated_threshold

    found = {d: calibrated_threshold(encoder.fingerprint, d) for d in DIRECTIONS}
    return {d: v for d, v in found.items() if v is not None}


def what_is_this(engine: SearchEngine, image: Path, *, k: int = 3) -> list[dict[str, Any]]:
    """Zero-shot: rank every attribute caption for a photo; top ``k`` with probabilities.

    Each caption is its own prompt (no prompt-template ensemble: the captions already read
    "a red striped mug"), so the 400 labels cost one batch of 400 short texts.
    """
    from clipsearch.retrieval.queries import classify

    if engine.encoder is None:
        raise QueryError("the zero-shot question needs the index's encoder")
    ranked = classify(engine.encoder, image, [c[0] for c in all_captions()], templates=("{}",))
    ranked = ranked[:k]
    return [
        {"rank": r + 1, "caption": label, "probability": round(float(p), 4)}
        for r, (label, p) in enumerate(ranked)
    ]


def run_demo(
    out_dir: Path,
    *,
    products: int = DEMO_PRODUCTS,
    seed: int = DEMO_SEED,
    model: str = "clipsearch-demo",
    pretrained: str | None = None,
    progress: ProgressCallback | None = None,
) -> DemoReport:
    """Generate a catalog in ``out_dir/catalog``, index it in ``out_dir/index``, and answer
    the demo questions. Also writes ``out_dir/demo_report.json``. ``progress`` gets
    "generate catalog" (products), the "index: ..." stages of :func:`build_demo_index`
    and "queries" (questions asked).
    """
    from clipsearch.retrieval.encoders import load_encoder

    timings: dict[str, float] = {}
    t = time.monotonic()
    catalog = generate_catalog(out_dir / "catalog", products=products, seed=seed, progress=progress)
    timings["generate"] = time.monotonic() - t
    report = progress or ignore
    t = time.monotonic()
    report(Progress("load model", 0, 1, "models"))
    # fp32: the relevance thresholds were calibrated in fp32, and on CPUs where "auto"
    # picks bf16 for the image tower the text tower gets slower, not faster.
    encoder = load_encoder(model, pretrained, device="cpu", precision="fp32")
    report(Progress("load model", 1, 1, "models", detail={"model": model}))
    timings["load_model"] = time.monotonic() - t
    t = time.monotonic()
    engine = build_demo_index(catalog.out_dir, out_dir / INDEX_DIR, encoder, progress=progress)
    timings["index"] = time.monotonic() - t
    t = time.monotonic()
    queries: list[DemoQuery] = []
    report(Progress("queries", 0, _N_QUESTIONS, "questions"))

    thresholds = demo_thresholds(encoder)

    def ask(
        title: str,
        query: str | Path,
        where: str | None = None,
        modality: str = "image",
        sort: str | None = None,
    ) -> None:
        t0 = time.monotonic()
        source = "image" if isinstance(query, Path) else "text"
        threshold = thresholds.get(f"{source}->{modality}")
        hits, matches = search_demo_index(
            engine, query, where=where, modality=modality, threshold=threshold, sort=sort
        )
        kind = source + ("->text" if modality == "text" else "")
        shown = str(query.relative_to(out_dir)) if isinstance(query, Path) else query
        ms = 1000 * (time.monotonic() - t0)
        queries.append(
            DemoQuery(
                title=title,
                kind=kind,
                query=shown,
                filter=where,
                hits=hits,
                matches=matches,
                ms=ms,
                sort=sort,
                threshold=threshold,
                no_good_match=threshold is not None
                and not any(not h["low_confidence"] for h in hits),
            )
        )
        report(Progress("queries", len(queries), _N_QUESTIONS, "questions"))

    with engine:
        ask("Plain text search", "red striped t-shirt")
        ask("The same in Chinese", "红色条纹T恤")
        ask("Sorted by price, after the relevance cutoff", "red striped t-shirt", sort="price")
        ask("Shopping assistant", "red striped t-shirt", where="price < 30 and in_stock")
        ask("Plain text search", "a white dotted mug")
        ask("Text with filters", "blue checked dress", where="price < 60 and in_stock")
        ask("Text with filters", "black boot", where="rating >= 4.5 and in_stock")
        probe = _probe_photo(catalog)
        # The probe is a back photo: find the product among the front photos.
        ask("Image query: which product is this?", probe, where="view = 'front'")
        ask("Image -> text: closest product titles", probe, modality="text")
        ask("A photo from outside the shop", _out_of_domain_photo(out_dir))
        t0 = time.monotonic()
        guesses = what_is_this(engine, probe)
        queries.append(
            DemoQuery(
                title="Image -> text: what is this?",
                kind="classify",
                query=str(probe.relative_to(out_dir)),
                filter=None,
                hits=guesses,
                matches=None,
                ms=1000 * (time.monotonic() - t0),
            )
        )
        report(Progress("queries", len(queries), _N_QUESTIONS, "questions"))
    timings["queries"] = time.monotonic() - t
    demo = DemoReport(
        catalog=catalog,
        index=out_dir / INDEX_DIR,
        model=encoder.fingerprint.to_dict(),
        timings=timings,
        queries=queries,
    )
    atomic_write_text(
        out_dir / "demo_report.json", json.dumps(demo.to_dict(), indent=2, default=str) + "\n"
    )
    return demo


def _out_of_domain_photo(out_dir: Path) -> Path:
    """A synthetic non-product photo (smooth colour blobs) written to ``out_dir``: real
    photos of cats or rockets do not ship with clipsearch."""
    import io

    import numpy as np

    from clipsearch.indexer.fsutil import atomic_write_bytes
    from clipsearch.indexer.training.junk import junk_image

    path = out_dir / "not-a-product.png"
    buf = io.BytesIO()
    junk_image("blobs", np.random.default_rng(DEMO_SEED)).save(buf, "PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _probe_photo(catalog: CatalogSummary) -> Path:
    """The first back photo of the catalog (a photo whose front twin is indexed)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(catalog.manifest, columns=["image_path", "view"]).to_pylist()
    chosen = next((r for r in rows if r["view"] == "back"), rows[0])
    return catalog.out_dir / str(chosen["image_path"])
