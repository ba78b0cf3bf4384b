"""Helpers shared by the CLI commands: error rendering, JSON output, progress bars."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console

from clipsearch.retrieval.errors import ClipsearchError

console = Console()
err_console = Console(stderr=True)


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn library exceptions into a one-line red message and exit code 1 (no traceback)."""
    try:
        yield
    except ClipsearchError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from e
    except KeyboardInterrupt as e:
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from e


@contextmanager
def staged_progress(*, disable: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A transient rich bar per stage, fed by a library ``progress(stage, done, total)``."""
    from rich.progress import Progress, TaskID

    with Progress(console=err_console, disable=disable, transient=True) as bar:
        tasks: dict[str, TaskID] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield on_progress


def print_json(obj: Any) -> None:
    """Write ``obj`` as JSON to stdout (no rich markup, so scripts can parse it)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
