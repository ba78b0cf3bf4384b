"""The Ray path against the local path on this machine: build and query overhead, and
throughput with 1 vs 2 encoder actors.

In one process, over one folder of JPEGs and the bundled demo model:

* ``build``: ``indexer.build.build`` (local threads) vs ``indexer.distributed.build_on_ray``
  with 1 and with 2 encoder actors on a private Ray cluster of this machine's CPUs
  (decode tasks, encoder actor pool, shard writes as tasks). Reported as items/s and as
  a ratio to the local build. The cluster start is timed separately (paid once).
* ``query``: ``SearchEngine`` vs ``DistributedSearchEngine`` (1 and 2 shard groups) on the
  built index: text queries one at a time (encode + fan-out + merge + rerank), same
  queries, same answers (checked), ms per query and the ratio to local.

On one machine Ray can only add overhead (the same cores do the same work plus
serialisation and scheduling); these ratios are the fixed cost a cluster has to
amortise. A second actor on two shared cores cannot double anything: it measures how the
pool shares a node, not scaling across GPUs (see docs/scale-out.md).

    nice python benchmarks/ray_scale.py            # writes benchmarks/results/ray_scale.{json,md}
    python benchmarks/ray_scale.py --images 120 --queries 20
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
QUERIES = ["red shirt", "blue mug", "green lamp", "striped dress", "wooden chair", "black bag"]


def make_images(folder: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((320, 240), Image.Resampling.BILINEAR)
        img.save(folder / f"img{i:05d}.jpg", quality=88)


class TimedStream:
    """Wraps an ``embedder``: seconds until the first outcome reached the driver (actor
    start, first decode block, first encoder batch). Outcomes arrive in order, so after
    that they come in bursts of what the pool already finished: no steady rate is
    measurable from the driver's side."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.first_s = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        first = True
        for outcome in self.inner(*args, **kwargs):
            if first:
                self.first_s, first = time.perf_counter() - t0, False
            yield outcome


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--queries", type=int, default=60)
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2, help="builds per setting (best kept)")
    ap.add_argument("--out", type=Path, default=RESULTS / "ray_scale.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only

    import ray

    from clipsearch.indexer.build import BuildOptions, build
    from clipsearch.indexer.distributed import (
        RayEmbedder,
        RayOptions,
        RayShardWriter,
        build_on_ray,
    )
    from clipsearch.retrieval.distributed import DistributedOptions, DistributedSearchEngine
    from clipsearch.retrieval.encoders import load_encoder
    from clipsearch.retrieval.engine import SearchEngine

    work = Path(tempfile.mkdtemp(prefix="ray-scale-"))
    try:
        make_images(work / "images", args.images)
        encoder = load_encoder("clipsearch-demo")
        options = BuildOptions(shard_size=args.shard_size)
        backend = encoder.fingerprint.backend
        print(f"encoder: clipsearch-demo ({backend}); {args.images} images", flush=True)

        # Warm the encoder and the page cache once, outside every timing.
        build([work / "images"], work / "warm", encoder=encoder, options=options)
        local_runs = []
        for rep in range(args.repeats):
            target = work / ("local" if rep == 0 else f"local-{rep}")
            secs, _ = timed(
                lambda target=target: build(
                    [work / "images"], target, encoder=encoder, options=options
                )
            )
            local_runs.append(secs)
        local_s = min(local_runs)
        print(f"local build: {local_s:.2f} s", flush=True)

        cpus = os.cpu_count() or 2
        start_s, _ = timed(
            lambda: ray.init(
                address="local", num_cpus=cpus, include_dashboard=False, logging_level="WARNING"
            )
        )
        # Start Ray's worker processes and their imports once (a real cluster has them
        # warm too); each timed build still starts its own encoder actors.
        make_images(work / "few", 16)
        build_on_ray([work / "few"], work / "ray-warm", encoder=encoder, options=options)
        builds: dict[str, float] = {}
        first_outcome: dict[str, float] = {}
        for n in (1, 2):
            # The actors share the node's cores: each gets its share of threads.
            ray_opts = RayOptions(
                encoders=n,
                cpus_per_encoder=0.5,
                threads_per_encoder=max(1, cpus // n),
                block_items=64,
            )
            runs = []
            for rep in range(args.repeats):
                target = work / f"ray{n}-{rep}"
                stream = TimedStream(RayEmbedder(encoder, ray_opts))
                secs, _ = timed(
                    lambda ray_opts=ray_opts, target=target, stream=stream: build(
                        [work / "images"], target, encoder=encoder, options=options,
                        embedder=stream, shard_writer=RayShardWriter(ray_opts),
                    )
                )  # fmt: skip
                runs.append((secs, stream.first_s))
            best = min(runs)
            builds[f"ray_{n}_encoder"] = best[0]
            first_outcome[f"ray_{n}_encoder"] = best[1]
            print(f"ray build, {n} encoder actor(s): (s, first outcome s) {runs}", flush=True)

        texts = [QUERIES[i % len(QUERIES)] + f" {i}" for i in range(args.queries)]
        query_ms: dict[str, float] = {}
        with SearchEngine.open(work / "local", encoder) as local:
            local.search(texts[0])
            secs, expected = timed(lambda: [local.search(t, k=10) for t in texts])
            query_ms["local"] = 1000 * secs / len(texts)
            for groups in (1, 2):
                opts = DistributedOptions(groups=groups, cpus_per_host=0)
                with DistributedSearchEngine.open(work / "local", encoder, options=opts) as dist:
                    dist.search(texts[0])
                    secs, got = timed(lambda dist=dist: [dist.search(t, k=10) for t in texts])
                    same = all(
                        [h.row_id for h in a.hits] == [h.row_id for h in b.hits]
                        for a, b in zip(expected, got, strict=True)
                    )
                    if not same:
                        raise SystemExit("distributed answers differ from the local engine's")
                    query_ms[f"ray_{groups}_group"] = 1000 * secs / len(texts)
                    print(f"ray query, {groups} group(s): {query_ms[f'ray_{groups}_group']:.2f} ms")
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = args.images
    doc = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "images": n,
        "queries": args.queries,
        "encoder_backend": backend,
        "ray_start_s": round(start_s, 2),
        "build_s": {"local": round(local_s, 2), **{k: round(v, 2) for k, v in builds.items()}},
        "build_items_per_s": {
            "local": round(n / local_s, 1),
            **{k: round(n / v, 1) for k, v in builds.items()},
        },
        "build_ratio_vs_local": {k: round(v / local_s, 2) for k, v in builds.items()},
        "encoder_actors_2_vs_1_throughput": round(
            builds["ray_1_encoder"] / builds["ray_2_encoder"], 2
        ),
        "first_outcome_s": {k: round(v, 2) for k, v in first_outcome.items()},
        "query_ms": {k: round(v, 2) for k, v in query_ms.items()},
        "query_ratio_vs_local": {
            k: round(v / query_ms["local"], 2) for k, v in query_ms.items() if k != "local"
        },
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    md = [
        "# Ray path vs local path (benchmarks/ray_scale.py)",
        "",
        f"{n} JPEGs (320x240), clipsearch-demo ({backend}), {os.cpu_count()} CPUs, one machine;"
        f" Ray cluster start {start_s:.1f} s (not in the build times); best of "
        f"{args.repeats} builds per setting, each Ray build starting its own encoder actors.",
        "",
        "| build | seconds | items/s | time vs local | first outcome at (s) |",
        "|---|---|---|---|---|",
        f"| local (threads) | {local_s:.2f} | {n / local_s:.1f} | 1.00 | |",
        *(
            f"| Ray, {k.split('_')[1]} encoder actor(s) | {v:.2f} | {n / v:.1f} | "
            f"{v / local_s:.2f} | {first_outcome[k]:.2f} |"
            for k, v in builds.items()
        ),
        "",
        f"2 encoder actors vs 1: {doc['encoder_actors_2_vs_1_throughput']}x the throughput "
        "(end to end, actor start included).",
        "",
        "| query (k=10, one at a time) | ms/query | vs local |",
        "|---|---|---|",
        *(f"| {k} | {v:.2f} | {v / query_ms['local']:.2f} |" for k, v in query_ms.items()),
        "",
        f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
        "(the machine is shared; other jobs were running).",
    ]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
