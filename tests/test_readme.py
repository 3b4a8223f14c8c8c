"""README's verbs, walked in the order shown on a fresh directory, with tiny settings: each line
runs as written but for sizes (images, epochs, iterations) and what cannot run here (remote
rasters with no network, TensorRT with no GPU: refused in one line, as promised). The quickstart
line is walked by tests/test_cli.py (its dataset has a fixed size).

It takes about 2 minutes on 2 cores (108 s measured; half of it three trainings and two exports),
so it is marked slow and runs with SEGDEPLOY_SLOW=1 (`make readme`); `SEGDEPLOY_SLOW=1 python -m
pytest tests/test_readme.py -s` prints each command's time."""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from segdeploy.cli import app
from tests.conftest import ROOT

# (pattern, replacement) applied to each README line: sizes only, never what a line does
TINY = [
    (r"^data synth (\S+)$", r"data synth \1 --tile 32 --scene-size 256 --train 8 --val 4 --test 2"),
    # a 1-epoch model's logits are near ties, which INT8 flips: the gate itself is tests/test_int8.py's
    (r"--calib-images \d+", "--calib-images 4 --set parity.int8_agreement=0.5 --set parity.int8_class_iou_drop=100"),
    (r"--tile 128 --overlap 16", "--tile 32 --overlap 8"),
    (r"--workers \d+", "--workers 1"),
]
TRAIN_TINY = ["--set", "data.tile_size=32", "--set", "train.batch_size=4", "--no-progress"]


def readme_commands() -> list[str]:
    """The bash block under "## The verbs", one command per line, comments dropped."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## The verbs", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines() if line.strip()]


def tiny(command: str) -> list[str]:
    line = command.removeprefix("segdeploy ")
    for pattern, repl in TINY:
        line = re.sub(pattern, repl, line)
    # a new run trains 1 epoch; the resume line extends it to 2
    line = re.sub(r"train\.epochs=\d+", "train.epochs=2" if "--resume" in line else "train.epochs=1", line)
    args = shlex.split(line)
    if args[0] == "train" and "--resume" not in args:
        args += TRAIN_TINY if "train.epochs" in line else ["--set", "train.epochs=1", *TRAIN_TINY]
    elif args[0] == "train":
        args.append("--no-progress")
    if args[0] == "bench":
        args += ["--batch", "1", "--iters", "2", "--seconds", "0"]
    if args[0] in ("predict", "eval", "export", "bench"):
        args.append("--no-progress")
    return args


def your_own_data(here: Path) -> None:
    """What the README's lines stand for as the user's files: a 4-band uint16 scene, a manifest."""
    import rasterio
    from rasterio.transform import from_origin

    img = np.random.default_rng(0).integers(1, 65535, (4, 64, 64), dtype=np.uint16)
    with rasterio.open(here / "bgrn_uint16.tif", "w", driver="GTiff", width=64, height=64, count=4, dtype="uint16",
                       crs="EPSG:32633", transform=from_origin(500_000, 5_000_000, 1, 1)) as dst:
        dst.write(img)
    (here / "scenes.txt").write_text("data/synth/scene/scene.tif\n")


@pytest.mark.slow
def test_readme_examples_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")  # a fresh checkout: the recipes, nothing made yet
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    your_own_data(tmp_path)
    runner = CliRunner()
    walked = []
    for command in readme_commands():
        if command == "segdeploy quickstart":
            continue  # tests/test_cli.py::test_quickstart_trains_the_demo_to_real_accuracy
        if "https://" in command:
            continue  # remote rasters: no network here (tests/test_remote.py serves them locally)
        args = tiny(command)
        t0 = time.perf_counter()
        result = runner.invoke(app, args, env={"COLUMNS": "200"})
        print(f"{time.perf_counter() - t0:6.1f}s  {' '.join(args)}")  # shown with -s: where the walk's time goes
        if "--trt" in args:
            from tests.conftest import has_tensorrt

            if not has_tensorrt():  # refused before any work, in one line naming what is missing
                lines = result.output.strip().splitlines()
                assert result.exit_code == 2 and len(lines) == 1 and "TensorRT" in lines[0], result.output
                continue
        assert result.exit_code == 0, (command, args, result.output)
        walked.append(args[0])
    assert walked.count("predict") == 10 and walked.count("train") == 4 and "bench" in walked and "info" in walked
    for made in ("report.png", "runs/demo/model.safetensors", "runs/demo/export/model.fp16.onnx",
                 "runs/demo/export/model.int8.cpu.onnx", "metrics.json", "pred.tif", "pred.gpkg", "pred_bgrn.tif",
                 "preds/scene_pred.tif", "preds/test0000_sat_pred.png", "bench.csv", "bench.png", "pred_all.probs.tif",
                 "sure.json"):
        assert (tmp_path / made).exists(), made
