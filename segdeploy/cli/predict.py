"""`segdeploy predict`."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import typer

from segdeploy.cli.app import app, console, emit_json, guarded


@app.command("predict")
@guarded
def predict_cmd(
    model: Path = typer.Argument(..., help="Run directory, .onnx or .engine."),
    inputs: list[str] = typer.Argument(..., help="GeoTIFF / PNG / JPEG files, directories, globs, remote rasters "
                                       "(https://…, s3://…, gs://…, /vsicurl/…) or @manifest.txt (one per line)."),
    out: Path = typer.Option(..., "--out", help="Output file (one input) or directory (several)."),
    tile: int = typer.Option(None, help="Tile size (default: the model's tile size)."),
    overlap: int = typer.Option(None, help="Overlap between tiles in pixels, ≤ tile/2 (default: tile/8, in "
                                "multiples of 8: 16 for a 128² tile, 64 for 512²)."),
    batch: int = typer.Option(None, help="Tiles per inference batch (default: 8 on a GPU, 2 on CPU, where larger "
                              "batches cost memory and gain no speed)."),
    blend: str = typer.Option("gaussian", help="Blend window: gaussian, hann, pyramid or crop."),
    probs: bool = typer.Option(False, "--probs", help="Also write a confidence raster (max softmax, percent)."),
    cog: bool = typer.Option(False, "--cog", help="Write Cloud-Optimized GeoTIFFs: internal tiles and overviews "
                             "(mode resampling for classes, never averaged)."),
    preview: bool = typer.Option(True, "--preview/--no-preview", help="Write a quick-look PNG (≤ 1024 px, palette, "
                                 "legend, nodata in grey) beside each raster output."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted prediction."),
    bands: str = typer.Option(None, "--bands", help="Input bands to use, 1-based, in the model's order: "
                              "3,2,1 for a BGR file, 1,2,3 for RGB out of RGBN (default: all bands, alpha left out, "
                              "R/G/B order from the file's colour interpretation)."),
    input_max: float = typer.Option(None, "--input-max", help="Full-scale value of the input's pixel type when it "
                                    "differs from the model's (e.g. 65535 for a uint16 raster and a uint8 model)."),
    device: str = typer.Option("auto", help="torch backend device: auto, cpu or cuda."),
    threads: int = typer.Option(None, help="CPU threads for the backend."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
    json_out: Path = typer.Option(None, "--json", help="Write the summary as JSON ('-' for stdout)."),
) -> None:
    """Tiled inference on scenes of any size with bounded memory; georeference kept."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from segdeploy.predict import PredictOptions, expand_inputs, input_stem, output_for, predict_file
    from segdeploy.runtime import backend_for, load_backend
    from segdeploy.utils import pick_device

    from segdeploy.errors import UserError
    from segdeploy.utils import live_progress, writable_location

    if threads:
        torch.set_num_threads(threads)
    files = expand_inputs(inputs)
    try:
        band_list = [int(b) for b in bands.split(",")] if bands else None
    except ValueError:
        raise UserError(f"--bands {bands!r} must be 1-based band numbers separated by commas, e.g. 3,2,1") from None
    options: dict = {"threads": threads} if threads else {}
    if backend_for(model) == "torch":
        options = {"device": pick_device(device)}
    backend = load_backend(model, **options)
    batch = batch or (8 if backend.device.startswith("cuda") else 2)
    opts = PredictOptions(tile=tile, overlap=overlap, batch=batch, blend=blend, probs=probs, resume=resume,
                          bands=band_list, input_max=input_max, preview=preview, cog=cog)
    many = len(files) > 1 or out.is_dir()
    for src in files:  # an unwritable output fails before any progress is drawn
        writable_location(output_for(src, out, many))
    results = []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tiles"),
               TextColumn("{task.fields[mps]:.2f} MP/s"), TextColumn("ETA"), TimeRemainingColumn()]
    with live_progress(Progress(*columns, console=console, disable=not progress)) as bar:
        for src in files:
            task = bar.add_task(input_stem(src), total=None, mps=0.0)
            pixels, t0 = _dimensions(src), time.perf_counter()

            def on_tile(done: int, total: int, task=task, pixels=pixels, t0=t0) -> None:  # noqa: ANN001
                rate = pixels * done / max(total, 1) / 1e6 / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, completed=done, total=total, mps=rate)

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                results.append(predict_file(backend, src, output_for(src, out, many), opts, progress=on_tile))
            for w in caught:
                if "georeference" in str(w.message):
                    console.print(f"[yellow]warning:[/] {w.message}")
    for r in results:
        console.print(f"{r.input} → {', '.join(r.files)}: {r.width}×{r.height} px, {r.tiles} tiles "
                      f"({r.skipped_tiles} all-nodata skipped) in {r.seconds:.1f}s = {r.megapixels_per_s:.2f} MP/s, "
                      f"peak RSS {r.peak_rss_mb:.0f} MB")
        for note in r.notes:
            console.print(f"  {note}")
    emit_json({"backend": backend.describe(), "results": [r.to_dict() for r in results]}, json_out)


def _dimensions(path: Path | str) -> float:
    """Pixels in the image (for the MP/s column); 0 when unknown."""
    from segdeploy.predict import PICTURE, is_remote, remote_settings

    try:
        if not is_remote(path) and Path(path).suffix.lower() in PICTURE:
            from PIL import Image

            with Image.open(path) as im:
                return float(im.width * im.height)
        import rasterio

        with rasterio.Env(**remote_settings()), rasterio.open(path) as src:
            return float(src.width * src.height)
    except Exception:  # noqa: BLE001
        return 0.0
