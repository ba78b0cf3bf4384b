"""Encoder throughput: fp32 against every precision and what ``auto`` picks.

``auto`` on a CPU with native bf16 times a short probe (``precision.py``) and keeps the
fastest of fp32 / bf16 autocast / bf16 weights; this benchmark prints its choice, the
probe's ratios and the ratio it measures itself over longer runs, so the two can be
compared.

Random-initialised weights (nothing is downloaded): speed does not depend on the weight
values, and agreement between precisions is measured as the cosine between the fp32 and
the low-precision vectors of the same inputs. Images are timed through the image tower
(``encode_prepared`` on already-preprocessed tensors, the indexer's hot loop); texts
through ``encode_texts`` (tokenising included). Every rate is measured in this process,
so the ratios compare like with like.

    nice python benchmarks/encode.py            # writes benchmarks/results/encode.json
    python benchmarks/encode.py --precisions fp32 auto bf16 bf16-weights --batches 3
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

from clipsearch.retrieval.encoders.openclip import OpenClipEncoder, cpu_supports_bf16

RESULTS = Path(__file__).resolve().parent / "results" / "encode.json"
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
    ap.add_argument("--batches", type=int, default=3, help="timed rounds (one batch each)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "auto", "bf16", "bf16-weights"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    import torch

    rng = np.random.default_rng(0)
    bs, rounds = args.batch_size, args.batches
    images = rng.standard_normal((bs, 3, 224, 224)).astype(np.float32)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) for _ in range(bs)]
    if "fp32" not in args.precisions:
        args.precisions.insert(0, "fp32")

    encoders = {
        p: OpenClipEncoder(
            args.arch, device=args.device, precision=p, batch_size=bs, allow_random=True
        )
        for p in args.precisions
    }
    vectors = {}
    for name, enc in encoders.items():  # warm-up: first calls allocate and pick kernels
        vectors[name] = (enc.encode_prepared(images), enc.encode_texts(texts))
    # Round-robin over precisions, so that load from other processes on a shared machine
    # hits every precision alike instead of skewing whichever ran during a busy spell.
    spent = {name: [0.0, 0.0] for name in encoders}
    for _ in range(rounds):
        for name, enc in encoders.items():
            t0 = time.perf_counter()
            enc.encode_prepared(images)
            t1 = time.perf_counter()
            enc.encode_texts(texts)
            t2 = time.perf_counter()
            spent[name][0] += t1 - t0
            spent[name][1] += t2 - t1
    n = bs * rounds
    runs: dict[str, dict[str, Any]] = {
        name: {
            "precision": enc.precision,
            "precision_reason": enc.precision_reason,
            "device": enc.device,
            "images_per_s": round(n / spent[name][0], 2),
            "texts_per_s": round(n / spent[name][1], 2),
        }
        for name, enc in encoders.items()
    }

    base_img, base_txt = vectors["fp32"]
    for name, run in runs.items():
        img, txt = vectors[name]
        run["image_speedup_vs_fp32"] = round(run["images_per_s"] / runs["fp32"]["images_per_s"], 3)
        run["text_speedup_vs_fp32"] = round(run["texts_per_s"] / runs["fp32"]["texts_per_s"], 3)
        run["image_cosine_to_fp32_min"] = round(float((img * base_img).sum(1).min()), 6)
        run["text_cosine_to_fp32_min"] = round(float((txt * base_txt).sum(1).min()), 6)

    result = {
        "benchmark": "encode",
        "arch": args.arch,
        "weights": "random init (seeded)",
        "batch_size": bs,
        "timed_items_per_modality": n,
        "machine": _machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "runs": runs,
    }
    for name, run in runs.items():
        print(f"{name:>12} -> {run['precision']}: {run}")
    if "auto" in runs:
        auto = runs["auto"]
        print(
            f"auto picked {auto['precision']} ({auto['precision_reason']}); measured here: "
            f"images {auto['image_speedup_vs_fp32']}x, texts {auto['text_speedup_vs_fp32']}x fp32"
        )
    _write_json(args.out, result)
    print(f"wrote {args.out}")


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


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
