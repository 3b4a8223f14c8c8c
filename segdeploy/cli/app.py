"""The root Typer app, global options, and the error guard every verb runs under."""

from __future__ import annotations

import errno
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
import typer.core
from rich.console import Console

try:  # Typer >= 0.28 carries its own copy of click and raises that copy's exceptions
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - Typer on the installed click
    from click import exceptions as click_exceptions

from segdeploy import __version__
from segdeploy.errors import Interrupted, UserError

GLOBAL_FLAGS = ("--debug",)
# what `segdeploy[train]` adds to the core (deployment) install
TRAINING_STACK = {"torch", "torchvision", "timm", "segmentation_models_pytorch", "safetensors", "onnxscript",
                  "onnxslim"}
OPTIONAL_VALUE = {"--mlflow": "local"}  # options whose value may be left out
# options whose value may be left out, and the words they take: a bare `--probs` (followed by
# anything but max/all, e.g. an input file as in older command lines) means `--probs max`
OPTIONAL_CHOICE = {"--probs": ("max", ("max", "all"))}


class _GlobalFlagsAnywhere(typer.core.TyperGroup):
    """`segdeploy train … --debug` means the same as `segdeploy --debug train …`; help texts are
    shown as written (rich markup would eat `[ray]`); a usage error is one line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _escape_help(self)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        flags = [a for a in args if a in GLOBAL_FLAGS]
        rest = [a for a in args if a not in GLOBAL_FLAGS]
        for i, a in enumerate(rest):  # a bare `--mlflow` means the local ./mlruns store
            if a in OPTIONAL_VALUE and (i + 1 == len(rest) or rest[i + 1].startswith("-")):
                rest.insert(i + 1, OPTIONAL_VALUE[a])
            elif a in OPTIONAL_CHOICE and (i + 1 == len(rest) or rest[i + 1] not in OPTIONAL_CHOICE[a][1]):
                rest.insert(i + 1, OPTIONAL_CHOICE[a][0])
        return super().parse_args(ctx, flags + rest)

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        """Click's usage errors (a missing argument, `--tile 0` out of its range) as one line that
        names the option, exit code 2, like every other refusal."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exceptions.ClickException as exc:
            if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
                ctx = getattr(exc, "ctx", None)
                where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
                typer.echo(f"error: {one_line(exc.format_message()).rstrip('.')}{where}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


def _escape_help(group: Any) -> None:
    """Escape rich markup in every help text of the command tree: help is plain text here."""
    from rich.markup import escape

    for cmd in group.commands.values():
        if cmd.help:
            cmd.help = escape(cmd.help)
        for param in cmd.params:
            if getattr(param, "help", None):
                param.help = escape(param.help)
        if getattr(cmd, "commands", None):
            _escape_help(cmd)


_TYPE_NAMES = {int: "INTEGER", float: "FLOAT", str: "TEXT", bool: "BOOLEAN"}


def _plain_type(self: Any, ctx: Any) -> str | None:
    """The value column of --help: click's INTEGER / PATH / TEXT… (TEXT... for a repeated one),
    nothing for a flag, instead of Typer's Python annotations (`<bool>`, `<list[str]>`)."""
    from typing import get_args

    if getattr(self, "is_flag", False):
        return None
    if self.metavar is not None and self.param_type_name == "option":
        return self.metavar
    desc = self.type_descriptor
    element = get_args(desc.annotation)[0] if desc.is_list and get_args(desc.annotation) else desc.annotation
    shown = "PATH" if desc.is_path else _TYPE_NAMES.get(element, getattr(element, "__name__", "TEXT").upper())
    return f"{shown}..." if desc.is_list else shown


def _usage_name(self: Any) -> str:
    """MODEL, [OUT], INPUTS... in the usage line (click's convention), not {model}."""
    name = (self.metavar or self.name or "").upper()
    name = name if self.required else f"[{name}]"
    return name + ("..." if self.nargs != 1 else "")


typer.core.TyperOption.display_type_rich = _plain_type  # type: ignore[method-assign]
typer.core.TyperArgument.display_type_rich = _plain_type  # type: ignore[method-assign]
typer.core.TyperArgument._usage_display_name = _usage_name  # type: ignore[method-assign]


app = typer.Typer(
    name="segdeploy",
    cls=_GlobalFlagsAnywhere,
    help="Train segmentation models, export them to ONNX/TensorRT behind an accuracy gate, "
    "and run them on huge rasters.",
    no_args_is_help=True,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
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
        from segdeploy.utils import environment

        env = environment()
        typer.echo(f"segdeploy {__version__}")
        for name, text in env.items():
            typer.echo(f"  {name:<12} {text}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version, those of Python, PyTorch, onnxruntime, TensorRT and "
                                 "GDAL, and the devices they see."),
) -> None:
    """Global options: --debug (full tracebacks) and --version. Without --debug, rasterio's logger is silenced so
    GDAL's messages cannot add lines to a one-line error."""
    STATE["debug"] = debug
    if not debug:  # GDAL's own messages (e.g. libtiff's write errors) would add lines to one-line errors
        # (process-wide on purpose: this callback runs once per `segdeploy` command, which owns its
        # process; the library sets no logging level but mlflow's, in tracking.py)
        import logging

        logging.getLogger("rasterio").setLevel(logging.CRITICAL)


def one_line(text: str) -> str:
    """`text` with its lines joined by single spaces, blank lines dropped (errors are one line)."""
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
        except KeyboardInterrupt as exc:  # an `Interrupted` says what was kept and how to go on
            said = one_line(str(exc)) if isinstance(exc, Interrupted) else ""
            typer.echo(f"interrupted: {said}" if said else "interrupted", err=True)
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
    """--json/--csv/--plot files that cannot be written fail before the work, not after it: a
    directory, an unwritable place, or a file the command itself reads or writes (its --out, an
    input, another report), which the report would replace."""
    import os

    from segdeploy.artifact import owning_run
    from segdeploy.utils import raise_write_error, writable_location

    others = {key: value for key, value in kwargs.items() if key not in REPORT_OPTIONS}
    taken: dict[str, str] = {}
    for key in REPORT_OPTIONS:
        target = kwargs.get(key)
        if target is None or str(target) == "-":
            continue
        path = Path(target)
        if path.is_dir():
            raise_write_error(path, IsADirectoryError(errno.EISDIR, "is a directory", str(path)))
        writable_location(path)
        option = OUTPUT_OPTIONS[key]
        if (run := owning_run(path)) is not None:
            raise UserError(f"{option} {target} is a file of the run {run} (segdeploy's own {path.name}), which the "
                            "report would replace; give the report a file of its own")
        here = os.path.abspath(path)
        for name, value in list(others.items()) + [(k, v) for k, v in taken.items()]:
            for item in value if isinstance(value, list | tuple) else [value]:
                named = isinstance(item, Path) or (isinstance(item, str) and (name in OUTPUT_OPTIONS or os.path.exists(item)))
                if named and str(item) not in ("", "-") and os.path.abspath(str(item)) == here:
                    what = OUTPUT_OPTIONS.get(name, "an input")
                    raise UserError(f"{option} {target} is the same file as {what}, which the report would "
                                    "replace; give the report a file of its own")
        taken[key] = str(target)


OUTPUT_OPTIONS = {"out": "--out", "out_arg": "--out", "vector": "--vector", "json_out": "--json", "csv_out": "--csv",
                  "plot_out": "--plot"}  # parameter -> the flag a user typed


def positive(value: float | None) -> float | None:
    """Option callback for a number that must be > 0 (Typer's `min=` includes its bound)."""
    if value is not None and not value > 0:
        raise typer.BadParameter(f"{value:g} is not > 0")
    return value


def check_choice(option: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    """A word option outside its choices fails before any work, naming the option as typed."""
    if value not in choices:
        import difflib

        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"{option} {value!r} is not one of {', '.join(choices)}{hint}")


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
