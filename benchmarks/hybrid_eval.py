"""Hybrid search quality on the demo catalog: P@1 and nDCG@10 per query type and mode.

A held-out catalog (``generate_catalog`` with ``--seed``, not the training seed) is
indexed with the bundled demo model (photos + titles, one document per product; the
lexical part over the default text fields: every string column plus the SKU). Labelled
queries are generated from the catalog's metadata with another seed:

* ``brand+kind``: "Northwind mug"; relevant: products of that brand and kind;
* ``sku``: "SKU-000102"; relevant: that product;
* ``title words``: brand, material and kind of a product ("Cobalt Lane linen t-shirt");
  relevant: products sharing the three;
* ``attributes``: "red striped t-shirt"; relevant: products with that colour, pattern, kind;
* ``chinese``: "红色条纹T恤" (colour, pattern, kind in Chinese); relevant: as attributes;
* ``misspelled``: "Nortwind mug" (one character dropped from the brand); as brand+kind.

Each query searches the image rows, grouped by product (``group_by_doc``), in the modes
``vector``, ``lexical`` and ``hybrid`` (RRF, k = 60, rows holding every query word
first). Binary relevance; nDCG@10's ideal ranks min(10, relevant) products first.

Two lexical configurations, each its own index over the same catalog: ``default`` (every
string column and the SKU: the catalog's attribute columns, captions and Chinese titles
included) and ``title,sku`` (what a shop with only titles has: "plain" is not in titles,
and the Chinese words are absent, so attribute and Chinese queries lean on the vectors).
Then hybrid alone, not grouped, at ``fusion_depth`` 10, 30, 50 and 100 (the default
configuration; grouped searches fetch a pool of 100 rows, so they cannot tell the depths
apart). Writes ``benchmarks/results/hybrid_eval.json`` and ``.md``:

    nice .venv/bin/python benchmarks/hybrid_eval.py --products 1500
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
MODES = ("vector", "lexical", "hybrid")
TYPES = ("brand+kind", "sku", "title words", "attributes", "chinese", "misspelled")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_queries(
    products: list[dict[str, Any]], n_per_type: int, seed: int
) -> list[tuple[str, str, set[str]]]:
    """(type, query text, relevant skus), ``n_per_type`` of each type."""
    from clipsearch.indexer.demo.catalog import COLOURS_ZH, KINDS_ZH, PATTERNS_ZH

    rng = np.random.default_rng(seed)

    def where(pred: Callable[[dict[str, Any]], bool]) -> set[str]:
        return {p["sku"] for p in products if pred(p)}

    out: list[tuple[str, str, set[str]]] = []
    for i in rng.choice(len(products), size=n_per_type * len(TYPES), replace=True).tolist():
        p = products[i]
        kind = str(p["kind"])
        brand_kind = where(lambda q, p=p: q["brand"] == p["brand"] and q["kind"] == p["kind"])
        attrs = where(
            lambda q, p=p: (
                (q["colour"], q["pattern"], q["kind"]) == (p["colour"], p["pattern"], p["kind"])
            )
        )
        n = len(out) % len(TYPES)
        t = TYPES[n]
        if t == "brand+kind":
            out.append((t, f"{p['brand']} {kind}", brand_kind))
        elif t == "sku":
            out.append((t, str(p["sku"]), {p["sku"]}))
        elif t == "title words":
            rel = where(
                lambda q, p=p: (
                    (q["brand"], q["material"], q["kind"]) == (p["brand"], p["material"], p["kind"])
                )
            )
            out.append((t, f"{p['brand']} {p['material']} {kind}", rel))
        elif t == "attributes":
            out.append((t, f"{p['colour']} {p['pattern']} {kind}", attrs))
        elif t == "chinese":
            zh = f"{COLOURS_ZH[p['colour']]}{PATTERNS_ZH[p['pattern']]}{KINDS_ZH[kind]}"
            out.append((t, zh, attrs))
        else:
            brand = str(p["brand"]).split()[0]
            cut = int(rng.integers(1, len(brand)))  # never the first letter
            typo = brand[:cut] + brand[cut + 1 :]
            rest = " ".join(str(p["brand"]).split()[1:])
            out.append((t, f"{typo} {rest} {kind}".replace("  ", " "), brand_kind))
    return out


def ndcg_at_10(ranked: list[str], relevant: set[str]) -> float:
    dcg = sum(1 / math.log2(i + 2) for i, d in enumerate(ranked[:10]) if d in relevant)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(10, len(relevant))))
    return dcg / ideal if ideal else 0.0


CONFIGS: dict[str, tuple[str, ...] | None] = {"default": None, "title,sku": ("title", "sku")}


def evaluate(
    index_dir: Path, catalog_dir: Path, encoder: Any, text_fields: tuple[str, ...] | None,
    queries: list[tuple[str, str, set[str]]],
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]], list[str]]:  # fmt: skip
    """Build (once) and evaluate one configuration: (summary, examples, lexical fields)."""
    from clipsearch.indexer.build import BuildOptions, build
    from clipsearch.indexer.sources import SourceOptions
    from clipsearch.retrieval.engine import SearchEngine

    if not (index_dir / "CURRENT").exists():
        log(f"indexing photos and titles with the demo model (text fields {text_fields})")
        sources = SourceOptions(
            image_col="image_path", text_cols=("title",), id_col="sku", on_duplicate="group"
        )
        options = BuildOptions(sources=sources, text_fields=text_fields)
        build([catalog_dir / "products.parquet"], index_dir, encoder=encoder, options=options)
    scores: dict[str, dict[str, dict[str, list[float]]]] = {
        t: {m: {"p@1": [], "ndcg@10": []} for m in MODES} for t in TYPES
    }
    examples: dict[str, list[dict[str, Any]]] = {t: [] for t in TYPES}
    with SearchEngine.open(index_dir, encoder=encoder) as engine:
        fields = next(list(s.lexical.record.fields) for s in engine.snapshot.shards if s.lexical)
        log(f"searching {len(queries)} queries x {len(MODES)} modes")
        for qtype, text, relevant in queries:
            tops: dict[str, list[str]] = {}
            for mode in MODES:
                res = engine.search(text, k=10, mode=mode, group_by_doc=True, modality="image")
                ranked = res.doc_ids
                tops[mode] = ranked[:3]
                scores[qtype][mode]["p@1"].append(float(bool(ranked) and ranked[0] in relevant))
                scores[qtype][mode]["ndcg@10"].append(ndcg_at_10(ranked, relevant))
            if len(examples[qtype]) < 2:
                examples[qtype].append({"query": text, "relevant": len(relevant), "top3": tops})
    summary: dict[str, Any] = {
        t: {m: {k: round(float(np.mean(v)), 3) for k, v in d.items()} for m, d in modes.items()}
        for t, modes in scores.items()
    }
    for t in TYPES:
        s = summary[t]
        s["hybrid >= best of both"] = all(
            s["hybrid"][k] >= max(s["vector"][k], s["lexical"][k]) for k in ("p@1", "ndcg@10")
        )
    return summary, examples, fields


DEPTHS = (10, 30, 50, 100)


def depth_sweep(
    index_dir: Path, encoder: Any, queries: list[tuple[str, str, set[str]]]
) -> dict[str, dict[str, dict[str, float]]]:
    """Hybrid P@1 and nDCG@10 per query type at each ``fusion_depth`` of ``DEPTHS``, not
    grouped (grouping fetches a pool of 100 rows, deeper than every depth here, so
    grouped results cannot tell the depths apart). Products are counted once, at their
    best row."""
    from clipsearch.retrieval.engine import SearchEngine

    out: dict[str, dict[str, dict[str, float]]] = {}
    with SearchEngine.open(index_dir, encoder=encoder) as engine:
        for depth in DEPTHS:
            scores: dict[str, dict[str, list[float]]] = {
                t: {"p@1": [], "ndcg@10": []} for t in TYPES
            }
            for qtype, text, relevant in queries:
                res = engine.search(text, k=10, mode="hybrid", fusion_depth=depth, modality="image")
                ranked = list(dict.fromkeys(res.doc_ids))
                scores[qtype]["p@1"].append(float(bool(ranked) and ranked[0] in relevant))
                scores[qtype]["ndcg@10"].append(ndcg_at_10(ranked, relevant))
            out[str(depth)] = {
                t: {k: round(float(np.mean(v)), 3) for k, v in d.items()} for t, d in scores.items()
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--products", type=int, default=1500)
    parser.add_argument("--catalog-seed", type=int, default=907, help="held-out catalog seed")
    parser.add_argument("--query-seed", type=int, default=4242)
    parser.add_argument("--per-type", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from clipsearch.indexer.demo.generate import generate_catalog
    from clipsearch.retrieval.encoders import load_encoder
    from clipsearch.retrieval.options import DEFAULT_FUSION_DEPTH as DEFAULT_DEPTH

    work = args.workdir or Path(tempfile.mkdtemp(prefix="hybrid-eval-"))
    catalog_dir = work / "catalog"
    t0 = time.perf_counter()
    if not (catalog_dir / "products.parquet").exists():
        log(f"generating {args.products} products (seed {args.catalog_seed}) in {catalog_dir}")
        generate_catalog(catalog_dir, products=args.products, seed=args.catalog_seed)
    encoder = load_encoder("clipsearch-demo")
    seen: dict[str, dict[str, Any]] = {}
    for row in pq.read_table(catalog_dir / "products.parquet").to_pylist():
        seen.setdefault(row["sku"], row)
    products = list(seen.values())
    queries = make_queries(products, args.per_type, args.query_seed)
    configs = {}
    for name, fields in CONFIGS.items():
        index_dir = work / ("index" if fields is None else "index-" + "-".join(fields))
        summary, examples, used = evaluate(index_dir, catalog_dir, encoder, fields, queries)
        configs[name] = {"lexical_fields": used, "results": summary, "examples": examples}
    log(f"hybrid at fusion_depth {', '.join(map(str, DEPTHS))}, not grouped")
    depths = depth_sweep(work / "index", encoder, queries)
    out = {
        "products": len(products),
        "catalog_seed": args.catalog_seed,
        "query_seed": args.query_seed,
        "queries_per_type": args.per_type,
        "model": "clipsearch-demo (bundled)",
        "seconds": round(time.perf_counter() - t0, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "configs": configs,
        "fusion_depth_ungrouped": depths,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hybrid_eval.json").write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    lines = [
        "# Hybrid search quality on the demo catalog",
        "",
        f"{len(products)} products (held-out seed {args.catalog_seed}), {args.per_type} "
        f"queries per type (seed {args.query_seed}), image rows grouped by product, bundled "
        "demo model, RRF k=60, rows holding every query word first. Command: `nice "
        f".venv/bin/python benchmarks/hybrid_eval.py --products {args.products}`. Load "
        f"average: {out['load_average']}.",
    ]
    for name, c in configs.items():
        lines += [
            "",
            f"## Lexical fields: {name} ({', '.join(c['lexical_fields'])})",
            "",
            "| query type | P@1 vector | P@1 lexical | P@1 hybrid | nDCG@10 vector | "
            "nDCG@10 lexical | nDCG@10 hybrid | hybrid >= both |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t in TYPES:
            s = c["results"][t]
            lines.append(
                f"| {t} | "
                + " | ".join(f"{s[m]['p@1']:.3f}" for m in MODES)
                + " | "
                + " | ".join(f"{s[m]['ndcg@10']:.3f}" for m in MODES)
                + f" | {'yes' if s['hybrid >= best of both'] else 'no'} |"
            )
    lines += [
        "",
        "## Fusion depth (default lexical fields, hybrid, not grouped)",
        "",
        "`fusion_depth`: rows each list contributes to the fusion (default "
        f"{DEFAULT_DEPTH}). Grouped searches fetch a pool of 100 rows, so the tables above "
        "do not depend on it. Each cell: P@1 / nDCG@10.",
        "",
        "| query type | " + " | ".join(f"depth {d}" for d in DEPTHS) + " |",
        "|---|" + "---|" * len(DEPTHS),
    ]
    for t in TYPES:
        cells = [
            f"{depths[str(d)][t]['p@1']:.3f} / {depths[str(d)][t]['ndcg@10']:.3f}" for d in DEPTHS
        ]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    (RESULTS / "hybrid_eval.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
