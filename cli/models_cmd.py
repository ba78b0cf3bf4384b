"""``clipsearch models``: list known models, describe one, pre-fetch weights."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from clipsearch.cli.common import cli_errors, console, print_json

models_app = typer.Typer(
    help="List, inspect and pre-download encoder models.", no_args_is_help=True
)

PRETRAINED_HELP = (
    "Pretrained tag, checkpoint path (.safetensors/.pt), hf-hub:org/name, or 'bundled'."
)


@models_app.command("list")
def list_cmd(
    offline_only: bool = typer.Option(
        False, "--offline", help="Only models whose weights are on this machine."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Presets, bundled models and every open_clip architecture/tag; marks what works offline."""
    from clipsearch.retrieval.encoders.catalog import list_models

    with cli_errors():
        rows = list_models()
    if offline_only:
        rows = [r for r in rows if r.offline]
    if as_json:
        print_json([r.to_dict() for r in rows])
        return
    table = Table(title="clipsearch models", show_lines=False)
    for col in ("model", "pretrained", "source", "offline", "description"):
        table.add_column(col, overflow="fold")
    for r in rows:
        mark = "[green]yes[/]" if r.offline else "[dim]no[/]"
        table.add_row(r.name, r.pretrained, r.source, mark, r.description)
    console.print(table)
    n_off = sum(r.offline for r in rows)
    console.print(
        f"{len(rows)} models, {n_off} available offline. "
        "Fetch others while online: clipsearch models fetch MODEL --pretrained TAG"
    )


@models_app.command("info")
def info_cmd(
    model: str = typer.Argument(..., help="Preset name, open_clip architecture, or fake[-DIM]."),
    pretrained: str | None = typer.Option(None, "--pretrained", "-p", help=PRETRAINED_HELP),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N, mps."),
    precision: str = typer.Option(
        "auto", "--precision", help="auto (measured per machine), fp32, fp16, bf16, bf16-weights."
    ),
    backend: str = typer.Option("auto", "--backend", help="auto, onnx or torch."),
    random_weights: bool = typer.Option(
        False, "--random-weights", help="Allow an architecture without --pretrained (random)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Load a model and show its fingerprint, dimension, size, device and precision."""
    from clipsearch.retrieval.encoders.catalog import describe_model

    with cli_errors():
        info = describe_model(
            model,
            pretrained,
            device=device,
            precision=precision,
            backend=backend,
            allow_random=random_weights,
        )
    if as_json:
        print_json(info)
        return
    table = Table(title=f"model {model}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    keys = ("arch", "pretrained", "dim", "n_parameters", "backend", "device", "precision")
    for key in (*keys, "precision_reason", "batch_size"):
        value = info[key]
        table.add_row(key, f"{value:,}" if key == "n_parameters" else str(value))
    for key, value in info["fingerprint"].items():
        if key not in info:
            table.add_row(f"fingerprint.{key}", str(value))
    console.print(table)


@models_app.command("fetch")
def fetch_cmd(
    model: str = typer.Argument(
        ..., help="Preset name, open_clip architecture, or hf-hub:org/name."
    ),
    pretrained: str | None = typer.Option(None, "--pretrained", "-p", help=PRETRAINED_HELP),
    cache_dir: str | None = typer.Option(
        None,
        "--cache-dir",
        help="Download here instead of the default HuggingFace/open_clip cache.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Download a model's weights into the local cache (run while online)."""
    from clipsearch.retrieval.encoders.catalog import fetch_model

    with cli_errors():
        result = fetch_model(model, pretrained, cache_dir=cache_dir)
    if as_json:
        print_json(result)
        return
    console.print(f"[green]ok[/] {result['arch']} / {result['pretrained']}: {result['path']}")
    console.print(f"sha256 {result['sha256']}")


@models_app.command("export")
def export_cmd(
    model: str = typer.Argument(..., help="Preset name or open_clip architecture."),
    pretrained: str | None = typer.Option(None, "--pretrained", "-p", help=PRETRAINED_HELP),
    fmt: str = typer.Option("onnx", "--format", help="Export format: onnx (the only one)."),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Folder to write; default: the cache folder --backend auto looks in.",
    ),
    quantize: str | None = typer.Option(
        None, "--quantize", help="int8: dynamic int8 weights (smaller; checked at cosine 0.98)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing export."),
    random_weights: bool = typer.Option(
        False, "--random-weights", help="Allow an architecture without --pretrained (random)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Export the image and text towers to ONNX, with tokenizer and preprocessing settings.

    The export checks itself: torch and onnxruntime must agree at cosine >= 0.999 on
    sample images and texts, or nothing is written. Search and embed then run the model
    without torch (--backend auto picks the export up from the default --out).
    """
    from clipsearch.retrieval.encoders.onnx_export import export_onnx

    with cli_errors():
        if fmt != "onnx":
            raise typer.BadParameter(
                f"unknown format {fmt!r}; expected onnx", param_hint="'--format'"
            )
        report = export_onnx(
            model,
            pretrained,
            out_dir=out,
            quantize=quantize,
            overwrite=overwrite,
            allow_random=random_weights,
        )
    if as_json:
        print_json(report.to_dict())
        return
    console.print(
        f"[green]ok[/] exported {model} to {report.out_dir} ({report.n_bytes / 1e6:.1f} MB)"
    )
    console.print(
        f"min cosine to torch: images {report.image_min_cosine:.5f}, "
        f"texts {report.text_min_cosine:.5f}"
    )
