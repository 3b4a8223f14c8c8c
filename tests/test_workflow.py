"""The workflow between the verbs (issue 19): reproducible runs, --resume that continues the run
that exists, nothing silently replaced or defaulted, numbers that mean what they say, help and
progress that a user can read, pictures with legends, `info` and `--version`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from typer.testing import CliRunner

from segdeploy.cli import app
from tests.conftest import RECIPES

runner = CliRunner()


def run(*args: object, env: dict[str, str] | None = None):  # noqa: ANN201
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200", **(env or {})})


def one_line_error(result) -> str:  # noqa: ANN001
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def write_tif(path: Path, size: int = 64, seed: int = 0) -> Path:
    from rasterio.transform import from_origin

    img = np.random.default_rng(seed).integers(1, 255, (3, size, size), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(300_000, 4_000_000, 1, 1)) as dst:
        dst.write(img)
    return path


# ------------------------------------------------------------------------------ 6. help, -h, completion, version


def test_help_shows_texts_as_written_with_click_type_names_and_h_and_completion() -> None:
    predict = run("predict", "--help").output
    assert "segdeploy[ray]" in predict  # rich markup used to eat "[ray]"
    for raw in ("<bool>", "<list[str]>", "<path>", "<int>", "<str>", "{model}"):
        assert raw not in predict, raw
    assert "INTEGER" in predict and "PATH" in predict and "MODEL INPUTS..." in predict
    assert run("predict", "-h").output == predict
    root = run("-h")
    assert root.exit_code == 0 and "--install-completion" in root.output and "--show-completion" in root.output
    assert run("data", "synth", "-h").exit_code == 0


def test_version_names_the_runtimes_and_devices() -> None:
    out = run("--version").output
    assert out.startswith("segdeploy ")
    import onnxruntime
    import torch

    assert f"torch        {torch.__version__}" in out and "devices: cpu" in out
    assert f"onnxruntime  {onnxruntime.__version__}" in out and "CPUExecutionProvider" in out
    assert "tensorrt" in out


def test_version_without_torch_says_so_and_does_not_import_it(tmp_path: Path) -> None:
    from tests.test_lean import run_without_torch

    proc, loaded = run_without_torch(tmp_path, "--version")
    assert proc.returncode == 0, proc.stderr
    assert "torch        not installed (pip install 'segdeploy[train]'" in proc.stdout
    assert loaded == []


# ------------------------------------------------------------------------------ 4. every number range-checked


@pytest.mark.parametrize(("args", "option"), [
    (["predict", "m.onnx", "x.tif", "--out", "o.tif", "--tile", "0"], "--tile"),
    (["predict", "m.onnx", "x.tif", "--out", "o.tif", "--tile", "-32"], "--tile"),
    (["predict", "m.onnx", "x.tif", "--out", "o.tif", "--batch", "0"], "--batch"),
    (["predict", "m.onnx", "x.tif", "--out", "o.tif", "--batch", "-1"], "--batch"),
    (["predict", "m.onnx", "x.tif", "--out", "o.tif", "--overlap", "-8"], "--overlap"),
    (["predict", "m.onnx", "x.tif", "--out", "o.tif", "--threads", "0"], "--threads"),
    (["predict", "m.onnx", "x.tif", "--out", "o.tif", "--workers", "0"], "--workers"),
    (["predict", "m.onnx", "x.tif", "--out", "o.tif", "--input-max", "0"], "--input-max"),
    (["predict", "m.onnx", "x.tif", "--out", "o.tif", "--blend", "gauss"], "--blend"),
    (["export", "run", "--opset", "16"], "--opset"),
    (["export", "run", "--calib-images", "0"], "--calib-images"),
    (["export", "run", "--workspace", "0"], "--workspace"),
    (["export", "run", "--tile", "0"], "--tile"),
    (["export", "run", "--batch", "4:2:8"], "--batch"),
    (["bench", "run", "--size", "8"], "--size"),
    (["bench", "run", "--iters", "0"], "--iters"),
    (["bench", "run", "--seconds", "-1"], "--seconds"),
    (["bench", "run", "--threads", "0"], "--threads"),
    (["bench", "run", "--batch", "0,8"], "--batch"),
    (["data", "synth", "d", "--tile", "8"], "--tile"),
    (["data", "synth", "d", "--train", "0"], "--train"),
    (["data", "synth", "d", "--scene-size", "10"], "--scene-size"),
    (["quickstart", "q", "--epochs", "0"], "--epochs"),
    (["quickstart", "q", "--scene-size", "0"], "--scene-size"),
    (["eval", "run", "--split", "tset"], "--split"),
])
def test_out_of_range_options_fail_in_one_line_naming_the_option(args: list[str], option: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.onnx").write_bytes(b"")
    (tmp_path / "x.tif").write_bytes(b"")
    line = one_line_error(run(*args))
    assert option in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "x.tif"]  # nothing written


def test_every_numeric_option_of_every_verb_has_a_range() -> None:
    """A meta-test over the whole CLI: an int or float option without a lower bound is how `--tile 0`
    used to fall back to a default silently."""
    import typer.main

    root = typer.main.get_command(app)
    unchecked = []

    def walk(cmd, path: str) -> None:  # noqa: ANN001
        for sub_name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {sub_name}")
        for param in getattr(cmd, "params", []):
            ann = getattr(getattr(param, "type_descriptor", None), "annotation", None)
            if ann in (int, float) and getattr(param, "min", None) is None and param.callback is None:
                unchecked.append(f"{path} {param.opts[0]}")

    walk(root, "segdeploy")
    assert not unchecked, unchecked


# ------------------------------------------------------------------------------ 4. outputs: exact names, one rule


def test_predict_refuses_an_output_name_that_cannot_hold_the_result(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "m.onnx").write_bytes(b"")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "photo.jpg")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "b.jpg")
    line = one_line_error(run("predict", tmp_path / "m.onnx", tmp_path / "photo.jpg", "--out", tmp_path / "pred.tif"))
    assert "photo.jpg is a picture" in line and f"--out {tmp_path / 'pred.png'}" in line
    line = one_line_error(run("predict", tmp_path / "m.onnx", tmp_path / "photo.jpg", tmp_path / "b.jpg",
                              "--out", tmp_path / "multi.png"))
    assert "--out must be a directory" in line and f"--out {tmp_path / 'multi'}/" in line
    line = one_line_error(run("predict", tmp_path / "m.onnx", write_tif(tmp_path / "s.tif"), "--out", tmp_path / "s.png"))
    assert "s.tif is a raster" in line and f"--out {tmp_path / 's.tif'}" in line
    assert not (tmp_path / "pred.png").exists() and not (tmp_path / "multi.png").exists()


def test_predict_refuses_to_replace_a_finished_output_without_overwrite(tiny_onnx: Path, tmp_path: Path) -> None:
    scene = write_tif(tmp_path / "s.tif")
    out = tmp_path / "pred.tif"
    assert run("predict", tiny_onnx, scene, "--out", out, "--no-progress").exit_code == 0
    before = out.read_bytes()
    out.write_bytes(b"the user's finished output")
    line = one_line_error(run("predict", tiny_onnx, scene, "--out", out, "--no-progress"))
    assert f"{out} already exists" in line and "--overwrite" in line
    assert out.read_bytes() == b"the user's finished output"
    again = run("predict", tiny_onnx, scene, "--out", out, "--no-progress", "--overwrite")  # the fix it names
    assert again.exit_code == 0, again.output
    assert out.read_bytes() == before
    line = one_line_error(run("predict", tiny_onnx, scene, "--out", out, "--resume", "--overwrite"))
    assert "contradict" in line


def test_synth_over_a_non_empty_folder_is_refused_and_overwrite_replaces_instead_of_merging(tmp_path: Path) -> None:
    small = ["--tile", "32", "--scene-size", "64", "--val", "1", "--test", "1"]
    assert run("data", "synth", tmp_path / "d", *small, "--train", "5").exit_code == 0
    line = one_line_error(run("data", "synth", tmp_path / "d", *small, "--train", "2"))
    assert "already holds a synthetic dataset" in line and "--overwrite" in line
    assert len(list((tmp_path / "d/train").glob("*_sat.png"))) == 5  # untouched
    assert run("data", "synth", tmp_path / "d", *small, "--train", "2", "--overwrite").exit_code == 0
    assert len(list((tmp_path / "d/train").glob("*_sat.png"))) == 2  # replaced, not merged with the old 5
    assert json.loads((tmp_path / "d/synth.json").read_text())["splits"]["train"] == 2
    assert not list(tmp_path.glob(".d.*"))  # no staging left behind
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("the user's")
    line = one_line_error(run("data", "synth", tmp_path / "mine", *small, "--train", "2", "--overwrite"))
    assert "does not hold an earlier synthetic dataset" in line
    assert (tmp_path / "mine/notes.txt").read_text() == "the user's" and len(list((tmp_path / "mine").iterdir())) == 1


def test_inspect_leaves_the_data_folder_alone_and_puts_the_chart_beside_the_report(tmp_path: Path) -> None:
    from segdeploy.data.synth import synth

    synth(tmp_path / "d", tile=32, scene_size=64, sizes={"train": 2, "val": 1, "test": 1})
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "d").rglob("*"))
    result = run("data", "inspect", tmp_path / "d")
    assert result.exit_code == 0, result.output
    assert "--plot" in result.output
    result = run("data", "inspect", tmp_path / "d", "--json", tmp_path / "rep/report.json")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rep/report.png").stat().st_size > 1000
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "d").rglob("*")) == before


def test_eval_refuses_to_replace_an_earlier_evaluation_without_overwrite(tiny_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "ev"
    assert run("eval", tiny_onnx, "--split", "val", "--out", out).exit_code == 0
    first = json.loads((out / "metrics.json").read_text())
    line = one_line_error(run("eval", tiny_onnx, "--split", "test", "--out", out))
    assert "already holds an evaluation" in line and "--overwrite" in line
    assert json.loads((out / "metrics.json").read_text()) == first
    again = run("eval", tiny_onnx, "--split", "test", "--out", out, "--overwrite")
    assert again.exit_code == 0, again.output
    assert json.loads((out / "metrics.json").read_text())["split"] == "test"
