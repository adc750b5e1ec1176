"""The ``mechdelta`` command line."""

from __future__ import annotations

import os

import typer

from mechdelta.zoo._cli import zoo_app

app = typer.Typer(
    name="mechdelta",
    help="Comparative mechanistic interpretability: why did the model change?",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """mechdelta command line."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@app.command()
def demo() -> None:
    """Summarise a built-in offline model pair."""
    from mechdelta._builtin import tiny_pair

    pair = tiny_pair()
    typer.echo(pair.summary())


@app.command()
def version() -> None:
    """Print mechdelta's version."""
    from mechdelta import __version__

    typer.echo(__version__)


app.add_typer(zoo_app, name="zoo")


def main() -> None:
    app()
