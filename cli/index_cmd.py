"""``clipsearch index``: build, add, delete, compact, verify and inspect an index.

Each command parses its options, calls one ``indexer`` (or ``clipsearch.retrieval.store``) function
and renders the result; the library does the work and a backend can call it the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from clipsearch.cli.common import (
    cli_errors,
    console,
    err_console,
    print_json,
    progress_bars,
    stdout_for_result,
)

if TYPE_CHECKING:
    from clipsearch.indexer.build import BuildOptions, IngestSummary

index_app = typer.Typer(
    help="Build and maintain indexes: build, add, delete, compact, verify, errors, info.",
    no_args_is_help=True,
)

_SOURCES_HELP = "Image folders, Parquet/CSV/JSONL manifests, or .txt files (one text per line)."


def _options(
    *,
    shard_size: int,
    index: str,
    target_recall: float,
    max_memory: str | None,
    batch_size: int | None,
    workers: int | None,
    device: str,
    image_col: str | None,
    text_col: list[str],
    id_col: str | None,
    on_duplicate: str,
    max_errors: str | None,
    extensions: str | None,
    max_image_mb: float,
    fetch_concurrency: int,
    fetch_timeout: float,
    fetch_cache: Path | None,
    text_fields: str | None = None,
) -> BuildOptions:
    from clipsearch.indexer.ann import IndexOptions, parse_memory
    from clipsearch.indexer.build import BuildOptions
    from clipsearch.indexer.fetch import FetchOptions
    from clipsearch.indexer.sources import SourceOptions

    index_device = "cpu" if device == "cpu" else "auto"
    extra: dict[str, Any] = {"workers": workers} if workers else {}
    if text_fields is not None:  # "" = no lexical part
        extra["text_fields"] = tuple(f.strip() for f in text_fields.split(",") if f.strip())
    return BuildOptions(
        max_errors=_max_errors(max_errors),
        max_image_bytes=int(max_image_mb * 1024 * 1024),
        fetch=FetchOptions(
            concurrency=fetch_concurrency, timeout_s=fetch_timeout, cache_dir=fetch_cache
        ),
        shard_size=shard_size,
        batch_size=batch_size,
        index=IndexOptions(
            index=index,
            target_recall=target_recall,
            max_memory=parse_memory(max_memory) if max_memory else None,
            device=index_device,
        ),
        sources=SourceOptions(
            image_col=image_col,
            text_cols=tuple(text_col),
            id_col=id_col,
            on_duplicate=on_duplicate,
            extensions=_extensions(extensions),
        ),
        **extra,
    )


def _max_errors(text: str | None) -> int | float | None:
    """``--max-errors``: a count ("10"), a fraction ("0.05") or a percentage ("5%")."""
    from clipsearch.retrieval.errors import ConfigError

    if text is None:
        return None
    raw = text.strip()
    try:
        if raw.endswith("%"):
            return float(raw[:-1]) / 100
        if any(c in raw for c in ".eE"):
            return float(raw)
        return int(raw)
    except ValueError as e:
        raise ConfigError(
            f"--max-errors {text!r}: give a count (10), a fraction (0.05) or a percentage (5%)"
        ) from e


def _extensions(text: str | None) -> tuple[str, ...] | None:
    """``--extensions jpg,.png``: the narrowed allowlist (None: every decodable format)."""
    if text is None:
        return None
    exts = [e.strip().lower() for e in text.split(",") if e.strip()]
    return tuple(e if e.startswith(".") else f".{e}" for e in exts)


def _render_summary(s: IngestSummary, out: Console) -> None:
    t = Table(title=f"{s.operation}: {s.root} -> version {s.version}", show_header=False)
    t.add_column("", style="bold")
    t.add_column("", justify="right")
    t.add_row("input items", f"{s.input:,}")
    if s.items_resumed:
        t.add_row("resumed from an interrupted run", f"{s.items_resumed:,}")
    t.add_row("indexed", f"{s.indexed:,}")
    t.add_row("skipped (errors)", f"{s.skipped:,}")
    if s.unchanged:
        t.add_row("skipped (already indexed, unchanged)", f"{s.unchanged:,}")
    if s.flagged:
        t.add_row("indexed but flagged (e.g. truncated)", f"{s.flagged:,}")
    if s.replaced:
        t.add_row("older rows replaced", f"{s.replaced:,}")
    t.add_row("shards written / resumed", f"{s.shards_written} / {s.shards_resumed}")
    if s.fetch:
        f = s.fetch
        t.add_row(
            "image URLs fetched / cached / failed",
            f"{f['fetched']:,} / {f['cached']:,} / {f['failed']:,}",
        )
    t.add_row("time", f"{s.seconds:.1f} s ({s.items_per_second:,.1f} items/s)")
    out.print(t)
    if s.skipped:
        err_console.print(f"[yellow]{s.skipped:,} items skipped; most common reasons:[/]")
        for stage, reason, n in s.top_reasons:
            err_console.print(f"  {n:>7,}  {stage}: {reason}", highlight=False, markup=False)
    if s.not_considered:
        total = sum(s.not_considered.values())
        kinds = ", ".join(f"{k} {v:,}" for k, v in list(s.not_considered.items())[:10])
        more = "" if len(s.not_considered) <= 10 else f", ... ({len(s.not_considered)} kinds)"
        err_console.print(
            f"[yellow]{total:,} files in source folders not considered[/] (not an allowed "
            f"image extension): {kinds}{more}",
            highlight=False,
        )
    if s.errors_report:
        err_console.print(
            f"errors report: {Path(s.root) / s.errors_report} "
            f"(`clipsearch index errors {s.root}` lists it)",
            highlight=False,
        )


# Shared option declarations (typer needs them per command).
_SHARD = typer.Option(100_000, "--shard-size", help="Rows per shard (per modality).")
_INDEX = typer.Option(
    "auto", "--index", help="auto, flat, ivf, ivfpq, hnsw, or a FAISS factory string."
)
_RECALL = typer.Option(
    0.95, "--target-recall", help="recall@10 that ANN search params are tuned to."
)
_MEMORY = typer.Option(None, "--max-memory", help="Per-shard index memory budget, e.g. 2G (auto).")
_BATCH = typer.Option(None, "--batch-size", help="Items per encoder forward pass.")
_WORKERS = typer.Option(
    None, "--workers", help="Decode worker threads (default: CPU count, max 8)."
)
_DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N.")
_IMAGE_COL = typer.Option(None, "--image-col", help="Manifest column with image paths.")
_TEXT_COL = typer.Option([], "--text-col", help="Manifest column with texts (repeatable).")
_ID_COL = typer.Option(None, "--id-col", help="Manifest column with document ids.")
_DUP = typer.Option(
    "reject",
    "--on-duplicate",
    help="Rows sharing an id: reject (keep first), last (keep last), group (all, one document).",
)
_JSON = typer.Option(False, "--json", help="Print the result as JSON.")
_RANDOM_WEIGHTS = typer.Option(
    False,
    "--random-weights",
    help="Allow an architecture without pretrained weights (random vectors: for tests and "
    "benchmarks only; without it such a --model is refused).",
)
_MAX_ERRORS = typer.Option(
    None,
    "--max-errors",
    help="Fail, committing nothing, when more items are skipped: a count (10), a fraction "
    "(0.05) or a percentage (5%). Default: never fail.",
)
_EXTENSIONS = typer.Option(
    None,
    "--extensions",
    help="Image extensions taken from folders, e.g. jpg,png (default: every format Pillow "
    "decodes).",
)
_MAX_IMAGE_MB = typer.Option(
    64.0, "--max-image-mb", help="Largest image file or download read, in MiB."
)
_FETCH_CONCURRENCY = typer.Option(
    8, "--fetch-concurrency", help="Image URLs fetched at once (http(s) image columns)."
)
_FETCH_TIMEOUT = typer.Option(20.0, "--fetch-timeout", help="Seconds per image URL attempt.")
_RAY = typer.Option(
    None,
    "--ray",
    metavar="ADDRESS",
    help="Embed and write shards on a Ray cluster: 'local' starts one here, 'auto' joins "
    "the one `ray start` started, or host:port / ray://host:10001 (needs clipsearch[ray]).",
)
_RAY_ENCODERS = typer.Option(
    None,
    "--ray-encoders",
    help="Encoder actors with --ray (default: one per GPU, or one CPU actor).",
)


_TEXT_FIELDS = typer.Option(
    None,
    "--text-fields",
    help="Columns indexed for lexical/hybrid search (BM25), e.g. title,brand,description,sku "
    "('source' is a text row's text; '' = none). Default: text plus every string column. "
    "With add: also gives existing shards a lexical part over these fields.",
)
_FETCH_CACHE = typer.Option(
    None, "--fetch-cache", help="Cache of fetched images (default ~/.cache/clipsearch/images)."
)


@index_app.command("build")
def build_cmd(
    sources: list[Path] = typer.Argument(..., help=_SOURCES_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Index directory to create or rebuild."),
    model: str = typer.Option(
        "clipsearch-demo", "--model", "-m", help="Preset, open_clip arch, or fake[-DIM]."
    ),
    pretrained: str | None = typer.Option(
        None, "--pretrained", "-p", help="Weights tag or checkpoint."
    ),
    shard_size: int = _SHARD,
    index: str = _INDEX,
    target_recall: float = _RECALL,
    max_memory: str | None = _MEMORY,
    batch_size: int | None = _BATCH,
    workers: int | None = _WORKERS,
    device: str = _DEVICE,
    image_col: str | None = _IMAGE_COL,
    text_col: list[str] = _TEXT_COL,
    id_col: str | None = _ID_COL,
    on_duplicate: str = _DUP,
    max_errors: str | None = _MAX_ERRORS,
    extensions: str | None = _EXTENSIONS,
    max_image_mb: float = _MAX_IMAGE_MB,
    fetch_concurrency: int = _FETCH_CONCURRENCY,
    fetch_timeout: float = _FETCH_TIMEOUT,
    fetch_cache: Path | None = _FETCH_CACHE,
    ray: str | None = _RAY,
    ray_encoders: int | None = _RAY_ENCODERS,
    text_fields: str | None = _TEXT_FIELDS,
    random_weights: bool = _RANDOM_WEIGHTS,
    as_json: bool = _JSON,
) -> None:
    """Embed SOURCES and write a new index version to --out (rerun to resume after a crash)."""
    from clipsearch.indexer.build import build
    from clipsearch.retrieval.encoders import load_encoder

    with cli_errors(), stdout_for_result() as result_out:
        opts = _options(
            shard_size=shard_size, index=index, target_recall=target_recall,
            max_memory=max_memory, batch_size=batch_size, workers=workers, device=device,
            image_col=image_col, text_col=text_col, id_col=id_col, on_duplicate=on_duplicate,
            max_errors=max_errors, extensions=extensions, max_image_mb=max_image_mb,
            fetch_concurrency=fetch_concurrency, fetch_timeout=fetch_timeout,
            fetch_cache=fetch_cache, text_fields=text_fields,
        )  # fmt: skip
        encoder = load_encoder(
            model,
            pretrained,
            device=device,
            batch_size=batch_size,
            allow_random=random_weights,
            purpose="build",
        )
        with progress_bars(quiet=as_json) as progress:
            if ray is not None:
                from clipsearch.indexer.distributed import RayOptions, build_on_ray

                ray_opts = RayOptions(address=ray, encoders=ray_encoders)
                summary = build_on_ray(
                    list(sources), out, encoder=encoder, options=opts, ray_options=ray_opts,
                    progress=progress,
                )  # fmt: skip
            else:
                summary = build(
                    list(sources), out, encoder=encoder, options=opts, progress=progress
                )
        # Inside the redirect: a line Ray forwards late still goes to stderr.
        if as_json:
            print_json(summary.to_dict(), file=result_out)
        else:
            _render_summary(summary, Console(file=result_out))


@index_app.command("add")
def add_cmd(
    index_dir: Path = typer.Argument(..., help="Existing index directory."),
    sources: list[Path] = typer.Argument(..., help=_SOURCES_HELP),
    shard_size: int = _SHARD,
    index: str = _INDEX,
    target_recall: float = _RECALL,
    max_memory: str | None = _MEMORY,
    batch_size: int | None = _BATCH,
    workers: int | None = _WORKERS,
    device: str = _DEVICE,
    image_col: str | None = _IMAGE_COL,
    text_col: list[str] = _TEXT_COL,
    id_col: str | None = _ID_COL,
    on_duplicate: str = _DUP,
    max_errors: str | None = _MAX_ERRORS,
    extensions: str | None = _EXTENSIONS,
    max_image_mb: float = _MAX_IMAGE_MB,
    fetch_concurrency: int = _FETCH_CONCURRENCY,
    fetch_timeout: float = _FETCH_TIMEOUT,
    fetch_cache: Path | None = _FETCH_CACHE,
    ray: str | None = _RAY,
    ray_encoders: int | None = _RAY_ENCODERS,
    text_fields: str | None = _TEXT_FIELDS,
    as_json: bool = _JSON,
) -> None:
    """Append SOURCES as new shards; unchanged items are skipped, changed ones replaced."""
    from clipsearch.indexer.build import add
    from clipsearch.retrieval.encoders import encoder_from_fingerprint
    from clipsearch.retrieval.manifest import read_current

    with cli_errors(), stdout_for_result() as result_out:
        opts = _options(
            shard_size=shard_size, index=index, target_recall=target_recall,
            max_memory=max_memory, batch_size=batch_size, workers=workers, device=device,
            image_col=image_col, text_col=text_col, id_col=id_col, on_duplicate=on_duplicate,
            max_errors=max_errors, extensions=extensions, max_image_mb=max_image_mb,
            fetch_concurrency=fetch_concurrency, fetch_timeout=fetch_timeout,
            fetch_cache=fetch_cache, text_fields=text_fields,
        )  # fmt: skip
        encoder = encoder_from_fingerprint(
            read_current(index_dir).encoder, device=device, purpose="build"
        )
        with progress_bars(quiet=as_json) as progress:
            if ray is not None:
                from clipsearch.indexer.distributed import RayOptions, add_on_ray

                ray_opts = RayOptions(address=ray, encoders=ray_encoders)
                summary = add_on_ray(
                    index_dir, list(sources), encoder=encoder, options=opts,
                    ray_options=ray_opts, progress=progress,
                )  # fmt: skip
            else:
                summary = add(
                    index_dir, list(sources), encoder=encoder, options=opts, progress=progress
                )
        # Inside the redirect: a line Ray forwards late still goes to stderr.
        if as_json:
            print_json(summary.to_dict(), file=result_out)
        else:
            _render_summary(summary, Console(file=result_out))


@index_app.command("delete")
def delete_cmd(
    index_dir: Path = typer.Argument(..., help="Index directory."),
    ids: list[str] = typer.Option(
        [], "--ids", help="doc ids to delete (repeatable, or comma-separated)."
    ),
    where: str | None = typer.Option(
        None, "--where", help='Filter expression, e.g. "price > 100".'
    ),
    as_json: bool = _JSON,
) -> None:
    """Delete documents (tombstones; `index compact` reclaims the space)."""
    from clipsearch.indexer.maintenance import delete

    doc_ids = [x.strip() for raw in ids for x in raw.split(",") if x.strip()]
    with cli_errors(), progress_bars(quiet=as_json) as progress:
        result = delete(index_dir, ids=doc_ids or None, where=where, progress=progress)
    if as_json:
        print_json(result.to_dict())
        return
    console.print(
        f"deleted {result.deleted_rows} rows of {result.deleted_docs} documents; "
        f"index is at version {result.version}"
    )
    if result.not_found:
        err_console.print(f"[yellow]not found:[/] {', '.join(result.not_found[:20])}")


@index_app.command("compact")
def compact_cmd(
    index_dir: Path = typer.Argument(..., help="Index directory."),
    keep_versions: int = typer.Option(1, "--keep-versions", help="Committed versions to keep."),
    as_json: bool = _JSON,
) -> None:
    """Rewrite shards without deleted rows and remove files no kept version references."""
    from clipsearch.indexer.maintenance import compact

    with cli_errors(), progress_bars(quiet=as_json) as progress:
        result = compact(index_dir, keep_versions=keep_versions, progress=progress)
    if as_json:
        print_json(result.to_dict())
        return
    console.print(
        f"version {result.version}: rewrote {result.shards_rewritten} shards, removed "
        f"{result.rows_removed} rows and {result.files_removed} files "
        f"({result.bytes_freed / 1e6:.1f} MB)"
    )


@index_app.command("verify")
def verify_cmd(
    index_dir: Path = typer.Argument(..., help="Index directory."),
    quick: bool = typer.Option(False, "--quick", help="Check sizes only, not sha256 hashes."),
    as_json: bool = _JSON,
) -> None:
    """Check every file against the manifest; exit code 1 when anything is wrong."""
    from clipsearch.retrieval.store import verify_index

    with cli_errors():
        report = verify_index(index_dir, verify_hashes=not quick)
    if as_json:
        print_json(report.to_dict())
    elif report.ok:
        console.print(
            f"[green]ok[/]: version {report.version}, {report.shards_checked} shards, "
            f"{report.files_checked} files, {report.rows:,} rows"
        )
    else:
        for where, problems in report.problems.items():
            for p in problems:
                err_console.print(f"[bold red]{where}[/]: {p}", highlight=False)
        err_console.print(f"[bold red]{len(report.problems)} shard(s)/part(s) with problems[/]")
    if not report.ok:
        raise typer.Exit(1)


@index_app.command("errors")
def errors_cmd(
    index_dir: Path = typer.Argument(..., help="Index directory."),
    limit: int = typer.Option(50, "--limit", help="Rows shown in the table (--json: all)."),
    as_json: bool = _JSON,
) -> None:
    """List the items builds and adds skipped or flagged, and why."""
    from clipsearch.indexer.reports import read_errors

    with cli_errors():
        report = read_errors(index_dir)
    if as_json:
        print_json(report.to_dict())
        return
    if not report.rows:
        console.print(f"version {report.version}: no items were skipped or flagged")
        return
    console.print(
        f"version {report.version}: {report.skipped:,} items skipped, {report.flagged:,} "
        f"indexed but flagged ({', '.join(report.files)})",
        highlight=False,
    )
    if report.top_reasons:
        t = Table(title="most common skip reasons")
        t.add_column("items", justify="right")
        t.add_column("stage")
        t.add_column("reason", overflow="fold")
        for stage, reason, n in report.top_reasons:
            t.add_row(f"{n:,}", stage, escape(reason))
        console.print(t)
    t = Table(title=f"items ({min(limit, len(report.rows))} of {len(report.rows)})")
    for col in ("version", "action", "stage", "doc_id", "source", "reason"):
        t.add_column(col, overflow="fold")
    for r in report.rows[:limit]:
        t.add_row(
            str(r.version), r.action, r.stage, escape(r.doc_id), escape(r.source), escape(r.reason)
        )
    console.print(t)


@index_app.command("info")
def info_cmd(
    index_dir: Path = typer.Argument(..., help="Index directory."),
    as_json: bool = _JSON,
) -> None:
    """Versions, rows per modality, model, index types, measured recall, errors."""
    from clipsearch.indexer.maintenance import info

    with cli_errors():
        data = info(index_dir)
    if as_json:
        print_json(data)
        return
    t = Table(title=f"{data['root']} (version {data['version']})", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    model = data["model"]
    rows = data["rows"]
    t.add_row("versions", ", ".join(map(str, data["versions"])))
    t.add_row(
        "model", f"{model['arch']} ({model['pretrained'] or 'random init'}, {model['dim']}-d)"
    )
    t.add_row("shards", str(data["shards"]))
    for modality, n in rows["live_by_modality"].items():
        t.add_row(f"{modality} rows (live)", f"{n:,}")
    t.add_row("deleted (tombstoned)", f"{data['tombstones']:,}")
    t.add_row("index types", ", ".join(f"{k} x{v}" for k, v in data["index_types"].items()) or "-")
    recall = data["measured_recall_min"]
    t.add_row("measured recall@10", "exact" if recall is None else f"{recall:.3f} (lowest shard)")
    errors = f"{data['errors']:,}"
    if data["errors"]:
        errors += f" (`clipsearch index errors {data['root']}` lists them)"
    t.add_row("errors reported", errors)
    roots = data["image_roots"]
    t.add_row(
        "image roots",
        "not recorded (older index)" if roots is None else "\n".join(roots) or "-",
    )
    t.add_row("size", f"{data['bytes'] / 1e6:.1f} MB")
    console.print(t)
