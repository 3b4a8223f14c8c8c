"""`segdeploy predict`."""

from __future__ import annotations

from pathlib import Path

import typer

from segdeploy.cli.app import app, check_choice, console, emit_json, guarded, positive


BACKEND_HELP = ("For a run directory: auto (the fastest of its forms that passed the gate and is current, on this "
                "machine; said in one line), or force one: torch, onnx, fp16, int8, engine.")
PROVIDER_HELP = ("onnxruntime execution provider: cpu, cuda or tensorrt; refused when onnxruntime here lacks it "
                 "(never a silent fall-back to the CPU).")


@app.command("predict")
@guarded
def predict_cmd(
    model: Path = typer.Argument(..., help="Run directory, .onnx or .engine."),
    inputs: list[str] = typer.Argument(..., help="GeoTIFF / PNG / JPEG files, directories, globs, remote rasters "
                                       "(https://…, s3://…, gs://…, /vsicurl/…) or @manifest.txt (one per line)."),
    out_arg: str = typer.Option(..., "--out", help="Output file (one input: NAME.tif for a raster, NAME.png for a "
                                "picture) or directory (several inputs, or a name ending in /)."),
    tile: int = typer.Option(None, min=1, help="Tile size (default: the model's tile size)."),
    overlap: int = typer.Option(None, min=0, help="Overlap between tiles in pixels, ≤ tile/2 (default: tile/8, in "
                                "multiples of 8: 16 for a 128² tile, 64 for 512²)."),
    batch: int = typer.Option(None, min=1, help="Tiles per inference batch (default: 8 on a GPU, 2 on CPU, where larger "
                              "batches cost memory and gain no speed)."),
    blend: str = typer.Option("gaussian", help="Blend window: gaussian, hann, pyramid or crop."),
    probs: str = typer.Option(None, "--probs", metavar="[max|all]", help="Also OUT.probs.tif: max (also a bare "
                              "--probs): the winning probability, percent; all: a band per class, uint8 round(p*255)."),
    probs_dtype: str = typer.Option("uint8", help="Pixel type of --probs all: uint8 (round(p*255)) or float32 (p)."),
    tta: str = typer.Option("none", help="Test-time augmentation per tile, softmax averaged: none, flips (2×), d4 (8×)"),
    threshold: float = typer.Option(None, min=0.0, max=1.0, help="Two-class models: class 1 where p > T (default: 0.5)."),
    min_confidence: float = typer.Option(None, min=0.0, max=1.0, help="Nodata where the winning probability is < P."),
    cog: bool = typer.Option(False, "--cog", help="Write Cloud-Optimized GeoTIFFs: internal tiles and overviews "
                             "(mode resampling for classes, never averaged)."),
    preview: bool = typer.Option(True, "--preview/--no-preview", help="Write a quick-look PNG (≤ 1024 px, palette, "
                                 "legend, nodata in grey) beside each raster output."),
    resume: bool = typer.Option(False, "--resume", help="Continue interrupted predictions and skip finished ones."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace finished (or start over unfinished) outputs; "
                                   "without it an existing output is refused."),
    bands: str = typer.Option(None, "--bands", help="Input bands to use, 1-based, in the model's order: "
                              "3,2,1 for a BGR file, 1,2,3 for RGB out of RGBN (default: all bands, alpha left out, "
                              "R/G/B order from the file's colour interpretation)."),
    max_pixel_value: float = typer.Option(None, "--max-pixel-value", "--input-max", callback=positive,
                                          help="Full-scale value of the input's pixel type when it differs from the "
                                          "model's (e.g. 65535 for a uint16 raster and a uint8 model)."),
    vector: str = typer.Option(None, help="Also polygons per class: OUT.gpkg|.geojson|.fgb|.parquet (one input), or "
                               "a format (gpkg…) for a file beside each raster. Needs segdeploy[vector]."),
    vector_layers: str = typer.Option("single", help="single, or per-class: a layer per class (GeoPackage)."),
    min_area: str = typer.Option(None, help="Leave out polygons under this many map units² (250) or pixels (40px)."),
    simplify: float = typer.Option(None, min=0.0, help="Simplify polygons, tolerance in map units, neighbours edge to edge."),
    classes: str = typer.Option(None, help="Classes to polygonise, names or 0-based ids (water,urban; default: all)."),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    provider: str = typer.Option(None, "--provider", help=PROVIDER_HELP),
    device: str = typer.Option("auto", help="torch backend device: auto, cpu or cuda."),
    threads: int = typer.Option(None, min=1, help="CPU threads for the backend (per worker with --ray)."),
    ray: bool = typer.Option(False, "--ray", help="Predict the rasters on a Ray cluster: a local one on 127.0.0.1 "
                             "started on demand, or the one at --ray-address / $RAY_ADDRESS (pip install "
                             "'segdeploy[ray]')."),
    ray_address: str = typer.Option(None, "--ray-address", help="Join this Ray cluster (HOST:PORT or "
                                    "ray://HOST:PORT) instead of starting a local one; implies --ray."),
    workers: int = typer.Option(None, "--workers", min=1, help="Ray workers, one backend each (default: one per CPU, "
                                "or per GPU)."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
    json_out: Path = typer.Option(None, "--json", help="Write the summary as JSON ('-' for stdout)."),
) -> None:
    """Tiled inference on scenes of any size with bounded memory, georeference kept; many rasters in turn or on a Ray
    cluster (--ray). A two-class run's threshold from `eval --thresholds` is applied (--threshold overrides it)."""
    from segdeploy.errors import UserError
    from segdeploy.predict import PredictOptions
    from segdeploy.raster import expand_inputs
    files = expand_inputs(inputs)
    band_list = _checked(blend, device, bands)
    choice, options = _model(model, backend, provider, device, threads)
    outputs, applied = _probs_and_decision(model, probs, probs_dtype, tta, threshold, min_confidence)
    out = Path(out_arg)
    many = len(files) > 1 or out.is_dir() or out_arg.endswith(("/", "\\"))
    vector_opts = _vector_options(model, vector, vector_layers, min_area, simplify, classes, many)
    opts = PredictOptions(tile=tile, overlap=overlap, batch=batch, blend=blend, resume=resume, overwrite=overwrite,
                          bands=band_list, max_pixel_value=max_pixel_value, preview=preview, cog=cog, vector=vector_opts,
                          **outputs)
    _check_head(choice.path, opts)
    jobs, finished = _plan(files, out, many, resume, overwrite, vector_opts, opts.probs or opts.class_probs)
    summary = _run_or_say(choice.path, options, jobs, opts, ray or ray_address is not None, ray_address, workers,
                          progress, len(files))
    _report(choice, summary | {"decision": applied, "skipped": [str(j.src) for j in finished]}, json_out)
    if failures := summary["failures"]:
        raise UserError(f"{len(failures)} of {len(jobs)} rasters failed: "
                        f"{', '.join(f['input'] for f in failures[:5])}{' …' if len(failures) > 5 else ''}"
                        " (reasons above); the others are written, and --resume skips them")


def _report(choice, summary: dict, json_out: Path | None) -> None:  # noqa: ANN001 - a runtime.choose.Choice
    """After the work (so that a refusal stays one line): the model-choice line (none when nothing ran),
    then the JSON summary."""
    if summary["results"] or summary["failures"]:
        say_choice(choice)
    emit_json(summary | {"model": choice.to_dict()}, json_out)


def say_choice(choice) -> None:  # noqa: ANN001 - a runtime.choose.Choice
    """The one line saying which of a run's forms ran and why (nothing for a file given as it is)."""
    if choice.basis != "file":
        console.print(choice.line(), soft_wrap=True, highlight=False, markup=False)


def _model(model: Path, backend: str, provider: str | None, device: str, threads: int | None) -> tuple:
    """(what runs: a `runtime.choose.Choice`, the options to load it with)."""
    from segdeploy.runtime import backend_for
    from segdeploy.runtime.choose import resolve

    choice = resolve(model, backend, provider, device)
    options: dict = ({"threads": threads} if threads else {}) | choice.options
    if backend_for(choice.path) == "torch":
        options.setdefault("device", device)
    return choice, options


def _check_head(model: Path, opts) -> None:  # noqa: ANN001 - PredictOptions
    """An argmax head with options it cannot serve is refused before any raster (predict.check_head)."""
    from segdeploy.artifact import form_of
    from segdeploy.predict import check_head

    form = form_of(Path(model)) if Path(model).is_file() else None
    check_head(form.output if form is not None else "logits", Path(model).name, opts)


def _run_or_say(model: Path, options: dict, jobs: list, opts, use_ray: bool, address: str | None,  # noqa: ANN001
                workers: int | None, progress: bool, inputs: int) -> dict:
    """`_run`, or with every output finished (--resume) a line saying so: no model loaded, no empty
    progress bar. A Ctrl-C says what was kept and the command that continues."""
    if not jobs:
        console.print(f"nothing to predict: {inputs} of {inputs} outputs already finished (skipped)")
        return {"backend": "", "ray": None, "seconds": 0.0, "megapixels_per_s": 0.0, "results": [], "failures": []}
    try:
        return _run(model, options, jobs, opts, use_ray, address, workers, progress)
    except KeyboardInterrupt:
        from segdeploy.errors import Interrupted

        raise Interrupted("the rows already on disk are kept (hidden .partial files beside each output); continue "
                          "with the same command plus --resume (and without --overwrite)") from None


def _probs_and_decision(model: Path, probs: str | None, dtype: str, tta: str, threshold: float | None,
                        min_confidence: float | None) -> tuple[dict, dict]:
    """--probs, --probs-dtype, --tta, --threshold and --min-confidence checked before any work (the
    threshold recorded in the run applied, and said): PredictOptions fields, and what the JSON
    summary records as applied."""
    from segdeploy.decision import PROBS_DTYPES, resolve
    from segdeploy.errors import UserError
    from segdeploy.tiling import TTA_MODES

    check_choice("--probs", probs or "max", ("max", "all"))
    check_choice("--probs-dtype", dtype, PROBS_DTYPES)
    check_choice("--tta", tta, tuple(TTA_MODES))
    if dtype != "uint8" and probs != "all":
        raise UserError("--probs-dtype is the pixel type of --probs all; add --probs all")
    decision, note = resolve(model, threshold, min_confidence)
    if note:
        console.print(f"decision: {note}", soft_wrap=True)
    fields = {"probs": probs == "max", "class_probs": probs == "all", "probs_dtype": dtype, "tta": tta,
              "decision": decision}
    return fields, {**decision.to_dict(), "source": note, "tta": tta}


def _checked(blend: str, device: str, bands: str | None) -> list[int] | None:
    """Word options checked before any work; the --bands list."""
    from segdeploy.errors import UserError
    from segdeploy.tiling import BLENDS

    check_choice("--blend", blend, BLENDS)
    check_choice("--device", device, ("auto", "cpu", "cuda"))
    try:
        return [int(b) for b in bands.split(",")] if bands else None
    except ValueError:
        raise UserError(f"--bands {bands!r} must be 1-based band numbers separated by commas, e.g. 3,2,1") from None


def _plan(files: list, out: Path, many: bool, resume: bool, overwrite: bool,  # noqa: ANN001
          vector_opts, probs: bool = False) -> tuple[list, list]:
    """The jobs to run and those already finished (named); an unwritable output (raster or vector)
    fails before any progress is drawn."""
    from segdeploy.jobs import plan_jobs
    from segdeploy.utils import writable_location

    jobs, finished = plan_jobs(files, out, many, resume, overwrite, vector_opts, probs)
    for job in jobs:
        writable_location(job.out)
        if vector_opts is not None:
            writable_location(vector_opts.path_for(job.out))
    for job in finished:
        console.print(f"{job.src}: already predicted ({job.out}), skipped", soft_wrap=True)
    return jobs, finished


def _vector_options(model: Path, target: str | None, layers: str, min_area: str | None, simplify: float | None,
                    classes: str | None, many: bool):  # noqa: ANN202 - a VectorOptions or None
    """--vector and its companions, checked before any raster is predicted."""
    from segdeploy.errors import UserError

    if target is None:
        given = [flag for flag, v in (("--vector-layers", layers != "single"), ("--min-area", min_area),
                                      ("--simplify", simplify is not None), ("--classes", classes)) if v]
        if given:
            raise UserError(f"{given[0]} shapes the polygons of --vector; add --vector OUT.gpkg (or a format: gpkg)")
        return None
    from segdeploy.vector import VectorOptions, model_classes

    opts = VectorOptions(target, layers, min_area, simplify,
                         [c.strip() for c in classes.split(",") if c.strip()] if classes else None)
    opts.check(many)
    names = model_classes(model)
    if names is not None:
        opts.class_ids(names)
    return opts


def _run(model: Path, options: dict, jobs: list, opts, use_ray: bool, address: str | None,  # noqa: ANN001
         workers: int | None, progress: bool) -> dict:
    """Run the jobs serially or on Ray under one progress bar; print each outcome; the summary."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    from segdeploy.cluster import run_jobs
    from segdeploy.jobs import Tally
    from segdeploy.progress import Ticker, format_seconds
    from segdeploy.utils import live_progress

    tally = Tally(len(jobs))
    ticker = Ticker(console, enabled=progress)  # plain lines when stderr is a log, not a terminal
    columns = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[done]}/{task.total:.0f} rasters"), TextColumn("{task.fields[mps]:.2f} MP/s"),
               TextColumn("{task.fields[failed]}"), TextColumn("ETA"), TimeRemainingColumn()]
    outcomes, info = [], {}
    with live_progress(Progress(*columns, console=console, disable=not progress)) as bar:
        task = bar.add_task("predict", total=max(len(jobs), 1), done=0, mps=0.0, failed="")

        def redraw() -> None:
            bar.update(task, completed=tally.completed, done=tally.done, mps=tally.megapixels_per_s,
                       failed=f"{tally.failed} failed" if tally.failed else "")
            ticker.tick(lambda: f"predict: {tally.completed:.2f}/{len(jobs)} rasters ({tally.completed / len(jobs):.0%}), "
                                f"{tally.megapixels_per_s:.2f} MP/s, {format_seconds(tally.seconds)} elapsed, "
                                f"{ticker.eta(tally.completed, len(jobs))}")

        def on_tiles(index: int, done: int, total: int, pixels: int) -> None:
            tally.tiles(index, done, total, pixels)
            redraw()

        for outcome in run_jobs(model, options, jobs, opts, use_ray, address, workers, on_tiles, info):
            tally.finish(outcome)
            redraw()
            _print_outcome(outcome)
            outcomes.append(outcome)
    mp = tally.pixels_done / 1e6
    console.print(f"{tally.done - tally.failed} of {len(jobs)} rasters predicted, {mp:.1f} MP in {tally.seconds:.1f}s "
                  f"= {tally.megapixels_per_s:.2f} MP/s{_where(info.get('ray'))}"
                  f"{f', {tally.failed} failed' if tally.failed else ''}", soft_wrap=True)
    return {"backend": info.get("backend", ""), "ray": info.get("ray"), "seconds": round(tally.seconds, 3),
            "megapixels_per_s": round(tally.megapixels_per_s, 3),
            "results": [o.to_dict() for o in outcomes if o.result is not None],
            "failures": [o.to_dict() for o in outcomes if o.error]}


def _where(ray: dict | None) -> str:
    if not ray:
        return ""
    return (f" on Ray ({ray['address']}: {plural(ray['workers'], 'worker')} × {plural(ray['threads_per_worker'], 'thread')}"
            f", {ray['cluster_cpus']:g} CPUs in the cluster)")


def plural(n: int, word: str) -> str:
    """'1 raster', '2 rasters': `n` and `word`, with an s unless n is 1."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def _print_outcome(outcome) -> None:  # noqa: ANN001
    if outcome.error:
        console.print(f"[red]error:[/] {outcome.error}", soft_wrap=True)
        return
    r = outcome.result
    for w in outcome.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    resumed = ""
    if r.resumed_from_row:
        resumed = (f"; resumed at row {r.resumed_from_row} of {r.height} ({r.resumed_from_row / r.height:.0%} was on "
                   f"disk; {r.tiles_total - r.tiles} of the scene's {r.tiles_total} tiles were not run again, and the "
                   "counts and speed are this run's)")
    console.print(f"{r.input} → {', '.join(r.files)}: {r.width}×{r.height} px, {r.tiles} tiles "
                  f"({r.skipped_tiles} all-nodata skipped) in {r.seconds:.1f}s = {r.megapixels_per_s:.2f} MP/s, "
                  f"peak RSS {r.peak_rss_mb:.0f} MB during it{resumed}", soft_wrap=True)
    if r.decision.get("min_confidence"):
        console.print(f"  withheld (winning probability < {r.decision['min_confidence']:g}, written as nodata): "
                      f"{r.withheld_pixels} px = {r.withheld_share:.2%} of the valid pixels")
    for note in r.notes:
        console.print(f"  {note}")
