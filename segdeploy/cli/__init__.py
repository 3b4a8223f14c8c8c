"""Command-line interface: one module per verb; the verbs hold no logic, only flags -> library call -> rendering."""

from segdeploy.cli import bench, data, evaluate, export, importing, info, predict, quickstart, train  # noqa: F401 - registers verbs
from segdeploy.cli.app import app


def main() -> None:
    """The `segdeploy` console script: run the Typer app (exits with its code)."""
    app()


__all__ = ["app", "main"]
