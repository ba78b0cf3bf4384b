"""Shared fixtures: a tiny random open_clip model, registered under a test-only name.

The model is CLIP-shaped but minute (ViT width 64, 2 layers, 32 px images; 2-layer text
tower of width 64, 16-token context), so open_clip tests run in well under a second
each after torch is imported. Its weights are saved as safetensors and as torch state
dicts (bare and wrapped in {"state_dict": ...}), to load back by path.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

TINY_ARCH = "cs-test-tiny"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class TinyCheckpoints:
    """Weights of one random tiny model, in every supported file format."""

    arch: str
    model: object  # the in-memory open_clip model the files were saved from (eval mode)
    safetensors: Path
    state_dict: Path  # torch.save(model.state_dict())
    wrapped: Path  # torch.save({"state_dict": ..., "epoch": 3})


@pytest.fixture(scope="session")
def tiny_arch(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Register the tiny config with open_clip and return its architecture name."""
    import open_clip

    path = tmp_path_factory.mktemp("tiny-config") / f"{TINY_ARCH}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(path)
    return TINY_ARCH


def save_tiny_weights(arch: str, folder: Path, seed: int) -> TinyCheckpoints:
    """Create a seeded random tiny model and save its weights in three formats."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):  # leave the global RNG as other tests found it
        torch.manual_seed(seed)
        model = open_clip.create_model(arch, pretrained=None).eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    st, sd, wrapped = folder / "tiny.safetensors", folder / "tiny.pt", folder / "tiny-wrapped.pt"
    save_file(state, str(st))
    torch.save(state, sd)
    torch.save({"state_dict": state, "epoch": 3}, wrapped)
    return TinyCheckpoints(arch, model, st, sd, wrapped)


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_arch: str, tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoints:
    return save_tiny_weights(tiny_arch, tmp_path_factory.mktemp("tiny-weights"), seed=1)


def put_in_hf_cache(cache: Path, repo_id: str, filename: str, data: bytes) -> None:
    """Lay a file out as huggingface_hub caches it: refs/main -> snapshots/<rev>/file."""
    rev = "0" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev).mkdir(parents=True, exist_ok=True)
    (repo / "snapshots" / rev / filename).write_bytes(data)


@pytest.fixture(scope="session", autouse=True)
def _isolated_clipsearch_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point clipsearch's cache (ONNX exports, precision probes) at a fresh folder.

    No test then depends on, or writes to, the user's ~/.cache/clipsearch.
    """
    import os

    folder = tmp_path_factory.mktemp("clipsearch-cache")
    old = os.environ.get("CLIPSEARCH_CACHE")
    os.environ["CLIPSEARCH_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("CLIPSEARCH_CACHE", None)
    else:
        os.environ["CLIPSEARCH_CACHE"] = old


@dataclass(frozen=True)
class TinyOnnx:
    """The tiny model exported to ONNX, and the torch (fp32) encoder it was checked against."""

    folder: Path
    torch_encoder: object


@pytest.fixture(scope="session")
def tiny_onnx(
    tiny_checkpoints: TinyCheckpoints, tmp_path_factory: pytest.TempPathFactory
) -> TinyOnnx:
    pytest.importorskip("onnxruntime")
    from clipsearch.retrieval.encoders import load_encoder
    from clipsearch.retrieval.encoders.onnx_export import export_onnx

    folder = tmp_path_factory.mktemp("tiny-onnx") / "export"
    weights = str(tiny_checkpoints.safetensors)
    export_onnx(tiny_checkpoints.arch, weights, out_dir=folder)
    enc = load_encoder(
        tiny_checkpoints.arch, weights, device="cpu", precision="fp32", backend="torch"
    )
    return TinyOnnx(folder, enc)


@pytest.fixture
def calibrate(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, float]], None]:
    """``calibrate({direction: threshold})``: every model now has exactly these calibrated
    relevance thresholds (what a model card would hold), for ``min_score="auto"`` tests."""
    from clipsearch.retrieval import models

    def set_thresholds(thresholds: dict[str, float]) -> None:
        monkeypatch.setattr(
            models, "calibrated_threshold", lambda fingerprint, direction: thresholds.get(direction)
        )

    return set_thresholds
