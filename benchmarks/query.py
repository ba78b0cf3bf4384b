"""Query benchmark: the engine against exact numpy, faiss defaults and naive post-filtering.

On N x 512 clustered synthetic vectors (unit norm, 1000 Gaussian clusters) with a
``bucket`` column (uniform 0..999, independent of the clusters) so that
``bucket < 1 / 10 / 100 / 500`` keeps 0.1% / 1% / 10% / 50% of the rows (plus 2% and
5%, shown but outside the goals). Two indexes are
written with the real shard writer: ``Flat`` (exact) and ``IVF{nlist},Flat`` (ANN, nprobe
tuned by the indexer to recall@10 >= 0.95), each in ``--shards`` shards.

Measured side by side in one run, latencies in ms (p50/p99) and QPS:

* ``numpy``: ``xb @ q`` + argpartition over float32 vectors: the memory-bandwidth floor;
* ``faiss-default``: IndexFlatIP / the IVF index searched with faiss's defaults (all OMP
  threads, BLAS only from 250 queries at d=512; IVF nprobe=1 as faiss ships it);
* ``engine-exact`` / ``engine-ann``: SearchEngine on the flat / IVF index;
* ``postfilter``: IVF (tuned nprobe) top ``k * 10`` then drop non-matching rows.

Filtered recall@10 is measured against exact filtered search. Writes
``benchmarks/results/query.json`` and ``.md``. Run with ``nice``:

    nice .venv/bin/python benchmarks/query.py --n 1000000
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from _synthetic import clustered_vectors

DIM = 512
K = 10
SELECTIVITIES = {"0.1%": 1, "1%": 10, "10%": 100, "50%": 500}
# Measured too, outside the goals: the band where exact scans and filtered IVF
# cost about the same, the planner's hardest choice.
EXTRA_SELECTIVITIES = {"2%": 20, "5%": 50}
RESULTS = Path(__file__).parent / "results"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors float32 [n, DIM], bucket int32 [n], queries float32 [q, DIM])."""
    rng = np.random.default_rng(seed)
    centres, xb = clustered_vectors(rng, n, DIM)
    bucket = rng.integers(0, 1000, n).astype(np.int32)
    q = centres[rng.integers(0, 1000, 256)] + 0.6 * rng.standard_normal((256, DIM)).astype(
        np.float32
    )
    return xb, bucket, (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def write_index(root: Path, xb: np.ndarray, bucket: np.ndarray, shards: int, index: str) -> None:
    from clipsearch.indexer.ann import IndexOptions
    from clipsearch.indexer.commit import commit
    from clipsearch.indexer.writer import write_shard
    from clipsearch.retrieval.encoders import FakeEncoder
    from clipsearch.retrieval.manifest import Manifest, shard_name

    n = len(xb)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    records = []
    for s, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        ids = [f"doc{i}" for i in range(lo, hi)]
        meta = pa.table(
            {
                "doc_id": ids,
                "modality": ["image"] * (hi - lo),
                "source": ids,
                "content_hash": [""] * (hi - lo),
                "bucket": pa.array(bucket[lo:hi]),
            }
        )
        records.append(
            write_shard(
                root,
                name=shard_name(s),
                modality="image",
                row_id_start=int(lo),
                vectors=xb[lo:hi],
                metadata=meta,
                index_options=IndexOptions(index=index, tune_queries=100, target_recall=0.95),
            )
        )
    manifest = Manifest(
        version=1,
        created_at="",
        operation="build",
        encoder=FakeEncoder(DIM).fingerprint,
        shards=tuple(records),
        next_row_id=n,
        next_shard=shards,
    )
    commit(root, manifest)


def timed(fn: Callable[[Any], Any], items: list[Any]) -> tuple[list[float], list[Any]]:
    """Latencies (ms) and outputs of ``fn`` over ``items``, after one untimed pass.

    The untimed pass pages in what the queries touch: the indexes are memory-mapped, and
    each query visits different IVF lists, so a single warm-up query leaves most of them
    cold (on the benchmark VM, whose DAMON policy also pages idle memory out, cold
    filtered p50s were 3-10x the warm ones).
    """
    for item in items:
        fn(item)
    times, outs = [], []
    for item in items:
        t = time.perf_counter()
        outs.append(fn(item))
        times.append((time.perf_counter() - t) * 1000)
    return times, outs


def summary(times: list[float], per_call: int = 1) -> dict[str, float]:
    a = np.array(times)
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "qps": round(per_call * 1000 * len(a) / float(a.sum()), 1),
    }


def recall(found: list[list[int]], truth: list[list[int]]) -> tuple[float, float]:
    """(mean recall@K, share of queries with min(K, matches) results)."""
    r = [len(set(f) & set(t)) / max(1, len(t)) for f, t in zip(found, truth, strict=True)]
    full = [len(f) >= len(t) for f, t in zip(found, truth, strict=True)]
    return round(float(np.mean(r)), 4), round(float(np.mean(full)), 4)


