"""Where each shard's FAISS index lives: CPU memory or one of faiss's GPUs.

Rules (DESIGN.md "GPU"):

* ``device="cpu"`` never touches a GPU. ``"auto"`` uses every GPU when the installed
  faiss is a GPU build that sees one, else the CPU. ``"cuda"`` (every GPU) and
  ``"cuda:N"`` (GPU N) require a GPU faiss and raise :class:`ConfigError` otherwise.
  Other device names (``"mps"``...) only concern the encoder; shards stay on CPU.
* Only index types the classic FAISS GPU code implements move: ``IndexFlat`` (inner
  product), ``IndexIVFFlat`` and ``IndexIVFPQ`` with 8-bit codes. HNSW, the fast-scan
  ``PQ..x4fs`` indexes, pre-transformed indexes and anything else stay on CPU, as does a
  shard whose copy to the GPU fails (logged as a warning).
* Shards are spread round-robin over the devices within each modality, so the shards
  one query searches are spread evenly. Every GPU index of a device shares that device's
  one ``StandardGpuResources`` and one lock: faiss GPU resources must not be used from
  two CPU threads at once, and the GPU runs one search at a time anyway.
* Flat shards are stored in float16 on the GPU when ``fp16_flat`` is set: half the GPU
  memory and bandwidth of a scan; the planner fetches extra candidates from such an
  index and rescores them exactly with the float32 vectors kept on CPU, so results equal
  the CPU path's. IVF-PQ copies use float16 lookup tables (required for many
  sub-quantizers, harmless since candidates are rescored exactly).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from clipsearch.retrieval.errors import ConfigError

log = logging.getLogger(__name__)

CPU = "cpu"

_GPU_FAISS_HINT = (
    "the installed faiss has no GPU support (faiss-cpu) or sees no GPU; install a GPU "
    "build in place of faiss-cpu (`.venv/bin/pip uninstall -y faiss-cpu && "
    '.venv/bin/pip install faiss-gpu-cu12`, see docs/usage.md "GPU"), check that '
    '`python -c "import faiss; print(faiss.get_num_gpus())"` prints at least 1, or open '
    'the index with device="cpu"'
)


def faiss_gpu_count() -> int:
    """GPUs faiss can use: 0 for faiss-cpu builds and for GPU builds that see none."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    return int(faiss.get_num_gpus())


def shard_devices(device: str, n_gpus: int | None = None) -> list[int]:
    """The GPU ids shards may be placed on for ``device`` ([] = CPU only).

    Args:
        device: "auto", "cpu", "cuda", "cuda:N" (anything else keeps shards on CPU).
        n_gpus: GPUs faiss sees; None asks faiss (only when the answer matters).
    Raises:
        ConfigError: "cuda" / "cuda:N" without a GPU faiss, or N out of range.
    """
    if device != "auto" and not device.startswith("cuda"):
        return []
    n = faiss_gpu_count() if n_gpus is None else n_gpus
    if device == "auto":
        return list(range(n))
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise ConfigError(f"device {device!r} is not valid; use auto, cpu, cuda or cuda:N")
    if n == 0:
        raise ConfigError(f"device {device!r} asked for, but {_GPU_FAISS_HINT}")
    if match[1] is None:
        return list(range(n))
    gpu = int(match[1])
    if gpu >= n:
        raise ConfigError(
            f"device {device!r} asked for, but faiss sees {n} GPU(s) (cuda:0..cuda:{n - 1}); "
            "pick one of those or use device='cuda' to spread shards over all of them"
        )
    return [gpu]


def gpu_unsupported(index: Any) -> str | None:
    """Why ``index`` must stay on CPU, or None when the FAISS GPU code can hold it."""
    import faiss

    idx: Any = faiss.downcast_index(index)
    name = type(idx).__name__
    if name in ("IndexFlat", "IndexFlatIP", "IndexFlatL2"):
        if idx.metric_type != faiss.METRIC_INNER_PRODUCT:
            return "flat index with a metric other than inner product"
        return None
    if name == "IndexIVFFlat":
        return None
    if name == "IndexIVFPQ":
        if int(idx.pq.nbits) != 8:
            return f"IVF-PQ with {idx.pq.nbits}-bit codes (GPU IVF-PQ needs 8-bit codes)"
        return None
    return f"{name} has no FAISS GPU implementation"


