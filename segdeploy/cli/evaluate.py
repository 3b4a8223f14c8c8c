"""`segdeploy eval`."""

from __future__ import annotations

from pathlib import Path

import typer

from segdeploy.cli.app import app, console, emit_json, guarded


@app.command("eval")
@guarded
def eval_cmd(
    model: Path = typer.Argument(..., help="Run directory, .onnx or .engine."),
    split: str = typer.Option("val", help="Dataset split: train, val or test."),
    data: Path = typer.Option(None, "--data", help="Dataset directory (overrides the recipe's data.root)."),
    recipe: Path = typer.Option(None, help="Recipe, when MODEL is not inside a run directory."),
    out: Path = typer.Option(None, help="Where plots and metrics.json go (default: next to MODEL, eval/)."),
    json_out: Path = typer.Option(None, "--json", help="Write metrics (per class + confusion matrix) as JSON."),
) -> None:
    """Per-class IoU/Dice/precision/recall/F1, a confusion-matrix PNG and overlays on a split."""
    from segdeploy.cli.render import metrics_table
    from segdeploy.evaluate import evaluate

    report = evaluate(model, split, recipe_path=recipe, data_root=data, out_dir=out)
    console.print(metrics_table(report.metrics, f"{report.split} · {report.images} images · {report.backend}"))
    console.print(f"plots and metrics.json in {report.out_dir}")
    emit_json(report.to_dict(), json_out)
