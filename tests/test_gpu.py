"""Tests that need a CUDA GPU (`gpu`) or TensorRT (`trt`). They skip with the reason when those are
absent (conftest.py) and exercise the real thing when present."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from segdeploy import recipe
from segdeploy.errors import ArtifactError
from segdeploy.export.pipeline import ExportOptions, export_run
from segdeploy.parity import compare, parity_tiles, run_batched
from segdeploy.runtime import load_backend
from segdeploy.train import fit
from tests.conftest import RECIPES, demo_overrides


@pytest.mark.gpu
def test_training_on_cuda_with_amp_and_channels_last(synth_dir: Path, tmp_path: Path) -> None:
    rec = recipe.load(RECIPES / "demo.yaml", demo_overrides(**{"train.epochs": 2, "train.device": "cuda"}), synth_dir)
    result = fit(rec, tmp_path / "run", progress=False)
    assert result.epochs_run == 2 and result.best_miou > 0.2


@pytest.mark.gpu
def test_torch_fp16_autocast_matches_fp32_on_cuda(tiny_run: Path) -> None:
    rec = recipe.load(tiny_run / "recipe.yaml")
    fp32 = load_backend(tiny_run, device="cuda")
    fp16 = load_backend(tiny_run, device="cuda", precision="fp16")
    x, y = parity_tiles(rec, fp32.meta, 64, 8)
    rep = compare(run_batched(fp32, x), run_batched(fp16, x), y, fp32.meta, rec.parity.thresholds("fp16"), "torch", "fp16")
    assert rep.agreement >= 0.999, rep.summary()


@pytest.mark.trt
def test_tensorrt_engine_builds_passes_the_gate_and_describes_itself(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export"))
    report = export_run(run, ExportOptions(trt=True, batch="1:2:4"), log=print)
    assert report.parity["engine"].passed
    side = json.loads((run / "export/model.engine.json").read_text())
    assert side["device"]["gpu_name"] == torch.cuda.get_device_name()
    assert side["profiles"][0]["max"][0] == 4 and side["onnx_sha256"] and side["parity_passed"]
    assert Path(side["timing_cache"]).is_file()
    engine = load_backend(run / "export/model.engine")
    assert engine(np.zeros((2, 3, 64, 64), np.float32)).shape == (2, 5, 64, 64)
    side["device"]["gpu_name"] = "Some Other GPU"
    (run / "export/model.engine.json").write_text(json.dumps(side))
    with pytest.raises(ArtifactError, match="rebuild with `segdeploy export"):
        load_backend(run / "export/model.engine")


@pytest.mark.trt
def test_tensorrt_int8_engine_is_built_from_the_symmetric_qdq_form_and_gated(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export"))
    loose = ["parity.samples=4", "parity.int8_agreement=0.3", "parity.int8_class_iou_drop=100"]  # a 2-epoch model
    report = export_run(run, ExportOptions(trt=True, int8=True, calib_images=4, batch="1:2:4", parity_overrides=loose),
                        log=print)
    assert report.parity["int8_engine"].passed and report.parity["engine"].passed
    side = json.loads((run / "export/model.int8.engine.json").read_text())
    assert side["precision"] == "int8" and side["onnx"] == "model.int8.onnx" and side["parity_passed"]
    assert not list((run / "export").glob(".*candidate*"))  # gated under a hidden name, then renamed
    engine = load_backend(run / "export/model.int8.engine")
    assert engine.precision == "int8" and engine(np.zeros((2, 3, 64, 64), np.float32)).shape == (2, 5, 64, 64)
