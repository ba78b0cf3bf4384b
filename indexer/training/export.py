"""Export a trained model: safetensors weights plus a model card (JSON and Markdown)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipsearch.indexer.fsutil import atomic_write_path, atomic_write_text
from clipsearch.indexer.training.config import TrainConfig
from clipsearch.indexer.training.text_tower import PreparedTower, copy_tower_files

if TYPE_CHECKING:
    import torch

WEIGHTS_NAME = "model.safetensors"
# The run folder's copy of a pretrained text tower's config and tokenizer files.
TOWER_DIR = "text_tower"
# open_clip config of a run with a pretrained text tower (loadable with its folder).
CONFIG_NAME = "open_clip_config.json"
CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"


def export_model(
    model: torch.nn.Module,
    cfg: TrainConfig,
    *,
    out_dir: Path,
    export_path: Path | None,
    card: dict[str, Any],
    architecture_config: dict[str, Any] | None = None,
    tower: PreparedTower | None = None,
) -> tuple[Path, Path]:
    """Write ``model.safetensors`` (in ``cfg.export_dtype``) and the model card to ``out_dir``.

    With ``export_path``, the weights are also copied there (and the Markdown card beside
    it as ``<stem>.md``). With a pretrained text ``tower``, ``out_dir`` also gets
    ``open_clip_config.json`` and ``text_tower/``; an ``export_path`` then becomes a
    bundled model: ``<stem>.json`` (its open_clip config, naming the tower
    ``bundled:<folder>``) and the folder ``<stem with _>/`` (tokenizer, BERT config,
    ``model_card.json``), as :mod:`clipsearch.retrieval.models` loads them.
    Returns (weights path, JSON card path).
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    dtype = torch.float16 if cfg.export_dtype == "fp16" else torch.float32
    state = {
        k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().clone()
        for k, v in model.state_dict().items()
    }
    weights = out_dir / WEIGHTS_NAME

    def save(tmp: Path) -> None:
        save_file(
            state,
            str(tmp),
            metadata={"format": "pt", "arch": cfg.model, "producer": "clipsearch train"},
        )
        os.chmod(tmp, 0o644)  # safetensors creates 0600 files; weights are meant to be shared

    atomic_write_path(weights, save)
    sha = _sha256(weights)
    n_params = sum(int(p.numel()) for p in model.parameters())
    full = {
        "architecture": cfg.model,
        "architecture_config": architecture_config or open_clip.get_model_config(cfg.model),
        "parameters": n_params,
        "weights_file": WEIGHTS_NAME,
        "weights_sha256": sha,
        "weights_bytes": weights.stat().st_size,
        "weights_dtype": cfg.export_dtype,
        "initialised_from": cfg.pretrained or "random (trained from scratch)",
        "text_tower": None
        if tower is None
        else {
            "origin": tower.source,
            "licence": tower.licence,
            "base_vocab": tower.base_vocab,
            "vocab_size": tower.vocab_size,
            "added_tokens": tower.vocab_size - tower.base_vocab,
            "text_lr": cfg.text_lr,
            "text_proj_lr": cfg.text_proj_lr,
        },
        "data": {
            "manifest": str(cfg.manifest),
            "image_column": cfg.image_column,
            "caption_columns": list(cfg.caption_columns),
            "templates": list(cfg.templates),
            "group_column": cfg.group_column,
            "hard_negative_columns": list(cfg.hard_negative_columns),
            "hard_negative_vary": list(cfg.hard_negative_vary),
            "hard_negative_fraction": cfg.hard_negative_fraction,
        },
        "training": cfg.to_dict(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
        **card,
    }
    card_json = out_dir / CARD_JSON
    atomic_write_text(card_json, json.dumps(full, indent=2, default=str) + "\n")
    markdown = render_card(full)
    atomic_write_text(out_dir / CARD_MD, markdown)
    if tower is not None:
        config = dict(architecture_config or {})
        atomic_write_text(out_dir / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    if export_path is not None:
        atomic_write_path(export_path, lambda tmp: shutil.copyfile(weights, tmp))
        atomic_write_text(export_path.with_suffix(".md"), markdown)
        if tower is not None:
            _export_bundled(export_path, architecture_config or {}, tower, full)
    return weights, card_json


def _export_bundled(
    export_path: Path, config: dict[str, Any], tower: PreparedTower, card: dict[str, Any]
) -> None:
    """Beside ``export_path``: the bundled open_clip config and the companion folder."""
    companion = export_path.parent / export_path.stem.replace("-", "_")
    copy_tower_files(tower.folder, companion)
    init = companion / "__init__.py"
    if not init.exists():
        # A package (data only) so that setuptools ships the files as package data.
        atomic_write_text(
            init, f'"""Tokenizer, text-tower config and model card of {export_path.stem}."""\n'
        )
    bundled = json.loads(json.dumps(config))
    ref = "bundled:" + companion.name
    bundled["text_cfg"]["hf_model_name"] = ref
    bundled["text_cfg"]["hf_tokenizer_name"] = ref
    atomic_write_text(export_path.with_suffix(".json"), json.dumps(bundled, indent=4) + "\n")
    atomic_write_text(companion / "model_card.json", json.dumps(card, indent=2, default=str) + "\n")


def render_card(card: dict[str, Any]) -> str:
    """The model card as Markdown."""
    tr = card["training"]
    lines = [
        f"# Model card: {card['architecture']}",
        "",
        f"- Architecture: `{card['architecture']}` ({card['parameters']:,} parameters); "
        f"config: `{json.dumps(card['architecture_config'])}`",
        f"- Weights: `{card['weights_file']}`, {card['weights_dtype']}, "
        f"{card['weights_bytes']:,} bytes, sha256 `{card['weights_sha256']}`",
        f"- Initialised from: {card['initialised_from']}",
        f"- Data: `{card['data']['manifest']}`: {card.get('train_examples')} training and "
        f"{card.get('val_examples')} validation images; captions from columns "
        f"{card['data']['caption_columns']} and {len(card['data']['templates'])} templates",
        f"- Training: {tr['steps']} steps of batch {tr['batch_size']}, AdamW lr {tr['lr']} "
        f"(warmup {tr['warmup_steps']}, cosine), weight decay {tr['weight_decay']}, "
        f"hard negatives {tr['hard_negative_fraction']} on {tr['hard_negative_columns']} "
        f"(varying {tr.get('hard_negative_vary') or 'any'}), label heads on "
        f"{tr.get('label_columns') or 'none'}, seed {tr['seed']}",
        f"- Final training loss: {card.get('final_loss')}",
    ]
    if card.get("command"):
        lines.append(f"- Command: `{card['command']}`")
    metrics = card.get("val_metrics") or {}
    if metrics:
        lines += ["", "## Validation (held-out products)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    return "\n".join(lines) + "\n"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
