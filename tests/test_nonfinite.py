"""A non-finite number never becomes a class or a "complete" run (issue 17, item 2): the data check
names every image with undeclared NaN/Inf (and its fix works), training on such an image stays
finite, training stops at the first non-finite loss and stays resumable, and at inference a tile
or image whose logits are not finite is recomputed at FP32 (or the run fails naming it), checked
against onnxruntime and numpy directly."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import rasterio
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from segdeploy import artifact as art
from segdeploy import recipe
from segdeploy.cli import app
from segdeploy.data.inspect import inspect
from segdeploy.errors import NonFiniteError
from segdeploy.predict import PredictOptions, predict_file
from segdeploy.runtime import load_backend
from tests.test_predict import write_tif

runner = CliRunner()


def read_band(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


# ------------------------------------------------------------------------------ data


def nan_tile_dataset(root: Path, *overrides: str) -> recipe.Recipe:
    """float32 GeoTIFF tiles (reflectance 0..1), one of them with 80 NaN pixels and no nodata tag."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        (root / f"images/{split}").mkdir(parents=True)
        (root / f"masks/{split}").mkdir(parents=True)
        for k in range(n):
            labels = rng.integers(0, 2, (32, 32)).astype(np.uint8)
            img = (np.stack([labels * 0.5 + 0.2] * 3) + rng.random((3, 32, 32)) * 0.1).astype(np.float32)
            if split == "train" and k == 1:
                img[:, 10:18, 3:13] = np.nan  # 80 pixels
            write_tif(root / f"images/{split}/{split}{k}.tif", img, crs=None)
            Image.fromarray(labels).save(root / f"masks/{split}/{split}{k}.png")
    (root / "r.yaml").write_text("data: {image_suffix: .tif, max_pixel_value: 1.0, mean: auto, std: auto, tile_size: 32}\n"
                                 "classes: {names: [a, b]}\nmodel: {arch: unet, encoder: mobilenet_v2}\n"
                                 "train: {epochs: 1, batch_size: 4}\naugment: {crop: false}\n")
    return recipe.load(root / "r.yaml", list(overrides), root)


def test_inspect_names_an_image_with_undeclared_nan_and_its_fix_works(tmp_path: Path) -> None:
    rec = nan_tile_dataset(tmp_path)
    report = inspect(rec)
    bad = tmp_path / "images/train/train1.tif"
    assert [p["file"] for p in report.problems] == [str(bad)]
    problem = report.problems[0]["problem"]
    assert "80 NaN/Inf pixels that no nodata value declares" in problem
    command = re.search(r"`(rio edit-info [^`]+)`", problem).group(1)
    rio = Path(sys.executable).with_name("rio")
    subprocess.run([str(rio), *shlex.split(command)[1:]], check=True)
    with rasterio.open(bad) as src:
        assert np.isnan(src.nodata)
    assert inspect(rec).ok


def test_training_on_an_image_with_nan_pixels_stays_finite(tmp_path: Path) -> None:
    """Issue 17's example: one float32 tile with ~80 NaN pixels used to train to NaN weights, a
    "complete" run and a "best val mIoU". The pre-training read names the file; the NaN pixels
    are ignored, and every loss and weight stays finite."""
    from segdeploy.train import fit

    rec = nan_tile_dataset(tmp_path)
    console = Console(record=True, width=200)
    result = fit(rec, tmp_path / "run", progress=False, console=console)
    said = console.export_text()
    assert "1 image(s) have NaN/Inf pixels" in said and f"{tmp_path / 'images/train/train1.tif'} (80 px)" in said
    run = art.Run(tmp_path / "run")
    assert art.run_state(run.root) == "complete" and np.isfinite(result.best_miou)
    assert all(np.isfinite(row["train_loss"]) and np.isfinite(row["val_loss"]) for row in run.read_history())
    assert all(torch.isfinite(t).all() for t in run.load_weights().values())
    assert all(np.isfinite(v) for v in run.meta.mean + run.meta.std)  # band statistics of valid pixels only


