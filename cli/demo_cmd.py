"""``clipsearch demo-data`` (generate the demo shop catalog), ``demo`` and ``demo-eval``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from clipsearch.cli.common import cli_errors, console, print_json, progress_bars

if TYPE_CHECKING:
    from clipsearch.indexer.demo.run import DemoReport


def demo_data_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for images/ and products.parquet."),
    products: int = typer.Option(3000, "--products", "-n", help="Number of products."),
    seed: int = typer.Option(0, "--seed", help="Same seed -> byte-identical catalog."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Generate the demo shop catalog: rendered product photos plus products.parquet."""
    from clipsearch.indexer.demo.generate import generate_catalog

    with cli_errors(), progress_bars(quiet=as_json, transient=False) as progress:
        summary = generate_catalog(out, products=products, seed=seed, progress=progress)
    if as_json:
        print_json(summary.to_dict())
        return
    console.print(
        f"[green]wrote[/] {summary.products} products ({summary.images} photos) to {summary.out_dir}; "
        f"manifest: {summary.manifest}"
    )


def demo_cmd(
    out: Path = typer.Option(
        Path("demo-out"), "--out", "-o", help="Folder for the catalog and demo_report.json."
    ),
    products: int = typer.Option(3000, "--products", "-n", help="Products in the demo shop."),
    seed: int = typer.Option(
        7, "--seed", help="Catalog seed (the bundled model was trained on seed 1)."
    ),
    model: str = typer.Option(
        "clipsearch-demo", "--model", help="Encoder model (preset or architecture)."
    ),
    pretrained: str | None = typer.Option(
        None, "--pretrained", help="Weights; default: the model's own (bundled)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Generate a demo shop, index it, and run shopping-assistant queries (text, filters, image)."""
    from clipsearch.indexer.demo.run import run_demo

    with cli_errors(), progress_bars(quiet=as_json) as on_progress:
        report = run_demo(
            out,
            products=products,
            seed=seed,
            model=model,
            pretrained=pretrained,
            progress=on_progress,
        )
    if as_json:
        print_json(report.to_dict())
        return
    _render_demo(report)


def _render_demo(report: DemoReport) -> None:
    from rich import box
    from rich.table import Table

    cat, tm = report.catalog, report.timings
    console.print(
        f"[bold]clipsearch demo[/]: {cat.products} products ({cat.images} photos, seed {cat.seed}) "
        f"indexed in {report.index}; model {report.model['arch']} ({report.model['pretrained'] or 'random'}), "
        f"dim {report.model['dim']}"
    )
    console.print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in tm.items()))
    from clipsearch.indexer.demo.run import DEMO_SHOP_ONLY, NO_GOOD_MATCH

    for q in report.queries:
        heading = f"{q.title}: [cyan]{q.query}[/]"
        if q.filter:
            heading += f"  where [magenta]{q.filter}[/] ({q.matches} rows match)"
        if q.sort:
            heading += f"  sorted by [magenta]{q.sort}[/] (results above the relevance threshold)"
        if q.no_good_match:
            console.print(f"[bold]{heading}[/]")
            console.print(f"  [yellow]{NO_GOOD_MATCH}[/]: {DEMO_SHOP_ONLY}.")
            if q.hits:
                best = q.hits[0]
                console.print(
                    f"  (closest, below the threshold {q.threshold:.3f}: "
                    f"{best.get('title', best['sku'])} at {best['score']:.3f})"
                )
            continue
        table = Table(title=heading, title_justify="left", box=box.SIMPLE_HEAD)
        if q.kind == "classify":
            for col in ("rank", "caption", "probability"):
                table.add_column(col)
            for h in q.hits:
                table.add_row(str(h["rank"]), h["caption"], f"{h['probability']:.3f}")
        else:
            # Fits 80 columns: only the title is cut (with an ellipsis); rows are in rank order.
            table.add_column("score", no_wrap=True, min_width=5)
            table.add_column("sku", no_wrap=True, min_width=10)
            table.add_column("title", overflow="ellipsis", no_wrap=True, max_width=30)
            table.add_column("price", justify="right", no_wrap=True, min_width=6)
            table.add_column("rating", no_wrap=True, min_width=6)
            table.add_column("stock", no_wrap=True, min_width=5)
            for h in q.hits:
                # A hit below the model's calibrated threshold is shown, but marked.
                low = "[dim]?[/]" if h.get("low_confidence") else ""
                table.add_row(
                    f"{h['score']:.3f}{low}",
                    h["sku"],
                    h["title"],
                    f"{h['price']:.2f}",
                    f"{h['rating']:.1f}",
                    "yes" if h["in_stock"] else "[red]no[/]",
                )
        console.print(table)
    if any(h.get("low_confidence") for q in report.queries for h in q.hits):
        console.print(
            "[dim]?[/] = below the model's calibrated relevance threshold (low confidence)"
        )
    console.print(f"report: {cat.out_dir.parent / 'demo_report.json'}")
    console.print(
        f"\nTry it in a browser: [bold]{_own_command()} serve {report.index}[/] "
        "then open http://127.0.0.1:8000/"
    )


