"""`segdeploy eval`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from segdeploy.cli.app import app, check_choice, console, emit_json, guarded
from segdeploy.cli.predict import BACKEND_HELP, PROVIDER_HELP


@app.command("eval")
@guarded
def eval_cmd(
    models: list[Path] = typer.Argument(..., help="Run directories, .onnx or .engine files; several → a comparison table."),
    split: str = typer.Option(None, help="Dataset split: train, val or test (default: test when the data layout "
                              "has one, else val)."),
    data: Path = typer.Option(None, "--data", help="Dataset directory (overrides the recipe's data.root)."),
    recipe: Path = typer.Option(None, help="Recipe, when MODEL is not inside a run directory."),
    out: Path = typer.Option(None, help="Where plots and metrics.json go (default: next to MODEL, eval/)."),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    provider: str = typer.Option(None, "--provider", help=PROVIDER_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier evaluation in the output directory "
                                   "(without it, one is refused)."),
    progress: bool = typer.Option(True, help="Show progress (plain progress lines when not on a terminal)."),
    json_out: Path = typer.Option(None, "--json", help="Write metrics (per class + confusion matrix) as JSON."),
) -> None:
    """Per-class IoU/Dice/precision/recall/F1, a confusion-matrix PNG and overlays on a split."""
    from segdeploy.cli.render import metrics_table
    from segdeploy.errors import UserError
    from segdeploy.evaluate import evaluate
    from segdeploy.progress import WorkProgress

    if split is not None:  # None: the layout's test split, else val (the report says which)
        check_choice("--split", split, ("train", "val", "test"))
    if out is not None and len(models) > 1:
        raise UserError("--out takes one model; with several, each writes next to itself")
    from segdeploy.runtime import load_backend
    from segdeploy.runtime.choose import resolve

    reports, choices = [], []
    for model in models:
        choice = resolve(model, backend, provider)
        choices.append(choice)
        loaded = load_backend(choice.path, **choice.options)
        with WorkProgress(console, f"eval {model} · {split or 'default split'}", None, "images", enabled=progress,
                          transient=True) as bar:
            report = evaluate(model, split, recipe_path=recipe, data_root=data, out_dir=out, overwrite=overwrite,
                              backend=loaded,
                              progress=lambda done, total: bar.update(done - bar.done, total=total))
        console.print(metrics_table(report.metrics, f"{model} · {report.split} · {report.images} images · "
                                                    f"{report.backend.split(' (')[0]}"))
        if choice.basis != "file":  # after the work: a refusal stays one line
            console.print(choice.line(), soft_wrap=True, highlight=False, markup=False)
        for note in report.notes:
            console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
        if report.split_reason:
            console.print(f"split: {report.split} ({report.split_reason})")
        console.print(f"plots and metrics.json in {report.out_dir}")
        reports.append(report)
    if len(reports) > 1:
        for table in comparison_tables(reports, console.width):
            console.print(table)
    docs = [r.to_dict() | {"model_choice": c.to_dict()} for r, c in zip(reports, choices, strict=True)]
    emit_json(docs[0] if len(docs) == 1 else {"models": docs}, json_out)


def comparison_tables(reports: list, width: int) -> list[Table]:  # noqa: ANN001
    """One row per model (its shortest unique name, never cut): mIoU, mDice, pixel accuracy and
    each class's IoU, best value in bold, folded into several tables when wider than `width`.

    Every mean is over the same classes, those present in the ground truth; a class absent from
    it is "-" in every row (otherwise it would count 0 for a model that predicts it somewhere
    and nothing for one that does not, and the means would compare different things)."""
    from segdeploy.cli.render import fmt, folded_tables, short_names

    names = reports[0].metrics.names
    present = sorted({i for r in reports for i in r.metrics.present()})
    values = {"mIoU": [r.metrics.mean_over(r.metrics.iou, present) for r in reports],
              "mDice": [r.metrics.mean_over(r.metrics.dice, present) for r in reports],
              "pixel acc": [r.metrics.pixel_accuracy for r in reports]}
    values.update({n: [float(r.metrics.iou[i]) if i in present else None for r in reports] for i, n in enumerate(names)})
    columns = []
    for header, col in values.items():
        best = max((v for v in col if v is not None and v == v), default=None)
        columns.append((header, [f"[bold]{fmt(v)}[/]" if best is not None and v == best else fmt(v) for v in col]))
    absent = [names[i] for i in range(len(names)) if i not in present]
    caption = (f"per-class columns are IoU; means over the {len(present)} classes present in the ground truth"
               + (f" (absent: {', '.join(absent)})" if absent else ""))
    return folded_tables(f"model comparison · {reports[0].split} split", short_names([r.model for r in reports]),
                         columns, width, key_header="model", caption=caption)