def test_training_stops_at_the_first_nonfinite_loss_and_resumes_from_the_last_good_epoch(tmp_path: Path) -> None:
    """A learning rate that blows up (raised on resume after a good first epoch) makes the loss NaN
    in epoch 2 (the training loss at a step, or the validation loss after it, whichever overflows
    first): one error naming epoch and step, the run marked failed (never complete, no best
    mIoU), and the command in the error continues it from epoch 2 to a complete run."""
    from segdeploy.train import fit

    run = tmp_path / "run"
    fit(nan_tile_dataset(tmp_path, "train.batch_size=2"), run, progress=False, console=Console(quiet=True))
    before = json.loads((run / "meta.json").read_text())["best_val_miou"]
    rec = recipe.load(tmp_path / "r.yaml", ["train.batch_size=2", "train.epochs=2", "optimizer.lr=1e12",
                                            "schedule.name=none"], tmp_path)
    with pytest.raises(NonFiniteError, match=r"^(training loss is (nan|inf) at epoch 2, step [12] of 2|"
                                             r"validation loss is (nan|inf) after epoch 2 \(train loss [^)]+\)); ") as failed:
        fit(rec, run, resume=True, progress=False, console=Console(quiet=True))
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "failed" and "best_val_miou" not in meta and "epoch 2" in meta["error"]
    assert art.run_state(run) == "unfinished" and len(art.Run(run).read_history()) == 1
    command = re.search(r"`segdeploy ([^`]+)`", str(failed.value)).group(1)
    assert command.startswith("train --resume --out ")  # the one resume command (README, hints)
    assert command.endswith(" --set optimizer.lr=0.0001")  # a tenth of the last good epoch's rate
    done = runner.invoke(app, [*shlex.split(command), "--no-progress"])  # as printed
    assert done.exit_code == 0, done.output
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["epochs_run"] == 2 and np.isfinite(meta["best_val_miou"])
    assert meta["best_val_miou"] >= before and len(art.Run(run).read_history()) == 2


# ------------------------------------------------------------------------------ inference


def nan_injecting_fp16(fp32: Path, out: Path, threshold: float) -> Path:
    """A stand-in for an FP16 export that overflows outside its calibration range: the FP32 graph,
    whose logits are NaN for every batch item with an input magnitude above `threshold`; its
    metadata names `fp32` as its source, as a real export's does."""
    model = onnx.load(str(fp32))
    graph = model.graph
    name = graph.output[0].name
    for node in graph.node:
        node.output[:] = [f"{o}_fp32" if o == name else o for o in node.output]
    graph.initializer.extend([numpy_helper.from_array(np.array([1, 2, 3], np.int64), "nan_axes"),
                              numpy_helper.from_array(np.array(threshold, np.float32), "nan_threshold"),
                              numpy_helper.from_array(np.array(np.nan, np.float32), "nan_value")])
    graph.node.extend([helper.make_node("Abs", [graph.input[0].name], ["nan_abs"]),
                       helper.make_node("ReduceMax", ["nan_abs", "nan_axes"], ["nan_max"], keepdims=1),
                       helper.make_node("Greater", ["nan_max", "nan_threshold"], ["nan_hit"]),
                       helper.make_node("Where", ["nan_hit", "nan_value", f"{name}_fp32"], [name])])
    props = {p.key: p for p in model.metadata_props}
    meta = json.loads(props[art.ONNX_META_KEY].value)
    meta["source"] = art.source_record(fp32, out.parent)
    props[art.ONNX_META_KEY].value = json.dumps(meta)
    onnx.checker.check_model(model)
    assert graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    onnx.save(model, str(out))
    return out


