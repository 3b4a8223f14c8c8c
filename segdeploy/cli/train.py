"""`segdeploy train`."""

from __future__ import annotations

from pathlib import Path

import typer

from segdeploy.cli.app import app, console, emit_json, guarded


@app.command("train")
@guarded
def train_cmd(
    recipe: Path = typer.Argument(None, help="Recipe YAML (see recipes/); with --resume, the run's own recipe is used "
                                  "and this may be left out."),
    data: Path = typer.Option(None, "--data", help="Dataset directory (overrides data.root)."),
    out: Path = typer.Option(None, "--out", help="Run directory (default: runs/<recipe name>)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: --set train.epochs=5 (repeatable). With "
                                   "--resume only train.epochs, early_stopping, max_minutes, num_workers, device, "
                                   "deterministic, grad_clip, optimizer.lr and data.root/cache may change."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out with its saved recipe "
                                "(segdeploy train --resume --out RUN)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory."),
    progress: bool = typer.Option(True, help="Show the progress bar (plain progress lines when not on a terminal)."),
    mlflow: str = typer.Option(None, "--mlflow", help="Log to MLflow: a tracking URI, a directory, or nothing for "
                               "./mlruns (default: MLFLOW_TRACKING_URI when set). TensorBoard events always go to "
                               "RUN/tensorboard when tensorboard is installed."),
    json_out: Path = typer.Option(None, "--json", help="Write the result summary as JSON ('-' for stdout)."),
) -> None:
    """Train a model from a recipe into a self-contained run directory."""
    from segdeploy import recipe as recipe_mod
    from segdeploy.errors import UserError
    from segdeploy.train import fit, resume_recipe

    if resume:
        if out is None:
            raise UserError("--resume needs the run to continue: segdeploy train --resume --out RUN")
        rec, changes = resume_recipe(out, recipe, set_, data)
        for change in changes:
            console.print(change, highlight=False, soft_wrap=True)
    elif recipe is None:
        raise UserError("train needs a recipe: segdeploy train RECIPE.yaml --data DIR (or --resume --out RUN to "
                        "continue a run)")
    else:
        rec = recipe_mod.load(recipe, set_, data)
    out = out or Path("runs") / rec.name
    result = fit(rec, out, resume=resume, overwrite=overwrite, progress=progress, console=console, mlflow=mlflow)
    if not result.main:  # under torchrun, rank 0 reports
        return
    console.print(f"[bold green]done[/] best val mIoU {result.best_miou:.4f} at epoch {result.best_epoch} "
                  f"in {result.seconds:.0f}s ({result.train_images_per_s:.1f} img/s) → {out}")
    for command in next_commands(out):
        console.print(f"  next: {command}", highlight=False, soft_wrap=True)
    emit_json({"run_dir": str(out), "best_val_miou": result.best_miou, "best_epoch": result.best_epoch,
               "epochs_run": result.epochs_run, "seconds": round(result.seconds, 2),
               "train_images_per_s": result.train_images_per_s, "stopped_early": result.stopped_early,
               "world_size": result.world_size, "next": next_commands(out)}, json_out)


def next_commands(run_dir: Path) -> list[str]:
    """What a finished run is for: evaluate it on its test split (val without one), export it, look inside."""
    from segdeploy.artifact import Run

    split = "test" if Run(run_dir).split_keys().get("test") else "val"
    return [f"segdeploy eval {run_dir} --split {split}", f"segdeploy export {run_dir} --fp16",
            f"segdeploy info {run_dir}"]
