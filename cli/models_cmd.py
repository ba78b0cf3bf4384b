"""``clipsearch models``: list known models, describe one, pre-fetch weights."""

from __future__ import annotations

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
    precision: str = typer.Option("auto", "--precision", help="auto, fp32, fp16, bf16."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Load a model and show its fingerprint, dimension, size, device and precision."""
    from clipsearch.retrieval.encoders.catalog import describe_model

    with cli_errors():
        info = describe_model(model, pretrained, device=device, precision=precision)
    if as_json:
        print_json(info)
        return
    table = Table(title=f"model {model}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key in ("arch", "pretrained", "dim", "n_parameters", "device", "precision", "batch_size"):
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
