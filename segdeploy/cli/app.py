"""The root Typer app, global options, and the error guard every verb runs under."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
import typer.core
from rich.console import Console

from segdeploy import __version__
from segdeploy.errors import UserError

GLOBAL_FLAGS = ("--debug",)
# what `segdeploy[train]` adds to the core (deployment) install
TRAINING_STACK = {"torch", "torchvision", "timm", "segmentation_models_pytorch", "safetensors", "onnxscript",
                  "onnxslim"}
OPTIONAL_VALUE = {"--mlflow": "local"}  # options whose value may be left out


class _GlobalFlagsAnywhere(typer.core.TyperGroup):
    """`segdeploy train … --debug` means the same as `segdeploy --debug train …`."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        flags = [a for a in args if a in GLOBAL_FLAGS]
        rest = [a for a in args if a not in GLOBAL_FLAGS]
        for i, a in enumerate(rest):  # a bare `--mlflow` means the local ./mlruns store
            if a in OPTIONAL_VALUE and (i + 1 == len(rest) or rest[i + 1].startswith("-")):
                rest.insert(i + 1, OPTIONAL_VALUE[a])
        return super().parse_args(ctx, flags + rest)


app = typer.Typer(
    name="segdeploy",
    cls=_GlobalFlagsAnywhere,
    help="Train segmentation models, export them to ONNX/TensorRT behind an accuracy gate, "
    "and run them on huge rasters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
data_app = typer.Typer(help="Make and check datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console(stderr=True, highlight=False)
STATE = {"debug": False}
F = TypeVar("F", bound=Callable[..., Any])


def _version(value: bool) -> None:
    if value:
        typer.echo(f"segdeploy {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    STATE["debug"] = debug
    if not debug:  # GDAL's own messages (e.g. libtiff's write errors) would add lines to one-line errors
        import logging

        logging.getLogger("rasterio").setLevel(logging.CRITICAL)


def one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def guarded(fn: F) -> F:
    """Turn user errors into one line on stderr and a non-zero exit (tracebacks only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            _check_report_targets(kwargs)
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except UserError as exc:
            if STATE["debug"]:
                raise
            typer.echo(f"error: {one_line(str(exc))}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except ModuleNotFoundError as exc:
            if STATE["debug"] or (exc.name or "").split(".")[0] not in TRAINING_STACK:
                raise
            typer.echo(f"error: this needs the PyTorch stack ({exc.name} is not installed): pip install "
                       "'segdeploy[train]' (predicting with an .onnx model needs none of it)", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except OSError as exc:  # a file system refusal the verb did not word itself: still one line
            if STATE["debug"]:
                raise
            from segdeploy.utils import describe_write_error

            where = exc.filename or "a file"
            typer.echo(f"error: {describe_write_error(where, exc, action='access')}", err=True)
            raise typer.Exit(2) from None
        except Exception as exc:  # noqa: BLE001 - a bug; still one line unless --debug
            if STATE["debug"]:
                raise
            typer.echo(f"error: unexpected {type(exc).__name__}: {one_line(str(exc))[:300]} "
                       "(rerun with --debug for the traceback)", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


REPORT_OPTIONS = ("json_out", "csv_out", "plot_out")


def _check_report_targets(kwargs: dict[str, Any]) -> None:
    """--json/--csv/--plot files that cannot be written fail before the work, not after it."""
    from segdeploy.utils import writable_location

    for key in REPORT_OPTIONS:
        target = kwargs.get(key)
        if target is not None and str(target) != "-":
            writable_location(Path(target))


def emit_json(obj: Any, target: Path | None) -> None:
    """Write `obj` as JSON to a file (atomically), or to stdout for '-'."""
    if target is None:
        return
    if str(target) == "-":
        sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
        return
    from segdeploy.utils import write_json

    try:
        write_json(target, obj)
    except OSError as exc:
        raise UserError(f"cannot write {target}: {exc.strerror}; choose a writable --json path") from None
