"""`segdeploy export`."""

from __future__ import annotations

from pathlib import Path

import typer

from segdeploy.cli.app import app, check_choice, console, emit_json, guarded, positive


@app.command("export")
@guarded
def export_cmd(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    fp16: bool = typer.Option(False, "--fp16", help="Also write model.fp16.onnx (mixed precision, FP32 I/O)."),
    trt: bool = typer.Option(False, "--trt", help="Also build a TensorRT FP16 engine (brings --fp16, its source; needs "
                             "TensorRT + a CUDA GPU, checked first); with --int8 also an INT8 engine."),
    int8: bool = typer.Option(False, "--int8", help="Also write calibrated INT8 ONNX: model.int8.onnx (symmetric, for "
                              "TensorRT) and model.int8.cpu.onnx (U8S8, for CPUs), each behind the gate."),
    calib_images: int = typer.Option(32, "--calib-images", min=1, help="INT8 calibration tiles (training split only; "
                                     "refused when the split holds fewer)."),
    calib_method: str = typer.Option("minmax", "--calib-method", help="INT8 calibration: minmax, entropy or percentile."),
    head: list[str] = typer.Option([], "--head", help="Also an FP32 ONNX with a server head, behind the same gate: "
                                   "argmax (model.argmax.onnx: the N×H×W uint8 class map) or softmax "
                                   "(model.softmax.onnx: probabilities); repeat for both."),
    opset: int = typer.Option(17, min=17, help="ONNX opset (≥ 17)."),
    tile: int = typer.Option(None, min=1, help="Tile size prediction will use (default: the recipe's data.tile_size)."),
    batch: str = typer.Option("1:4:8", help="TensorRT batch profile MIN:OPT:MAX."),
    workspace: float = typer.Option(4.0, callback=positive, help="TensorRT workspace limit in GiB."),
    export_time_limit: float = typer.Option(300.0, "--export-time-limit", callback=positive,
                                            help="Seconds each ONNX exporter may take before the next is tried."),
    set_: list[str] = typer.Option([], "--set", help="Override a gate threshold: --set parity.fp16_agreement=0.9995."),
    data: Path = typer.Option(None, "--data", help="Dataset for the parity gate (default: the run's data.root)."),
    progress: bool = typer.Option(True, help="Show what export is doing (on a terminal a spinner; otherwise a line "
                                  "every 30 s of silence, SEGDEPLOY_PROGRESS_SECONDS)."),
    json_out: Path = typer.Option(None, "--json", help="Write the export report as JSON ('-' for stdout)."),
) -> None:
    """ONNX (FP32), mixed-precision FP16 ONNX, calibrated INT8 ONNX and TensorRT engines, each behind the parity gate.

    One transaction: every prerequisite is checked first, the asked forms are built beside the old
    ones and replace them only when all pass; a failure leaves RUN/export as it was."""
    from segdeploy.errors import ParityError
    from segdeploy.export.pipeline import ExportOptions, export_run

    from segdeploy.export.tensorrt import parse_batch

    parse_batch(batch)  # a malformed --batch fails before minutes of export, not after
    for name in head:
        check_choice("--head", name, ("argmax", "softmax"))
    opts = ExportOptions(fp16=fp16, trt=trt, int8=int8, calib_images=calib_images, calib_method=calib_method,
                         heads=sorted(set(head)),
                         opset=opset, tile=tile, batch=batch, workspace_gib=workspace, export_time_limit=export_time_limit,
                         data_root=data, parity_overrides=set_)
    from segdeploy.progress import Heartbeat

    try:
        with Heartbeat(console, "export", enabled=progress) as beat:
            report = export_run(run_dir, opts, log=beat.stage)
    except ParityError as exc:
        if json_out is not None and exc.report is not None:
            emit_json({"error": str(exc), **exc.report.to_dict()}, json_out)
        raise
    for key, path in report.files.items():
        console.print(f"  {key:<15} {path}", markup=False, highlight=False)
    for why in report.stale.values():
        console.print(f"[yellow]stale[/] {why}", highlight=False)
    console.print(f"[bold green]{', '.join(r.form.file for r in report.results.values())} passed the parity gate[/] "
                  f"in {report.seconds:.1f}s", highlight=False)
    emit_json(report.to_dict(), json_out)
