"""What checking every file at open costs: one 1M x 512 shard, opened three ways.

``open_snapshot`` reads each file once and, by default (``verify="fast"``), hashes it
with XXH3-128 before parsing it, so corrupt bytes are never served. This script writes a
real index with the indexer's own ``write_shard`` + ``commit`` (1M random unit vectors
of dim 512: a 1 GiB fp16 ``.npy``, the FAISS file, the metadata Parquet) and times:

* ``size``: sizes only, the baseline (no content check; vectors stay lazily mapped);
* ``fast``: sizes + XXH3-128 of every file (the default);
* ``full``: sizes + sha256 + XXH3-128 (what ``verify_hashes=True`` and ``index verify`` do);

each with the files in the page cache ("warm": a server restart) and evicted from it
with ``posix_fadvise(DONTNEED)`` ("cold": the first open after boot; the disk speed
matters then). Ratios are against ``size`` in the same run. ``before`` is the
``open_snapshot`` of the commit before single-read opens (``--before``, loaded with
``git show``): it checked sizes, then read every shard file twice (once to check the
shapes, once to load) and never checked content.

    nice python benchmarks/open_verify.py                      # 1M x 512, flat and sq8
    nice python benchmarks/open_verify.py --n 200000 --layouts flat
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
# FAISS index per layout: "flat" stores float32 vectors (the biggest FAISS file, 2 GiB
# at 1M x 512); "sq8" one byte per dimension (0.5 GiB), close to what an IVF index with
# a memory budget costs in bytes, without minutes of k-means.
LAYOUTS = {"flat": "Flat", "sq8": "SQ8"}


def write_index(root: Path, n: int, dim: int, factory: str) -> None:
    import pyarrow as pa

    from clipsearch.indexer.ann import IndexOptions
    from clipsearch.indexer.commit import commit
    from clipsearch.indexer.writer import write_shard
    from clipsearch.retrieval.encoders import FakeEncoder
    from clipsearch.retrieval.manifest import Manifest

    rng = np.random.default_rng(0)
    vectors = np.empty((n, dim), np.float16)
    for s in range(0, n, 100_000):
        x = rng.standard_normal((min(100_000, n - s), dim)).astype(np.float32)
        vectors[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"doc{i}" for i in range(n)]
    metadata = pa.table(
        {
            "doc_id": ids,
            "modality": pa.array(["image"] * n),
            "source": [f"images/{d}.jpg" for d in ids],
            "content_hash": [f"{i:064x}" for i in range(n)],
            "price": rng.uniform(1, 100, n),
        }
    )
    record = write_shard(
        root,
        name="s000000",
        modality="image",
        row_id_start=0,
        vectors=vectors,
        metadata=metadata,
        index_options=IndexOptions(index=factory),
    )
    manifest = Manifest(
        version=1,
        created_at="",
        operation="build",
        encoder=FakeEncoder(dim).fingerprint,
        shards=(record,),
        next_row_id=n,
        next_shard=1,
    )
    commit(root, replace(manifest))


def evict(root: Path) -> None:
    """Drop the index's files from the page cache (no root needed for our own files)."""
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd) if os.access(p, os.W_OK) else None
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def load_before(commit: str) -> Any:
    """The ``open_snapshot`` of ``commit``'s retrieval/store.py, or None without git."""
    repo = Path(__file__).resolve().parent.parent
    try:
        source = subprocess.run(
            ["git", "show", f"{commit}:retrieval/store.py"],
            cwd=repo,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "store_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("store_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["store_before"] = module
    spec.loader.exec_module(module)
    return module.open_snapshot


def time_open(root: Path, level: str, *, cold: bool, before: Any) -> float:
    from clipsearch.retrieval.store import open_snapshot

    if cold:
        evict(root)
    else:
        open_snapshot(root, verify="size")  # ensure the page cache holds every file
    t0 = time.perf_counter()
    snap = before(root) if level == "before" else open_snapshot(root, verify=level)  # type: ignore[arg-type]
    seconds = time.perf_counter() - t0
    del snap
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--before", default="5b563e5", help="commit for the 'before' column")
    args = ap.parse_args()
    before = load_before(args.before)
    levels = ("size", "fast", "full") + (("before",) if before is not None else ())

    loadavg_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    for layout in args.layouts:
        work = Path(tempfile.mkdtemp(prefix="open_verify-", dir=args.workdir))
        root = work / "idx"
        try:
            t0 = time.perf_counter()
            write_index(root, args.n, args.dim, LAYOUTS[layout])
            write_s = time.perf_counter() - t0
            sizes = {p.name: p.stat().st_size for p in (root / "shards").iterdir()}
            row: dict[str, Any] = {
                "layout": layout,
                "factory": LAYOUTS[layout],
                "bytes": sizes,
                "write_seconds": round(write_s, 2),
            }
            for cache in ("warm", "cold"):
                for level in levels:
                    times = [
                        time_open(root, level, cold=cache == "cold", before=before)
                        for _ in range(args.repeats)
                    ]
                    row[f"{cache}_{level}_s"] = round(statistics.median(times), 3)
                for level in levels[1:]:
                    base = row[f"{cache}_size_s"]
                    row[f"{cache}_{level}_ratio"] = round(row[f"{cache}_{level}_s"] / base, 2)
                    extra = row[f"{cache}_{level}_s"] - base
                    row[f"{cache}_{level}_extra_s"] = round(extra, 3)
            runs.append(row)
            print(json.dumps(row))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    result = {
        "n": args.n,
        "dim": args.dim,
        "repeats": args.repeats,
        "before_commit": args.before if before is not None else None,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_before": [round(x, 2) for x in loadavg_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "open_verify.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "open_verify.md").write_text(render(result))


def render(result: dict[str, Any]) -> str:
    lines = [
        f"# Open-time content checks, {result['n']:,} x {result['dim']} fp16",
        "",
        "`python benchmarks/open_verify.py` (median of "
        f"{result['repeats']}; load average {result['machine']['loadavg_before']} before, "
        f"{result['machine']['loadavg_after']} after, {result['machine']['cpus']} CPUs).",
        "size = sizes only (baseline); fast = + XXH3-128 of every file (the default);",
        "full = + sha256 too; before = the open of commit "
        f"{result['before_commit']} (sizes only, shard files read twice).",
        "Cold = files evicted from the page cache first. (x) = ratio to size.",
        "",
        "| layout | files (MiB) | cache | size s | fast s (x) | full s (x) | before s (x) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        mib = sum(r["bytes"].values()) / (1 << 20)
        for cache in ("warm", "cold"):
            lines.append(
                f"| {r['layout']} ({r['factory']}) | {mib:,.0f} | {cache} | "
                f"{r[f'{cache}_size_s']} | {r[f'{cache}_fast_s']} ({r[f'{cache}_fast_ratio']}x) | "
                f"{r[f'{cache}_full_s']} ({r[f'{cache}_full_ratio']}x) | "
                f"{r.get(f'{cache}_before_s')} ({r.get(f'{cache}_before_ratio')}x) |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
