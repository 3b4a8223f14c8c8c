"""`segdeploy predict` (placeholder until its issue lands)."""

from __future__ import annotations

import typer

from segdeploy.cli.app import app, guarded
from segdeploy.errors import UserError


@app.command("predict", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@guarded
def predict_cmd(ctx: typer.Context) -> None:
    """(not built yet)"""
    raise UserError("segdeploy predict is not built yet in this version")
