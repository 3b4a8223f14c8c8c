"""User-facing errors.

Anything the user can fix (a bad file, a typo in a recipe, a missing dependency) is raised as
a :class:`UserError`; the CLI prints its message as one line and exits non-zero, with the
traceback only under ``--debug``. Everything else is a bug and is reported as such.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by input the user controls; the message says what to fix."""

    exit_code = 2


class RecipeError(UserError):
    """A recipe key is unknown, mistyped or out of range."""


class UnknownNameError(RecipeError):
    """A registered name (architecture, loss…) is misspelt; the message lists close matches."""


class DataError(UserError):
    """A dataset file is missing, unreadable, or inconsistent with the recipe."""


class ModelError(UserError):
    """An architecture/encoder name is unknown or weights cannot be loaded."""


class ArtifactError(UserError):
    """A run directory, ONNX file or engine is missing, unfinished, corrupt or incompatible."""


class ParityError(UserError):
    """An exported model failed the accuracy gate; carries the report."""

    exit_code = 3

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


class OutputError(UserError):
    """An output cannot be written: read-only or full file system, permission denied, bad path."""


class BackendUnavailable(UserError):
    """A runtime (TensorRT, CUDA, an onnxruntime provider) is not installed here."""


class NonFiniteError(UserError):
    """A model produced NaN/Inf (logits at inference, the loss in training) where a number was due;
    the message names the tile, image or step, and what to do."""


class Interrupted(KeyboardInterrupt):
    """The user stopped the work (Ctrl-C); the message says what was kept and the command that
    continues. A KeyboardInterrupt still (an `except Exception` never swallows a Ctrl-C); the CLI
    prints the message and exits 130."""
