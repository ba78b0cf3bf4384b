"""``clipsearch embed``: embed a few texts and images; print vectors or their similarities."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from clipsearch.cli.common import cli_errors, console, err_console, print_json
from clipsearch.retrieval.encoders import DEFAULT_MODEL


def embed_cmd(
    text: list[str] = typer.Option([], "--text", "-t", help="A text to embed (repeatable)."),
    image: list[Path] = typer.Option(
        [], "--image", "-i", help="An image file to embed (repeatable)."
    ),
    model: str = typer.Option(
        DEFAULT_MODEL, "--model", "-m", help="Preset, open_clip architecture, or fake[-DIM]."
    ),
    pretrained: str | None = typer.Option(
        None, "--pretrained", "-p", help="Tag, checkpoint path, hf-hub:org/name, or 'bundled'."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N, mps."),
    precision: str = typer.Option(
        "auto", "--precision", help="auto (measured per machine), fp32, fp16, bf16, bf16-weights."
    ),
    backend: str = typer.Option(
        "auto", "--backend", help="auto (ONNX when the model has an export), onnx, or torch."
    ),
    random_weights: bool = typer.Option(
        False,
        "--random-weights",
        help="Allow a --model without --pretrained (random weights, meaningless vectors).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the vectors as JSON."),
) -> None:
    """Embed texts and images with one model and show how similar they are to each other."""
    from clipsearch.retrieval.encoders import load_encoder
    from clipsearch.retrieval.encoders.catalog import describe_encoder, embed_inputs

    with cli_errors():
        encoder = load_encoder(
            model,
            pretrained,
            device=device,
            precision=precision,
            backend=backend,
            allow_random=random_weights,
        )
        result = embed_inputs(encoder, texts=text, images=image)
    if as_json:
        print_json(
            {
                "encoder": describe_encoder(encoder, model=model),
                "items": [
                    {
                        "label": label,
                        "modality": modality,
                        "truncated": bool(cut),
                        "vector": [round(float(x), 7) for x in vec],
                    }
                    for label, modality, cut, vec in zip(
                        result.labels,
                        result.modalities,
                        result.truncated,
                        result.vectors,
                        strict=True,
                    )
                ],
                "similarity": [[round(float(x), 6) for x in row] for row in result.similarity()],
            }
        )
        return
    sim = result.similarity()
    names = [f"{'T' if m == 'text' else 'I'}{i}" for i, m in enumerate(result.modalities)]
    legend = Table(show_header=True, title=f"{encoder.fingerprint.arch} ({encoder.dim}-d)")
    legend.add_column("id")
    legend.add_column("input", overflow="fold")
    for name, label, cut in zip(names, result.labels, result.truncated, strict=True):
        legend.add_row(name, label + (" [yellow](truncated)[/]" if cut else ""))
    console.print(legend)
    matrix = Table(title="cosine similarity")
    matrix.add_column("")
    for name in names:
        matrix.add_column(name, justify="right")
    for name, row in zip(names, sim, strict=True):
        matrix.add_row(name, *(f"{x:.3f}" for x in row))
    console.print(matrix)
    if result.truncated.any():
        err_console.print(
            f"[yellow]warning:[/] {int(result.truncated.sum())} text(s) exceed the model's "
            f"{encoder.fingerprint.context_length}-token context and were truncated"
        )
