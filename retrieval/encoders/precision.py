"""Choosing a CPU precision by measurement, cached per machine and model.

On CPUs with native bf16 (AVX512-BF16, AMX) bf16 is not always faster: torch's bf16
autocast measured 0.6-0.9x the speed of fp32 for ViT-B-32 on such a CPU (casts around
every op), while bf16 *weights* avoid the casts. So ``precision="auto"`` on those CPUs
times a short probe (paired fp32/candidate passes over an 8-image batch, median of
7 rounds, see ``probe``) the first time a model is loaded, picks the fastest candidate
that beats fp32 by at least ``MIN_GAIN``, and caches the choice in
``$CLIPSEARCH_CACHE/precision.json`` (key: CPU model and flags, torch version and
threads, architecture, weights). The choice and the measured ratios are reported as
``encoder.precision`` / ``encoder.precision_reason``; ``benchmarks/encode.py`` prints them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Candidates timed against fp32 (bf16 autocast, and the model's weights cast to bf16).
CANDIDATES = ("bf16", "bf16-weights")
# A candidate must run at least this much faster than fp32 to be chosen: probes of a
# few hundred ms vary by ~5%, and bf16 costs a little accuracy (cosine ~0.999).
MIN_GAIN = 1.10
# Images per probe pass (enough to amortise per-call overhead, short enough for ~1 s).
PROBE_BATCH = 8
PROBE_REPEATS = 7
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


def choose_cpu_precision(encoder: Any) -> tuple[str, str, dict[str, float]]:
    """``(precision, reason, speed ratios vs fp32)`` for a loaded fp32 OpenClipEncoder."""
    import torch

    fp = encoder.fingerprint
    key = "|".join(
        (
            machine_id(),
            f"torch {torch.__version__}",
            f"threads {torch.get_num_threads()}",
            fp.arch,
            fp.weights_sha256 or fp.pretrained or "random",
        )
    )
    cached = _read_cache().get(key)
    if cached and cached.get("precision") in ("fp32", *CANDIDATES):
        ratios = {k: float(v) for k, v in cached.get("ratios", {}).items()}
        return cached["precision"], f"auto: measured earlier ({_describe(ratios)})", ratios
    ratios = probe(encoder)
    best = max(ratios, key=lambda k: ratios[k])
    choice = best if ratios[best] >= MIN_GAIN else "fp32"
    _write_cache(key, {"precision": choice, "ratios": ratios, "measured_at": time.time()})
    log.info("precision probe for %s on this CPU: %s -> %s", fp.arch, _describe(ratios), choice)
    return choice, f"auto: measured now ({_describe(ratios)})", ratios


def _describe(ratios: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}x fp32" for k, v in sorted(ratios.items()))


def probe(encoder: Any) -> dict[str, float]:
    """Speed of each candidate relative to fp32 (>1 = faster), on the image tower.

    Candidates are timed in interleaved rounds (fp32, bf16, bf16-weights, fp32, ...);
    each round gives a paired ratio (fp32 time / candidate time, measured back to back,
    so under similar load) and the result is the median over rounds: on a shared,
    loaded CPU single timings swing 2-4x, paired medians far less.
    """
    import torch

    size = encoder.fingerprint.image_size
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((PROBE_BATCH, 3, size, size)).astype(np.float32))
    model = encoder.model
    half = copy.deepcopy(model).to(torch.bfloat16)
    xh = x.to(torch.bfloat16)

    def autocast() -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.encode_image(x)

    runs = {
        "fp32": lambda: model.encode_image(x),
        "bf16": autocast,
        "bf16-weights": lambda: half.encode_image(xh),
    }
    ratios: dict[str, list[float]] = {k: [] for k in CANDIDATES}
    with torch.inference_mode():
        for fn in runs.values():
            fn()  # warm-up: first calls allocate and pick kernels
        for _ in range(PROBE_REPEATS):
            for name in CANDIDATES:
                base = _seconds(runs["fp32"])
                ratios[name].append(base / _seconds(runs[name]))
    return {k: float(np.median(v)) for k, v in ratios.items()}


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
    x = np.random.default_rng(0).standard_normal((PROBE_BATCH, 3, size, size)).astype(np.float32)
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
