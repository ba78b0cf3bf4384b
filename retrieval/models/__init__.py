"""Model configs and weights bundled with clipsearch.

Every ``*.json`` here is an open_clip model config (``embed_dim``, ``vision_cfg``,
``text_cfg``); :func:`register` adds them to open_clip's registry so the architecture
can be created by its file stem (``clipsearch-demo``). Weights for architecture ``X``
ship as ``X.safetensors`` beside the config and load with ``pretrained="bundled"``.

No torch or open_clip import happens at module level: ``bundled_weights`` and
``bundled_configs`` are cheap and safe to call from the CLI.
"""

from __future__ import annotations

import threading
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent

_registered: set[Path] = set()
_lock = threading.Lock()


def bundled_configs() -> dict[str, Path]:
    """Architecture name -> config file, for every JSON config in this folder."""
    return {p.stem: p for p in sorted(MODELS_DIR.glob("*.json"))}


def bundled_weights(arch: str) -> Path | None:
    """The bundled ``<arch>.safetensors`` file, or None when this package ships none."""
    path = MODELS_DIR / f"{arch}.safetensors"
    return path if path.is_file() else None


def register() -> list[str]:
    """Add the bundled configs to open_clip's model registry; idempotent and thread-safe.

    Returns the architecture names that are bundled (registered now or before).
    """
    import open_clip

    configs = bundled_configs()
    with _lock:
        for path in configs.values():
            if path not in _registered:
                open_clip.add_model_config(path)
                _registered.add(path)
    return list(configs)