def numpy_topk(xb: np.ndarray, q: np.ndarray, mask: np.ndarray | None = None) -> list[int]:
    s = xb @ q
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    idx = np.argpartition(-s, K)[:K]
    idx = idx[np.argsort(-s[idx])]
    return [int(i) for i in idx if np.isfinite(s[i])]


def exact_truth(
    codes: np.ndarray, xq: np.ndarray, mask: np.ndarray | None = None
) -> list[list[int]]:
    """Ground truth in one batched BLAS pass (a per-query loop would dominate the run)."""
    from clipsearch.retrieval.kernels import exact_search

    _, idx = exact_search(xq, codes, K, mask=mask)
    return idx.tolist()


def run(n: int, shards: int, n_queries: int, batch: int, workdir: Path) -> dict[str, Any]:
    import faiss

    from clipsearch.retrieval.engine import SearchEngine
    from clipsearch.retrieval.kernels import exact_search

    t0 = time.perf_counter()
    xb, bucket, queries = make_data(n)
    q1 = list(queries[:n_queries])
    out: dict[str, Any] = {
        "n": n,
        "dim": DIM,
        "shards": shards,
        "queries": n_queries,
        "batch": batch,
    }
    t = time.perf_counter()
    log(f"writing the flat index ({n:,} rows)")
    write_index(workdir / "flat", xb, bucket, shards, "flat")
    out["build_flat_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    nlist = 1 << max(4, round(np.log2(4 * np.sqrt(n / shards))) - 1)
    log(f"writing the IVF{nlist} index")
    write_index(workdir / "ivf", xb, bucket, shards, f"IVF{nlist},Flat")
    log("measuring")
    out["build_ivf_s"] = round(time.perf_counter() - t, 1)
    default_threshold = faiss.cvar.distance_compute_blas_threshold
    flat = SearchEngine.open(workdir / "flat")
    ann = SearchEngine.open(workdir / "ivf")
    out["ivf"] = {s.record.name: s.record.index.to_dict() for s in ann._state.shards}
    tuned_threshold = faiss.cvar.distance_compute_blas_threshold
    del xb  # from here the float32 vectors are read from the flat index (zero-copy views)
    codes = np.concatenate([s.codes for s in flat._state.shards])  # type: ignore[misc]
    truth = exact_truth(codes, np.stack(q1))
    rows: dict[str, Any] = {}

    def single(name: str, fn: Callable[[np.ndarray], list[int]], expected: list[list[int]]) -> None:
        times, found = timed(fn, q1)
        rows[name] = {
            **summary(times),
            **dict(zip(("recall@10", "full_k"), recall(found, expected), strict=True)),
        }

    # --- unfiltered, one query at a time
    single("numpy single", lambda q: numpy_topk(codes, q), truth)
    faiss_flat = faiss.IndexFlatIP(DIM)
    faiss_flat.add(codes)
    faiss.cvar.distance_compute_blas_threshold = default_threshold
    single(
        "faiss-default flat single", lambda q: faiss_flat.search(q[None], K)[1][0].tolist(), truth
    )
    ivf_indexes = [s.index for s in ann._state.shards]
    starts = [s.record.row_id_start for s in ann._state.shards]
    tuned_nprobe = [s.params.get("nprobe", 1) for s in ann._state.shards]

    def faiss_ivf(q: np.ndarray, nprobes: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard by shard with faiss's own threading, merged by score."""
        ds, ids = [], []
        for start, idx, nprobe in zip(starts, ivf_indexes, nprobes, strict=True):
            params = faiss.SearchParametersIVF()
            params.nprobe = nprobe
            d, i = idx.search(q[None], k, params=params)
            ds.append(d[0])
            ids.append(np.where(i[0] >= 0, i[0] + start, -1))
        d, i = np.concatenate(ds), np.concatenate(ids)
        order = np.argsort(-d)[:k]
        return d[order], i[order]

    ivf_default = [1] * len(ivf_indexes)  # faiss's default nprobe
    single(
        "faiss-default ivf(nprobe=1) single",
        lambda q: [int(i) for i in faiss_ivf(q, ivf_default, K)[1] if i >= 0],
        truth,
    )
    faiss.cvar.distance_compute_blas_threshold = tuned_threshold
    single("engine-exact single", lambda q: flat.search(q, k=K).row_ids, truth)
    single("engine-ann single", lambda q: ann.search(q, k=K).row_ids, truth)

    # --- unfiltered, batches
    batches = [queries[i : i + batch] for i in range(0, len(queries) - batch + 1, batch)][:3]
    btruth = [exact_truth(codes, b) for b in batches]

    def batched(name: str, fn: Callable[[np.ndarray], list[list[int]]]) -> None:
        times, found = timed(fn, batches)
        flat_found = [f for fs in found for f in fs]
        rows[name] = {
            **summary(times, batch),
            **dict(
                zip(
                    ("recall@10", "full_k"),
                    recall(flat_found, [t for ts in btruth for t in ts]),
                    strict=True,
                )
            ),
        }

    batched("numpy batch", lambda b: exact_search(b, codes, K)[1].tolist())
    faiss.cvar.distance_compute_blas_threshold = default_threshold
    batched("faiss-default flat batch", lambda b: faiss_flat.search(b, K)[1].tolist())
    faiss.cvar.distance_compute_blas_threshold = tuned_threshold
    batched("engine-exact batch", lambda b: [r.row_ids for r in flat.search_batch(list(b), k=K)])
    batched("engine-ann batch", lambda b: [r.row_ids for r in ann.search_batch(list(b), k=K)])
    faiss_flat.reset()  # frees its copy of the vectors

    # --- filtered
    bucket_all = np.concatenate(
        [s.metadata.column("bucket").to_numpy() for s in flat._state.shards]
    )
    for label, below in {**SELECTIVITIES, **EXTRA_SELECTIVITIES}.items():
        where = f"bucket < {below}"
        mask = bucket_all < below
        ftruth = exact_truth(codes, np.stack(q1), mask)
        single(f"numpy filtered {label}", lambda q, m=mask: numpy_topk(codes, q, m), ftruth)
        single(
            f"engine-exact filtered {label}",
            lambda q, w=where: flat.search(q, k=K, where=w).row_ids,
            ftruth,
        )
        # The engine caches per filter text its masks and (for exact scans) a contiguous
        # copy of the allowed rows; the first query with a filter pays for both.
        t = time.perf_counter()
        ann.search(q1[-1], k=K, where=where)
        cold_ms = round((time.perf_counter() - t) * 1000, 3)
        single(
            f"engine-ann filtered {label}",
            lambda q, w=where: ann.search(q, k=K, where=w).row_ids,
            ftruth,
        )
        rows[f"engine-ann filtered {label}"]["plans"] = sorted(
            set(ann.search(q1[0], k=K, where=where).plans.values())
        )
        rows[f"engine-ann filtered {label}"]["first_query_ms"] = cold_ms

        def post(q: np.ndarray, m: np.ndarray = mask) -> list[int]:
            _, ids = faiss_ivf(q, tuned_nprobe, K * 10)
            return [int(i) for i in ids if i >= 0 and m[i]][:K]

        single(f"postfilter x10 {label}", post, ftruth)
    out["rows"] = rows
    out["goals"] = goals(rows)
    out["total_s"] = round(time.perf_counter() - t0, 1)
    flat.close()
    ann.close()
    return out


def goals(rows: dict[str, Any]) -> dict[str, Any]:
    ann_p50 = rows["engine-ann single"]["p50_ms"]
    filtered = {
        k: v
        for k, v in rows.items()
        if k.startswith("engine-ann filtered") and k.split()[-1] in SELECTIVITIES
    }
    return {
        "exact_single_vs_numpy_floor": round(
            rows["engine-exact single"]["p50_ms"] / rows["numpy single"]["p50_ms"], 3
        ),
        "exact_single_within_1.2x": rows["engine-exact single"]["p50_ms"]
        <= 1.2 * rows["numpy single"]["p50_ms"],
        "filtered_min_recall@10": min(v["recall@10"] for v in filtered.values()),
        "filtered_always_k": all(v["full_k"] == 1.0 for v in filtered.values()),
        "filtered_max_p50_vs_unfiltered_ann": round(
            max(v["p50_ms"] for v in filtered.values()) / ann_p50, 3
        ),
    }


def to_markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Query benchmark: {r['n']:,} x {r['dim']} vectors, {r['shards']} shards",
        "",
        f"Machine: {r['machine']}. {r['queries']} single queries, batches of {r['batch']}. "
        f"Build: flat {r['build_flat_s']} s, IVF {r['build_ivf_s']} s. Total {r['total_s']} s.",
        "",
        "| config | p50 ms | p99 ms | QPS | recall@10 | share with k results |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, v in r["rows"].items():
        plans = f" ({', '.join(v['plans'])})" if "plans" in v else ""
        if "first_query_ms" in v:
            plans += f" [first query with this filter: {v['first_query_ms']} ms]"
        lines.append(
            f"| {name}{plans} | {v['p50_ms']} | {v['p99_ms']} | {v['qps']} | {v['recall@10']} | {v['full_k']} |"
        )
    lines += [
        "",
        "Goals (filtered rows: the issue's 0.1%, 1%, 10% and 50%; 2% and 5% are shown as "
        "the band where the planner's choice between an exact scan and filtered IVF is "
        "closest):",
        "",
        "```",
        json.dumps(r["goals"], indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="rows (default 1M)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the indexes")
    parser.add_argument("--out", type=Path, default=RESULTS / "query")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="clipsearch-bench-"))
    try:
        result = run(args.n, args.shards, args.queries, args.batch, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
