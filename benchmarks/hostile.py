"""Memory under hostile image queries: N concurrent 40 MP PNG bombs against ``clipsearch serve``.

The query is a 6300 x 6300 PNG of zeros (~113 KB on the wire, 39.7 MP: just under the
40 MP ``max_image_pixels`` cap, so every request is admitted). The script builds a
tiny index with the fake encoder, then for each configuration

- ``budget``: the default ``decode_pixel_budget`` (80 MP in flight), and
- ``unbounded`` (the baseline): a budget as large as all requests together, which is
  how the service behaved before the budget existed,

starts the server in a subprocess on 127.0.0.1, sends one small warm-up query, and
then fires ``--concurrency`` copies of the bomb at once to ``/search/image``. A thread
samples the server's RSS every 10 ms (``/proc/PID/status``); the report gives the RSS
before, the peak, and the RSS once the service is idle again (after the last answer,
when the ``clipsearch_decode_pixels_in_use`` gauge reads 0 and the trim ran), with the
status counts. The baseline run is stopped if its RSS passes ``--kill-above-mb``.

    nice .venv/bin/python benchmarks/hostile.py                       # 32 at once
    nice .venv/bin/python benchmarks/hostile.py --concurrency 8

Writes benchmarks/results/hostile.json and hostile.md. Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SIDE = 6300
BUDGET_PIXELS = 80_000_000  # ServiceConfig's default decode_pixel_budget
# Memory a pixel in flight may cost at peak (see ServiceConfig.decode_pixel_budget).
BYTES_PER_PIXEL = 12

SERVER = """
import json, sys, uvicorn
from clipsearch.retrieval.encoders import load_encoder
from clipsearch.retrieval.service.app import create_app
from clipsearch.retrieval.service.config import ServiceConfig
from clipsearch.retrieval.service.server import http_protocol
config = ServiceConfig(**json.loads(sys.argv[2]))
app = create_app(sys.argv[1], config, encoder=load_encoder("fake"))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[3]), log_level="error", http=http_protocol())
"""


def bomb_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE)).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def build_index(folder: Path) -> Path:
    from PIL import Image

    from clipsearch.indexer.build import BuildOptions, build
    from clipsearch.retrieval.encoders import load_encoder

    images = folder / "images"
    images.mkdir(parents=True)
    for i, rgb in enumerate([(200, 30, 30), (30, 60, 200), (40, 160, 60), (230, 220, 40)]):
        Image.new("RGB", (64, 64), rgb).save(images / f"p{i}.png")
    index = folder / "index"
    build([images], index, encoder=load_encoder("fake"), options=BuildOptions(workers=1))
    return index


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(base: str, proc: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited during startup")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the server did not become healthy")


def pixels_in_use(base: str) -> float:
    import httpx

    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith("clipsearch_decode_pixels_in_use "):
            return float(line.split()[1])
    return -1.0


async def burst(base: str, payload: bytes, n: int, timeout_s: float) -> list[int]:
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=timeout_s) as client:

        async def one() -> int:
            try:
                r = await client.post(
                    "/search/image", files={"image": ("bomb.png", payload, "image/png")}
                )
                return r.status_code
            except httpx.HTTPError:
                return -1  # connection dropped (the server died)

        return list(await asyncio.gather(*(one() for _ in range(n))))


def run_config(
    name: str, index: Path, config: dict[str, Any], payload: bytes, args: argparse.Namespace
) -> dict[str, Any]:
    import httpx

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", SERVER, str(index), json.dumps(config), str(port)]
    proc = subprocess.Popen(cmd)
    samples: list[int] = []
    killed = threading.Event()
    stop = threading.Event()
    try:
        wait_healthy(base, proc)
        small = io.BytesIO()
        from PIL import Image

        Image.new("RGB", (64, 64), (200, 30, 30)).save(small, format="PNG")
        for _ in range(3):
            httpx.post(
                base + "/search/image", files={"image": ("s.png", small.getvalue())}, timeout=30
            )
        before = rss_kb(proc.pid)

        def sample() -> None:
            while not stop.is_set():
                try:
                    kb = rss_kb(proc.pid)
                except (FileNotFoundError, ProcessLookupError):
                    return
                samples.append(kb)
                if kb > args.kill_above_mb * 1024:
                    killed.set()
                    proc.kill()
                    return
                stop.wait(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        statuses = asyncio.run(burst(base, payload, args.concurrency, timeout_s=120))
        wall = time.perf_counter() - t0
        after = None
        if not killed.is_set():
            deadline = time.monotonic() + 30
            while pixels_in_use(base) != 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # the trim runs in a thread once the budget is idle
            after = rss_kb(proc.pid)
        stop.set()
        sampler.join(5)
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    peak = max(samples) if samples else before
    return {
        "name": name,
        "config": config,
        "statuses": dict(sorted(Counter(statuses).items())),
        "wall_s": round(wall, 2),
        "rss_before_mb": round(before / 1024, 1),
        "rss_peak_mb": round(peak / 1024, 1),
        "rss_after_mb": None if after is None else round(after / 1024, 1),
        "peak_over_before_mb": round((peak - before) / 1024, 1),
        "killed_above_mb": args.kill_above_mb if killed.is_set() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--kill-above-mb", type=int, default=6000)
    args = parser.parse_args()
    payload = bomb_png()
    all_pixels = SIDE * SIDE * args.concurrency
    with tempfile.TemporaryDirectory() as tmp:
        index = build_index(Path(tmp))
        runs = [
            run_config(
                "budget",
                index,
                {"decode_pixel_budget": BUDGET_PIXELS, "max_queue": 256},
                payload,
                args,
            ),
            run_config(
                "unbounded",
                index,
                {"decode_pixel_budget": all_pixels, "max_queue": 256},
                payload,
                args,
            ),
        ]
    load = os.getloadavg()
    budget, unbounded = runs
    # Stated bound: RSS before + 12 bytes per budget pixel (Pillow's 4-byte RGB buffer,
    # one converted copy while decoding, 16 MB block rounding and allocator slack).
    bound_mb = budget["rss_before_mb"] + BYTES_PER_PIXEL * BUDGET_PIXELS / 2**20
    report = {
        "payload_bytes": len(payload),
        "image": f"{SIDE}x{SIDE} RGB zeros ({SIDE * SIDE:,} pixels)",
        "concurrency": args.concurrency,
        "runs": runs,
        "stated_bound_mb": round(bound_mb, 1),
        "budget_within_bound": budget["rss_peak_mb"] <= bound_mb,
        "peak_growth_ratio_unbounded_over_budget": round(
            unbounded["peak_over_before_mb"] / max(budget["peak_over_before_mb"], 1.0), 2
        ),
        "no_5xx_but_504": all(
            s < 500 or s == 504
            for run in runs
            if not run["killed_above_mb"]
            for s in run["statuses"]
        ),
        "load_average": [round(x, 2) for x in load],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hostile.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Hostile images: server memory under concurrent 40 MP PNG bombs",
        "",
        f"`{report['image']}`, {len(payload):,} bytes, {args.concurrency} requests at once "
        "to `/search/image` (fake encoder; decode dominates). Load average "
        f"{report['load_average']} on {report['cpus']} CPUs.",
        "",
        "| config | statuses | wall s | RSS before MB | RSS peak MB | peak - before MB "
        "| RSS idle after MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        after = (
            run["rss_after_mb"]
            if run["rss_after_mb"] is not None
            else (f"killed above {run['killed_above_mb']} MB")
        )
        lines.append(
            f"| {run['name']} | {run['statuses']} | {run['wall_s']} | {run['rss_before_mb']} "
            f"| {run['rss_peak_mb']} | {run['peak_over_before_mb']} | {after} |"
        )
    lines += [
        "",
        f"Stated bound with the budget: RSS before + {BYTES_PER_PIXEL} B x {BUDGET_PIXELS:,} pixels = "
        f"{report['stated_bound_mb']} MB; within it: {report['budget_within_bound']}. "
        "Peak growth unbounded / budget: "
        f"{report['peak_growth_ratio_unbounded_over_budget']}x.",
        "",
        "504s are requests whose deadline (10 s) passed while they waited for decode room: "
        "the budget trades them for bounded memory.",
    ]
    (RESULTS / "hostile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
