"""``clipsearch search``, ``clipsearch classify`` and ``clipsearch eval``.

Thin wrappers: each parses its options, calls one library function
(:meth:`SearchEngine.search`, :func:`clipsearch.retrieval.queries.classify`,
:func:`clipsearch.retrieval.eval.evaluate_index`) and renders a rich table or JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from clipsearch.cli.common import cli_errors, console, print_json
from clipsearch.retrieval.errors import QueryError

_DEVICE = typer.Option(
    "auto", "--device", help="auto, cpu, cuda, cuda:N: where the encoder and shards run."
)


def search_cmd(
    index: Path = typer.Argument(..., help="Index directory."),
    text: str | None = typer.Option(None, "--text", "-t", help="Text query."),
    image: Path | None = typer.Option(None, "--image", "-i", help="Image query (file)."),
    where: str | None = typer.Option(
        None, "--where", "-w", help='Filter, e.g. "price < 30 and in_stock".'
    ),
    k: int = typer.Option(10, "-k", help="Results per page."),
    offset: int = typer.Option(0, "--offset", help="Results to skip (pagination)."),
    modality: str | None = typer.Option(None, "--modality", help="Rows to search: image or text."),
    group_by_doc: bool = typer.Option(False, "--group-by-doc", help="One result per doc_id."),
    mmr: float | None = typer.Option(None, "--mmr", help="MMR diversity lambda in [0, 1]."),
    sort: str | None = typer.Option(None, "--sort", help="Sort by a field: FIELD or FIELD:desc."),
    min_score: float | None = typer.Option(None, "--min-score", help="Drop results scoring lower."),
    device: str = _DEVICE,
    as_json: bool = typer.Option(False, "--json", help="JSON output."),
) -> None:
    """Search an index with a text or an image query."""
    from clipsearch.retrieval.engine import SearchEngine

    with cli_errors():
        if (text is None) == (image is None):
            raise QueryError("give exactly one of --text or --image")
        query: Any = text if text is not None else image
        with SearchEngine.open(index, device=device) as engine:
            results = engine.search(
                query,
                k=k,
                offset=offset,
                where=where,
                modality=modality,
                group_by_doc=group_by_doc,
                mmr=mmr,
                sort=sort,
                min_score=min_score,
            )
    if as_json:
        print_json(results.to_dict())
        return
    table = Table(title=f"{len(results)} results (index version {results.index_version})")
    for col in ("#", "score", "doc_id", "modality", "source", "metadata"):
        table.add_column(col, overflow="fold")
    for h in results:
        meta = ", ".join(f"{k}={v}" for k, v in h.metadata.items())
        table.add_row(str(h.rank + 1), f"{h.score:.3f}", h.doc_id, h.modality, h.source, meta)
    console.print(table)
    if results.total_matches is not None:
        console.print(f"{results.total_matches} rows match the filter")


def classify_cmd(
    image: Path = typer.Argument(..., help="Image file."),
    labels: str = typer.Option(..., "--labels", "-l", help="Comma-separated labels."),
    model: str = typer.Option(
        "clipsearch-demo", "--model", "-m", help="Encoder preset or architecture."
    ),
    pretrained: str | None = typer.Option(None, "--pretrained", help="Weights tag or checkpoint."),
    as_json: bool = typer.Option(False, "--json", help="JSON output."),
) -> None:
    """Zero-shot classify an image into one of the given labels."""
    from clipsearch.retrieval.encoders import load_encoder
    from clipsearch.retrieval.queries import classify

    with cli_errors():
        encoder = load_encoder(model, pretrained)
        probs = classify(encoder, image, [x for x in labels.split(",") if x.strip()])
    if as_json:
        print_json([{"label": label, "probability": p} for label, p in probs])
        return
    table = Table(title=str(image))
    table.add_column("label")
    table.add_column("probability", justify="right")
    for label, p in probs:
        table.add_row(label, f"{p:.3f}")
    console.print(table)


def eval_cmd(
    index: Path = typer.Argument(..., help="Index directory."),
    pairs: Path = typer.Option(..., "--pairs", help="CSV/JSONL of labelled (image, text) pairs."),
    k: int = typer.Option(10, "-k", help="k of the index recall@k."),
    device: str = _DEVICE,
    as_json: bool = typer.Option(False, "--json", help="JSON output."),
) -> None:
    """R@1/5/10 and ranks both directions on labelled pairs, and index recall@k."""
    from clipsearch.retrieval.engine import SearchEngine
    from clipsearch.retrieval.eval import evaluate_index

    with cli_errors(), SearchEngine.open(index, device=device) as engine:
        report = evaluate_index(engine, pairs, k=k)
    if as_json:
        print_json(report)
        return
    table = Table(title=f"{report['pairs']} pairs, index version {report['index_version']}")
    table.add_column("direction")
    for col in ("R@1", "R@5", "R@10", "median_rank", "mean_rank"):
        table.add_column(col, justify="right")
    for direction in ("image_to_text", "text_to_image"):
        m = report[direction]
        table.add_row(
            direction, *(f"{m[c]:.3f}" for c in ("R@1", "R@5", "R@10", "median_rank", "mean_rank"))
        )
    console.print(table)
    console.print(
        json.dumps({key: v for key, v in report.items() if key.startswith("index_recall")})
    )
