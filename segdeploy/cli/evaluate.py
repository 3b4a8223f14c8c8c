"""`segdeploy eval`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from segdeploy.cli.app import app, check_choice, console, emit_json, guarded
from segdeploy.cli.predict import BACKEND_HELP, PROVIDER_HELP, say_choice


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
    tta: str = typer.Option("none", help="Also score with test-time augmentation (flips: 2 views, d4: 8) and "
                            "show per-class IoU and time with and without it."),
    thresholds: str = typer.Option(None, help="Two-class models: sweep the threshold on class 1's probability, "
                                   "START:STOP:STEP or a list (0.1:0.9:0.05); the best is recorded in the run for predict."),
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
    from segdeploy.decision import parse_thresholds
    from segdeploy.runtime import load_backend
    from segdeploy.runtime.choose import resolve
    from segdeploy.tiling import TTA_MODES

    check_choice("--tta", tta, tuple(TTA_MODES))
    sweep = parse_thresholds(thresholds) if thresholds else None
    reports, choices = [], []
    for model in models:
        choice = resolve(model, backend, provider)
        choices.append(choice)
        loaded = load_backend(choice.path, **choice.options)
        with WorkProgress(console, f"eval {model} · {split or 'default split'}", None, "images", enabled=progress,
                          transient=True) as bar:
            report = evaluate(model, split, recipe_path=recipe, data_root=data, out_dir=out, overwrite=overwrite,
                              backend=loaded,
                              progress=lambda done, total: bar.update(done - bar.done, total=total), tta=tta,
                              thresholds=sweep)
        console.print(metrics_table(report.metrics, f"{model} · {report.split} · {report.images} images · "
                                                    f"{report.backend.split(' (')[0]}"))
        _print_tta_and_sweep(report)
        say_choice(choice)  # after the work: a refusal stays one line
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


def _print_tta_and_sweep(report) -> None:  # noqa: ANN001 - an EvalReport
    """--tta: per-class IoU without/with TTA and the time of each; --thresholds: IoU/Dice per T."""
    from segdeploy.cli.render import fmt

    if report.tta is not None:
        t = report.tta
        table = Table(title=f"test-time augmentation ({t.mode}) · {report.split} split")
        for col in ("class", "IoU", f"IoU with {t.mode}", "change"):
            table.add_column(col, justify="left" if col == "class" else "right")
        rows = [(n, report.metrics.iou[i], t.metrics.iou[i]) for i, n in enumerate(report.metrics.names)]
        rows.append(("mIoU", report.metrics.miou, t.metrics.miou))
        for name, a, b in rows:
            table.add_row(name, fmt(a), fmt(b), "-" if a != a or b != b else f"{b - a:+.4f}")
        console.print(table)
        console.print(f"time: {report.seconds:.2f}s without TTA, {t.seconds:.2f}s with {t.mode} "
                      f"({t.seconds / max(report.seconds, 1e-9):.1f}×)")
    if report.sweep is not None:
        sweep = report.sweep
        table = Table(title=f"threshold on p({sweep.names[1]}) · {report.split} split")
        for col in ("T", f"IoU {sweep.names[1]}", f"Dice {sweep.names[1]}", "mIoU"):
            table.add_column(col, justify="right")
        best = sweep.best()["threshold"]
        for r in sweep.rows():
            mark = (lambda v: f"[bold]{v}[/]") if r["threshold"] == best else str
            table.add_row(*(mark(x) for x in (f"{r['threshold']:g}", fmt(r["iou"]), fmt(r["dice"]), fmt(r["miou"]))))
        console.print(table)
        where = f"recorded in {sweep.recorded}: predict applies it" if sweep.recorded else "not recorded (see the note)"
        console.print(f"best threshold {best:g} ({where}); plot {sweep.plot}", soft_wrap=True)


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
