"""`segdeploy import` (the function is `import_cmd`: `import` is a Python keyword)."""

from __future__ import annotations

from pathlib import Path

import typer

from segdeploy.cli.app import app, console, emit_json, guarded


@app.command("import")
@guarded
def import_cmd(
    source: str = typer.Argument(..., help="A state dict (.pth .pt .bin .ckpt .safetensors), an smp save_pretrained "
                                 "folder or Hub id org/name, a TorchScript archive, a torch.export .pt2, or an .onnx."),
    recipe: Path = typer.Option(..., "--recipe", help="Recipe YAML: classes, palette, bands, normalisation, pixel "
                                "scale, tile size; the architecture for a state dict; optionally data."),
    out: Path = typer.Option(..., "--out", help="Run directory to make."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: --set data.tile_size=256 (repeatable)."),
    data: Path = typer.Option(None, "--data", help="Dataset (overrides data.root): the import ends with the "
                              "per-class table on its val split and a check of the predictions."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Load a whole pickled model (torch.save(model)); "
                                      "this runs code from the file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --out (kept until the "
                                   "import completes)."),
    json_out: Path = typer.Option(None, "--json", help="Write the import report as JSON ('-' for stdout)."),
) -> None:
    """Make a finished run directory from a model trained elsewhere: eval, export (behind the same gate),
    predict and bench then work on it as on a run segdeploy trained."""
    from segdeploy.artifact import Run
    from segdeploy.importing import FORMAT_NAMES, ImportOptions, import_model

    say = lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    report = import_model(source, out, ImportOptions(recipe, set_, data, trust_pickle, overwrite),
                          log=lambda m: console.print(f"[yellow]{m}[/]", highlight=False, soft_wrap=True))
    for note in report.notes:
        say(f"  {note}")
    console.print(f"[bold green]imported[/] {source} ({FORMAT_NAMES[report.format]}) → {out} in {report.seconds:.1f}s; "
                  f"the run holds {report.model_format}, source sha256 {report.sha256[:12]}…", soft_wrap=True)
    result = report.to_dict()
    if Run(out).recipe.data.root is None:
        say("no data (recipe data.root or --data): the imported model's predictions were not checked against masks")
        result["check"] = {"status": "undecided", "message": "no data"}
    else:
        result |= _check_on_val(out)
    emit_json(result, json_out)


def _check_on_val(run_dir: Path) -> dict:
    """The per-class table on the val split, and the verdict on the predictions."""
    from segdeploy.cli.render import metrics_table
    from segdeploy.evaluate import evaluate
    from segdeploy.importing import check_predictions

    ev = evaluate(run_dir, "val", plots=False)
    console.print(metrics_table(ev.metrics, f"{run_dir} · val · {ev.images} images · {ev.backend.split(' (')[0]}"))
    check = check_predictions(ev.metrics.matrix, ev.metrics.names)
    style = {"ok": "[green]check:[/]", "warning": "[yellow]warning:[/]", "undecided": "[yellow]note:[/]"}[check.status]
    console.print(f"{style} {check.message}", highlight=False, soft_wrap=True)
    return {"eval": ev.to_dict(), "check": check.to_dict()}
