"""The ``clipsearch`` command line: one typer app, thin commands over library calls."""
