"""`segdeploy bench`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from segdeploy.cli.app import app, check_choice, console, emit_json, guarded


def _split(value: str, kind: type = str) -> tuple:
    return tuple(kind(v.strip()) for v in value.split(",") if v.strip())


@app.command("bench")
@guarded
def bench_cmd(
    models: list[Path] = typer.Argument(..., help="Run directories and/or exported artifacts (.onnx, .engine)."),
    backend: str = typer.Option("torch,onnxruntime,tensorrt", help="Backends to measure (comma-separated), or auto: "
                                "only what `predict RUN` runs here (--backend auto)."),
    precision: str = typer.Option("fp32,fp16,int8", help="Precisions to measure (comma-separated)."),
    batch: str = typer.Option("1,8", help="Batch sizes (comma-separated)."),
    size: int = typer.Option(None, min=16, help="Square input size in pixels (default: each model's tile size, "
                             "what predict feeds it)."),
    data: Path = typer.Option(None, "--data", help="Dataset for the accuracy columns (default: the run's data)."),
    tiled: Path = typer.Option(None, "--tiled", help="Also time `predict` end to end on this image."),
    tta: str = typer.Option("none", help="Also time each batch test-time augmented (flips: 2 views, d4: 8; "
                            "softmax averaged): the TTA MP/s column, and --tiled with it."),
    threads: int = typer.Option(None, min=1, help="CPU threads for every CPU backend (default: torch's)."),
    iters: int = typer.Option(10, min=1, help="Minimum timed iterations per row."),
    seconds: float = typer.Option(1.0, min=0, help="Minimum timed seconds per row (the defaults give a first "
                                  "table of the demo model in about a minute on 2 CPU cores)."),
    progress: bool = typer.Option(True, help="Show progress with an estimate (plain lines when not on a terminal)."),
    accuracy: bool = typer.Option(True, help="Compute the accuracy columns."),
    record: bool = typer.Option(True, help="Record the speeds measured in each run directory (RUN/export/speed.json, "
                                "per machine), which `--backend auto` ranks by."),
    json_out: Path = typer.Option(None, "--json", help="Write every row as JSON ('-' for stdout)."),
    csv_out: Path = typer.Option(None, "--csv", help="Write every row as CSV."),
    plot_out: Path = typer.Option(None, "--plot", help="PNG chart: latency vs batch per backend."),
) -> None:
    """Latency (p50/p90/p99), throughput, memory and accuracy per backend and precision, in one table."""
    from functools import partial

    from segdeploy.bench import BACKENDS, PRECISIONS, BenchOptions, bench, plot, write_csv
    from segdeploy.errors import UserError
    from segdeploy.predict import time_file
    from segdeploy.tiling import TTA_MODES

    check_choice("--tta", tta, tuple(TTA_MODES))
    backends, precisions = _split(backend), _split(precision)
    for name in backends:
        if name not in (*BACKENDS, "auto"):
            raise UserError(f"--backend {name!r} is unknown; choose from {', '.join(BACKENDS)} or auto")
    for name in precisions:
        if name not in PRECISIONS:
            raise UserError(f"--precision {name!r} is unknown; choose from {', '.join(PRECISIONS)}")
    try:
        batches = _split(batch, int)
    except ValueError:
        raise UserError(f"--batch {batch!r} must be comma-separated integers, e.g. 1,8") from None
    if not batches or min(batches) < 1:
        raise UserError(f"--batch {batch!r} must be comma-separated integers ≥ 1, e.g. 1,8")
    opts = BenchOptions(backends=backends, precisions=precisions, batches=batches, size=size, threads=threads,
                        data=data, tiled=tiled, tiled_run=partial(time_file, tta=tta) if tiled else None, min_iters=iters,
                        min_seconds=seconds, accuracy=accuracy, tta=tta,
                        record=record)
    from segdeploy.progress import WorkProgress

    with WorkProgress(console, "bench", None, "rows", enabled=progress, transient=True) as bar:
        def on_row(done: int, label: str) -> None:
            if not label:  # the first call: how many rows there are
                bar.update(0, total=done)
            else:
                bar.update(done - bar.done, last=label)

        report = bench(models, opts, log=lambda m: console.print(m, markup=False, highlight=False), progress=on_row)
    for table in render(report, console.width):  # the terminal's width, or COLUMNS when piped
        console.print(table)
    for run_dir, choice in report.auto.items():
        console.print(f"--backend auto in {run_dir}: {choice['path']} — {choice['reason']}", soft_wrap=True,
                      highlight=False, markup=False)
    from segdeploy.bench import log_to_mlflow

    for note in log_to_mlflow(report):
        console.print(note, highlight=False)
    emit_json(report.to_dict(), json_out)
    if csv_out:
        write_csv(report, csv_out)
    if plot_out and report.measured:
        plot(report, plot_out)
        console.print(f"chart: {plot_out}")
    if not report.measured:
        raise typer.Exit(1)


MARKS = {"ok": "✅", "gate_failed": "⚠️", "unavailable": "❌"}


def render(report, width: int) -> list[Table]:  # noqa: ANN001
    """One row per backend × precision × batch, most-read columns first, folded into more tables
    when wider than `width`; reasons as numbered notes under the last table. A column no row has a
    value for (GPU MB on a CPU-only machine, tiled MP/s without --tiled) is left out; JSON and CSV
    keep every field."""

    def f(v: float | None, d: int = 1) -> str:
        return "-" if v is None else f"{v:.{d}f}"

    from segdeploy.cli.render import folded_tables, short_names

    models = sorted({r.model for r in report.rows})
    short = dict(zip(models, short_names(models), strict=True))
    notes: list[str] = []
    keys = []
    for r in report.rows:
        note = r.reason or (f"engine {r.engine_mb:.0f} MB, built in {r.build_s:.0f} s" if r.engine_mb else "")
        mark = MARKS[r.status]
        if note:
            if note not in notes:
                notes.append(note)
            mark += escape(f"[{notes.index(note) + 1}]")
        name = f"{r.backend} {r.precision}" if len(models) == 1 else f"{short[r.model]}: {r.backend} {r.precision}"
        keys.append(f"{mark} {name} · {r.batch or '-'}")
    rows = report.rows
    columns = [
        ("p50 ms", ["-" if r.p50_ms is None else f"{r.p50_ms:.1f}±{r.std_ms:.1f}" for r in rows]),
        ("img/s", [f(r.images_per_s) for r in rows]),
        ("mIoU", [f(r.miou, 4) for r in rows]),
        ("agree", ["-" if r.agreement is None else f"{r.agreement:.3%}" for r in rows]),
        ("p90/p99 ms", ["-" if r.p90_ms is None else f"{r.p90_ms:.1f}/{r.p99_ms:.1f}" for r in rows]),
        ("MP/s", [f(r.megapixels_per_s, 2) for r in rows]),
        ("TFLOP/s", [f(r.tflops, 3) for r in rows]),
        ("RSS MB", [f(r.peak_rss_mb, 0) for r in rows]),
        ("GPU MB", [f(r.peak_gpu_mb, 0) for r in rows]),
        ("tiled MP/s", [f(r.tiled_mp_per_s, 2) for r in rows]),
    ]
    mode = next((r.tta for r in rows if r.tta != "none"), None)
    if mode:
        columns.insert(6, (f"MP/s {mode}", [f(r.tta_mp_per_s, 2) for r in rows]))
    # a column no row has a value for (GPU MB without a GPU, tiled MP/s without --tiled) is left out
    columns = columns[:1] + [c for c in columns[1:] if any(v != "-" for v in c[1])]
    if any(r.rss_includes_torch and r.backend != "torch" for r in rows):
        notes.append("RSS MB is the bench process's peak during each row, and PyTorch was loaded in it (the accuracy "
                     "reference, a torch row or the FLOP count: about 650 MB on every later row); for one form's own "
                     "footprint run `segdeploy bench FILE.onnx --no-accuracy`, or see predict's summary")
    for model, classes in report.miou_classes.items():
        notes.append(f"mIoU/mDice of {short[model] if model in short else Path(model).name}: mean over the "
                     f"{len(classes)} classes present in its accuracy tiles ({', '.join(classes)}), the same for every "
                     f"row; tiles: {report.accuracy_tiles.get(model, 'the gate’s')}")
    caption = "\n".join([escape(f"[{i + 1}] {n}") for i, n in enumerate(notes)] + [
        f"{report.note}. ✅ works · ⚠️ works but fails the parity gate · ❌ unavailable or failed"])
    title = (f"segdeploy bench · {', '.join(short.values())} · {report.threads} CPU threads · "
             f"{report.machine.get('gpu') or 'no GPU'}")
    return folded_tables(title, keys, columns, width, key_header="backend · batch", caption=caption)