@pytest.fixture
def exports(tiny_onnx: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(FP32 ONNX, NaN-injecting 'FP16' made from it) in a copy of the run's export folder."""
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    for name in ("recipe.yaml", "meta.json"):
        shutil.copy(tiny_onnx.parent.parent / name, run / name)
    fp32 = run / "export" / tiny_onnx.name
    shutil.copy(tiny_onnx, fp32)
    return fp32, run / "export" / art.EXPORT_FORMS["fp16"].file


def test_a_tile_with_nonfinite_logits_is_recomputed_at_fp32_or_named(exports: tuple[Path, Path], synth_dir: Path,
                                                                      tmp_path: Path) -> None:
    fp32, fp16 = exports
    nan_injecting_fp16(fp32, fp16, threshold=10.0)
    with rasterio.open(synth_dir / "scene/scene.tif") as src:
        scene = src.read().astype(np.float32) / 255  # reflectance 0..1: normalised |x| ≤ 2.7
    scene[:, 110:118, 110:118] = 5.0  # outside the calibration range: normalised |x| ≈ 20
    write_tif(tmp_path / "in.tif", scene)
    opts = PredictOptions(max_pixel_value=1.0, preview=False)  # tile 64, overlap 8: windows at 0, 56, 112, 168, 224
    res = predict_file(load_backend(fp16, threads=2), tmp_path / "in.tif", tmp_path / "fp16.tif", opts)
    predict_file(load_backend(fp32, threads=2), tmp_path / "in.tif", tmp_path / "fp32.tif", opts)
    assert np.array_equal(read_band(tmp_path / "fp16.tif"), read_band(tmp_path / "fp32.tif"))
    assert [t.split(" (")[0] for t in res.recomputed_tiles] == ["tile 1,1", "tile 1,2", "tile 2,1", "tile 2,2"]
    assert any("4 tiles gave non-finite logits at FP16 and were recomputed at FP32" in n for n in res.notes)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(fp16, alone / fp16.name)  # deployed without the FP32 model it came from
    with pytest.raises(NonFiniteError, match=r"non-finite logits \(NaN/Inf\) on tile 1,1 \(rows 56\.\.120, columns "
                                             r"56\.\.120\) of .*in.tif.* no FP32 form to recompute it with"):
        predict_file(load_backend(alone / fp16.name, threads=2), tmp_path / "in.tif", tmp_path / "alone.tif", opts)
    assert not (tmp_path / "alone.tif").exists()


def test_eval_recomputes_images_with_nonfinite_logits_at_fp32(exports: tuple[Path, Path], synth_dir: Path) -> None:
    from segdeploy.evaluate import evaluate

    fp32, fp16 = exports
    meta = art.read_onnx_meta(fp32)
    mean, std = np.asarray(meta.mean, np.float32), np.asarray(meta.std, np.float32)
    peaks = {}
    for path in sorted((synth_dir / "val").glob("*_sat.png")):
        x = (np.asarray(Image.open(path), np.float32) / np.float32(255) - mean) / std
        peaks[path] = float(np.abs(x).max())
    ordered = sorted(peaks.values())
    threshold = (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2  # between two images' peaks
    nan_injecting_fp16(fp32, fp16, threshold)
    got = evaluate(fp16, "val", plots=False)
    ref = evaluate(fp32, "val", plots=False)
    # eval scores tiles, as predict does (each synth val image is one 64² tile: tile 0,0)
    assert got.recomputed == [f"tile 0,0 of image {p}" for p, v in peaks.items() if v > threshold] and got.recomputed
    assert np.array_equal(got.metrics.iou, ref.metrics.iou, equal_nan=True)
    assert got.to_dict()["recomputed_at_fp32"] == got.recomputed


def test_the_gate_fails_a_candidate_with_nonfinite_logits_and_refuses_a_nonfinite_reference(tiny_run: Path) -> None:
    from segdeploy.parity import ParityReference, compare
    from segdeploy.models import load_run_model
    from segdeploy.runtime.torch import TorchBackend

    run = art.Run(tiny_run)
    rec = run.recipe
    reference = TorchBackend(load_run_model(run), run.meta, run.root)
    ref = ParityReference(reference, rec, run.meta, 64)
    cand = ref.logits.clone()
    cand[3, :, 5, 7] = float("nan")
    report = compare(ref.logits, cand, ref.y, run.meta, rec.parity.thresholds("fp16"), "onnxruntime", "fp16")
    assert not report.passed and f"1 of {len(cand)} tiles give non-finite logits (NaN/Inf)" in report.failures

    class Overflowing(TorchBackend):
        def run(self, batch: torch.Tensor) -> torch.Tensor:
            out = super().run(batch).clone()
            out[1:2] = float("inf")
            return out

    with pytest.raises(NonFiniteError, match=r"non-finite logits on parity tile 1 of image 'val\d+'"):
        ParityReference(Overflowing(load_run_model(run), run.meta, run.root), rec, run.meta, 64)
