"""The ``clipsearch`` typer app. Command groups live in their own modules.

Nothing here imports torch, open_clip or faiss: ``clipsearch --help`` must stay fast.
"""

from __future__ import annotations

import typer

import clipsearch
from clipsearch.cli.common import setup_logging

app = typer.Typer(
    name="clipsearch",
    help="Cross-modal (text <-> image) search: build CLIP indexes, query them, serve them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"clipsearch {clipsearch.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: int = typer.Option(
        0, "--verbose", "-v", count=True, help="More logging (-vv: debug)."
    ),
) -> None:
    setup_logging(verbose)


from clipsearch.cli.demo_cmd import demo_cmd, demo_data_cmd, demo_eval_cmd  # noqa: E402
from clipsearch.cli.embed_cmd import embed_cmd  # noqa: E402
from clipsearch.cli.index_cmd import index_app  # noqa: E402
from clipsearch.cli.models_cmd import models_app  # noqa: E402
from clipsearch.cli.search_cmd import classify_cmd, eval_cmd, search_cmd  # noqa: E402
from clipsearch.cli.serve_cmd import serve as serve_cmd  # noqa: E402
from clipsearch.cli.train_cmd import train_cmd  # noqa: E402

app.add_typer(models_app, name="models")
app.add_typer(index_app, name="index")
app.command("embed")(embed_cmd)
app.command("serve")(serve_cmd)
app.command("search")(search_cmd)
app.command("classify")(classify_cmd)
app.command("eval")(eval_cmd)
app.command("demo-data")(demo_data_cmd)
app.command("demo")(demo_cmd)
app.command("demo-eval")(demo_eval_cmd)
app.command("train")(train_cmd)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
