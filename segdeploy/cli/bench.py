"""`segdeploy bench`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from segdeploy.cli.app import app, console, emit_json, guarded


def _split(value: str, kind: type = str) -> tuple:
    return tuple(kind(v.strip()) for v in value.split(",") if v.strip())


@app.command("bench")
@guarded
def bench_cmd(
    models: list[Path] = typer.Argument(..., help="Run directories and/or exported artifacts (.onnx, .engine)."),
    backend: str = typer.Option("torch,onnxruntime,tensorrt", help="Backends to measure (comma-separated)."),
    precision: str = typer.Option("fp32,fp16", help="Precisions to measure (comma-separated)."),
    batch: str = typer.Option("1,8", help="Batch sizes (comma-separated)."),
    size: int = typer.Option(512, help="Square input size in pixels."),
    data: Path = typer.Option(None, "--data", help="Dataset for the accuracy columns (default: the run's data)."),
    tiled: Path = typer.Option(None, "--tiled", help="Also time `predict` end to end on this image."),
    threads: int = typer.Option(None, help="CPU threads for every CPU backend (default: torch's)."),
    iters: int = typer.Option(20, help="Minimum timed iterations per row."),
    seconds: float = typer.Option(2.0, help="Minimum timed seconds per row."),
    accuracy: bool = typer.Option(True, help="Compute the accuracy columns."),
    json_out: Path = typer.Option(None, "--json", help="Write every row as JSON ('-' for stdout)."),
    csv_out: Path = typer.Option(None, "--csv", help="Write every row as CSV."),
    plot_out: Path = typer.Option(None, "--plot", help="PNG chart: latency vs batch per backend."),
) -> None:
    """Latency (p50/p90/p99), throughput, memory and accuracy per backend and precision, in one table."""
    from segdeploy.bench import BACKENDS, PRECISIONS, BenchOptions, bench, plot, write_csv
    from segdeploy.errors import UserError

    backends, precisions = _split(backend), _split(precision)
    for name in backends:
        if name not in BACKENDS:
            raise UserError(f"--backend {name!r} is unknown; choose from {', '.join(BACKENDS)}")
    for name in precisions:
        if name not in PRECISIONS:
            raise UserError(f"--precision {name!r} is unknown; choose from {', '.join(PRECISIONS)}")
    try:
        batches = _split(batch, int)
    except ValueError:
        raise UserError(f"--batch {batch!r} must be comma-separated integers, e.g. 1,8") from None
    if not batches or min(batches) < 1 or size < 16:
        raise UserError("--batch values must be ≥ 1 and --size ≥ 16")
    opts = BenchOptions(backends=backends, precisions=precisions, batches=batches, size=size, threads=threads,
                        data=data, tiled=tiled, min_iters=iters, min_seconds=seconds, accuracy=accuracy)
    report = bench(models, opts, log=lambda m: console.print(m, markup=False, highlight=False))
    wide = console if console.is_terminal else Console(stderr=True, width=160, highlight=False)
    wide.print(render(report))
    emit_json(report.to_dict(), json_out)
    if csv_out:
        write_csv(report, csv_out)
    if plot_out and report.measured:
        plot(report, plot_out)
        console.print(f"chart: {plot_out}")
    if not report.measured:
        raise typer.Exit(1)


def render(report) -> Table:  # noqa: ANN001
    """One row per backend × precision × batch; reasons as numbered notes under the table."""

    def f(v: float | None, d: int = 1) -> str:
        return "-" if v is None else f"{v:.{d}f}"

    models = {r.model for r in report.rows}
    t = Table(title=f"segdeploy bench · {', '.join(Path(m).name for m in models)} · {report.threads} CPU threads · "
                    f"{report.machine.get('gpu') or 'no GPU'}", title_justify="left")
    for col in ("", "backend", "batch", "p50 ms ±std", "p90 / p99 ms", "img/s", "MP/s", "TFLOP/s", "RSS MB",
                "GPU MB", "mIoU", "agree", "tiled MP/s"):
        t.add_column(col, justify="left" if col in ("", "backend") else "right", no_wrap=True)
    notes: list[str] = []
    for r in report.rows:
        mark = r.status
        note = r.reason or (f"engine {r.engine_mb:.0f} MB, built in {r.build_s:.0f} s" if r.engine_mb else "")
        if note:
            if note not in notes:
                notes.append(note)
            mark += escape(f" [{notes.index(note) + 1}]")
        name = f"{r.backend} {r.precision}" if len(models) == 1 else f"{Path(r.model).name}: {r.backend} {r.precision}"
        t.add_row(mark, name, str(r.batch or "-"),
                  "-" if r.p50_ms is None else f"{r.p50_ms:.1f} ±{r.std_ms:.1f}",
                  "-" if r.p90_ms is None else f"{r.p90_ms:.1f} / {r.p99_ms:.1f}",
                  f(r.images_per_s), f(r.megapixels_per_s, 2), f(r.tflops, 3), f(r.peak_rss_mb, 0),
                  f(r.peak_gpu_mb, 0), f(r.miou, 4), "-" if r.agreement is None else f"{r.agreement:.3%}",
                  f(r.tiled_mp_per_s, 2))
    for model, classes in report.miou_classes.items():
        notes.append(f"mIoU/mDice of {Path(model).name}: mean over the {len(classes)} classes present in the "
                     f"validation tiles ({', '.join(classes)}), the same for every row")
    t.caption = "\n".join([escape(f"[{i + 1}] {n}") for i, n in enumerate(notes)] + [
        f"{report.note}. ✅ works · ⚠️ works but fails the parity gate · ❌ unavailable or failed"])
    t.caption_justify = "left"
    return t
