"""Encoder throughput: fp32 against every precision and what ``auto`` picks.

``auto`` on a CPU with native bf16 times a short probe (``precision.py``) and keeps the
fastest of fp32 / bf16 autocast / bf16 weights; this benchmark prints its choice (for
indexing batches and for one-item queries), the probe's ratios and the ratios it
measures itself over longer runs, so the two can be compared.

Speedups are medians of paired ratios (fp32's time / the candidate's, timed back to
back in each round) with their range; ``fp32-again``, a second fp32 encoder timed the
same way, shows the run's noise (an earlier unpaired 3-round run under load measured one
fp32 encoder at 1.36x another, and bf16 weights at 2.28x where quieter runs give ~0.4-0.6x).
``query_*`` columns time one-item calls, on the encoders' query threads.

Random-initialised weights (nothing is downloaded): speed does not depend on the weight
values, and agreement between precisions is measured as the cosine between the fp32 and
the low-precision vectors of the same inputs. Images are timed through the image tower
(``encode_prepared`` on already-preprocessed tensors, the indexer's hot loop); texts
through ``encode_texts`` (tokenising included). Every rate is measured in this process,
so the ratios compare like with like; the load average before and after is recorded.

    nice python benchmarks/encode.py            # writes benchmarks/results/encode.json
    python benchmarks/encode.py --precisions fp32 auto bf16-weights --batches 5
    nice python benchmarks/encode.py --int8     # the demo model's ONNX export, fp32 vs int8

``--int8`` measures dynamic int8 quantisation of the demo model's ONNX export instead:
images/s and texts/s (against the fp32 export and torch fp32, interleaved), cosine to
fp32, recall@10 of int8 text->image rankings against fp32 ones on a held-out demo
catalog, and the demo quality metrics (``indexer.demo.evaluate``) of both. Written to
``benchmarks/results/encode.json`` under ``"onnx_int8"``.
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
from _results import write_json

from clipsearch.retrieval.encoders.openclip import OpenClipEncoder, cpu_supports_bf16

RESULTS = Path(__file__).resolve().parent / "results" / "encode.json"
# A second fp32 encoder timed like the candidates: its "speedup" is the run's noise.
CONTROL = "fp32-again"
WORDS = [
    "red",
    "blue",
    "green",
    "cotton",
    "linen",
    "shirt",
    "dress",
    "shoes",
    "leather",
    "bag",
    "summer",
    "winter",
    "jacket",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=5, help="timed rounds (one batch each)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "auto", "bf16", "bf16-weights"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--int8", action="store_true", help="measure int8 ONNX (demo model) instead")
    ap.add_argument("--products", type=int, default=300, help="held-out catalog size (--int8)")
    args = ap.parse_args()
    if args.int8:
        result = bench_int8(args.products, args.batches)
        doc = json.loads(args.out.read_text()) if args.out.is_file() else {}
        doc["onnx_int8"] = result
        write_json(args.out, doc)
        print(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
        return

    import torch

    rng = np.random.default_rng(0)
    bs, rounds = args.batch_size, args.batches
    images = rng.standard_normal((bs, 3, 224, 224)).astype(np.float32)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) for _ in range(bs)]
    names = list(dict.fromkeys(["fp32", CONTROL, *args.precisions]))
    load_before = os.getloadavg()
    encoders = {
        name: OpenClipEncoder(
            args.arch,
            device=args.device,
            precision="fp32" if name == CONTROL else name,
            batch_size=bs,
            allow_random=True,
            purpose="build",  # auto: the probe's batch ratios decide, as for indexing
        )
        for name in names
    }
    vectors = {}
    for name, enc in encoders.items():  # warm-up: first calls allocate and pick kernels
        vectors[name] = (enc.encode_prepared(images), enc.encode_texts(texts))
        enc.encode_prepared(images[:1])
        enc.encode_texts(texts[:1])
    timed = {
        "image": _paired(encoders, lambda e: e.encode_prepared(images), rounds),
        "text": _paired(encoders, lambda e: e.encode_texts(texts), rounds),
        # One item per call: a query, on the encoder's query threads.
        "query_image": _paired(encoders, lambda e: e.encode_prepared(images[:1]), 4 * rounds),
        "query_text": _paired(encoders, lambda e: e.encode_texts(texts[:1]), 4 * rounds),
    }
    runs: dict[str, dict[str, Any]] = {}
    base_img, base_txt = vectors["fp32"]
    for name, enc in encoders.items():
        img, txt = vectors[name]
        image, text = timed["image"][name], timed["text"][name]
        q_image, q_text = timed["query_image"][name], timed["query_text"][name]
        runs[name] = {
            "precision": enc.precision,
            "precision_reason": enc.precision_reason,
            "device": enc.device,
            "images_per_s": round(bs / image["median_s"], 2),
            "texts_per_s": round(bs / text["median_s"], 2),
            "image_speedup_vs_fp32": image["ratio"],
            "image_speedup_range": image["range"],
            "text_speedup_vs_fp32": text["ratio"],
            "text_speedup_range": text["range"],
            "query_image_ms": round(q_image["median_s"] * 1e3, 2),
            "query_text_ms": round(q_text["median_s"] * 1e3, 2),
            "query_image_speedup_vs_fp32": q_image["ratio"],
            "query_text_speedup_vs_fp32": q_text["ratio"],
            "image_cosine_to_fp32_min": round(float((img * base_img).sum(1).min()), 6),
            "text_cosine_to_fp32_min": round(float((txt * base_txt).sum(1).min()), 6),
        }

    result = {
        "benchmark": "encode",
        "arch": args.arch,
        "weights": "random init (seeded)",
        "batch_size": bs,
        "rounds": rounds,
        "method": (
            "speedups are medians over rounds of paired ratios (fp32 time / candidate time, "
            f"timed back to back); {CONTROL!r} is a second fp32 encoder, so its ratio and "
            "range show the noise of this run; query_* time one-item calls"
        ),
        "machine": _machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "runs": runs,
    }
    for name, run in runs.items():
        print(
            f"{name:>12} -> {run['precision']:>12}: batch {bs}: images {run['images_per_s']}/s "
            f"{run['image_speedup_vs_fp32']}x {run['image_speedup_range']}, texts "
            f"{run['texts_per_s']}/s {run['text_speedup_vs_fp32']}x {run['text_speedup_range']}; "
            f"1 item: image {run['query_image_ms']} ms {run['query_image_speedup_vs_fp32']}x, "
            f"text {run['query_text_ms']} ms {run['query_text_speedup_vs_fp32']}x"
        )
    if "auto" in runs:
        auto = runs["auto"]
        print(
            f"auto picked {auto['precision']} ({auto['precision_reason']}); measured here: "
            f"images {auto['image_speedup_vs_fp32']}x, texts {auto['text_speedup_vs_fp32']}x fp32"
        )
        if auto["precision_reason"].startswith("auto for"):  # probed: the query choice too
            from clipsearch.retrieval.encoders.precision import choose_cpu_precision

            query, _, _ = choose_cpu_precision(encoders["fp32"], "query")  # cached
            auto["auto_for_queries"] = query
            print(f"auto for queries (1 item): {query}")
    print(f"noise ({CONTROL} vs fp32): images {runs[CONTROL]['image_speedup_range']}, "
          f"texts {runs[CONTROL]['text_speedup_range']}; load average {load_before} -> "
          f"{result['load_average_after']}")  # fmt: skip
    if args.out.is_file():  # keep the --int8 section of an earlier run
        old = json.loads(args.out.read_text())
        if "onnx_int8" in old:
            result["onnx_int8"] = old["onnx_int8"]
    write_json(args.out, result)
    print(f"wrote {args.out}")


def _paired(encoders: dict[str, Any], fn: Any, rounds: int) -> dict[str, dict[str, Any]]:
    """Per encoder: median seconds per call, and the median (and range) over rounds of
    fp32's time / its time, each pair timed back to back so that both meet the same load
    from other processes (on a shared machine single timings swing 2-4x)."""
    base = encoders["fp32"]
    times: dict[str, list[float]] = {name: [] for name in encoders}
    ratios: dict[str, list[float]] = {name: [] for name in encoders}
    for _ in range(rounds):
        for name, enc in encoders.items():
            if name == "fp32":
                continue
            t_base, t = _seconds(lambda: fn(base)), _seconds(lambda enc=enc: fn(enc))
            times["fp32"].append(t_base)
            times[name].append(t)
            ratios[name].append(t_base / t)
    ratios["fp32"] = [1.0]
    return {
        name: {
            "median_s": float(np.median(times[name])),
            "ratio": round(float(np.median(ratios[name])), 3),
            "range": [round(min(ratios[name]), 3), round(max(ratios[name]), 3)],
        }
        for name in encoders
    }


def _seconds(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_int8(products: int, rounds: int) -> dict[str, Any]:
    """fp32 vs int8 ONNX (and torch fp32) for the demo model; see the module docstring."""
    from clipsearch.indexer.demo.evaluate import evaluate_catalog
    from clipsearch.indexer.demo.generate import generate_catalog
    from clipsearch.retrieval.encoders import load_encoder, load_image_for
    from clipsearch.retrieval.encoders.onnx_export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        int8 = export_onnx("clipsearch-demo", out_dir=Path(tmp) / "int8", quantize="int8")
        int8_bytes = sum(f.stat().st_size for f in int8.out_dir.glob("*.onnx"))
        encoders = {
            "torch fp32": load_encoder("clipsearch-demo", backend="torch", precision="fp32"),
            "onnx fp32": load_encoder("clipsearch-demo", backend="onnx"),
            "onnx int8": load_encoder(str(int8.out_dir)),
        }
        catalog = generate_catalog(Path(tmp) / "catalog", products=products, seed=4242)
        paths = sorted((catalog.out_dir / "images").rglob("*.jpg"))[:512]
        base = encoders["onnx fp32"]
        prepared = np.stack([base.prepare_image(load_image_for(base, p)) for p in paths])
        rng = np.random.default_rng(0)
        texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) for _ in range(256)]
        vectors = {
            n: (e.encode_prepared(prepared), e.encode_texts(texts)) for n, e in encoders.items()
        }
        spent = {n: [0.0, 0.0] for n in encoders}
        for _ in range(rounds):
            for n, e in encoders.items():
                t0 = time.perf_counter()
                e.encode_prepared(prepared)
                t1 = time.perf_counter()
                e.encode_texts(texts)
                t2 = time.perf_counter()
                spent[n][0] += t1 - t0
                spent[n][1] += t2 - t1
        quality = {n: evaluate_catalog(encoders[n], catalog.out_dir)["metrics"]
                   for n in ("onnx fp32", "onnx int8")}  # fmt: skip
    img32, txt32 = vectors["onnx fp32"]
    img8, txt8 = vectors["onnx int8"]
    top32 = np.argsort(-(txt32 @ img32.T), axis=1)[:, :10]
    top8 = np.argsort(-(txt8 @ img8.T), axis=1)[:, :10]
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top32, top8, strict=True)]))
    n_img, n_txt = len(paths) * rounds, len(texts) * rounds
    runs = {
        n: {
            "images_per_s": round(n_img / spent[n][0], 1),
            "texts_per_s": round(n_txt / spent[n][1], 1),
        }
        for n in encoders
    }
    for run in runs.values():
        run["image_speed_vs_onnx_fp32"] = round(
            run["images_per_s"] / runs["onnx fp32"]["images_per_s"], 3
        )
        run["text_speed_vs_onnx_fp32"] = round(
            run["texts_per_s"] / runs["onnx fp32"]["texts_per_s"], 3
        )
    return {
        "model": "clipsearch-demo",
        "images": len(paths),
        "texts": len(texts),
        "rounds": rounds,
        "load_average": os.getloadavg(),
        "runs": runs,
        "int8_image_cosine_to_fp32": {
            "min": round(float((img8 * img32).sum(1).min()), 5),
            "mean": round(float((img8 * img32).sum(1).mean()), 5),
        },
        "int8_text_cosine_to_fp32": {
            "min": round(float((txt8 * txt32).sum(1).min()), 5),
            "mean": round(float((txt8 * txt32).sum(1).mean()), 5),
        },
        "int8_recall@10_vs_fp32_text_to_image": round(recall, 4),
        "int8_graph_bytes": int8_bytes,
        "quality": quality,
        "verdict": "int8 stays optional (not default) unless its quality metrics match fp32",
    }


def _machine() -> dict[str, Any]:
    import torch

    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_supports_bf16(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


if __name__ == "__main__":
    main()
