"""`segdeploy eval`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from segdeploy.cli.app import app, console, emit_json, guarded


@app.command("eval")
@guarded
def eval_cmd(
    models: list[Path] = typer.Argument(..., help="Run directories, .onnx or .engine files; several → a comparison table."),
    split: str = typer.Option("val", help="Dataset split: train, val or test."),
    data: Path = typer.Option(None, "--data", help="Dataset directory (overrides the recipe's data.root)."),
    recipe: Path = typer.Option(None, help="Recipe, when MODEL is not inside a run directory."),
    out: Path = typer.Option(None, help="Where plots and metrics.json go (default: next to MODEL, eval/)."),
    json_out: Path = typer.Option(None, "--json", help="Write metrics (per class + confusion matrix) as JSON."),
) -> None:
    """Per-class IoU/Dice/precision/recall/F1, a confusion-matrix PNG and overlays on a split."""
    from segdeploy.cli.render import metrics_table
    from segdeploy.errors import UserError
    from segdeploy.evaluate import evaluate

    if out is not None and len(models) > 1:
        raise UserError("--out takes one model; with several, each writes next to itself")
    reports = []
    for model in models:
        report = evaluate(model, split, recipe_path=recipe, data_root=data, out_dir=out)
        console.print(metrics_table(report.metrics, f"{model} · {report.split} · {report.images} images · {report.backend}"))
        console.print(f"plots and metrics.json in {report.out_dir}")
        reports.append(report)
    if len(reports) > 1:
        console.print(comparison_table(reports))
    emit_json(reports[0].to_dict() if len(reports) == 1 else {"models": [r.to_dict() for r in reports]}, json_out)


def comparison_table(reports: list) -> Table:  # noqa: ANN001
    """One row per model: mIoU, mDice, pixel accuracy and each class's IoU; best value in bold.

    Every mean is over the same classes, those present in the ground truth; a class absent from
    it is "-" in every row (otherwise it would count 0 for a model that predicts it somewhere
    and nothing for one that does not, and the means would compare different things)."""
    from segdeploy.cli.render import fmt

    names = reports[0].metrics.names
    present = sorted({i for r in reports for i in r.metrics.present()})
    t = Table(title=f"model comparison · {reports[0].split} split", title_justify="left")
    for col in ["model", "mIoU", "mDice", "pixel acc", *names]:
        t.add_column(col, justify="left" if col == "model" else "right")
    columns = [[r.metrics.mean_over(r.metrics.iou, present) for r in reports],
               [r.metrics.mean_over(r.metrics.dice, present) for r in reports],
               [r.metrics.pixel_accuracy for r in reports]]
    columns += [[float(r.metrics.iou[i]) if i in present else None for r in reports] for i in range(len(names))]
    best = [max((v for v in col if v is not None and v == v), default=None) for col in columns]
    for k, r in enumerate(reports):
        cells = []
        for col, b in zip(columns, best, strict=True):
            text = fmt(col[k])
            cells.append(f"[bold]{text}[/]" if b is not None and col[k] == b else text)
        t.add_row(str(r.model), *cells)
    absent = [names[i] for i in range(len(names)) if i not in present]
    t.caption = (f"per-class columns are IoU; means over the {len(present)} classes present in the ground truth"
                 + (f" (absent: {', '.join(absent)})" if absent else ""))
    return t
