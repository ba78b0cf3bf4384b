"""Shard index types side by side: build time, memory, recall@10, query latency.

N x 512 clustered unit vectors (random centres plus noise: real embeddings cluster, and
uniform random vectors make every ANN index look bad). For flat, IVF-Flat, IVF-PQ with
exact re-ranking from the fp16 vectors, HNSW32 and ``auto``, the script runs the
indexer's own ``build_ann`` (train on a sample, add, tune nprobe/efSearch to the target
recall@10 on held-out vectors) and then measures, on fresh queries not used in tuning:

* recall@10 against exact search (the re-ranking step is included where the spec asks
  for it, exactly as the engine runs it);
* single-query latency (one query at a time, FAISS on all cores), median and p95 ms;
* memory: the serialized index size (what ``open_snapshot`` loads) plus, for re-ranked
  indexes, the fp16 vectors it reads (memory-mapped).

    nice python benchmarks/build.py                # N = 1,000,000 (slow on 2 cores)
    nice python benchmarks/build.py --n 200000 --kinds flat ivf ivfpq auto
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def clustered(n: int, dim: int, *, n_clusters: int, noise: float, seed: int) -> np.ndarray:
    """Unit vectors around ``n_clusters`` random centres. ``noise`` is the per-dimension
    noise relative to the centres' scale. In 512-d, at 2.0 clusters are so tight that IVF
    with one probe is ~0.92 recall@10 (too easy); at 2.5 IVF needs nearly every list
    for 0.95 (close to uniform, too hard); the default 2.2 sits between."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x = centres[rng.integers(0, n_clusters, m)]
        x = x + noise * rng.standard_normal((m, dim)).astype(np.float32)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact_topk(xb: np.ndarray, xq: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids by one matmul (the oracle)."""
    scores = xq @ xb.T
    ids = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, ids, axis=1), axis=1)
    return np.take_along_axis(ids, order, axis=1)


def search_one(index: Any, xb16: np.ndarray, q: np.ndarray, k: int, k_factor: int) -> np.ndarray:
    """One query the engine's way: FAISS candidates, exact fp16 rescoring when k_factor > 1."""
    _, ids = index.search(q[None], k * k_factor)
    cand = ids[0][ids[0] >= 0]
    if k_factor > 1:
        scores = xb16[cand].astype(np.float32) @ q
        cand = cand[np.argsort(-scores)]
    return cand[:k]


def bench_kind(
    kind: str, xb: np.ndarray, xq: np.ndarray, truth: np.ndarray, args: Any
) -> dict[str, Any]:
    import faiss

    from clipsearch.indexer.ann import IndexOptions, build_ann

    max_mem = int(args.max_memory_gb * 2**30) if args.max_memory_gb else None
    options = IndexOptions(index=kind, max_memory=max_mem, target_recall=args.target_recall)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    index, spec = build_ann(xb, options)
    build_s = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    index_bytes = len(faiss.serialize_index(index))
    kf = spec.k_factor
    xb16 = xb.astype(np.float16)
    found = np.stack([search_one(index, xb16, q, 10, kf) for q in xq[: args.queries]])
    recall = float(
        np.mean([len(np.intersect1d(f, t)) / 10 for f, t in zip(found, truth, strict=True)])
    )
    lat = []
    for q in xq[: args.queries]:
        t = time.perf_counter()
        search_one(index, xb16, q, 10, kf)
        lat.append((time.perf_counter() - t) * 1000)
    return {
        "requested": kind,
        "factory": spec.factory,
        "search_params": spec.search_params,
        "build_s": round(build_s, 2),
        "index_mb": round(index_bytes / 2**20, 1),
        "fp16_rerank_mb": round(xb16.nbytes / 2**20, 1) if kf > 1 else 0.0,
        "peak_rss_growth_mb": round(max(0, rss1 - rss0) / 1024, 1),
        "tuned_recall_at_10": spec.measured_recall,
        "recall_at_10": round(recall, 4),
        "latency_ms_p50": round(float(np.median(lat)), 3),
        "latency_ms_p95": round(float(np.percentile(lat, 95)), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--noise", type=float, default=2.2)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--kinds", nargs="+", default=["flat", "ivf", "ivfpq", "hnsw", "auto"])
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument(
        "--max-memory-gb", type=float, default=None,
        help="budget passed to auto (IVF-Flat if the vectors fit, else IVF-PQ)",
    )  # fmt: skip
    ap.add_argument(
        "--hnsw-max-n", type=int, default=300_000,
        help="skip HNSW above this many vectors (HNSW32 at 1M x 512 takes 20+ min on 2 cores)",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=RESULTS / "build.json")
    args = ap.parse_args()

    import faiss

    t0 = time.perf_counter()
    x = clustered(
        args.n + args.queries, args.dim, n_clusters=args.clusters, noise=args.noise, seed=0
    )
    xb, xq = x[: args.n], x[args.n :]
    truth = exact_topk(xb, xq, 10)
    lat = []
    for q in xq[:20]:
        t = time.perf_counter()
        s = xb @ q
        np.argpartition(-s, 10)[:10]
        lat.append((time.perf_counter() - t) * 1000)
    setup_s = time.perf_counter() - t0
    print(f"data + ground truth: {setup_s:.1f}s; exact scan {np.median(lat):.1f} ms/query")
    from clipsearch.indexer.ann import IndexOptions, choose_factory

    runs: list[dict[str, Any]] = []
    skipped: list[str] = []
    for kind in args.kinds:
        if kind == "hnsw" and args.n > args.hnsw_max_n:
            skipped.append(f"hnsw: n={args.n:,} > --hnsw-max-n {args.hnsw_max_n:,}")
            continue
        max_mem = int(args.max_memory_gb * 2**30) if args.max_memory_gb else None
        factory = choose_factory(args.n, args.dim, IndexOptions(index=kind, max_memory=max_mem))
        same = next((r for r in runs if r["factory"] == factory), None)
        if kind == "auto" and same is not None:
            # auto picked a factory already built with the same options: builds are seeded,
            # so the row would be the same index measured twice.
            r = {**same, "requested": "auto", "same_as": same["requested"]}
        else:
            r = bench_kind(kind, xb, xq, truth, args)
        print(json.dumps(r), flush=True)
        runs.append(r)
    doc = {
        "benchmark": "build",
        "n": args.n,
        "dim": args.dim,
        "clusters": args.clusters,
        "noise": args.noise,
        "queries": args.queries,
        "target_recall": args.target_recall,
        "max_memory_gb": args.max_memory_gb,
        "exact_numpy_scan_ms_per_query": round(float(np.median(lat)), 2),
        "machine": {
            "cpus": os.cpu_count(),
            "faiss": faiss.__version__,
            "omp_threads": faiss.omp_get_max_threads(),
            "platform": platform.platform(),
            "load_avg_at_end": [round(v, 2) for v in os.getloadavg()],
        },
        "skipped": skipped,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        f"# Shard index types on {args.n:,} x {args.dim} clustered vectors",
        "",
        f"{args.clusters} clusters, noise {args.noise}. "
        f"Exact numpy scan: {doc['exact_numpy_scan_ms_per_query']} ms/query. "
        f"Recall@10 on {args.queries} fresh queries; target {args.target_recall}.",
        "",
        "| requested | factory | params | build s | index MB | + fp16 MB | recall@10 | p50 ms | p95 ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        params = ", ".join(f"{k}={v}" for k, v in r["search_params"].items())
        requested = r["requested"] + (f" (= {r['same_as']} row)" if "same_as" in r else "")
        lines.append(
            f"| {requested} | {r['factory']} | {params} | {r['build_s']} | {r['index_mb']} "
            f"| {r['fp16_rerank_mb']} | {r['recall_at_10']} | {r['latency_ms_p50']} | {r['latency_ms_p95']} |"
        )
    lines += [f"\nSkipped: {s}." for s in skipped]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
