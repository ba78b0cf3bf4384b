"""``clipsearch train``: contrastive training / fine-tuning on an (image, caption) manifest."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from clipsearch.cli.common import cli_errors, console, print_json, progress_bars


def _split(values: list[str]) -> tuple[str, ...]:
    """Repeatable options also accept comma-separated lists: --x a,b --x c -> (a, b, c)."""
    return tuple(v.strip() for raw in values for v in raw.split(",") if v.strip())


def train_cmd(
    manifest: Path = typer.Option(
        ..., "--manifest", "-m", help="Parquet, CSV or JSONL of (image, caption) rows."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Run folder: checkpoints, model.safetensors, model card."
    ),
    model: str = typer.Option(
        "clipsearch-demo", "--model", help="open_clip architecture (bundled ones included)."
    ),
    pretrained: str = typer.Option(
        "", "--pretrained", help="Start from these weights (path or tag); empty: from scratch."
    ),
    image_column: str = typer.Option(
        "image_path", "--image-column", help="Column of image paths (relative to the manifest)."
    ),
    caption_column: list[str] = typer.Option(
        ["caption"], "--caption-column", help="Caption column(s); repeat or comma-separate."
    ),
    template: list[str] = typer.Option(
        [],
        "--template",
        help="Caption template over columns, e.g. 'a {colour} {kind}'; repeatable.",
    ),
    template_set: str | None = typer.Option(
        None, "--template-set", help="Named template set: 'shop' (the demo catalog)."
    ),
    group_column: str | None = typer.Option(
        None,
        "--group-column",
        help="Document id column (e.g. sku): same-product rows are positives.",
    ),
    hard_negative_columns: list[str] = typer.Option(
        [],
        "--hard-negative-columns",
        help="Attributes for hard-negative pairs, e.g. kind,colour,pattern.",
    ),
    hard_negative_vary: list[str] = typer.Option(
        [],
        "--hard-negative-vary",
        help="Columns a partner may differ in (default: any hard-negative column), e.g. kind.",
    ),
    hard_negatives: float = typer.Option(
        0.0, "--hard-negatives", help="Fraction of each batch made of hard-negative pairs (0-1)."
    ),
    label_columns: list[str] = typer.Option(
        [],
        "--label-columns",
        help="Attribute columns that also supervise the image tower (e.g. kind), via heads dropped at export.",
    ),
    label_weight: float = typer.Option(1.0, "--label-weight", help="Weight of the label losses."),
    text_tower: str = typer.Option(
        "",
        "--text-tower",
        help="Pretrained text tower (LiT): 'minilm' (all-MiniLM-L6-v2, needs the train extra) "
        "or a Hugging Face BERT folder; the image tower of --model learns to meet it.",
    ),
    add_tokens: str = typer.Option(
        "", "--add-tokens", help="Tokens to add to the tower: 'zh-common' or a file (one a line)."
    ),
    embed_dim: int | None = typer.Option(
        None, "--embed-dim", help="Embedding size with --text-tower (default: the tower's width)."
    ),
    text_lr: float | None = typer.Option(
        None, "--text-lr", help="Learning rate of the text transformer; 0 locks it (default: --lr)."
    ),
    text_proj_lr: float | None = typer.Option(
        None, "--text-proj-lr", help="Learning rate of the text projection; 0 locks it."
    ),
    translation_set: str | None = typer.Option(
        None,
        "--translation-set",
        help="Translated caption templates: 'shop-zh' (Chinese captions of the demo catalog).",
    ),
    distill_steps: int = typer.Option(
        0, "--distill-steps", help="Steps teaching added tokens on the translation pairs first."
    ),
    negative_images: int = typer.Option(
        0, "--negative-images", help="Synthetic non-product images per batch (negatives of all)."
    ),
    steps: int = typer.Option(1000, "--steps", help="Optimiser steps."),
    batch_size: int = typer.Option(128, "--batch-size", help="Examples per step."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (AdamW)."),
    warmup_steps: int = typer.Option(
        100, "--warmup-steps", help="Linear warmup steps before the cosine decay."
    ),
    weight_decay: float = typer.Option(
        0.1, "--weight-decay", help="AdamW weight decay (not on gains/biases)."
    ),
    no_augment: bool = typer.Option(False, "--no-augment", help="Disable image augmentation."),
    val_fraction: float = typer.Option(
        0.05, "--val-fraction", help="Held-out fraction of products for validation."
    ),
    val_every: int = typer.Option(200, "--val-every", help="Validate every N steps."),
    checkpoint_every: int = typer.Option(
        200, "--checkpoint-every", help="Checkpoint every N steps."
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seed of initialisation, data order and augmentation."
    ),
    threads: int = typer.Option(2, "--threads", help="torch CPU threads."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:N]."),
    export_dtype: str = typer.Option(
        "fp16", "--export-dtype", help="fp16 or fp32 for the exported weights."
    ),
    export: Path | None = typer.Option(
        None, "--export", help="Also copy the final weights here (e.g. the bundled model file)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train or fine-tune a CLIP model (symmetric InfoNCE); re-running resumes from the last checkpoint."""
    from clipsearch.indexer.training import TrainConfig, train
    from clipsearch.indexer.training import template_set as named_templates
    from clipsearch.indexer.training.config import translation_set as named_translations

    with cli_errors():
        templates = tuple(template) + (named_templates(template_set) if template_set else ())
        cfg = TrainConfig(
            manifest=manifest,
            out_dir=out,
            model=model,
            pretrained=pretrained,
            image_column=image_column,
            caption_columns=_split(caption_column),
            templates=templates,
            group_column=group_column,
            hard_negative_columns=_split(hard_negative_columns),
            hard_negative_vary=_split(hard_negative_vary),
            hard_negative_fraction=hard_negatives,
            label_columns=_split(label_columns),
            label_weight=label_weight,
            text_tower=text_tower,
            add_tokens=add_tokens,
            embed_dim=embed_dim,
            text_lr=text_lr,
            text_proj_lr=text_proj_lr,
            translations=named_translations(translation_set) if translation_set else (),
            distill_steps=distill_steps,
            negative_images=negative_images,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            warmup_steps=min(warmup_steps, steps),
            weight_decay=weight_decay,
            augment=not no_augment,
            val_fraction=val_fraction,
            val_every=val_every,
            checkpoint_every=checkpoint_every,
            seed=seed,
            threads=threads,
            device=device,
            export_dtype=export_dtype,
        )
        command = "clipsearch " + shlex.join(sys.argv[1:])
        # Not transient: the loss and validation rows stay on screen after the run.
        with progress_bars(quiet=as_json, transient=False) as on_progress:
            result = train(cfg, progress=on_progress, export_path=export, command=command)
    if as_json:
        print_json(result.to_dict())
        return
    m = result.metrics
    console.print(
        f"[green]trained[/] {result.steps} steps (resumed from {result.resumed_from}) in "
        f"{result.wall_s:.0f} s; final loss {result.losses[-1]:.3f}"
    )
    if m:
        console.print(
            f"validation: image->text R@1 {m['image_to_text_R@1']:.3f} R@5 {m['image_to_text_R@5']:.3f}"
            f" | text->image R@1 {m['text_to_image_R@1']:.3f} R@5 {m['text_to_image_R@5']:.3f}"
        )
    console.print(f"weights: {result.model_path}\nmodel card: {result.card_path}")
