"""`segdeploy data synth|inspect`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from segdeploy.cli.app import console, data_app, emit_json, guarded


@data_app.command("synth")
@guarded
def synth_cmd(
    out: Path = typer.Argument(..., help="Directory to create (train/val/test splits, dataset.yaml, scene/)."),
    tile: int = typer.Option(128, min=32, help="Size of each training image."),
    scene_size: int = typer.Option(2048, min=64, help="Width/height of the georeferenced scene (scene/scene.tif)."),
    train: int = typer.Option(160, min=1, help="Training images."),
    val: int = typer.Option(32, min=1, help="Validation images."),
    test: int = typer.Option(32, min=0, help="Test images."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier synth output in OUT (kept until the "
                                   "new one is complete); a folder with other files is never touched."),
    json_out: Path = typer.Option(None, "--json", help="Write a summary as JSON ('-' for stdout)."),
) -> None:
    """Write the deterministic synthetic land-cover dataset and a large GeoTIFF scene (no downloads)."""
    from segdeploy.data.synth import synth

    summary = synth(out, tile=tile, scene_size=scene_size, sizes={"train": train, "val": val, "test": test},
                    overwrite=overwrite)
    console.print(f"wrote {train}/{val}/{test} train/val/test images ({tile}×{tile}) to {out}, "
                  f"scene {summary['scene']} ({scene_size}×{scene_size}, EPSG:32633)")
    emit_json(summary, json_out)


@data_app.command("inspect")
@guarded
def inspect_cmd(
    data: Path = typer.Argument(..., help="A recipe YAML, or a directory with a dataset.yaml."),
    data_root: Path = typer.Option(None, "--data", help="Override the recipe's data.root."),
    json_out: Path = typer.Option(None, "--json", help="Write the report as JSON ('-' for stdout)."),
    plot_out: Path = typer.Option(None, "--plot", help="Class-distribution chart PNG (default: beside the --json report, "
                              "REPORT.png; none without either)."),
    strict: bool = typer.Option(True, help="Exit non-zero when problems are found."),
) -> None:
    """Check integrity (pairs, readability, sizes, mask values) and the class distribution."""
    from segdeploy.data.inspect import inspect, plot_distribution, recipe_for_data

    rec = recipe_for_data(data, data_root)
    report = inspect(rec)
    t = Table(title=f"class distribution · {report.root}", title_justify="left")
    t.add_column("class")
    for s in report.pixel_counts:
        t.add_column(f"{s} ({report.splits[s]})", justify="right")
    t.add_column("suggested weight", justify="right")
    for i, name in enumerate(report.classes):
        t.add_row(name, *[f"{report.fractions(s)[i]:.2%}" for s in report.pixel_counts],
                  f"{report.suggested_class_weights[i]:.3f}")
    t.caption = "image sizes: " + ", ".join(f"{k} ×{v}" for k, v in list(report.image_sizes.items())[:5])
    console.print(t)
    plot_path = plot_out or (json_out.with_suffix(".png") if json_out is not None and str(json_out) != "-" else None)
    if report.pixel_counts and plot_path is not None:
        plot_distribution(report, plot_path)
        console.print(f"chart: {plot_path}")
    elif report.pixel_counts:
        console.print("no chart written (the data folder is left as it is); add --plot FILE.png for one")
    if report.problems:
        console.print(f"[red]{len(report.problems)} problem(s):")
        for p in report.problems[:20]:
            console.print(f"  [{p['split']}] {p['problem']}", soft_wrap=True)
        if len(report.problems) > 20:
            console.print(f"  … and {len(report.problems) - 20} more (see --json)")
    else:
        console.print("[green]no integrity problems found")
    emit_json(report.to_dict(), json_out)
    if report.problems and strict:
        raise typer.Exit(1)
