"""Cold start: process start -> first search result, ONNX against torch, plus --help.

Each measurement is a fresh ``clipsearch`` process (what a user at a terminal pays):

* ``help``: ``clipsearch --help``;
* ``search onnx``: ``clipsearch search INDEX --text ... --backend auto`` (the demo model
  ships an ONNX export, so ``auto`` means ONNX Runtime, no torch, no open_clip);
* ``search torch``: the same with ``--backend torch``.

Commands run in interleaved rounds (help, onnx, torch, help, ...) so outside load hits
each alike; the report gives each one's median and the onnx/torch ratio. The warm-up
run before the rounds is a first search on this machine: it fills ``$CLIPSEARCH_CACHE``
(the optimised ONNX graph, file hashes), so it is timed too, in a fresh cache folder:
``search onnx, empty cache``. Then the
service's footprint: a process that opens the index with each backend, as ``clipsearch
serve`` does, answers one text query through the HTTP app and reports its peak RSS.

The index is the 2,000-product demo index (built once into a temporary folder with
``clipsearch demo``, or pass ``--index``).

    nice python benchmarks/cold_start.py             # writes benchmarks/results/cold_start.{json,md}
    python benchmarks/cold_start.py --index /tmp/demo2k/index --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
QUERY = "red striped t-shirt"

SERVICE_PROBE = """
import json, resource, sys, time
from fastapi.testclient import TestClient
from clipsearch.retrieval.encoders import encoder_from_fingerprint
from clipsearch.retrieval.manifest import read_current
from clipsearch.retrieval.service.app import create_app
index, backend, query = sys.argv[1:4]
enc = encoder_from_fingerprint(read_current(index).encoder, device="cpu", backend=backend)
with TestClient(create_app(index, encoder=enc)) as client:
    deadline = time.monotonic() + 120  # the app loads the index in the background
    while client.get("/health").status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    r = client.post("/search", json={"text": query, "k": 5})
print(json.dumps({
    "ok": r.status_code == 200,
    "backend": enc.fingerprint.backend,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "torch_loaded": "torch" in sys.modules,
}))
"""


def clipsearch_cmd() -> list[str]:
    exe = shutil.which("clipsearch", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "clipsearch.cli.app"]


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return elapsed


def build_demo_index(folder: Path, products: int) -> Path:
    cmd = [*clipsearch_cmd(), "demo", "--out", str(folder), "--products", str(products), "--json"]
    subprocess.run(cmd, check=True, capture_output=True)
    return folder / "index"


def service_footprint(index: Path, backend: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", SERVICE_PROBE, str(index), backend, QUERY],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--index", type=Path, default=None, help="an index built with the demo model")
    ap.add_argument("--products", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "cold_start.json")
    args = ap.parse_args()
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        index = args.index or build_demo_index(Path(tmp) / "demo", args.products)
        base = clipsearch_cmd()
        search = [*base, "search", str(index), "--text", QUERY, "-k", "5", "--json"]
        commands = {
            "help": [*base, "--help"],
            "search onnx": [*search, "--backend", "auto"],
            "search torch": [*search, "--backend", "torch"],
        }
        # A first search with nothing cached yet (the optimised ONNX graph is saved then).
        empty = dict(os.environ, CLIPSEARCH_CACHE=str(Path(tmp) / "empty-cache"))
        first_onnx = [timed(commands["search onnx"], env=empty)]
        for cmd in commands.values():  # warm the page cache: every run reads the same files
            timed(cmd)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.rounds):
            for name, cmd in commands.items():
                times[name].append(timed(cmd))
        service = {b: service_footprint(index, b) for b in ("onnx", "torch")}

    times["search onnx, empty cache"] = first_onnx
    medians = {name: statistics.median(v) for name, v in times.items()}
    doc = {
        "benchmark": "cold_start",
        "index": str(args.index) if args.index else f"clipsearch demo --products {args.products}",
        "query": QUERY,
        "rounds": args.rounds,
        "load_average_before": load_before,
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "seconds": {name: [round(x, 3) for x in v] for name, v in times.items()},
        "median_s": {name: round(v, 3) for name, v in medians.items()},
        "search_onnx_over_torch": round(medians["search onnx"] / medians["search torch"], 3),
        "target_search_onnx_s": 1.0,
        "target_met": medians["search onnx"] <= 1.0,
        "service": service,
        "service_rss_onnx_over_torch": round(
            service["onnx"]["peak_rss_mb"] / service["torch"]["peak_rss_mb"], 3
        ),
    }
    print(json.dumps(doc, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# Cold start: process start -> first search result",
        "",
        f"Median of {args.rounds} interleaved rounds, {os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{x:.2f}' for x in load_before)} before, "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end; index: {doc['index']}. "
        "`search onnx, empty cache` is one run: the first search on a machine.",
        "",
        "| command | median s |",
        "|---|---:|",
        *(f"| {name} | {v:.3f} |" for name, v in medians.items()),
        "",
        f"ONNX / torch search: **{doc['search_onnx_over_torch']}** "
        f"(target: ONNX search <= 1.0 s: {'met' if doc['target_met'] else 'not met'}).",
        "",
        "| service backend | peak RSS MB | torch loaded |",
        "|---|---:|---|",
        *(f"| {b} | {s['peak_rss_mb']:.0f} | {s['torch_loaded']} |" for b, s in service.items()),
        "",
        f"ONNX / torch service RSS: **{doc['service_rss_onnx_over_torch']}**.",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
