"""Model configs and weights bundled with clipsearch.

Every ``*.json`` here is an open_clip model config (``embed_dim``, ``vision_cfg``,
``text_cfg``); :func:`register` adds them to open_clip's registry so the architecture
can be created by its file stem (``clipsearch-demo``). Weights for architecture ``X``
ship as ``X.safetensors`` beside the config and load with ``pretrained="bundled"``.

A config whose text tower is a Hugging Face model (``text_cfg.hf_model_name``) names
it ``bundled:<folder>``: a folder beside the configs (``clipsearch_demo/``) holding the
tower's ``config.json`` and tokenizer files. :func:`register` resolves the reference to
that folder's absolute path, so the model loads offline from wherever the package is
installed, and fingerprints record it back as ``bundled:<folder>``
(:func:`portable_path`) so an index stays valid when the package moves.

The same folder holds ``model_card.json``: origin, licence, training and the calibrated
relevance thresholds (:func:`relevance_threshold`).

No torch or open_clip import happens at module level: ``bundled_weights``,
``bundled_configs`` and ``relevance_threshold`` are cheap and safe to call from the CLI.
"""

from __future__ import annotations

import copy
import json
import math
import threading
from pathlib import Path
from typing import Any

MODELS_DIR = Path(__file__).resolve().parent
BUNDLED_PREFIX = "bundled:"
CARD_NAME = "model_card.json"
# Query -> row modality pairs a threshold is calibrated for.
DIRECTIONS = ("text->image", "text->text", "image->image", "image->text")

_lock = threading.Lock()


def bundled_configs() -> dict[str, Path]:
    """Architecture name -> config file, for every JSON config in this folder."""
    return {p.stem: p for p in sorted(MODELS_DIR.glob("*.json"))}


def bundled_weights(arch: str) -> Path | None:
    """The bundled ``<arch>.safetensors`` file, or None when this package ships none."""
    path = MODELS_DIR / f"{arch}.safetensors"
    return path if path.is_file() else None


def bundled_onnx(arch: str) -> Path | None:
    """The ONNX export shipped for ``arch`` (folder ``<arch>-onnx/`` holding
    ``clipsearch-onnx.json``), or None when this package ships none."""
    folder = MODELS_DIR / f"{arch}-onnx"
    return folder if (folder / "clipsearch-onnx.json").is_file() else None


def companion_folder(arch: str) -> Path:
    """The folder of ``arch``'s other files (tokenizer, model card): ``clipsearch_demo/``
    for ``clipsearch-demo`` (an importable name, so the files ship as package data)."""
    return MODELS_DIR / arch.replace("-", "_")


def resolve_reference(value: str) -> str:
    """``bundled:<folder>`` -> the folder's absolute path; anything else unchanged."""
    if value.startswith(BUNDLED_PREFIX):
        return str(MODELS_DIR / value.removeprefix(BUNDLED_PREFIX))
    return value


def portable_path(value: str) -> str:
    """Inverse of :func:`resolve_reference`: a path inside this folder -> ``bundled:...``."""
    try:
        rel = Path(value).resolve().relative_to(MODELS_DIR)
    except (ValueError, OSError):
        return value
    return BUNDLED_PREFIX + rel.as_posix()


def load_config(path: Path) -> dict[str, Any]:
    """A bundled config with its ``bundled:`` references resolved."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    text = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if isinstance(text.get(key), str):
            text[key] = resolve_reference(text[key])
    return cfg


def register() -> list[str]:
    """Add the bundled configs to open_clip's model registry; idempotent and thread-safe.

    Returns the architecture names that are bundled (registered now or before).
    """
    configs = bundled_configs()
    with _lock:
        for arch, path in configs.items():
            register_config(arch, load_config(path))
    return list(configs)


def register_config(name: str, config: dict[str, Any]) -> None:
    """Make ``config`` (an open_clip model config dict) creatable as ``name``.

    open_clip only reads configs from files with paths inside them as written; entries
    put here directly keep resolved absolute paths and survive its registry rescans.
    """
    import open_clip.factory

    open_clip.factory._MODEL_CONFIGS[name] = copy.deepcopy(config)


def model_card(arch: str) -> dict[str, Any] | None:
    """The bundled model's ``model_card.json``, or None when it has none."""
    path = companion_folder(arch) / CARD_NAME
    if not path.is_file():
        return None
    card: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return card


def calibrated_threshold(fingerprint: Any, direction: str) -> float | None:
    """The relevance threshold for an encoder ``fingerprint`` (anything with ``arch``,
    ``pretrained`` and ``weights_sha256``): what ``min_score="auto"`` resolves to.

    Only bundled models carry a calibration today; None for every other encoder.
    """
    if getattr(fingerprint, "pretrained", None) != "bundled":
        return None
    return relevance_threshold(
        fingerprint.arch, direction, weights_sha256=fingerprint.weights_sha256
    )


def relevance_threshold(
    arch: str, direction: str, *, weights_sha256: str | None = None
) -> float | None:
    """The calibrated relevance threshold of bundled model ``arch`` for ``direction``.

    ``direction`` is ``"<query modality>-><row modality>"`` (``text->image``...). A score
    at or above it is the right product with the precision recorded in the card (90%).
    None when the model has no calibration for that direction, or when
    ``weights_sha256`` is given and differs from the weights it was calibrated on.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")
    card = model_card(arch)
    if card is None:
        return None
    cal = card.get("calibration") or {}
    if weights_sha256 is not None and cal.get("weights_sha256") != weights_sha256:
        return None
    value = (cal.get("thresholds") or {}).get(direction)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)
