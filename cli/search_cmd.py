"""``clipsearch search``, ``clipsearch classify`` and ``clipsearch eval``.

Thin wrappers: each parses its options, calls one library function
(:meth:`SearchEngine.search`, :func:`clipsearch.retrieval.queries.classify`,
:func:`clipsearch.retrieval.eval.evaluate_index`) and renders a rich table or JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from clipsearch.cli.common import cli_errors, console, print_json
from clipsearch.cli.render import default_fields, parse_fields, results_json, results_table
from clipsearch.retrieval.errors import QueryError
from clipsearch.retrieval.options import AUTO, DEFAULT_FUSION_DEPTH, MinScore, SearchOptions

_DEVICE = typer.Option(
    "auto", "--device", help="auto, cpu, cuda, cuda:N: where the encoder and shards run."
)
_BACKEND = typer.Option(
    "auto",
    "--backend",
    help="Query encoder runtime: auto (ONNX when the model has an export, e.g. the demo "
    "model; else torch), onnx, or torch.",
)
_QUERY_THREADS = typer.Option(
    1,
    "--query-threads",
    min=1,
    help="CPU threads that encode the query (1: steady latency on a busy machine).",
)
_RANDOM_WEIGHTS = typer.Option(
    False,
    "--random-weights",
    help="Allow a --model without --pretrained (random weights, meaningless vectors).",
)


# typer keeps single newlines of a help text, so each paragraph is one line here.
_SEARCH_HELP = "\n\n".join(
    [
        "Search an index with a text, an image or a composed query.",
        "One --text or one --image is a plain query. Several terms, a --minus-* term or a "
        "weight make a composed query: the weighted sum of the terms' embeddings, "
        're-normalised (this photo + "red" - "striped"):',
        "  clipsearch search INDEX --image photo.jpg --text red --minus-text striped",
        "Weights: the i-th --text-weight applies to the i-th --text (likewise --image-weight "
        "and --image); terms without one weigh 1. Every --minus-text / --minus-image weighs "
        "-W, W = --minus-weight (1 by default); a negative --text-weight also subtracts.",
        "The table shows one line per hit: rank (1-based), score, doc_id, a title-like column "
        "(the first of title, name, caption, text, description, label that the index has; "
        "text rows show their own text) and price when the index has one. --fields chooses "
        "other columns. --json prints every hit in full; with --fields, each hit's metadata "
        "keeps only those fields.",
    ]
)


def search_cmd(
    index: Path = typer.Argument(..., help="Index directory."),
    text: list[str] | None = typer.Option(
        None, "--text", "-t", metavar="TEXT", help="Text query term (repeatable)."
    ),
    image: list[Path] | None = typer.Option(
        None, "--image", "-i", metavar="PATH", help="Image query term, a file (repeatable)."
    ),
    minus_text: list[str] | None = typer.Option(
        None, "--minus-text", metavar="TEXT", help="Text to steer away from (repeatable)."
    ),
    minus_image: list[Path] | None = typer.Option(
        None, "--minus-image", metavar="PATH", help="Image to steer away from (repeatable)."
    ),
    text_weight: list[float] | None = typer.Option(
        None,
        "--text-weight",
        metavar="W",
        help="Weight of the matching --text, in order (default 1).",
    ),
    image_weight: list[float] | None = typer.Option(
        None,
        "--image-weight",
        metavar="W",
        help="Weight of the matching --image, in order (default 1).",
    ),
    minus_weight: float = typer.Option(
        1.0, "--minus-weight", metavar="W", help="Each --minus-text / --minus-image weighs -W."
    ),
    where: str | None = typer.Option(
        None, "--where", "-w", help='Filter, e.g. "price < 30 and in_stock".'
    ),
    k: int = typer.Option(10, "-k", help="Results per page."),
    offset: int = typer.Option(0, "--offset", help="Results to skip (pagination)."),
    modality: str | None = typer.Option(None, "--modality", help="Rows to search: image or text."),
    group_by_doc: bool = typer.Option(
        False, "--group-by-doc", help="One result per doc_id (its best row; see --group-mode)."
    ),
    group_mode: str | None = typer.Option(
        None,
        "--group-mode",
        metavar="max|mean",
        help="How --group-by-doc scores a doc: max (best row) or mean (of its rows in the "
        "pool). Implies --group-by-doc.",
    ),
    mmr: float | None = typer.Option(None, "--mmr", help="MMR diversity lambda in [0, 1]."),
    sort: str | None = typer.Option(None, "--sort", help="Sort by a field: FIELD or FIELD:desc."),
    min_score: str | None = typer.Option(
        None,
        "--min-score",
        metavar="SCORE|auto",
        help="Drop results scoring lower (a cosine), or 'auto': the model's calibrated "
        "relevance threshold for this kind of query (text->image, image->image, ...). "
        "Implies --mode vector unless --mode is given.",
    ),
    boost: list[str] | None = typer.Option(
        None,
        "--boost",
        metavar="FIELD=WEIGHT",
        help="Add WEIGHT * FIELD (numeric, null = 0) to every score (repeatable), "
        "e.g. --boost rating=0.01.",
    ),
    fields: str | None = typer.Option(
        None,
        "--fields",
        metavar="A,B,...",
        help="Columns to show after rank, score and doc_id: metadata columns or "
        "row_id, modality, source. With --json: the metadata kept per hit.",
    ),
    mode: str | None = typer.Option(
        None,
        "--mode",
        help="vector, lexical (BM25 over the index's text fields) or hybrid (both fused). "
        "Default: hybrid when the index has a lexical part, else vector.",
    ),
    fusion: str = typer.Option("rrf", "--fusion", help="Hybrid fusion: rrf or weighted."),
    rrf_k: int = typer.Option(60, "--rrf-k", help="RRF's k: rank r adds weight / (k + r)."),
    vector_weight: float = typer.Option(1.0, "--vector-weight", help="Weight of the vector list."),
    lexical_weight: float = typer.Option(
        1.0, "--lexical-weight", help="Weight of the lexical list."
    ),
    fusion_depth: int = typer.Option(
        DEFAULT_FUSION_DEPTH,
        "--fusion-depth",
        help="Hybrid: rows each list contributes to the fusion (at least offset + k).",
    ),
    device: str = _DEVICE,
    backend: str = _BACKEND,
    query_threads: int = _QUERY_THREADS,
    as_json: bool = typer.Option(
        False, "--json", help="JSON output (lexical/hybrid hits carry an 'explain')."
    ),
) -> None:
    from clipsearch.retrieval.engine import SearchEngine
    from clipsearch.retrieval.manifest import FIXED_COLUMNS

    with cli_errors():
        query = _query(
            text or [],
            image or [],
            minus_texts=minus_text or [],
            minus_images=minus_image or [],
            text_weights=text_weight or [],
            image_weights=image_weight or [],
            minus_weight=minus_weight,
        )
        options = SearchOptions(
            k=k,
            offset=offset,
            where=where,
            modality=modality,
            group_by_doc=_grouping(group_by_doc, group_mode),
            mmr=mmr,
            sort=sort,
            min_score=_parse_min_score(min_score),
            boosts=tuple(_parse_boost(b) for b in boost or []),
            mode=mode,  # type: ignore[arg-type]  # SearchOptions validates the spelling
            fusion=fusion,  # type: ignore[arg-type]
            rrf_k=rrf_k,
            vector_weight=vector_weight,
            lexical_weight=lexical_weight,
            fusion_depth=fusion_depth,
        )
        encoder = _index_encoder(index, device=device, backend=backend, query_threads=query_threads)
        with SearchEngine.open(
            index, encoder=encoder, device=device, query_threads=query_threads
        ) as engine:
            columns = [c for c in engine.schema.names if c not in FIXED_COLUMNS]
            shown = _fields(fields, columns)
            results = engine.search(query, options)
            cutoff = _cutoff(engine, query, options)
            fingerprint = engine.manifest.encoder
            closest = None
            if cutoff is not None and not results.hits and options.offset == 0:
                # Nothing passes: name the closest row, so "no good match" is explained.
                plain = options.replace(min_score=None, k=1, sort=None, mode="vector")
                closest = next(iter(engine.search(query, plain).hits), None)
    if as_json:
        out = results_json(results, shown if fields is not None else None)
        if cutoff is not None:
            out["relevance_cutoff"] = cutoff.value
            out["no_good_match"] = not results.hits and options.offset == 0
        print_json(out)
        return
    text_column = None if fields is not None else shown[0]
    if cutoff is not None:
        console.print(f"min score: {cutoff.describe()}")
    if cutoff is not None and not results.hits and options.offset == 0:
        _no_good_match(fingerprint, cutoff=cutoff, closest=closest)
    else:
        console.print(results_table(results, shown, text_column=text_column))
    if results.total_matches is not None:
        console.print(f"{results.total_matches} rows match the filter")


search_cmd.__doc__ = _SEARCH_HELP


def _parse_min_score(value: str | None) -> MinScore | None:
    """``--min-score``: a number, or "auto" (SearchOptions validates the number)."""
    if value is None:
        return None
    if value.strip().lower() == AUTO:
        return AUTO
    try:
        return float(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is neither a number (a cosine such as 0.3) nor 'auto' (the model's "
            "calibrated relevance threshold)",
            param_hint="'--min-score'",
        ) from None


@dataclass(frozen=True)
class _Cutoff:
    """The min_score a search applied: the number, and the direction when it was "auto"."""

    value: float
    direction: str | None = None

    def describe(self) -> str:
        if self.direction is None:
            return f"{self.value:.3f}"
        return f"auto = {self.value:.3f} (the model's calibrated {self.direction} threshold)"


def _cutoff(engine: Any, query: Any, options: SearchOptions) -> _Cutoff | None:
    """The threshold ``options.min_score`` stands for (None without one)."""
    if options.min_score is None:
        return None
    if options.min_score != AUTO:
        return _Cutoff(float(options.min_score))
    from clipsearch.retrieval.engine import query_modality

    kind = query_modality(query) or "image"
    rows = engine.target_modality(options.modality)
    return _Cutoff(engine.relevance_threshold(kind, options.modality), f"{kind}->{rows}")


def _no_good_match(fingerprint: Any, *, cutoff: _Cutoff, closest: Any) -> None:
    """What the table is replaced by when nothing reaches the cutoff (demo wording)."""
    from clipsearch.indexer.demo.run import DEMO_SHOP_ONLY, NO_GOOD_MATCH

    line = f"[yellow]{NO_GOOD_MATCH}[/]: no result scores at or above {cutoff.value:.3f}"
    if fingerprint.arch == "clipsearch-demo":
        line += f"; {DEMO_SHOP_ONLY}"
    console.print(line + ".")
    if closest is not None:
        title = closest.metadata.get("title") or closest.doc_id
        console.print(
            f"  (closest, below {cutoff.value:.3f}: {title} [{closest.doc_id}] at "
            f"{closest.score:.3f})"
        )


def _index_encoder(index: Path, *, device: str, backend: str, query_threads: int) -> Any:
    """The query encoder of ``index`` on ``backend``; None leaves "auto" to the engine."""
    from clipsearch.retrieval.encoders import BACKENDS, encoder_from_fingerprint

    if backend not in BACKENDS:
        raise typer.BadParameter(
            f"{backend!r} is not one of {', '.join(BACKENDS)}", param_hint="'--backend'"
        )
    if backend == "auto":
        return None
    from clipsearch.retrieval.manifest import read_current

    return encoder_from_fingerprint(
        read_current(index).encoder, device=device, backend=backend, query_threads=query_threads
    )


def _query(
    texts: list[str],
    images: list[Path],
    *,
    minus_texts: list[str],
    minus_images: list[Path],
    text_weights: list[float],
    image_weights: list[float],
    minus_weight: float,
) -> Any:
    """A plain str / Path for one unweighted term, else a ComposedQuery of every term.

    Terms go images first, then texts, then negatives (images, then texts): the order a
    reader of "this photo + red - striped" expects.
    """
    if not texts and not images:
        raise QueryError(
            "give a query: --text and/or --image (--minus-text / --minus-image only "
            "subtract from one)"
        )
    plain = not (text_weights or image_weights or minus_texts or minus_images)
    if plain and len(texts) + len(images) == 1:
        return texts[0] if texts else images[0]
    from clipsearch.retrieval.queries import ComposedQuery

    terms: list[tuple[float, Any]] = [
        *zip(_weights(image_weights, len(images), "--image"), images, strict=True),
        *zip(_weights(text_weights, len(texts), "--text"), texts, strict=True),
        *((-minus_weight, p) for p in minus_images),
        *((-minus_weight, t) for t in minus_texts),
    ]
    return ComposedQuery(terms=tuple(terms))


def _weights(weights: list[float], n_terms: int, option: str) -> list[float]:
    """The i-th weight for the i-th term; terms without one weigh 1."""
    if len(weights) > n_terms:
        raise typer.BadParameter(
            f"{len(weights)} weights for {n_terms} {option} term(s); the i-th "
            f"{option}-weight applies to the i-th {option}",
            param_hint=f"'{option}-weight'",
        )
    return [*weights, *[1.0] * (n_terms - len(weights))]


def _parse_boost(spec: str) -> tuple[str, float]:
    """``"rating=0.01"`` -> ``("rating", 0.01)``; SearchOptions validates the pair."""
    name, sep, weight = spec.partition("=")
    try:
        if not sep or not name.strip():
            raise ValueError
        return name.strip(), float(weight)
    except ValueError:
        raise typer.BadParameter(
            f"{spec!r} is not FIELD=WEIGHT (a numeric field and a number), e.g. rating=0.01",
            param_hint="'--boost'",
        ) from None


def _grouping(group_by_doc: bool, group_mode: str | None) -> Any:
    # SearchOptions validates the mode's spelling; --group-mode alone implies grouping.
    if group_mode is not None:
        return group_mode
    return "max" if group_by_doc else None


def _fields(spec: str | None, columns: list[str]) -> list[str]:
    if spec is None:
        return default_fields(columns)
    try:
        return parse_fields(spec, columns)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="'--fields'") from e


def classify_cmd(
    image: Path = typer.Argument(..., help="Image file."),
    labels: str = typer.Option(..., "--labels", "-l", help="Comma-separated labels."),
    model: str = typer.Option(
        "clipsearch-demo", "--model", "-m", help="Encoder preset or architecture."
    ),
    pretrained: str | None = typer.Option(None, "--pretrained", help="Weights tag or checkpoint."),
    backend: str = _BACKEND,
    random_weights: bool = _RANDOM_WEIGHTS,
    as_json: bool = typer.Option(False, "--json", help="JSON output."),
) -> None:
    """Zero-shot classify an image into one of the given labels."""
    from clipsearch.retrieval.encoders import load_encoder
    from clipsearch.retrieval.queries import classify

    with cli_errors():
        encoder = load_encoder(model, pretrained, backend=backend, allow_random=random_weights)
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
