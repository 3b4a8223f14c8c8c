"""Shared fixtures: a small synthetic dataset and one tiny trained run, built once per test run.

The suite runs in parallel workers (pytest-xdist, `make test`); the session fixtures below are
built once for all of them, under a file lock, in the run's shared temporary directory. Tests
treat them as read-only (copy a run before changing it).

No test touches the network: HF_HUB_OFFLINE makes any weight download fail at once.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))

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
    skip_slow = pytest.mark.skip(reason="slow end-to-end walk: run with SEGDEPLOY_SLOW=1 (make readme)")
    for item in items:
        if "slow" in item.keywords and not os.environ.get("SEGDEPLOY_SLOW"):
            item.add_marker(skip_slow)
        elif "trt" in item.keywords and not has_tensorrt():
            item.add_marker(skip_trt)
        elif "gpu" in item.keywords and not has_cuda():
            item.add_marker(skip_gpu)


def shared(tmp_path_factory: pytest.TempPathFactory, name: str, build) -> Path:  # noqa: ANN001
    """The directory `name`, built once by `build(path)` for every xdist worker of this test run
    (under a file lock; a marker file written last says it is complete)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = root / f"shared-{name}"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not (out / ".complete").exists():
            import shutil

            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out)
            (out / ".complete").touch()
    return out


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from segdeploy.data.synth import synth

    return shared(tmp_path_factory, "synth",
                  lambda out: synth(out, tile=64, scene_size=256, sizes={"train": 24, "val": 8, "test": 8}))


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
    return shared(tmp_path_factory, "runs", lambda out: fit(rec, out / "tiny", progress=False)) / "tiny"


@pytest.fixture(scope="session")
def tiny_onnx(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run exported to FP32 ONNX (gated), in a copy of the run."""
    import shutil

    from segdeploy.export.pipeline import ExportOptions, export_run

    def build(out: Path) -> None:
        shutil.copytree(tiny_run, out / "run", ignore=shutil.ignore_patterns("export", "eval"))
        export_run(out / "run", ExportOptions(), log=lambda _: None)

    return shared(tmp_path_factory, "onnx", build) / "run" / "export" / "model.onnx"


@pytest.fixture(scope="session")
def tiny_fp16(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny run exported with --fp16 (model.onnx + model.fp16.onnx, gated), shared by
    the export, INT8 and bench tests: copy it before changing anything in it."""
    import shutil

    from segdeploy.export.pipeline import ExportOptions, export_run

    def build(out: Path) -> None:
        shutil.copytree(tiny_run, out / "run", ignore=shutil.ignore_patterns("export", "eval"))
        export_run(out / "run", ExportOptions(fp16=True), log=lambda _: None)

    return shared(tmp_path_factory, "fp16", build) / "run"


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` by relative path ({} when it does not exist): a failed or
    interrupted command must leave it equal."""
    import hashlib

    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