def _own_command() -> str:
    """How the user ran clipsearch (``.venv/bin/clipsearch`` under ``make demo``)."""
    argv0 = Path(sys.argv[0])
    return str(argv0) if argv0.name == "clipsearch" else "clipsearch"


def demo_eval_cmd(
    model: str = typer.Option("clipsearch-demo", "--model", help="Encoder model to evaluate."),
    pretrained: str | None = typer.Option(
        None, "--pretrained", help="Weights; default: the model's own (bundled)."
    ),
    products: int = typer.Option(500, "--products", "-n", help="Products in the held-out catalog."),
    seed: int = typer.Option(
        1234, "--seed", help="Held-out catalog seed (must differ from the training seed)."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the JSON report here."),
    calibration_seed: int | None = typer.Option(
        None,
        "--calibration-seed",
        help="Calibrate relevance thresholds on a catalog of this seed first "
        "(default: use the model's bundled calibration).",
    ),
    write_card: Path | None = typer.Option(
        None, "--write-card", help="Store the calibration in this model_card.json."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Measure a model on a freshly generated demo catalog against the demo quality bar:
    template queries, unseen synonyms, kind synonyms, Chinese, image->text, out-of-domain."""
    from clipsearch.indexer.demo.evaluate import evaluate_demo_model

    with cli_errors(), progress_bars(quiet=as_json) as on_progress:
        report = evaluate_demo_model(
            model=model,
            pretrained=pretrained,
            products=products,
            seed=seed,
            out_file=out,
            calibration_seed=calibration_seed,
            write_card=write_card,
            progress=on_progress,
        )
    if as_json:
        print_json(report)
        return
    m = report["metrics"]
    bar_ = report["quality_bar"]
    for key, bar in bar_.items():
        value = m.get(key)
        if value is None:
            console.print(f"{key}: not measured (bar {bar:.2f}) [red]FAIL[/]")
            continue
        mark = "[green]pass[/]" if value >= bar else "[red]FAIL[/]"
        console.print(f"{key}: {value:.4f} (bar {bar:.2f}) {mark}")
    console.print(
        f"kind synonyms precision@1 {m['kind_synonyms_precision@1']:.4f}; Chinese unseen phrasing "
        f"{m['chinese_unseen_phrasing_precision@1']:.4f}; text->image precision@5 "
        f"{m['text_to_image_precision@5']:.4f}; per-attribute image->text: "
        + ", ".join(f"{k} {v:.3f}" for k, v in m["image_to_text_attribute_accuracy"].items())
    )
    if report.get("thresholds"):
        console.print(
            "relevance thresholds: "
            + ", ".join(f"{d} {v:.3f}" for d, v in report["thresholds"].items())
        )
    console.print(f"{report['images']} photos, {report['queries']} queries, seed {seed}")
    if out:
        console.print(f"report: {out}")
    if not report["passed"]:
        raise typer.Exit(2)
