"""`segdeploy bench` (placeholder until its issue lands)."""

from __future__ import annotations

import typer

from segdeploy.cli.app import app, guarded
from segdeploy.errors import UserError


@app.command("bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@guarded
def bench_cmd(ctx: typer.Context) -> None:
    """(not built yet)"""
    raise UserError("segdeploy bench is not built yet in this version")
