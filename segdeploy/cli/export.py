"""`segdeploy export` (placeholder until its issue lands)."""

from __future__ import annotations

import typer

from segdeploy.cli.app import app, guarded
from segdeploy.errors import UserError


@app.command("export", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@guarded
def export_cmd(ctx: typer.Context) -> None:
    """(not built yet)"""
    raise UserError("segdeploy export is not built yet in this version")
