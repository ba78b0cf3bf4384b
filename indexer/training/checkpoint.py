"""Training checkpoints that resume exactly, with no pickle anywhere.

A checkpoint is a folder ``checkpoints/step-00000400/`` holding:

* ``model.safetensors``: the model's state dict (fp32);
* ``optimizer.safetensors``: every tensor of the AdamW state (``<param>.<name>``);
* ``rng.safetensors``: torch's CPU (and CUDA) generator states and numpy's MT19937 key;
* ``state.json``: step, config, optimizer param groups, grad-scaler state, python's and
  numpy's remaining RNG state, loss history and validation metrics.

The folder is written under a temporary name, every file fsynced, then renamed, so a
crash never leaves a half-written checkpoint that a resume would pick up.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsearch.indexer.fsutil import fsync_dir, fsync_file
from clipsearch.retrieval.errors import ConfigError

if TYPE_CHECKING:
    import torch

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})$")


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """A loaded checkpoint: tensors plus the JSON state."""

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint folder in ``out_dir``, or None."""
    root = out_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    found = sorted(
        p for p in root.iterdir() if _NAME.match(p.name) and (p / "state.json").is_file()
    )
    return found[-1] if found else None


def save_checkpoint(
    out_dir: Path,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler_state: dict[str, Any] | None,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically and delete all but the ``keep`` newest."""
    import torch
    from safetensors.torch import save_file

    root = out_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model_sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(model_sd, str(tmp / "model.safetensors"))
    opt_sd = optimizer.state_dict()
    opt_tensors = {
        f"{pid}.{name}": value.detach().contiguous().clone()
        for pid, entry in opt_sd["state"].items()
        for name, value in entry.items()
        if isinstance(value, torch.Tensor)
    }
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # legacy=True always returns the tuple form
    rng_tensors = {
        "torch_cpu": torch.get_rng_state(),
        "numpy_key": torch.from_numpy(np_state[1].astype(np.int64)),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng_tensors[f"torch_cuda_{i}"] = s
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    py_state = random.getstate()
    full_state = {
        **state,
        "step": step,
        "optimizer_param_groups": opt_sd["param_groups"],
        "optimizer_scalars": {
            f"{pid}.{name}": value
            for pid, entry in opt_sd["state"].items()
            for name, value in entry.items()
            if not isinstance(value, torch.Tensor)
        },
        "scaler": scaler_state,
        "rng_python": [py_state[0], list(py_state[1]), py_state[2]],
        "rng_numpy": {
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
    }
    (tmp / "state.json").write_text(json.dumps(full_state, indent=1) + "\n")
    for f in tmp.iterdir():
        fsync_file(f)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(root)
    old = sorted(p for p in root.iterdir() if _NAME.match(p.name))[:-keep]
    for p in old:
        shutil.rmtree(p)
    return final


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint`."""
    from safetensors.torch import load_file

    try:
        state = json.loads((path / "state.json").read_text())
        model = load_file(str(path / "model.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"checkpoint {path} is unreadable ({e}); delete it to resume from an older one"
        ) from e
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in opt_tensors.items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = value
    for key, scalar in state.get("optimizer_scalars", {}).items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = scalar
    optimizer = {"state": opt_state, "param_groups": state["optimizer_param_groups"]}
    state["_rng_tensors"] = rng
    return Checkpoint(
        path=path, step=int(state["step"]), model=model, optimizer=optimizer, state=state
    )


def restore_rng(ckpt: Checkpoint) -> None:
    """Put python's, numpy's and torch's global generators back where they were."""
    import torch

    rng = ckpt.state["_rng_tensors"]
    version, internal, gauss = ckpt.state["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    n = ckpt.state["rng_numpy"]
    key = rng["numpy_key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(rng["torch_cpu"])
    cuda = sorted(k for k in rng if k.startswith("torch_cuda_"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in cuda])
