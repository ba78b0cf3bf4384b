"""Write a demo catalog to disk: JPEG photos plus ``products.parquet``.

Layout of ``out_dir``::

    images/SKU-000042-front.jpg
    images/SKU-000042-back.jpg      # about a quarter of the products have a back photo
    products.parquet                # one row per photo; a product with two photos has
                                    # two rows with the same sku (its doc_id)
    catalog.json                    # seed, sizes, and the attribute vocabularies

``image_path`` is relative to ``out_dir``, so the catalog can be moved or copied whole.
Same seed and same library versions (Pillow, pyarrow) give byte-identical files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from clipsearch.indexer.demo.catalog import (
    COLOURS,
    COLOURS_ZH,
    KINDS,
    KINDS_ZH,
    MEASURE_ZH,
    PATTERNS,
    PATTERNS_ZH,
    Product,
    make_product,
)
from clipsearch.indexer.demo.render import encode_jpeg, render_photo
from clipsearch.indexer.fsutil import (
    atomic_write_bytes,
    atomic_write_path,
    atomic_write_text,
    fsync_dir,
)
from clipsearch.retrieval.errors import ConfigError
from clipsearch.retrieval.progress import Progress, ProgressCallback

log = logging.getLogger(__name__)

MANIFEST_NAME = "products.parquet"
# Upper bound on --products: 200k photos is ~1 GB of JPEGs, beyond any demo's needs.
MAX_PRODUCTS = 200_000


@dataclass(frozen=True, kw_only=True)
class CatalogSummary:
    """What :func:`generate_catalog` wrote."""

    # The catalog folder and its manifest.
    out_dir: Path
    manifest: Path
    seed: int
    products: int
    # Photo rows in the manifest (>= products: some products have a back photo).
    images: int

    def to_dict(self) -> dict[str, object]:
        return {
            "out_dir": str(self.out_dir),
            "manifest": str(self.manifest),
            "seed": self.seed,
            "products": self.products,
            "images": self.images,
        }


def generate_catalog(
    out_dir: str | os.PathLike[str],
    *,
    products: int = 3000,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> CatalogSummary:
    """Generate ``products`` products with seed ``seed`` into ``out_dir``.

    An existing catalog in ``out_dir`` is replaced (its ``images/`` folder and manifest);
    other files there are left alone. ``progress`` gets "generate catalog" (products).

    Raises:
        ConfigError: ``products`` is out of range, or ``out_dir`` is a file.
    """
    if not 1 <= products <= MAX_PRODUCTS:
        raise ConfigError(f"--products must be in 1..{MAX_PRODUCTS}, got {products}")
    if seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {seed}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".images.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    rows: list[dict[str, object]] = []
    try:
        if progress is not None:
            progress(Progress("generate catalog", 0, products, "products"))
        for i in range(products):
            product = make_product(seed, i)
            for view in product.views:
                name = f"{product.sku}-{view}.jpg"
                data = encode_jpeg(render_photo(product, view, seed, i))
                atomic_write_bytes(staging / name, data, sync_dir=False)
                rows.append(_row(product, view, f"images/{name}"))
            if progress is not None:
                progress(Progress("generate catalog", i + 1, products, "products"))
        fsync_dir(staging)
        final = out / "images"
        if final.exists():
            old = out / f".images.old-{os.getpid()}"
            final.rename(old)
            staging.rename(final)
            shutil.rmtree(old)
        else:
            staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest = out / MANIFEST_NAME
    _write_manifest(manifest, rows)
    info = {
        "generator": "clipsearch demo-data",
        "seed": seed,
        "products": products,
        "images": len(rows),
        "kinds": list(KINDS),
        "colours": list(COLOURS),
        "patterns": list(PATTERNS),
        "manifest": MANIFEST_NAME,
        "note": "one row per photo; rows of one product share its sku",
    }
    atomic_write_text(out / "catalog.json", json.dumps(info, indent=2) + "\n")
    log.info("wrote %d products (%d photos) to %s", products, len(rows), out)
    return CatalogSummary(
        out_dir=out, manifest=manifest, seed=seed, products=products, images=len(rows)
    )


def _row(product: Product, view: str, image_path: str) -> dict[str, object]:
    return {
        "sku": product.sku,
        "image_path": image_path,
        "view": view,
        "title": product.title,
        "description": product.description,
        "caption": product.caption,
        "title_zh": product.title_zh,
        "caption_zh": product.caption_zh,
        "category": product.category,
        "kind": product.kind,
        "colour": product.colour,
        "pattern": product.pattern,
        "kind_zh": KINDS_ZH[product.kind],
        "colour_zh": COLOURS_ZH[product.colour],
        "pattern_zh": PATTERNS_ZH[product.pattern],
        "measure_zh": MEASURE_ZH[product.kind],
        "kind_alt": product.kind_alt,
        "colour_alt": product.colour_alt,
        "pattern_alt": product.pattern_alt,
        "brand": product.brand,
        "material": product.material,
        "price": product.price,
        "rating": product.rating,
        "in_stock": product.in_stock,
        "created_at": product.created_at,
    }


def _write_manifest(path: Path, rows: list[dict[str, object]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("sku", pa.string()),
            ("image_path", pa.string()),
            ("view", pa.string()),
            ("title", pa.string()),
            ("description", pa.string()),
            ("caption", pa.string()),
            ("title_zh", pa.string()),
            ("caption_zh", pa.string()),
            ("category", pa.string()),
            ("kind", pa.string()),
            ("colour", pa.string()),
            ("pattern", pa.string()),
            ("kind_zh", pa.string()),
            ("colour_zh", pa.string()),
            ("pattern_zh", pa.string()),
            ("measure_zh", pa.string()),
            ("kind_alt", pa.string()),
            ("colour_alt", pa.string()),
            ("pattern_alt", pa.string()),
            ("brand", pa.string()),
            ("material", pa.string()),
            ("price", pa.float64()),
            ("rating", pa.float64()),
            ("in_stock", pa.bool_()),
            ("created_at", pa.timestamp("s", tz="UTC")),
        ]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    atomic_write_path(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
