"""A small product corpus with a lexical part, and a brute-force BM25 oracle.

The oracle scores the same tokens the index holds (``retrieval.lexical.analyze`` of each
row's text) with tantivy's BM25: k1 = 1.2, b = 0.75, idf = ln(1 + (N - n + 0.5) /
(n + 0.5)), per field (words, CJK bigrams) with that field's average length; plus
clipsearch's rule that a term in more than half the rows only scores rows matching a
rarer one. Texts stay under 40 tokens, where tantivy stores field lengths exactly.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from clipsearch.indexer.build import BuildOptions, build
from clipsearch.indexer.sources import SourceOptions
from clipsearch.retrieval.encoders import load_encoder
from clipsearch.retrieval.lexical import COMMON_TERM_SHARE, analyzers, split_cjk

K1, B = 1.2, 0.75

BRANDS = ("Northwind", "Bluefin", "Cobalt Lane", "Driftwood", "Larkspur")
KINDS = ("mug", "hat", "lamp", "tee", "bag", "boot")
COLOURS = ("red", "blue", "green", "black")
PATTERNS = ("striped", "dotted", "plain")
ZH = {"mug": "马克杯", "hat": "帽子", "lamp": "台灯", "tee": "T恤", "bag": "包", "boot": "靴子"}
ZH_COLOUR = {"red": "红色", "blue": "蓝色", "green": "绿色", "black": "黑色"}


def products(n: int = 60) -> list[dict[str, object]]:
    out = []
    for i in range(n):
        brand, kind = BRANDS[i % 5], KINDS[(i // 5) % 6]
        colour, pattern = COLOURS[(i * 7) % 4], PATTERNS[(i * 3) % 3]
        extra = " ".join(["mug"] * (i % 3)) if kind == "mug" else ""
        out.append(
            {
                "sku": f"SKU-{i:06d}",
                "title": f"{brand} {colour} {pattern} {kind}s {extra}".strip(),
                "title_zh": f"{brand} {ZH_COLOUR[colour]}{ZH[kind]}",
                "price": float(5 + i),
                "brand": brand,
            }
        )
    return out


def write_catalog(folder: Path, rows: list[dict[str, object]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "products.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def build_catalog(
    root: Path,
    catalog: Path,
    *,
    text_fields: tuple[str, ...] | None = ("title", "title_zh", "sku"),
    shard_size: int = 100_000,
) -> Path:
    build(
        [catalog],
        root,
        encoder=load_encoder("fake-32"),
        options=BuildOptions(
            shard_size=shard_size,
            text_fields=text_fields,
            sources=SourceOptions(text_cols=("title",), id_col="sku"),
        ),
    )
    return root


def doc_text(row: dict[str, object], fields: tuple[str, ...]) -> str:
    return "\n".join(str(row[f]) for f in fields if row.get(f))


def _tokens(text: str) -> tuple[list[str], list[str]]:
    words, cjk = analyzers()
    latin, grams = split_cjk(text)
    return list(words.analyze(latin)), (list(cjk.analyze(grams)) if grams else [])


def bm25_oracle(texts: list[str], query: str) -> dict[int, float]:
    """Row -> BM25 score of every row the query matches (brute force)."""
    docs = [_tokens(t) for t in texts]
    q_words, q_cjk = _tokens(query)
    n_docs = len(docs)
    scores: dict[int, float] = {}
    rare_hit: set[int] = set()
    any_rare = unknown = False
    for field, q in ((0, dict.fromkeys(q_words)), (1, dict.fromkeys(q_cjk))):
        lengths = [len(d[field]) for d in docs]
        avg = sum(lengths) / n_docs
        counts = [Counter(d[field]) for d in docs]
        for term in q:
            df = sum(1 for c in counts if term in c)
            if df == 0:
                unknown = True  # (misspellings: not in the oracle's queries)
                continue
            common = df > COMMON_TERM_SHARE * n_docs
            any_rare |= not common
            idf = math.log(1 + (n_docs - df + 0.5) / (df + 0.5))
            for i, c in enumerate(counts):
                tf = c.get(term, 0)
                if tf:
                    norm = tf * (K1 + 1) / (tf + K1 * (1 - B + B * lengths[i] / avg))
                    scores[i] = scores.get(i, 0.0) + idf * norm
                    if not common:
                        rare_hit.add(i)
    if any_rare or unknown:
        scores = {i: s for i, s in scores.items() if i in rare_hit}
    return scores
