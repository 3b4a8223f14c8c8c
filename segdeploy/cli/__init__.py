"""Command-line interface: one module per verb; each parses its flags, calls the library (several verbs in a row for
quickstart, import's evaluation and bench --tiled) and renders the result and its progress. Decisions about models,
data and outputs are the library's."""

from segdeploy.cli import bench, data, evaluate, export, importing, info, predict, quickstart, train  # noqa: F401 - registers verbs
from segdeploy.cli.app import app


def main() -> None:
    """The `segdeploy` console script: run the Typer app (exits with its code)."""
    app()


__all__ = ["app", "main"]
