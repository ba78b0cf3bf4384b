"""Choosing a CPU precision by measurement, cached per machine and model.

On CPUs with native bf16 (AVX512-BF16, AMX) bf16 is not always faster: on this
project's AVX512-BF16 CPU without AMX, ViT-B-32 ran bf16 *weights* at 0.6-0.8x and bf16
autocast at 0.16-0.55x the speed of fp32 (``benchmarks/encode.py``). So
``precision="auto"`` on those CPUs times a short probe the first time a model is loaded
(``probe``), picks the fastest candidate that beats fp32 by at least ``MIN_GAIN`` and
caches the ratios in ``$CLIPSEARCH_CACHE/precision.json`` (key: CPU model and flags,
torch version, architecture, weights).

The probe times one item (what a query encodes) and ``PROBE_ITEMS["build"]`` (an indexing
batch) separately, and the choice follows what the encoder is loaded for
(``purpose``): bf16 may pay on big batches and not on single queries. It measures the
*CPU time of one thread* (torch pinned to one intra-op thread, ``time.thread_time``),
not wall time on every core: on a shared machine wall-clock timings of a multi-threaded
forward pass swing 2-4x with other processes' load (two identical fp32 encoders
measured 0.65x and 1.36x each other), while one thread's CPU time does not see that load
(identical encoders within 3% at load average 7), and the per-item arithmetic cost is
what differs between precisions. The choice and the measured ratios are reported as
``encoder.precision`` / ``encoder.precision_reason``; ``benchmarks/encode.py`` prints them
and checks them against longer wall-clock runs.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.retrieval.errors import ConfigError

log = logging.getLogger(__name__)

# Candidates timed against fp32 (bf16 autocast, and the model's weights cast to bf16).
CANDIDATES = ("bf16", "bf16-weights")
# A candidate must run at least this much faster than fp32 to be chosen: bf16 costs a
# little accuracy (cosine ~0.999), so a gain within measurement noise is not worth it.
MIN_GAIN = 1.10
# What an encoder is loaded for, and the items per probe call that stand for it: one
# query, or an indexing batch. ViT-B-32 sees 50 tokens per image, so 4 images already
# make 200-row matrix products; the ratio at 4 matched batches of 8 and 32 (issue 11).
PROBE_ITEMS = {"query": 1, "build": 4}
# Images per timing of choose_build_backend (torch vs ONNX, wall time on every core).
BACKEND_PROBE_BATCH = 8
# Paired rounds per candidate and size, at most; a round whose ratio lies beyond
# MIN_GAIN * DECISIVE (or below MIN_GAIN / DECISIVE) ends the timing of that pair early.
# One thread's CPU time repeats within ~3%, so one decisive round is enough.
PROBE_REPEATS = 3
DECISIVE = 1.25
# Cache entries of probes that measured differently (wall time, one size) are ignored.
PROBE_VERSION = 2
CACHE_FILE = "precision.json"


def cache_path() -> Path:
    from clipsearch.retrieval.encoders.onnx import onnx_cache_root

    return onnx_cache_root().parent / CACHE_FILE


def machine_id() -> str:
    """CPU model name and a hash of its flags: what decides bf16 speed on this machine."""
    name, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} [{hashlib.sha256(flags.encode()).hexdigest()[:12]}]"


def choose_cpu_precision(encoder: Any, purpose: str = "query") -> tuple[str, str, dict[str, float]]:
    """``(precision, reason, speed ratios vs fp32)`` for a loaded fp32 OpenClipEncoder.

    ``purpose``: ``query`` decides by the one-item ratios, ``build`` by the batch ones.
    One probe (cached) serves both.
    """
    import torch

    if purpose not in PROBE_ITEMS:
        raise ConfigError(f"unknown purpose {purpose!r}; expected one of {', '.join(PROBE_ITEMS)}")
    fp = encoder.fingerprint
    key = "|".join(
        (
            f"probe v{PROBE_VERSION}",
            machine_id(),
            f"torch {torch.__version__}",
            fp.arch,
            fp.weights_sha256 or fp.pretrained or "random",
        )
    )
    ratios = _cached_ratios(_read_cache().get(key))
    when = "measured earlier"
    if ratios is None:
        ratios, when = probe(encoder), "measured now"
        choices = {p: _pick(r) for p, r in ratios.items()}
        _write_cache(key, {"ratios": ratios, "choices": choices, "measured_at": time.time()})
        log.info(
            "precision probe for %s on this CPU: %s -> %s", fp.arch, _describe(ratios), choices
        )
    choice = _pick(ratios[purpose])
    return choice, f"auto for {purpose}: {when} ({_describe(ratios)})", ratios[purpose]


def _pick(ratios: dict[str, float]) -> str:
    """The fastest candidate if it beats fp32 by ``MIN_GAIN``, else fp32 (ratios: the
    candidates timed, at least one)."""
    best = max(ratios, key=lambda k: ratios[k])
    return best if ratios[best] >= MIN_GAIN else "fp32"


def _cached_ratios(entry: Any) -> dict[str, dict[str, float]] | None:
    try:
        ratios = {
            purpose: {
                name: float(value)
                for name, value in entry["ratios"][purpose].items()
                if name in CANDIDATES
            }
            for purpose in PROBE_ITEMS
        }
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return ratios if all(ratios.values()) else None


def _describe(ratios: dict[str, dict[str, float]]) -> str:
    return "; ".join(
        f"{PROBE_ITEMS[purpose]} item{'s' if PROBE_ITEMS[purpose] > 1 else ''}: "
        + ", ".join(f"{k} {v:.2f}x fp32" for k, v in sorted(by_name.items()))
        for purpose, by_name in ratios.items()
    )


def probe(encoder: Any) -> dict[str, dict[str, float]]:
    """Speed of each candidate relative to fp32 (>1 = faster), per purpose, on the image tower.

    Returns ``{"query": {"bf16": r, "bf16-weights": r}, "build": {...}}``. Each ratio is
    the median over up to ``PROBE_REPEATS`` paired rounds (fp32's CPU time / the
    candidate's, back to back) on one intra-op thread; a decisive round stops early.
    Autocast is not timed on the batch when it already lost on one item (see
    ``_hopeless_autocast``): that entry is then missing.
    """
    import torch

    size = encoder.fingerprint.image_size
    rng = np.random.default_rng(0)
    x = rng.standard_normal((max(PROBE_ITEMS.values()), 3, size, size)).astype(np.float32)
    model = encoder.model
    half = copy.deepcopy(model).to(torch.bfloat16)

    def runs(n: int) -> dict[str, Callable[[], Any]]:
        xf = torch.from_numpy(x[:n])
        xh = xf.to(torch.bfloat16)

        def autocast() -> Any:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model.encode_image(xf)

        return {
            "fp32": lambda: model.encode_image(xf),
            "bf16": autocast,
            "bf16-weights": lambda: half.encode_image(xh),
        }

    ratios: dict[str, dict[str, float]] = {}
    with torch.inference_mode(), _one_thread():
        for fn in runs(1).values():
            fn()  # warm-up: first calls allocate and pick kernels
        for purpose, n in PROBE_ITEMS.items():
            fns = runs(n)
            ratios[purpose] = {}
            for name in CANDIDATES:
                if purpose != "query" and _hopeless_autocast(name, ratios["query"]):
                    continue
                ratios[purpose][name] = _paired(fns["fp32"], fns[name])
    return ratios


def _hopeless_autocast(name: str, one_item: dict[str, float]) -> bool:
    """True when bf16 autocast need not be timed on a batch: it lost to bf16 weights by
    ``DECISIVE`` on one item. Autocast runs the same bf16 products plus casts of the
    weights and activations on every call, so it never caught up on batches (ViT-B-32
    here: 0.52x fp32 on one item, 0.09x on 4, bf16 weights 0.74x and 0.61x), and one
    autocast pass on 4 items cost more CPU than the whole rest of the probe."""
    return name == "bf16" and one_item["bf16"] * DECISIVE < one_item["bf16-weights"]


def _paired(base: Callable[[], Any], candidate: Callable[[], Any]) -> float:
    got: list[float] = []
    for _ in range(PROBE_REPEATS):
        got.append(_cpu_seconds(base) / _cpu_seconds(candidate))
        ratio = float(np.median(got))
        if ratio >= MIN_GAIN * DECISIVE or ratio <= MIN_GAIN / DECISIVE:
            break
    return float(np.median(got))


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one intra-op thread (all work on the calling thread), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cpu_seconds(fn: Callable[[], Any]) -> float:
    """CPU seconds the calling thread spends in ``fn``: time other processes take is not
    counted, so timings on a loaded machine stay comparable."""
    t = time.thread_time()
    fn()
    return max(time.thread_time() - t, 1e-9)


def _seconds(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def choose_build_backend(torch_encoder: Any, onnx_encoder: Any) -> str:
    """``"onnx"`` or ``"torch"``: which embeds images faster here, measured once and cached.

    Paired timings of ``encode_prepared`` on the same 8 images (median of 5 rounds);
    ONNX wins ties, since it also spares the torch import on later runs.
    """
    import torch

    fp = torch_encoder.fingerprint
    key = "|".join(
        (
            "build-backend",
            machine_id(),
            f"torch {torch.__version__} {torch_encoder.precision}",
            f"threads {torch.get_num_threads()}",
            fp.arch,
            fp.weights_sha256 or fp.pretrained or "random",
        )
    )
    cached = _read_cache().get(key)
    if cached and cached.get("backend") in ("onnx", "torch"):
        return str(cached["backend"])
    size = fp.image_size
    x = np.random.default_rng(0).standard_normal((BACKEND_PROBE_BATCH, 3, size, size))
    x = x.astype(np.float32)
    torch_encoder.encode_prepared(x)  # warm-up
    onnx_encoder.encode_prepared(x)
    ratios = []
    for _ in range(5):
        t_torch = _seconds(lambda: torch_encoder.encode_prepared(x))
        ratios.append(t_torch / _seconds(lambda: onnx_encoder.encode_prepared(x)))
    ratio = float(np.median(ratios))
    choice = "onnx" if ratio >= 1.0 else "torch"
    _write_cache(key, {"backend": choice, "onnx_speed_vs_torch": ratio, "measured_at": time.time()})
    log.info("build backend for %s: onnx %.2fx torch -> %s", fp.arch, ratio, choice)
    return choice


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(key: str, entry: dict[str, Any]) -> None:
    path = cache_path()
    data = _read_cache()
    data[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".precision-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: measure again next time
        log.warning("cannot cache the precision choice in %s: %s", path, e)
