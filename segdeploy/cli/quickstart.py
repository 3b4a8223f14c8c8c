"""`segdeploy quickstart`: the whole product on built-in data, end to end."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from segdeploy.cli.app import app, console, emit_json, guarded
from segdeploy.errors import UserError

DEMO_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"


@app.command("quickstart")
@guarded
def quickstart_cmd(
    out: Path = typer.Argument(Path("quickstart"), help="Working directory for data and the run."),
    epochs: int = typer.Option(None, help="Override the demo recipe's epochs."),
    scene_size: int = typer.Option(2048, help="Size of the synthetic GeoTIFF scene."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    json_out: Path = typer.Option(None, "--json", help="Write the summary as JSON ('-' for stdout)."),
) -> None:
    """synth data → train the demo recipe → eval on the test split → export ONNX + FP16 behind the gate."""
    from segdeploy import recipe as recipe_mod
    from segdeploy.cli.render import metrics_table
    from segdeploy.data.synth import synth
    from segdeploy.evaluate import evaluate
    from segdeploy.export.pipeline import ExportOptions, export_run
    from segdeploy.train import fit

    if not DEMO_RECIPE.is_file():
        raise UserError(f"demo recipe {DEMO_RECIPE} not found; run quickstart from a source checkout (pip install -e .)")
    t0 = time.perf_counter()
    data_dir, run_dir = out / "data", out / "run"
    console.rule("1/4 synthetic data")
    info = synth(data_dir, scene_size=scene_size)
    console.print(f"{sum(info['splits'].values())} images + {scene_size}² scene in {data_dir}")
    console.rule("2/4 train recipes/demo.yaml")
    overrides = [f"train.epochs={epochs}"] if epochs else []
    rec = recipe_mod.load(DEMO_RECIPE, overrides, data_dir)
    result = fit(rec, run_dir, overwrite=True, progress=progress, console=console)
    console.rule("3/4 evaluate on the test split")
    report = evaluate(run_dir, "test")
    console.print(metrics_table(report.metrics, f"test · {report.images} images"))
    console.rule("4/4 export ONNX FP32 + FP16, gated against PyTorch")
    exported = export_run(run_dir, ExportOptions(fp16=True),
                          log=lambda m: console.print(m, soft_wrap=True, markup=False, highlight=False))
    summary = {
        "seconds": round(time.perf_counter() - t0, 1),
        "data": str(data_dir),
        "run_dir": str(run_dir),
        "best_val_miou": round(result.best_miou, 4),
        "test_miou": round(report.metrics.miou, 4),
        "parity": {k: {"agreement": round(r.agreement, 6), "worst_iou_drop_points": round(r.worst_drop, 3),
                       "passed": r.passed} for k, r in exported.parity.items()},
        "artifacts": {
            "weights": str(run_dir / "model.safetensors"),
            "history": str(run_dir / "history.csv"),
            "curves": str(run_dir / "plots"),
            "eval": str(report.out_dir),
            "onnx": exported.files["onnx"],
            "onnx_fp16": exported.files["onnx_fp16"],
            "parity": exported.files["parity_summary"],
            "scene": info["scene"],
        },
    }
    console.rule("summary")
    console.print(f"test mIoU [bold]{summary['test_miou']:.4f}[/] (val {summary['best_val_miou']:.4f}) "
                  f"in {summary['seconds']:.0f}s")
    for k, v in summary["artifacts"].items():
        console.print(f"  {k:<8} {v}")
    console.print(f"next: segdeploy eval {run_dir} --split test --json -")
    emit_json(summary, json_out)
