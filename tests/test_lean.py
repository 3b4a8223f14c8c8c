"""The deployment path is lean: `segdeploy predict`, `eval` and `bench` on an .onnx model import
neither torch, timm nor smp (they run with them made unimportable, as in a core install without
segdeploy[train]), and a verb that needs the PyTorch stack says which extra to install in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import rasterio

from tests.conftest import RECIPES

HEAVY = ("torch", "torchvision", "timm", "segmentation_models_pytorch")
VECTOR = ("pyogrio", "shapely")  # segdeploy[vector]: only `predict --vector` needs them
# run the CLI with the training stack unimportable, then report what was imported and the peak RSS
PROBE = """
import json, sys
for name in {heavy!r}:
    sys.modules[name] = None  # `import torch` now raises ModuleNotFoundError, as when it is not installed
def report():
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r} and sys.modules[m] is not None)
    with open({report!r}, "w") as f:
        json.dump(loaded, f)
import atexit
atexit.register(report)
from segdeploy.cli import main
sys.argv = ["segdeploy", *{args!r}]
main()
"""


def run_without_torch(tmp_path: Path, *args: str, blocked: tuple[str, ...] = HEAVY) -> tuple[subprocess.CompletedProcess,
                                                                                             list[str]]:
    report = tmp_path / "imported.json"
    code = PROBE.format(heavy=blocked, report=str(report), args=list(args))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    return proc, json.loads(report.read_text()) if report.exists() else ["<no report>"]


def test_predict_on_onnx_runs_without_torch_timm_or_smp(tiny_onnx: Path, synth_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred.tif"
    proc, loaded = run_without_torch(tmp_path, "predict", str(tiny_onnx), str(synth_dir / "scene/scene.tif"),
                                     "--out", str(out), "--no-progress", "--json", str(tmp_path / "s.json"),
                                     blocked=HEAVY + VECTOR)
    assert proc.returncode == 0, proc.stderr
    assert loaded == []  # nor pyogrio or shapely: polygons are an extra
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["backend"].startswith("onnxruntime fp32") and len(summary["results"]) == 1
    with rasterio.open(synth_dir / "scene/scene.tif") as src, rasterio.open(out) as pred:
        assert (pred.width, pred.height, pred.crs, pred.transform) == (src.width, src.height, src.crs, src.transform)
        labels = pred.read(1)
    classes = set(np.unique(labels).tolist())
    assert classes <= {0, 1, 2, 3, 4, 255} and len(classes - {255}) >= 2  # 255: the scene's nodata
    proc, _ = run_without_torch(tmp_path, "predict", str(tiny_onnx), str(synth_dir / "scene/scene.tif"), "--out",
                                str(tmp_path / "v.tif"), "--vector", "gpkg", blocked=HEAVY + VECTOR)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --vector needs pyogrio and shapely (pyogrio is not installed): pip install 'segdeploy[vector]'"]


def test_eval_and_bench_on_onnx_run_without_torch(tiny_onnx: Path, tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    proc, loaded = run_without_torch(tmp_path, "eval", str(tiny_onnx), "--split", "test", "--json",
                                     str(tmp_path / "eval.json"))
    assert proc.returncode == 0 and loaded == [], proc.stderr
    from segdeploy.evaluate import evaluate

    reference = evaluate(tiny_run, "test", plots=False, out_dir=tmp_path / "ref").metrics  # PyTorch on the same weights
    assert json.loads((tmp_path / "eval.json").read_text())["miou"] == __import__("pytest").approx(reference.miou,
                                                                                                  abs=2e-3)
    lone = tmp_path / "deployed" / "model.onnx"  # an ONNX file shipped without its run
    lone.parent.mkdir()
    shutil.copy(tiny_onnx, lone)
    proc, loaded = run_without_torch(tmp_path, "bench", str(lone), "--batch", "1", "--size", "64", "--json",
                                     str(tmp_path / "bench.json"))
    assert proc.returncode == 0 and loaded == [], proc.stderr
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["backend"], r["status"]) for r in rows] == [("onnxruntime", "ok")] and rows[0]["p50_ms"] > 0


def test_a_verb_that_needs_the_training_stack_names_the_extra(synth_dir: Path, tmp_path: Path) -> None:
    proc, _ = run_without_torch(tmp_path, "train", str(RECIPES / "demo.yaml"), "--data", str(synth_dir),
                                "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'segdeploy[train]'" in lines[0] and "torch" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_onnx_metadata_is_read_without_the_graph_and_equals_onnx_own_parse(tiny_onnx: Path, tmp_path: Path) -> None:
    import onnx
    import pytest

    from segdeploy.artifact import read_onnx_meta
    from segdeploy.onnx_props import metadata_props
    from segdeploy.errors import ArtifactError

    props = metadata_props(tiny_onnx)
    assert props == {p.key: p.value for p in onnx.load(str(tiny_onnx)).metadata_props} and "segdeploy" in props
    assert read_onnx_meta(tiny_onnx).num_classes == 5
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(tiny_onnx.read_bytes()[: tiny_onnx.stat().st_size // 2])  # a truncated download
    with pytest.raises(ArtifactError, match="cut.onnx is not a readable ONNX file"):
        read_onnx_meta(cut)


def test_a_foreign_onnx_is_imported_and_predicted_without_torch(tiny_onnx: Path, tiny_run: Path, synth_dir: Path,
                                                                tmp_path: Path) -> None:
    """`segdeploy import model.onnx` and predict/eval on the run it makes need only the core install."""
    import onnx

    foreign = onnx.load(str(tiny_onnx))
    del foreign.metadata_props[:]  # an ONNX file exported elsewhere: no segdeploy metadata
    onnx.save(foreign, str(tmp_path / "theirs.onnx"))
    run = tmp_path / "run"
    proc, loaded = run_without_torch(tmp_path, "import", str(tmp_path / "theirs.onnx"), "--recipe",
                                     str(tiny_run / "recipe.yaml"), "--out", str(run), "--json", str(tmp_path / "i.json"))
    assert proc.returncode == 0 and loaded == [], proc.stderr
    report = json.loads((tmp_path / "i.json").read_text())
    assert report["model_format"] == "onnx" and report["eval"]["images"] == 8  # the tiny run's recipe brings its data
    assert report["check"]["status"] in ("ok", "warning") and report["check"]["kappa"] is not None
    proc, loaded = run_without_torch(tmp_path, "predict", str(run), str(synth_dir / "scene/scene.tif"), "--out",
                                     str(tmp_path / "ours.tif"), "--no-progress", "--no-preview")
    assert proc.returncode == 0 and loaded == [], proc.stderr
    proc, _ = run_without_torch(tmp_path, "predict", str(tiny_onnx), str(synth_dir / "scene/scene.tif"), "--out",
                                str(tmp_path / "direct.tif"), "--no-progress", "--no-preview")
    with rasterio.open(tmp_path / "ours.tif") as a, rasterio.open(tmp_path / "direct.tif") as b:
        assert (a.read(1) == b.read(1)).mean() >= 0.9999  # the same model, imported: the same map
