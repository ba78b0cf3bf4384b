"""Ingest throughput: end-to-end `index build` images/s against the encoder's raw rate.

For each model, in one process:

* ``raw``: ``encoder.encode_prepared`` on batches that were decoded and preprocessed
  beforehand (the best the encoder can do; the baseline);
* ``sequential``: decode + prepare + encode one batch after another, no overlap (what a
  naive loop achieves);
* ``build``: ``clipsearch.indexer.build.build`` over the folder of JPEGs (scan, read + sha256,
  decode + prepare in worker threads overlapped with encoding, fp16 + Parquet + FAISS
  shard writing, manifest commit).

The goal is ``build / raw >= 0.85`` (pipeline overhead under 15%). Models have random
weights (nothing is downloaded; speed does not depend on weight values): a
ViT-B-32-shaped model and the demo architecture (bundled weights when present).

Each model runs on both backends, torch (``precision="auto"``, i.e. measured) and ONNX
Runtime (the demo model's shipped export; the ViT-B-32-shaped model is exported into a
temporary folder first), and the table gives ONNX's rate over torch's. ``--backend
auto`` uses ONNX whenever an export exists; this run is the measurement behind that rule.

    nice python benchmarks/ingest.py                      # writes benchmarks/results/ingest.{json,md}
    python benchmarks/ingest.py --images 64 --models ViT-B-32 --backends onnx
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def make_jpegs(folder: Path, n: int, size: tuple[int, int] = (640, 480)) -> None:
    """Photo-like JPEGs: smooth colour gradients plus sensor-like noise, quality 90."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        a, b, c = rng.uniform(0, 1, 3)
        base = np.stack(
            [
                127 + 100 * np.sin(xx / (40 + 60 * a) + i),
                127 + 100 * np.cos(yy / (40 + 60 * b)),
                127 + 100 * np.sin((xx + yy) / (50 + 80 * c)),
            ],
            axis=-1,
        )
        noise = rng.normal(0, 12, base.shape)
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{i:05d}.jpg", quality=90)


def load_model(name: str, batch_size: int, backend: str, scratch: Path) -> tuple[Any, str]:
    from clipsearch.retrieval.encoders import load_encoder

    weights = "bundled weights" if name == "clipsearch-demo" else "random init"
    pretrained = None if name == "clipsearch-demo" else ""
    if backend == "torch":
        enc = load_encoder(
            name, pretrained, device="cpu", batch_size=batch_size, backend="torch",
            allow_random=True,
        )  # fmt: skip
        return enc, f"{weights}, torch {enc.precision}"  # type: ignore[attr-defined]
    if name == "clipsearch-demo":
        return load_encoder(name, device="cpu", batch_size=batch_size, backend="onnx"), (
            f"{weights}, onnx (shipped export)"
        )
    from clipsearch.retrieval.encoders.onnx_export import export_onnx

    folder = scratch / f"{name}-onnx"
    if not folder.exists():
        export_onnx(name, "", out_dir=folder, allow_random=True)
    return load_encoder(str(folder), device="cpu", batch_size=batch_size), f"{weights}, onnx"


def bench_model(
    name: str, backend: str, folder: Path, batch_size: int, workers: int, repeats: int
) -> dict[str, Any]:
    from clipsearch.indexer.ann import IndexOptions
    from clipsearch.indexer.build import BuildOptions, build
    from clipsearch.retrieval.encoders import load_image_for

    encoder, weights = load_model(name, batch_size, backend, folder.parent)
    paths = sorted(folder.glob("*.jpg"))
    n = len(paths)
    # Warm-up (first forward passes allocate, JIT-select kernels).
    warm = np.stack([encoder.prepare_image(load_image_for(encoder, p)) for p in paths[:batch_size]])
    encoder.encode_prepared(warm)

    t0 = time.perf_counter()
    prepared = [encoder.prepare_image(load_image_for(encoder, p)) for p in paths]
    decode_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for s in range(0, n, batch_size):
        batch = [
            encoder.prepare_image(load_image_for(encoder, p)) for p in paths[s : s + batch_size]
        ]
        encoder.encode_prepared(np.stack(batch))
    seq_s = time.perf_counter() - t0

    # The CPU is shared: interleave raw and build rounds and keep each one's best, so a
    # burst of outside load does not land on one side only.
    raw_s = build_s = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in range(0, n, batch_size):
            encoder.encode_prepared(np.stack(prepared[s : s + batch_size]))
        raw_s = min(raw_s, time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as tmp:
            opts = BuildOptions(
                batch_size=batch_size,
                workers=workers,
                index=IndexOptions(index="flat", device="cpu"),
            )
            t0 = time.perf_counter()
            summary = build([folder], Path(tmp) / "idx", encoder=encoder, options=opts)
            build_s = min(build_s, time.perf_counter() - t0)
    del prepared
    assert summary.indexed == n, summary.to_dict()
    raw, seq, end2end = n / raw_s, n / seq_s, n / build_s
    return {
        "model": name,
        "backend": backend,
        "weights": weights,
        "dim": encoder.dim,
        "image_size": encoder.fingerprint.image_size,
        "images": n,
        "batch_size": batch_size,
        "workers": workers,
        "repeats": repeats,
        "decode_prepare_per_s": round(n / decode_s, 1),
        "raw_encode_per_s": round(raw, 2),
        "sequential_per_s": round(seq, 2),
        "build_per_s": round(end2end, 2),
        "build_over_raw": round(end2end / raw, 3),
        "sequential_over_raw": round(seq / raw, 3),
        "goal_met": end2end / raw >= 0.85,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--models", nargs="+", default=["ViT-B-32", "clipsearch-demo"])
    ap.add_argument("--backends", nargs="+", default=["torch", "onnx"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved raw/build rounds")
    ap.add_argument(
        "--torch-threads", type=int, default=None,
        help="torch intra-op threads (default: torch's own, one per core)",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=RESULTS / "ingest.json")
    args = ap.parse_args()

    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        make_jpegs(folder, args.images)
        for name in args.models:
            for backend in args.backends:
                result = bench_model(
                    name, backend, folder, args.batch_size, args.workers, args.repeats
                )
                print(json.dumps(result), flush=True)
                runs.append(result)
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for r in runs:
        by_model.setdefault(r["model"], {})[r["backend"]] = r
    for pair in by_model.values():
        if {"torch", "onnx"} <= set(pair):
            for key in ("raw_encode_per_s", "build_per_s"):
                pair["onnx"][f"{key.removesuffix('_per_s')}_onnx_over_torch"] = round(
                    pair["onnx"][key] / pair["torch"][key], 3
                )
    doc = {
        "benchmark": "ingest",
        "load_average": os.getloadavg(),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "note": "2-core CPU shared with other work; ratios are measured in one process",
        },
        "images": "640x480 JPEG, quality 90",
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# Ingest throughput (images/s)",
        "",
        f"{args.images} JPEGs 640x480, batch {args.batch_size}, {args.workers} decode workers, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}.",
        "",
        f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}.",
        "",
        "| model | backend | weights | raw encode | sequential | index build | build/raw "
        "| goal >= 0.85 | ONNX/torch raw | ONNX/torch build |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['weights']} | {r['raw_encode_per_s']} "
            f"| {r['sequential_per_s']} | {r['build_per_s']} | {r['build_over_raw']} "
            f"| {'yes' if r['goal_met'] else 'no'} | {r.get('raw_encode_onnx_over_torch', '')} "
            f"| {r.get('build_onnx_over_torch', '')} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
