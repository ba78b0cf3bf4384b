"""Kill/interrupt campaign: SIGINT and SIGKILL at random times during build, add and compact.

Each trial starts the operation in a child process (the real library, the fake encoder
slowed to a steady per-item cost so an interrupt lands mid-work), sends SIGINT or
SIGKILL after a random delay, then checks:

* **committed versions intact**: the live version verifies (sizes and hashes) and holds
  exactly the rows of a version that was committed: before the operation, or its
  complete result, never a mix;
* **re-run equals a clean run**: running the same command again finishes, and its rows
  and vectors equal those of an uninterrupted run (compact: the same live documents and
  vectors, as compaction renumbers rows);
* **work lost per interrupt** (build, add): items embedded before the signal minus items
  the re-run resumed, in items and in seconds of embedding at the measured rate. The
  build runs under the default shard size (100,000 rows), so only the checkpoints
  (``checkpoint_seconds``) and Ctrl-C's own save keep work.

    nice python benchmarks/kill_campaign.py                  # 48 trials -> results/kill_campaign.{json,md}
    python benchmarks/kill_campaign.py --trials 6 --images 120
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

# Checkpoint interval of the campaign's builds: the bound on work a kill may lose.
CHECKPOINT_S = 0.5
# Seconds of (simulated) encoder work per item.
ITEM_S = 0.004
BATCH = 8

CHILD = """
import json, signal, sys, time
# Ctrl-C as from a terminal, even when the campaign itself runs in the background
# (a background job inherits SIGINT ignored, and Python keeps it ignored).
signal.signal(signal.SIGINT, signal.default_int_handler)
import numpy as np
from clipsearch.indexer.build import BuildOptions, IngestInterrupted, add, build
from clipsearch.indexer.maintenance import compact
from clipsearch.retrieval.encoders import FakeEncoder

op, out, log, *sources = sys.argv[1:]

class Slow(FakeEncoder):
    # The fake encoder with a steady cost per item; logs items encoded so far.
    done = 0
    def encode_prepared(self, batch):
        time.sleep(%(item_s)r * len(batch))
        out_ = super().encode_prepared(batch)
        Slow.done += len(batch)
        with open(log, "a") as f:
            f.write(f"{Slow.done}\\n")
        return out_

opts = BuildOptions(batch_size=%(batch)r, workers=2, checkpoint_seconds=%(ckpt)r)
try:
    if op == "build":
        s = build(sources, out, encoder=Slow(32), options=opts)
    elif op == "add":
        s = add(out, sources, encoder=Slow(32), options=opts)
    else:
        compact(out)
        s = None
except IngestInterrupted as e:
    print(json.dumps({"interrupted": str(e), "items_kept": e.items_kept}))
    sys.exit(130)
