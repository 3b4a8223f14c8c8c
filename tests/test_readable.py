"""What users read: overlay figures with titles and a legend, quick-look previews, tables that
fit an 80-column terminal without cutting the names that tell rows apart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from segdeploy.cli import app

PALETTE = [(255, 255, 0), (0, 160, 0), (0, 0, 255)]


def test_overlay_figure_has_panel_titles_and_a_class_legend() -> None:
    from segdeploy.viz import overlay_figure

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, (32, 40))
    pred = truth.copy()
    pred[:4] = (pred[:4] + 1) % 3
    truth[-2:] = 255  # ignored pixels
    image = rng.integers(0, 255, (32, 40, 3)).astype(np.uint8)
    fig = overlay_figure(image, truth, pred, ["field", "forest", "water"], PALETTE, 255.0, 255)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:3] == ["image", "ground truth", "prediction"] and titles[3].startswith("errors (")
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["field", "forest", "water", "wrong", "ignored"]
    colours = [tuple(round(v * 255) for v in h.get_facecolor()[:3]) for h in legend.legend_handles[:3]]
    assert colours == PALETTE


def _colours(png: Path) -> set[tuple[int, int, int]]:
    arr = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    return {tuple(int(v) for v in c) for c in np.unique(arr, axis=0)}


def test_predict_writes_a_preview_in_the_palette_unless_told_not_to(tiny_run: Path, synth_dir: Path,
                                                                     tmp_path: Path) -> None:
    runner = CliRunner()
    scene = synth_dir / "scene/scene.tif"
    result = runner.invoke(app, ["predict", str(tiny_run), str(scene), "--out", str(tmp_path / "p.tif"), "--tile", "64",
                                 "--overlap", "16", "--no-progress", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    preview = tmp_path / "p_preview.png"
    assert str(preview) in json.loads((tmp_path / "r.json").read_text())["results"][0]["files"]
    with Image.open(preview) as im:
        assert max(im.size) <= 1600  # a quick look, not the scene
    seen = _colours(preview)
    palette = json.loads((tiny_run / "meta.json").read_text())["model_meta"]["palette"]
    assert sum(tuple(c) in seen for c in palette) >= 3  # the class colours (legend + map)
    assert (40, 40, 40) in seen  # the scene's nodata corner, shown as no data
    result = runner.invoke(app, ["predict", str(tiny_run), str(scene), "--out", str(tmp_path / "q.tif"), "--tile", "64",
                                 "--overlap", "16", "--no-progress", "--no-preview"])
    assert result.exit_code == 0 and not (tmp_path / "q_preview.png").exists()


def test_data_synth_writes_a_preview_of_its_scene(synth_dir: Path) -> None:
    from segdeploy.data.synth import PALETTE as SYNTH_PALETTE

    preview = synth_dir / "scene/scene_labels_preview.png"
    seen = _colours(preview)
    assert all(tuple(c) in seen for c in SYNTH_PALETTE) and (40, 40, 40) in seen


def _lines(renderables: list, width: int) -> list[str]:
    from rich.console import Console

    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    for r in renderables:
        console.print(r)
    return console.export_text().splitlines()


def test_bench_and_comparison_tables_fit_80_columns_without_cutting_names() -> None:
    from segdeploy.bench import OK, UNAVAILABLE, BenchReport, BenchRow
    from segdeploy.cli.bench import render
    from segdeploy.cli.evaluate import comparison_tables
    from segdeploy.evaluate import EvalReport
    from segdeploy.metrics import metrics_from_matrix

    models = ["/data/experiments/deepglobe/runs/unet_resnet18", "/data/experiments/deepglobe/runs/fpn_resnet18"]
    rows = [BenchRow(m, b, p, batch, 512, OK, p50_ms=123.4, p90_ms=130.1, p99_ms=140.2, std_ms=3.3, images_per_s=8.1,
                     megapixels_per_s=2.12, tflops=0.123, peak_rss_mb=1234, miou=0.9612, agreement=0.99998)
            for m in models for b, p in (("torch", "fp32"), ("onnxruntime", "fp16")) for batch in (1, 8)]
    rows.append(BenchRow(models[0], "tensorrt", "fp16", 0, 512, UNAVAILABLE,
                         "TensorRT not installed (pip install 'segdeploy[trt]', NVIDIA GPU)"))
    report = BenchReport(rows=rows, threads=2, machine={}, miou_classes={models[0]: ["a", "b"]})
    lines = _lines(render(report, 80), 80)
    assert max(map(len, lines)) <= 80
    assert any("unet_resnet18: torch fp32 · 8" in line for line in lines)  # the row's name, whole
    assert any("fpn_resnet18: onnxruntime fp16 · 1" in line for line in lines)
    assert "…" not in "".join(lines)

    names = ["urban", "agriculture", "rangeland", "forest", "water", "barren", "unknown"]
    matrix = np.diag([50, 40, 30, 20, 10, 5, 1]) + 1
    reports = [EvalReport(f"/data/experiments/deepglobe/runs/{n}", "torch", "test", 8,
                          metrics_from_matrix(matrix, names), 0.0, Path(".")) for n in ("unet", "fpn", "pspnet")]
    lines = _lines(comparison_tables(reports, 80), 80)
    assert max(map(len, lines)) <= 80 and "…" not in "".join(lines)
    for name in ("unet", "fpn", "pspnet"):
        assert sum(line.split("│")[1].strip() == name for line in lines if line.count("│") > 2) >= 2  # each table
    for cls in names:
        assert any(cls in line for line in lines)


def test_bench_table_leaves_out_columns_no_row_has_a_value_for() -> None:
    """On a CPU-only machine without --tiled, the GPU MB and tiled MP/s columns were a table of dashes."""
    from dataclasses import replace

    from segdeploy.bench import OK, BenchReport, BenchRow
    from segdeploy.cli.bench import render

    row = BenchRow("runs/demo", "onnxruntime", "fp32", 1, 128, OK, p50_ms=68.6, p90_ms=92.2, p99_ms=98.7,
                   std_ms=13.2, images_per_s=13.6, megapixels_per_s=0.22, tflops=0.037, peak_rss_mb=226)
    text = "\n".join(_lines(render(BenchReport(rows=[row], threads=2, machine={}), 200), 200))
    assert "68.6±13.2" in text and "RSS MB" in text and "226" in text
    assert "GPU MB" not in text and "tiled MP/s" not in text and "mIoU" not in text
    measured = replace(row, peak_gpu_mb=512.0, tiled_mp_per_s=0.31, miou=0.9612)
    text = "\n".join(_lines(render(BenchReport(rows=[measured, row], threads=2, machine={}), 200), 200))
    assert all(h in text for h in ("GPU MB", "tiled MP/s", "mIoU")) and "0.31" in text and "0.9612" in text


def test_bench_says_when_its_rss_column_holds_pytorch_too(tiny_onnx: Path) -> None:
    """Every onnxruntime row of `bench RUN` showed ~1070 MB: PyTorch, loaded for the reference and the
    FLOP count, sits in the same process. The table says so (with the command that measures one form
    alone), and the --size refusal names the sizes that work."""
    from dataclasses import replace

    from segdeploy.bench import OK, BenchOptions, BenchReport, BenchRow, bench
    from segdeploy.cli.bench import render

    row = BenchRow("runs/demo", "onnxruntime", "fp32", 1, 128, OK, p50_ms=68.6, std_ms=1.0, peak_rss_mb=1070)
    plain = "\n".join(_lines(render(BenchReport(rows=[row], threads=2, machine={}), 200), 200))
    assert "PyTorch was loaded" not in plain
    loaded = "\n".join(_lines(render(BenchReport(rows=[replace(row, rss_includes_torch=True)], threads=2,
                                                  machine={}), 200), 200))
    assert "PyTorch was loaded" in " ".join(loaded.split()) and "--no-accuracy" in loaded
    from segdeploy.artifact import artifact_meta

    d = artifact_meta(tiny_onnx).input_divisor
    size = 2 * d + 1
    report = bench([tiny_onnx], BenchOptions(batches=(1,), size=size, accuracy=False, min_iters=1, min_seconds=0))
    reason = report.rows[0].reason
    assert f"--size {2 * d} or --size {3 * d}" in reason, reason


def test_short_names_keep_what_tells_items_apart() -> None:
    from segdeploy.cli.render import short_names

    assert short_names(["runs/demo"]) == ["demo"]
    assert short_names(["a/runs/unet", "b/runs/unet", "b/runs/fpn"]) == ["a/runs/unet", "b/runs/unet", "b/runs/fpn"]
    assert short_names(["x/export/model.onnx", "x/export/model.fp16.onnx"]) == ["model.onnx", "model.fp16.onnx"]


def test_figures_are_drawn_and_written_without_pyplot(tmp_path: Path) -> None:
    """Every figure is made by `viz.new_figure` and written by `viz.save_figure`: the PNG is
    complete, and neither pyplot (its global figure list) nor `matplotlib.use` (the process's
    backend) is touched, so a notebook's own matplotlib session is left as it was."""
    import subprocess
    import sys

    code = f"""
import sys, numpy as np, matplotlib
matplotlib.use = lambda *a, **k: sys.exit("matplotlib.use called")
from segdeploy.viz import overlay_figure, save_figure
from segdeploy.bench import BenchReport, BenchRow, plot
truth = np.zeros((8, 8), np.int64)
save_figure(overlay_figure(np.zeros((8, 8, 3), np.uint8), truth, truth, ["a", "b"], [(0, 0, 0), (9, 9, 9)], 255.0, 255),
            __import__("pathlib").Path({str(tmp_path / "overlay.png")!r}))
plot(BenchReport(rows=[BenchRow("m", "onnxruntime", "fp32", 1, 64, "ok", p50_ms=2.0, p90_ms=2.5)], threads=1),
     __import__("pathlib").Path({str(tmp_path / "bench.png")!r}))
print("matplotlib.pyplot" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
    for name in ("overlay.png", "bench.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.size[0] > 300
