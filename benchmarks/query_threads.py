"""Single-query latency of the torch encoder: torch's default threads vs ``query_threads=1``.

A search encodes one query at a time. With torch's default (every core), the forward
pass of one short text or one image splits across an OpenMP team; when other processes
keep the CPU busy, the team waits for descheduled members and latency balloons. The
encoder therefore runs calls of up to ``QUERY_BATCH`` items on ``query_threads``
threads (1 by default; see ``OpenClipEncoder.threads_for``).

The benchmark starts its own background load (``--busy`` spinning processes, default
one per core), then times single-item encodes with both settings interleaved (default,
one thread, default, ...) so both see the same load, and reports p50/p90 of each and
their ratios. It also times the same encodes with no load of its own ("as_found": the
machine as it was, other users included; see the recorded load average), and the cost of
switching threads per call: ``query_threads=1`` called from a thread already on one
thread (no switch) against one on the default count (a switch and a restore per call).

    nice python benchmarks/query_threads.py            # writes benchmarks/results/query_threads.json
    python benchmarks/query_threads.py --model ViT-B-32 --rounds 40

``--model`` takes the bundled demo model (default, real weights, what the demo and the
tests serve) or an open_clip architecture (random weights: speed does not depend on them).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from _results import write_json

RESULTS = Path(__file__).resolve().parent / "results" / "query_threads.json"
QUERIES = [
    "red summer dress",
    "leather bag",
    "blue cotton shirt with short sleeves",
    "winter jacket",
    "green shoes",
    "linen trousers for the beach",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="clipsearch-demo")
    ap.add_argument("--rounds", type=int, default=60, help="timed queries per setting and phase")
    ap.add_argument("--busy", type=int, default=os.cpu_count() or 1, help="spinning processes")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    import torch

    from clipsearch.retrieval.encoders import load_encoder

    default_threads = torch.get_num_threads()
    kw: dict[str, Any] = {"backend": "torch", "precision": "fp32", "device": "cpu"}
    if args.model != "clipsearch-demo":
        kw["allow_random"] = True
    encoders = {
        "default": load_encoder(args.model, query_threads=None, **kw),
        "query_threads=1": load_encoder(args.model, query_threads=1, **kw),
    }
    size = encoders["default"].fingerprint.image_size
    image = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    kinds: dict[str, Callable[[Any, int], Any]] = {
        "text": lambda enc, i: enc.encode_texts([QUERIES[i % len(QUERIES)]]),
        "image": lambda enc, i: enc.encode_prepared(image),
    }
    for enc in encoders.values():  # warm-up: first calls allocate and pick kernels
        for fn in kinds.values():
            for i in range(3):
                fn(enc, i)

    result: dict[str, Any] = {
        "benchmark": "query_threads",
        "model": args.model,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_default_threads": default_threads,
        "rounds": args.rounds,
        "load_average_before": os.getloadavg(),
    }
    result["as_found"] = {k: _interleaved(encoders, fn, args.rounds) for k, fn in kinds.items()}
    result["switch_cost"] = _switch_cost(encoders["query_threads=1"], kinds, args.rounds)
    with _busy(args.busy):
        result["busy_processes"] = args.busy
        result["loaded"] = {k: _interleaved(encoders, fn, args.rounds) for k, fn in kinds.items()}
        result["load_average_loaded"] = os.getloadavg()
    for phase in ("as_found", "loaded"):
        for kind, row in result[phase].items():
            d, one = row["default"], row["query_threads=1"]
            print(
                f"{phase:>8} {kind:5}: default p50 {d['p50_ms']:7.2f} p90 {d['p90_ms']:7.2f} ms | "
                f"query_threads=1 p50 {one['p50_ms']:7.2f} p90 {one['p90_ms']:7.2f} ms | "
                f"default/one p50 {row['p50_ratio']:.2f}x p90 {row['p90_ratio']:.2f}x"
            )
    sc = result["switch_cost"]
    print(
        f"switch cost: set_num_threads pair {sc['set_num_threads_pair_us']:.2f} us; query on a "
        f"switching thread / on a one-thread caller: text {sc['text']:.3f}x, image {sc['image']:.3f}x"
    )
    print(f"load average before {result['load_average_before']}, while loaded "
          f"{result['load_average_loaded']}")  # fmt: skip
    write_json(args.out, result)
    print(f"wrote {args.out}")


def _interleaved(
    encoders: dict[str, Any], fn: Callable[[Any, int], Any], rounds: int
) -> dict[str, Any]:
    """p50/p90 per encoder, timed in alternation so both meet the same load."""
    times: dict[str, list[float]] = {name: [] for name in encoders}
    for i in range(rounds):
        for name, enc in encoders.items():
            t = time.perf_counter()
            fn(enc, i)
            times[name].append(time.perf_counter() - t)
    row: dict[str, Any] = {
        name: {
            "p50_ms": round(float(np.percentile(t, 50)) * 1e3, 3),
            "p90_ms": round(float(np.percentile(t, 90)) * 1e3, 3),
        }
        for name, t in times.items()
    }
    d, one = row["default"], row["query_threads=1"]
    row["p50_ratio"] = round(d["p50_ms"] / one["p50_ms"], 3)
    row["p90_ratio"] = round(d["p90_ms"] / one["p90_ms"], 3)
    return row


def _switch_cost(
    enc: Any, kinds: dict[str, Callable[[Any, int], Any]], rounds: int
) -> dict[str, float]:
    """Median paired ratio: a caller on the default count (the encoder switches to one
    thread and back every call) against a caller already on one thread (no switch)."""
    import torch

    default = torch.get_num_threads()
    t = time.perf_counter()
    for _ in range(10_000):
        torch.set_num_threads(1)
        torch.set_num_threads(default)
    out = {"set_num_threads_pair_us": round((time.perf_counter() - t) / 10_000 * 1e6, 3)}
    for kind, fn in kinds.items():
        ratios = []
        for i in range(rounds):
            torch.set_num_threads(default)
            switching = _seconds(lambda fn=fn, i=i: fn(enc, i))
            torch.set_num_threads(1)
            steady = _seconds(lambda fn=fn, i=i: fn(enc, i))
            ratios.append(switching / steady)
        out[kind] = round(float(np.median(ratios)), 3)
    torch.set_num_threads(default)
    return out


def _seconds(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _spin() -> None:
    while True:
        pass


@contextmanager
def _busy(n: int) -> Iterator[None]:
    """``n`` processes spinning on the CPU for the duration of the block."""
    ctx = mp.get_context("spawn")  # no copy of torch's state in the children
    procs = [ctx.Process(target=_spin, daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        time.sleep(1.0)  # let the load average and the scheduler see them
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join()


if __name__ == "__main__":
    main()
