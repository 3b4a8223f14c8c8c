"""`segdeploy quickstart`: the whole product on built-in data, end to end."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from rich.markup import escape

from segdeploy.cli.app import app, console, emit_json, guarded
from segdeploy.errors import UserError

DEMO_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"


@app.command("quickstart")
@guarded
def quickstart_cmd(
    out: Path = typer.Argument(Path("quickstart"), help="Working directory for data and the run."),
    epochs: int = typer.Option(None, min=1, help="Override the demo recipe's epochs."),
    scene_size: int = typer.Option(2048, min=256, help="Size of the synthetic GeoTIFF scene."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the results of an earlier quickstart in OUT "
                                   "(its run is kept until the new one has trained)."),
    json_out: Path = typer.Option(None, "--json", help="Write the summary as JSON ('-' for stdout)."),
) -> None:
    """synth data → train the demo recipe → eval → export ONNX + FP16 behind the gate → tiled predict → bench."""
    from segdeploy import recipe as recipe_mod
    from segdeploy.cli.render import metrics_table
    from segdeploy.data.synth import synth
    from segdeploy.evaluate import evaluate
    from segdeploy.export.pipeline import ExportOptions, export_run
    from segdeploy.train import fit

    if not DEMO_RECIPE.is_file():
        raise UserError(f"demo recipe {DEMO_RECIPE} not found; run quickstart from a source checkout (pip install -e .)")
    from segdeploy.artifact import META_FILE
    from segdeploy.data.synth import SUMMARY_FILE
    from segdeploy.utils import check_replaceable

    # the outputs rule: an earlier quickstart (its data or its run) is replaced only with --overwrite,
    # and a folder holding anything else is never written into
    check_replaceable(out, overwrite, (f"data/{SUMMARY_FILE}", f"run/{META_FILE}"), "quickstart output")
    t0 = time.perf_counter()
    data_dir, run_dir = out / "data", out / "run"
    console.rule("1/6 synthetic data")
    info = synth(data_dir, scene_size=scene_size, overwrite=overwrite)
    console.print(f"{sum(info['splits'].values())} images + {scene_size}² scene in {data_dir}")
    console.rule("2/6 train recipes/demo.yaml")
    rec = recipe_mod.load(DEMO_RECIPE, [f"train.epochs={epochs}"] if epochs else [], data_dir)
    result = fit(rec, run_dir, overwrite=True, progress=progress, console=console)
    console.rule("3/6 evaluate on the test split")
    report = evaluate(run_dir, "test")
    console.print(metrics_table(report.metrics, f"test · {report.images} images"))
    console.rule("4/6 export ONNX FP32 + FP16, gated against PyTorch")
    exported = export_run(run_dir, ExportOptions(fp16=True),
                          log=lambda m: console.print(m, markup=False, highlight=False))
    console.rule("5/6 tiled prediction of the georeferenced scene with the FP16 ONNX")
    pred, scene_acc = _predict_scene(Path(exported.files["fp16"]), info, out / "scene_pred.tif")
    console.rule("6/6 bench: every backend available here, batch 1")
    bench_report = _bench(run_dir, rec.data.tile_size)
    summary = _summary(time.perf_counter() - t0, data_dir, run_dir, result, report, exported, info, pred, scene_acc,
                       bench_report)
    console.rule("summary")
    console.print(f"test mIoU [bold]{summary['test_miou']:.4f}[/] (val {summary['best_val_miou']:.4f}) "
                  f"in {summary['seconds']:.0f}s")
    _print_map(summary["artifacts"], Path(report.out_dir), run_dir)
    emit_json(summary, json_out)


def _predict_scene(model: Path, info: dict, pred_path: Path):  # noqa: ANN202 - (prediction summary, accuracy)
    """`segdeploy predict` on the scene as a user would run it: its own process, so its peak
    memory is predict's (this process also holds the training stack, whose memory says nothing
    about predict's)."""
    from segdeploy.raster import pixel_agreement

    pred = run_own_process(["predict", str(model), info["scene"], "--out", str(pred_path), "--tile", "256",
                            "--overlap", "32", "--batch", "4", "--no-progress", "--overwrite", "--json", "-"])
    pred = pred["results"][0]
    scene_acc = pixel_agreement(pred_path, Path(info["scene_labels"]))
    console.print(f"{pred['width']}×{pred['height']} px in {pred['seconds']:.1f}s = {pred['megapixels_per_s']:.2f} MP/s, "
                  f"peak RSS of the predict process while it predicted {pred['peak_rss_mb']:.0f} MB, pixel accuracy vs "
                  f"scene labels {scene_acc:.4f}")
    return pred, scene_acc


