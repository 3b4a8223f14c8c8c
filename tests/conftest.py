"""Shared fixtures: a small synthetic dataset and one tiny trained run, built once per session.

No test touches the network: HF_HUB_OFFLINE makes any weight download fail at once.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def has_cuda() -> bool:
    return torch.cuda.is_available()


def has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return has_cuda()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none visible: torch.cuda.is_available() is False)")
    skip_trt = pytest.mark.skip(reason="needs TensorRT (pip install segdeploy[trt]) and a CUDA GPU")
    for item in items:
        if "trt" in item.keywords and not has_tensorrt():
            item.add_marker(skip_trt)
        elif "gpu" in item.keywords and not has_cuda():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from segdeploy.data.synth import synth

    out = tmp_path_factory.mktemp("synth")
    synth(out, tile=64, scene_size=256, sizes={"train": 24, "val": 8, "test": 8})
    return out


def demo_overrides(**extra: object) -> list[str]:
    """The demo recipe, shrunk to seconds: 64 px tiles, 2 epochs."""
    base = {"train.epochs": 2, "train.batch_size": 8, "data.tile_size": 64}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def tiny_run(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from segdeploy import recipe
    from segdeploy.train import fit

    rec = recipe.load(RECIPES / "demo.yaml", demo_overrides(), synth_dir)
    out = tmp_path_factory.mktemp("runs") / "tiny"
    fit(rec, out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_onnx(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run exported to FP32 ONNX (gated), in a copy of the run."""
    import shutil

    from segdeploy.export.pipeline import ExportOptions, export_run

    run = tmp_path_factory.mktemp("onnx") / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export", "eval"))
    export_run(run, ExportOptions(), log=lambda _: None)
    return run / "export" / "model.onnx"