print(json.dumps(s.to_dict() if s else {}))
""" % {"item_s": ITEM_S, "batch": BATCH, "ckpt": CHECKPOINT_S}  # noqa: UP031


def _child(op: str, out: Path, sources: list[Path], log: Path) -> subprocess.Popen[str]:
    args = [sys.executable, "-c", CHILD, op, str(out), str(log), *map(str, sources)]
    return subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _run(op: str, out: Path, sources: list[Path], log: Path) -> dict[str, Any]:
    p = _child(op, out, sources, log)
    stdout, stderr = p.communicate(timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"{op} failed ({p.returncode}): {stderr[-2000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def _rows(root: Path, *, by_doc: bool = False) -> tuple[str, np.ndarray]:
    from tests.indexer.helpers import canonical, snapshot_rows

    rows, vecs = snapshot_rows(root)
    if by_doc:
        order = np.argsort([r["doc_id"] for r in rows], kind="stable")
        rows = [{k: v for k, v in rows[i].items() if k != "row_id"} for i in order]
        vecs = vecs[order]
    return canonical(rows), vecs


def _same(a: tuple[str, np.ndarray], b: tuple[str, np.ndarray]) -> bool:
    return a[0] == b[0] and a[1].shape == b[1].shape and bool(np.array_equal(a[1], b[1]))


def _intact(root: Path, allowed: list[tuple[str, np.ndarray]], by_doc: bool) -> bool:
    """The live version verifies and equals one of the ``allowed`` committed states."""
    from clipsearch.retrieval.manifest import CURRENT_FILE
    from clipsearch.retrieval.store import verify_index

    if not (root / CURRENT_FILE).exists():
        return not allowed or any(a is None for a in allowed)
    if not verify_index(root, verify_hashes=True).ok:
        return False
    live = _rows(root, by_doc=by_doc)
    return any(a is not None and _same(live, a) for a in allowed)


def _last_count(log: Path) -> int:
    try:
        lines = log.read_text().split()
    except FileNotFoundError:
        return 0
    return int(lines[-1]) if lines else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=48, help="trials in all (split over 3 ops)")
    ap.add_argument("--images", type=int, default=400, help="images of the build corpus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "kill_campaign.json")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    from clipsearch.indexer.build import BuildOptions, build
    from clipsearch.indexer.maintenance import delete
    from clipsearch.retrieval.encoders import FakeEncoder
    from tests.indexer.helpers import make_images

    load = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="clipsearch-kill-"))
    try:
        first, second = work / "first", work / "second"
        make_images(first, args.images)
        (first / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
        make_images(second, args.images // 2, seed=7, prefix="second")
        opts = BuildOptions(batch_size=BATCH, workers=2)
        enc = FakeEncoder(32)
        # Clean references (in-process; the same options and encoder math as the child).
        t0 = time.perf_counter()
        clean_build = work / "clean-build"
        _run("build", clean_build, [first], work / "ref.log")
        build_s = time.perf_counter() - t0
        ref_build = _rows(clean_build)
        ref_build_by_doc = _rows(clean_build, by_doc=True)
        clean_add = work / "clean-add"
        shutil.copytree(clean_build, clean_add)
        t0 = time.perf_counter()
        _run("add", clean_add, [second], work / "ref.log")
        add_s = time.perf_counter() - t0
        ref_add = _rows(clean_add)
        deleted = work / "deleted"
        build([first], deleted, encoder=enc, options=opts)
        delete(deleted, ids=[f"img{i:04d}.jpg" for i in range(0, args.images, 3)])
        before_compact = _rows(deleted, by_doc=True)
        t0 = time.perf_counter()
        probe = work / "probe-compact"
        shutil.copytree(deleted, probe)
        _run("compact", probe, [], work / "ref.log")
        compact_s = time.perf_counter() - t0
        rate = args.images / max(1e-9, args.images * ITEM_S)  # items/s of the slowed encoder

        trials: list[dict[str, Any]] = []
        ops = ["build", "add", "compact"]
        for t in range(args.trials):
            op = ops[t % 3]
            sig = signal.SIGINT if (t // 3) % 2 == 0 else signal.SIGKILL
            delay = rng.uniform(0.05 * compact_s, 0.95 * compact_s)
            root = work / f"t{t:03d}"
            log = work / f"t{t:03d}.log"
            if op == "add":
                shutil.copytree(clean_build, root)
            elif op == "compact":
                shutil.copytree(deleted, root)
            sources = {"build": [first], "add": [second], "compact": []}[op]
            p = _child(op, root, sources, log)
            if op != "compact":
                # A random moment of the embedding (not of the interpreter's start-up):
                # wait for the first batch, then for the random delay.
                n_items = args.images + 1 if op == "build" else args.images // 2
                delay = rng.uniform(0.0, n_items * ITEM_S * 1.2)
                deadline = time.monotonic() + 120
                while not log.exists() and p.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.01)
            time.sleep(delay)  # benchmark timing, not test synchronisation
            p.send_signal(sig)
            _stdout, stderr = p.communicate(timeout=600)
            embedded = _last_count(log)
            committed = (root / "CURRENT").exists() and (op != "add" or _same(_rows(root), ref_add))
            allowed: list[Any] = {
                "build": [None, ref_build],
                "add": [ref_build, ref_add],
                "compact": [before_compact],
            }[op]
            intact = _intact(root, allowed, by_doc=op == "compact")
            rerun = _run(op, root, sources, work / f"t{t:03d}-rerun.log")
            if op == "compact":
                equal = _same(_rows(root, by_doc=True), before_compact)
            elif op == "build" and committed:
                # The re-run rebuilt over a committed build: same rows, newer row ids.
                equal = _same(_rows(root, by_doc=True), ref_build_by_doc)
            else:
                equal = _same(_rows(root), ref_build if op == "build" else ref_add)
            staging_left = (root / ".staging").exists()
            trial: dict[str, Any] = {
                "op": op,
                "signal": sig.name,
                "delay_s": round(delay, 3),
                "returncode": p.returncode,
                "finished_before_signal": p.returncode == 0,
                "committed_before_dying": committed,
                "committed_intact": intact,
                "rerun_equals_clean": equal,
                "staging_left_after_success": staging_left,
            }
            if op != "compact":
                kept = int(rerun.get("items_resumed", 0))
                trial["items_embedded_before_signal"] = embedded
                trial["items_resumed"] = kept
                # Not committed -> everything embedded but not kept was lost.
                lost = 0 if committed else max(0, embedded - kept)
                trial["items_lost"] = lost
                trial["seconds_lost"] = round(lost / rate, 3)
            if p.returncode not in (0, 130, -signal.SIGKILL):
                trial["stderr_tail"] = stderr[-300:]
            trials.append(trial)
            print(json.dumps(trial), flush=True)
            shutil.rmtree(root, ignore_errors=True)

        resumable = [x for x in trials if x["op"] != "compact" and not x["committed_before_dying"]]
        summary = {
            "trials": len(trials),
            "by_op_signal": {
                f"{op}/{s}": sum(1 for x in trials if x["op"] == op and x["signal"] == s)
                for op in ops
                for s in ("SIGINT", "SIGKILL")
            },
            "finished_before_signal": sum(x["finished_before_signal"] for x in trials),
            "interrupted_uncommitted": len(resumable),
            "committed_intact": sum(x["committed_intact"] for x in trials),
            "rerun_equals_clean": sum(x["rerun_equals_clean"] for x in trials),
            "staging_left_after_success": sum(x["staging_left_after_success"] for x in trials),
            "max_items_lost": {
                s: max((x["items_lost"] for x in resumable if x["signal"] == s), default=0)
                for s in ("SIGINT", "SIGKILL")
            },
            "max_seconds_lost": {
                s: max((x["seconds_lost"] for x in resumable if x["signal"] == s), default=0.0)
                for s in ("SIGINT", "SIGKILL")
            },
            "checkpoint_seconds": CHECKPOINT_S,
            "bound_items": int(CHECKPOINT_S * rate) + 2 * BATCH,
        }
        result = {
            "summary": summary,
            "setup": {
                "images": args.images,
                "encoder": f"FakeEncoder(32) + {ITEM_S * 1000:.0f} ms/item",
                "batch_size": BATCH,
                "shard_size": "100,000 (default)",
                "clean_seconds": {
                    "build": round(build_s, 2),
                    "add": round(add_s, 2),
                    "compact": round(compact_s, 2),
                },
                "seed": args.seed,
                "loadavg_at_start": [round(x, 2) for x in load],
                "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                "python": platform.python_version(),
            },
            "trials": trials,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        md = args.out.with_suffix(".md")
        md.write_text(_markdown(result))
        print(json.dumps(summary, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _markdown(result: dict[str, Any]) -> str:
    s, setup = result["summary"], result["setup"]
    lines = [
        "# Kill/interrupt campaign (`python benchmarks/kill_campaign.py`)",
        "",
        f"{s['trials']} trials, SIGINT and SIGKILL at random times of build, add and compact "
        f"({setup['images']} images, {setup['encoder']}, shard size {setup['shard_size']}, "
        f"checkpoint every {s['checkpoint_seconds']} s); load average "
        f"{setup['loadavg_at_start']} -> {setup['loadavg_at_end']}.",
        "",
        "| check | trials |",
        "|---|---|",
        f"| committed version intact after the signal | {s['committed_intact']} / {s['trials']} |",
        f"| re-run equals a clean run | {s['rerun_equals_clean']} / {s['trials']} |",
        f"| staging left after a successful re-run | {s['staging_left_after_success']} |",
        f"| finished before the signal arrived | {s['finished_before_signal']} |",
        f"| build/add trials interrupted before committing | {s['interrupted_uncommitted']} |",
        "",
        "| signal | max items lost | max seconds of embedding lost |",
        "|---|---|---|",
    ]
    for sig in ("SIGINT", "SIGKILL"):
        lines.append(f"| {sig} | {s['max_items_lost'][sig]} | {s['max_seconds_lost'][sig]} |")
    lines += ["", f"Trials per op/signal: {s['by_op_signal']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