def run_own_process(args: list[str]) -> dict:
    """`python -m segdeploy ARGS` (with `--json -`) in a child process: its JSON result. Its
    memory is measured inside it (RssSampler): the kernel's ru_maxrss of a child started from this
    process counts this process's memory at the fork. Raises UserError with the child's error."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "segdeploy", *args], capture_output=True, text=True, check=False)
    if proc.returncode:
        lines = proc.stderr.strip().splitlines()
        raise UserError(f"segdeploy {' '.join(args[:3])} failed: {lines[-1] if lines else proc.returncode}")
    return json.loads(proc.stdout)


def _bench(run_dir: Path, size: int):  # noqa: ANN202 - a BenchReport
    from rich.table import Table

    from segdeploy.bench import BenchOptions, bench
    from segdeploy.cli.bench import MARKS

    report = bench([run_dir], BenchOptions(precisions=("fp32", "fp16"), batches=(1,), size=size, min_iters=10,
                                           min_seconds=1.0), log=lambda m: None)
    compact = Table(title=f"batch 1 · {size}² · full table: segdeploy bench {run_dir}", title_justify="left")
    for col in ("", "backend", "p50 ms", "img/s", "mIoU", "agreement", "note"):
        compact.add_column(col, justify="right" if col in ("p50 ms", "img/s", "mIoU", "agreement") else "left",
                           no_wrap=col != "note", overflow="fold")
    for r in report.rows:
        compact.add_row(MARKS[r.status], f"{r.backend} {r.precision}", "-" if r.p50_ms is None else f"{r.p50_ms:.1f}",
                        "-" if r.images_per_s is None else f"{r.images_per_s:.1f}",
                        "-" if r.miou is None else f"{r.miou:.4f}",
                        "-" if r.agreement is None else f"{r.agreement:.3%}", escape(r.reason))
    console.print(compact)
    return report


def _summary(seconds: float, data_dir: Path, run_dir: Path, result, report, exported, info: dict, pred,  # noqa: ANN001
             scene_acc: float, bench_report) -> dict:  # noqa: ANN001
    from segdeploy.artifact import Run
    from segdeploy.viz import preview_path

    run = Run(run_dir)
    return {
        "seconds": round(seconds, 1),
        "data": str(data_dir),
        "run_dir": str(run_dir),
        "best_val_miou": round(result.best_miou, 4),
        "test_miou": round(report.metrics.miou, 4),
        "scene_prediction": {"megapixels_per_s": pred["megapixels_per_s"], "seconds": pred["seconds"],
                             "peak_rss_mb": round(pred["peak_rss_mb"], 1), "pixel_accuracy": round(scene_acc, 4)},
        "bench": [{"backend": r.backend, "precision": r.precision, "status": r.status, "p50_ms": r.p50_ms,
                   "reason": r.reason} for r in bench_report.rows],
        "parity": {k: {"agreement": round(r.agreement, 6), "worst_iou_drop_points": round(r.worst_drop, 3),
                       "passed": r.passed} for k, r in exported.parity.items()},
        "artifacts": {
            "weights": str(run.weights),
            "history": str(run.history_path),
            "curves": str(run.plots_dir),
            "eval": str(report.out_dir),
            "onnx": exported.files["fp32"],
            "onnx_fp16": exported.files["fp16"],
            "parity": exported.files["parity_summary"],
            "scene": info["scene"],
            "scene_prediction": pred["output"],
            "scene_preview": str(preview_path(Path(pred["output"]))),
        },
    }


def _print_map(files: dict[str, str], eval_dir: Path, run_dir: Path) -> None:
    """Where everything is, what to open first."""
    from segdeploy.artifact import CONFUSION_FILE, CURVE_FILES, OVERLAY_FILE

    console.print("[bold]open first[/]")
    for what, path in (("the predicted scene, in colour", files["scene_preview"]),
                       ("predictions vs ground truth, per class", str(eval_dir / OVERLAY_FILE.format(0))),
                       ("confusion matrix", str(eval_dir / CONFUSION_FILE)),
                       ("FP32/FP16 parity report", files["parity"]),
                       ("training curves", str(Path(files["curves"]) / CURVE_FILES["miou"]))):
        console.print(f"  {what:<40} {path}", soft_wrap=True)
    console.print("[bold]everything else[/]")
    for k, v in files.items():
        console.print(f"  {k:<17} {v}", soft_wrap=True)
    console.print(f"next: segdeploy bench {run_dir}   ·   segdeploy eval {run_dir} --split test --json -")