def assign_devices(shards: Sequence[tuple[str, bool]], devices: Sequence[int]) -> list[int | None]:
    """Round-robin device per shard, counted per modality; None = stays on CPU.

    Args:
        shards: ``(modality, gpu_supported)`` per shard, in manifest order.
        devices: GPU ids to spread over ([] = all on CPU).
    """
    if not devices:
        return [None] * len(shards)
    counters: dict[str, int] = {}
    out: list[int | None] = []
    for modality, supported in shards:
        if not supported:
            out.append(None)
            continue
        n = counters.get(modality, 0)
        counters[modality] = n + 1
        out.append(devices[n % len(devices)])
    return out


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; cgroup quotas not counted)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Placed:
    """One shard's searchable index and where it lives."""

    # The index to search: the CPU index itself, or its GPU copy.
    index: Any
    # "cpu" or "cuda:N".
    placement: str
    # Serialises searches (and per-call parameter changes) on this index; shared by
    # every shard of one GPU, one per CPU shard.
    lock: threading.Lock = field(default_factory=threading.Lock)
    # True when a flat index is stored in float16 (the planner over-fetches and
    # rescores exactly).
    fp16: bool = False

    @property
    def on_gpu(self) -> bool:
        return self.placement != CPU


class ShardPlacer:
    """Copies supported shard indexes to the engine's GPUs; one per engine.

    GPU resources and locks live as long as the engine, so reloads reuse them.
    """

    def __init__(self, device: str, *, fp16_flat: bool = True) -> None:
        self.device = device
        self.devices = shard_devices(device)
        self.fp16_flat = fp16_flat
        self._resources: dict[int, Any] = {}
        self._locks = {d: threading.Lock() for d in self.devices}
        if self.devices:
            import faiss

            for d in self.devices:
                self._resources[d] = faiss.StandardGpuResources()

    def place(self, shards: Sequence[tuple[str, str, Any]]) -> list[Placed]:
        """Place ``(name, modality, cpu_index)`` shards; logs a one-line summary."""
        reasons = [gpu_unsupported(index) if self.devices else None for _, _, index in shards]
        targets = assign_devices(
            [
                (modality, reason is None)
                for (_, modality, _), reason in zip(shards, reasons, strict=True)
            ],
            self.devices,
        )
        placed = [
            Placed(index=index, placement=CPU) if gpu is None else self._to_gpu(name, index, gpu)
            for (name, _, index), gpu in zip(shards, targets, strict=True)
        ]
        counts: dict[str, int] = {}
        for p in placed:
            counts[p.placement] = counts.get(p.placement, 0) + 1
        kept = sorted({r for r in reasons if r is not None})
        if placed:
            log.info(
                "shard placement (device=%r): %s%s",
                self.device,
                ", ".join(f"{n} on {where}" for where, n in sorted(counts.items())),
                f" (kept on cpu: {'; '.join(kept)})" if kept else "",
            )
        return placed

    def _to_gpu(self, name: str, index: Any, gpu: int) -> Placed:
        import faiss

        options = faiss.GpuClonerOptions()
        is_flat = type(faiss.downcast_index(index)).__name__ in ("IndexFlat", "IndexFlatIP")
        is_pq = type(faiss.downcast_index(index)).__name__ == "IndexIVFPQ"
        # Flat: float16 storage (see module docstring); IVF-PQ: float16 lookup tables.
        options.useFloat16 = (is_flat and self.fp16_flat) or is_pq
        try:
            gpu_index = faiss.index_cpu_to_gpu(self._resources[gpu], gpu, index, options)
        except RuntimeError as e:  # e.g. out of GPU memory, an unsupported PQ size
            log.warning("shard %s stays on cpu: copy to cuda:%d failed (%s)", name, gpu, e)
            return Placed(index=index, placement=CPU)
        log.debug("shard %s on cuda:%d", name, gpu)
        return Placed(
            index=gpu_index,
            placement=f"cuda:{gpu}",
            lock=self._locks[gpu],
            fp16=is_flat and self.fp16_flat,
        )
