"""Helpers shared by the CLI commands: error rendering, JSON output, the progress renderer."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Any, TextIO

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, ProgressColumn, Task, TaskID, TextColumn, TimeRemainingColumn
from rich.progress import Progress as Bars
from rich.table import Column
from rich.text import Text

from clipsearch.retrieval.errors import ClipsearchError
from clipsearch.retrieval.progress import Progress, ProgressCallback

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
        # The library's interrupts say what they kept and how to resume.
        message = str(e) or "interrupted"
        err_console.print(f"[yellow]{escape(message)}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from e


@contextmanager
def progress_bars(*, quiet: bool, transient: bool = True) -> Iterator[ProgressCallback | None]:
    """The one renderer of library progress: a rich bar per stage on stderr.

    Each stage row shows done/total in the stage's unit, its rate (unit/s), the time
    left, the skipped count and the event's detail. Yields None when ``quiet`` (under
    ``--json``), so the library skips building events. ``transient`` bars vanish when
    the command ends (a finished build shows its summary table instead).
    """
    if quiet:
        yield None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=20),
        _CountColumn(),
        _RateColumn(),
        TimeRemainingColumn(),
        # Detail last; it is cut rather than wrapped onto a second line.
        TextColumn(
            "{task.fields[info]}",
            table_column=Column(no_wrap=True, overflow="ellipsis"),
        ),
    )
    with Bars(*columns, console=err_console, transient=transient) as bars:
        tasks: dict[str, TaskID] = {}

        def render(event: Progress) -> None:
            info = _info(event)
            task = tasks.get(event.stage)
            if task is None:
                tasks[event.stage] = bars.add_task(
                    event.stage,
                    total=event.total,
                    completed=event.done,
                    unit=event.unit,
                    info=info,
                )
                return
            if event.done < bars.tasks[task].completed:
                # The stage runs again (e.g. "train index" of the next shard): its rate
                # and ETA must not mix the two runs.
                bars.reset(task, total=event.total, completed=event.done)
            bars.update(task, total=event.total, completed=event.done, unit=event.unit, info=info)

        yield render


# Characters of skipped/detail text shown per stage: the bar, counts and ETA keep their room.
_INFO_WIDTH = 48


def _info(event: Progress) -> str:
    parts = [f"skipped {event.skipped:,}"] if event.skipped else []
    parts += [f"{k} {_number(v)}" for k, v in event.detail.items()]
    text = " · ".join(parts)
    return escape(text if len(text) <= _INFO_WIDTH else text[: _INFO_WIDTH - 1] + "…")


def _number(value: float | int | str) -> str:
    if isinstance(value, float):
        if value and (abs(value) < 1e-2 or abs(value) >= 1e5):
            return f"{value:.2e}"  # learning rates
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return value


class _CountColumn(ProgressColumn):
    """``done/total unit``, or ``done unit`` while the total is unknown."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True))

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "")
        done = int(task.completed)
        if task.total is None:
            return Text(f"{done:,} {unit}")
        return Text(f"{done:,}/{int(task.total):,} {unit}")


class _RateColumn(ProgressColumn):
    """Units per second over rich's recent samples (blank until there are two)."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True, justify="right"))

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("")
        return Text(f"{speed:,.1f} {task.fields.get('unit', '')}/s")


@contextmanager
def stdout_for_result() -> Iterator[TextIO]:
    """The command's stdout, kept for its result: whatever else the body writes to
    stdout goes to stderr. Ray's driver prints the lines it forwards from raylets and
    workers (a raylet's disk-space warning, a worker's print) on sys.stdout, and one
    such line breaks a ``--json`` result piped into a parser."""
    out = sys.stdout
    with redirect_stdout(sys.stderr):
        yield out


def print_json(obj: Any, file: TextIO | None = None) -> None:
    """Write ``obj`` as JSON to ``file`` (default stdout; no rich markup, so scripts can
    parse it)."""
    out = sys.stdout if file is None else file
    out.write(json.dumps(obj, indent=2, default=str) + "\n")
    out.flush()


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
