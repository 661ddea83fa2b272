"""The `fashionlab` command: a thin layer over the library. Nothing in the library imports it."""

from __future__ import annotations

import sys

import typer

from fashionlab.errors import FashionlabError

app = typer.Typer(
    name="fashionlab",
    help="Rigorous, fast deep-learning experiments on Fashion-MNIST.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",  # docstrings reflow as paragraphs; [brackets] stay text
)


def _register_commands() -> None:
    # Each module adds its commands or sub-groups to `app`; imported here so that
    # `fashionlab --help` lists them all.
    from fashionlab.cli import data, model, runs, search, study  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script; user-fixable errors exit 2 with one line."""
    _register_commands()
    try:
        app(args=argv, prog_name="fashionlab")
    except FashionlabError as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        sys.exit(2)
