"""The workflow between the verbs (issue 19): reproducible runs, --resume that continues the run
that exists, nothing silently replaced or defaulted, numbers that mean what they say, help and
progress that a user can read, pictures with legends, `info` and `--version`."""

from __future__ import annotations

import json
import re
import shutil
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
    (["predict", "m.onnx", "x.tif", "--out", "o.tif", "--input-max", "0"], "--input-max"),  # the old name, an alias
    (["predict", "m.onnx", "x.tif", "--out", "o.tif", "--max-pixel-value", "0"], "--max-pixel-value"),
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


def test_quickstart_keeps_the_same_rule(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("the user's")
    line = one_line_error(run("quickstart", tmp_path / "mine", "--overwrite"))
    assert "does not hold an earlier quickstart output" in line
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    (tmp_path / "qs/data").mkdir(parents=True)
    (tmp_path / "qs/data/synth.json").write_text("{}")  # an earlier quickstart
    line = one_line_error(run("quickstart", tmp_path / "qs"))
    assert "already holds a quickstart output; pass --overwrite" in line


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


def test_eval_replaces_its_own_record_in_the_default_place(tiny_onnx: Path, tmp_path: Path) -> None:
    """The default eval/NAME-SPLIT beside a model is that model's current record: a second eval
    replaces it without --overwrite (a directory the user names follows the one rule, above)."""
    import shutil

    run_copy = tmp_path / "run"
    shutil.copytree(tiny_onnx.parents[1], run_copy)
    model = run_copy / "export" / tiny_onnx.name
    for _ in range(2):
        result = run("eval", model, "--split", "val")
        assert result.exit_code == 0, result.output
    record = model.parent / "eval" / f"{model.name}-val" / "metrics.json"
    assert json.loads(record.read_text())["split"] == "val"


# ------------------------------------------------------------------------------ 1. reproducible runs, 3. resume

TINY = ["train.epochs=1", "train.batch_size=4", "data.tile_size=32"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from segdeploy.data.synth import synth

    out = tmp_path_factory.mktemp("tiny") / "data"
    synth(out, tile=32, scene_size=64, sizes={"train": 8, "val": 2, "test": 2})
    return out


def tensors_equal(a: dict, b: dict) -> list[str]:
    """Names of the tensors that differ in any bit (or exist in one dict only)."""
    import torch

    return sorted(k for k in set(a) | set(b) if k not in a or k not in b or not torch.equal(a[k], b[k]))


def metrics_of(run_dir: Path) -> list[dict]:
    import csv

    return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")}
            for row in csv.DictReader((run_dir / "history.csv").open())]


def test_the_same_recipe_and_seed_give_bit_identical_weights_and_metrics(tiny_data: Path, tmp_path: Path) -> None:
    from segdeploy import recipe
    from segdeploy.artifact import Run
    from segdeploy.train import fit

    rec = recipe.load(RECIPES / "demo.yaml", TINY, tiny_data)
    for name in ("a", "b"):
        fit(rec, tmp_path / name, progress=False)
    a, b = Run(tmp_path / "a"), Run(tmp_path / "b")
    assert tensors_equal(a.load_weights(), b.load_weights()) == []
    assert tensors_equal(a.load_checkpoint()["model"], b.load_checkpoint()["model"]) == []
    assert metrics_of(a.root) == metrics_of(b.root)
    assert a.info["best_val_miou"] == b.info["best_val_miou"]


def test_the_seed_decides_the_augmentation_whatever_the_loader_workers(tiny_data: Path) -> None:
    """Sample i of epoch e is augmented from sample_seed(seed, e, i) alone: the same in the main
    process and in a worker, and a resumed run draws what an uninterrupted one did."""
    import torch

    from segdeploy import recipe
    from segdeploy.data.dataset import discover
    from segdeploy.data.torchdata import SeededSampler, SegmentationDataset
    from segdeploy.reproducible import sample_seed

    rec = recipe.load(RECIPES / "demo.yaml", TINY, tiny_data)
    ds = SegmentationDataset(discover(rec.data, "train"), rec.data, rec.classes, [0.0] * 3, [1.0] * 3, rec.augment)
    torch.manual_seed(123)
    x1, y1 = ds[(3, sample_seed(0, 2, 3))]
    torch.manual_seed(456)  # the global generator is neither used nor moved
    state = torch.get_rng_state()
    x2, y2 = ds[(3, sample_seed(0, 2, 3))]
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(state, torch.get_rng_state())
    sampler = SeededSampler(len(ds), seed=0)
    sampler.set_epoch(2)
    first = list(sampler)
    sampler.set_epoch(3)
    sampler.set_epoch(2)
    assert list(sampler) == first and sorted(i for i, _ in first) == list(range(len(ds)))
    assert dict(first)[3] == sample_seed(0, 2, 3)


def test_interrupted_training_names_the_command_that_resumes_it_exactly(tiny_data: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after epoch 1 of 2; the command the message names continues the run, with progress
    lines in a log, the next commands at the end, and the weights of an uninterrupted run."""
    from segdeploy import recipe
    from segdeploy.artifact import Run
    from segdeploy.errors import Interrupted
    from segdeploy.train import fit

    two = [*TINY[1:], "train.epochs=2"]
    rec = recipe.load(RECIPES / "demo.yaml", two, tiny_data)
    fit(rec, tmp_path / "straight", progress=False)
    real = Run.write_status

    def ctrl_c_after_epoch_1(self, status, meta=None, **fields):  # noqa: ANN001, ANN202 - Ctrl-C from outside
        real(self, status, meta, **fields)
        if status == "training" and fields.get("epochs_done") == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Run, "write_status", ctrl_c_after_epoch_1)
    out = tmp_path / "cut"
    with pytest.raises(Interrupted) as info:
        fit(rec, out, progress=False)
    monkeypatch.setattr(Run, "write_status", real)
    command = re.search(r"continue with `(segdeploy train [^`]+)`", str(info.value)).group(1)
    assert command == f"segdeploy train --resume --out {out}"
    result = run(*command.split()[1:], env={"SEGDEPLOY_PROGRESS_SECONDS": "0"})
    assert result.exit_code == 0, result.output
    assert re.search(r"train epoch 2/2: \d+/\d+ steps \(\d+%\), [\d.]+ (images/s|s per image), loss [\d.]+.*ETA",
                     result.output)
    assert f"next: segdeploy eval {out} --split test" in result.output
    assert f"next: segdeploy export {out} --fp16" in result.output
    straight, resumed = Run(tmp_path / "straight"), Run(out)
    assert tensors_equal(straight.load_checkpoint()["model"], resumed.load_checkpoint()["model"]) == []
    assert tensors_equal(straight.load_weights(), resumed.load_weights()) == []
    assert metrics_of(straight.root) == metrics_of(resumed.root)


def test_resume_uses_the_runs_recipe_and_says_what_a_different_one_changes(tiny_data: Path, tmp_path: Path) -> None:
    from segdeploy import recipe
    from segdeploy.artifact import Run
    from segdeploy.errors import RecipeError
    from segdeploy.train import resume_recipe

    out = tmp_path / "run"
    out.mkdir()
    two = [*TINY[1:], "train.epochs=2"]
    rec = recipe.load(RECIPES / "demo.yaml", two, tiny_data)
    Run(out).recipe_path.write_text(rec.to_yaml())
    Run(out).meta_path.write_text(json.dumps({"status": "training", "epochs_done": 1, "model_meta": {}}))
    Run(out).last_checkpoint.write_bytes(b"")
    same, notes = resume_recipe(out)
    assert same == rec and notes == []
    # the README's old resume line re-read recipes/demo.yaml (12 epochs) over a run trained with 1
    with pytest.raises(RecipeError, match=r"demo.yaml gives .*train.epochs 12 where the run has 2.*"
                                          r"`segdeploy train --resume --out "):
        resume_recipe(out, RECIPES / "demo.yaml", [], tiny_data)
    with pytest.raises(RecipeError, match=r"--resume cannot change augment.hflip 0.1 where the run has 0.5"):
        resume_recipe(out, None, ["augment.hflip=0.1"])
    longer, notes = resume_recipe(out, None, ["train.epochs=3"])  # a key that may change: applied and stated
    assert longer.train.epochs == 3 and notes == ["train.epochs: 2 → 3 (applied to the resumed run)"]
    with pytest.raises(RecipeError, match=r"has run 1 of its 1 epochs already.*--set train.epochs=2"):
        resume_recipe(out, None, ["train.epochs=1"])
    same_again, _ = resume_recipe(out, RECIPES / "demo.yaml", two, tiny_data)  # the full original command
    assert same_again == rec
    assert one_line_error(run("train", "--resume")).endswith("segdeploy train --resume --out RUN")


def test_readme_and_the_tools_hint_show_the_same_resume_command(tmp_path: Path) -> None:
    from segdeploy.artifact import continue_hint

    (tmp_path / "last.ckpt").write_bytes(b"")
    hint = continue_hint(tmp_path)
    assert f"`segdeploy train --resume --out {tmp_path}`" in hint
    readme = (RECIPES.parent / "README.md").read_text()
    assert "segdeploy train --resume --out runs/demo" in readme
    assert "--out runs/demo --resume" not in readme  # the old form that re-read the recipe file


def test_interrupted_before_any_epoch_says_there_is_nothing_to_resume(tmp_path: Path) -> None:
    from segdeploy.train import interrupted_hint

    (tmp_path / "run").mkdir()
    (tmp_path / "run/meta.json").write_text(json.dumps({"status": "training", "epochs_done": 0, "model_meta": {}}))
    assert "nothing to resume; start it again with the same command" in interrupted_hint(tmp_path / "run", "new")


def test_deterministic_mode_sets_and_restores_torchs_switches_and_names_ops_without_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import warnings

    import torch

    from segdeploy.reproducible import deterministic_mode

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with deterministic_mode(True) as det:
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        warnings.warn("upsample_bilinear2d_backward_out_cuda does not have a deterministic implementation, but you "
                      "set 'torch.use_deterministic_algorithms(True, warn_only=True)'", UserWarning, stacklevel=1)
    assert det.nondeterministic_ops == ["upsample_bilinear2d_backward_out_cuda"]
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with deterministic_mode(False):
        assert not torch.are_deterministic_algorithms_enabled()


def test_the_offline_switches_hold_only_inside_a_hub_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """`fail_fast_when_offline` sets the socket default timeout and huggingface_hub's offline
    constant for the download it wraps and puts both back after it (a failure included)."""
    import socket

    from huggingface_hub import constants

    from segdeploy import models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    before = (socket.getdefaulttimeout(), constants.HF_HUB_OFFLINE)
    with pytest.raises(OSError, match="no network"), models.fail_fast_when_offline("imagenet"):
        assert socket.getdefaulttimeout() == 3.0 and constants.HF_HUB_OFFLINE is True
        raise OSError("no network")
    assert (socket.getdefaulttimeout(), constants.HF_HUB_OFFLINE) == before


def test_a_torch_backends_threads_hold_only_while_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's thread count is process-wide: `threads` applies inside each run, and is put back."""
    import torch

    from segdeploy.artifact import ModelMeta
    from segdeploy.runtime.base import LoadOptions
    from segdeploy.runtime.torch import TorchBackend

    seen: list[int] = []

    class Spy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch.get_num_threads())
            return x

    meta = ModelMeta(classes=["a", "b"], palette=[[0, 0, 0], [9, 9, 9]], mean=[0.0, 0.0], std=[1.0, 1.0],
                     max_pixel_value=1.0, bands=2, input_divisor=1, tile_size=8)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        backend = TorchBackend(Spy(), meta, Path("spy"))
        backend.threads = 1
        backend(np.zeros((1, 2, 8, 8), np.float32))
        assert seen == [1] and torch.get_num_threads() == 2
        monkeypatch.setattr(TorchBackend, "__init__", lambda self, *a, **k: None)
        monkeypatch.setattr("segdeploy.models.load_run_model", lambda run: Spy())
        monkeypatch.setattr("segdeploy.artifact.Run.meta", meta)
        loaded = TorchBackend.load(Path("run"), LoadOptions(device="cpu", threads=1))
        assert loaded.threads == 1 and torch.get_num_threads() == 2  # loading changes nothing process-wide
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------------ 6. hints that point the right way


def test_offline_imagenet_weights_fail_before_the_data_is_read_and_name_weights_null(tiny_data: Path,
                                                                                     tmp_path: Path) -> None:
    data = tmp_path / "d"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("scene"))
    (data / "val/val0000_mask.png").write_bytes(b"not a png")  # what a full read would stop at
    args = ["train", RECIPES / "demo.yaml", "--data", data, "--out", tmp_path / "r", "--no-progress", "--set",
            "data.tile_size=32"]
    line = one_line_error(run(*args, "--set", "model.weights=imagenet"))  # HF_HUB_OFFLINE=1 (conftest)
    assert "imagenet" in line and "model.weights: null" in line and "val0000" not in line
    fixed = one_line_error(run(*args, "--set", "model.weights=null"))  # the fix: past the weights, to the data
    assert "val0000_mask.png" in fixed


def test_a_ratio_split_left_empty_says_so_and_its_fix_works(tiny_data: Path) -> None:
    from segdeploy import recipe
    from segdeploy.data.dataset import discover
    from segdeploy.errors import DataError

    tiny = ["data.image_dir=train", "data.mask_dir=train", "data.split.mode=ratio",
            "data.split.ratios={train: 0.98, val: 0.01, test: 0.01}"]
    rec = recipe.load(RECIPES / "demo.yaml", tiny, tiny_data)
    with pytest.raises(DataError, match=r"split 'val' is empty because of the ratios, not the files") as info:
        discover(rec.data, "val")
    assert "no '*_sat.png' images" not in str(info.value)
    fix = re.search(r"--set '([^']+)'", str(info.value)).group(1)
    fixed = recipe.load(RECIPES / "demo.yaml", [*tiny[:-1], fix], tiny_data)
    assert len(discover(fixed.data, "val")) >= 1


# ------------------------------------------------------------------------------ 6. segdeploy info


def test_info_describes_a_run_its_exports_gates_and_staleness(tiny_onnx: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_onnx.parent.parent, run_dir, ignore=shutil.ignore_patterns("eval"))  # shared: others write there
    meta = json.loads((run_dir / "meta.json").read_text())
    parity = json.loads((run_dir / "export/parity.json").read_text())["forms"]["fp32"]
    result = run("info", run_dir, "--json", tmp_path / "i.json")
    assert result.exit_code == 0, result.output
    facts = json.loads((tmp_path / "i.json").read_text())
    assert facts["status"] == "complete" and facts["epochs_done"] == meta["epochs_run"]
    assert facts["best"] == {"val_miou": meta["best_val_miou"], "epoch": meta["best_epoch"], "levels": None}
    assert facts["model"]["classes"] == meta["model_meta"]["classes"]
    assert facts["versions"]["torch"] == meta["model_meta"]["versions"]["torch"]
    forms = {e["form"]: e for e in facts["exports"]}
    fp32 = forms["fp32"]
    assert fp32["present"] and fp32["stale"] is None
    assert fp32["size_mb"] == round((run_dir / "export/model.onnx").stat().st_size / 2**20, 2)
    assert fp32["gate"]["passed"] is parity["passed"] and fp32["gate"]["agreement"] == parity["agreement"]
    assert forms["fp16"] == {"form": "fp16", "file": "model.fp16.onnx", "backend": "onnxruntime", "precision": "fp16",
                             "present": False, "make_with": f"segdeploy export {run_dir} --fp16"}
    assert "exports" in result.output and "not made: segdeploy export" in result.output
    # the weights change after the export: the ONNX is named stale, here and for the file itself
    weights = run_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")
    facts = json.loads(run("info", run_dir, "--json", "-").output)
    assert "is stale" in {e["form"]: e for e in facts["exports"]}["fp32"]["stale"]
    model = json.loads(run("info", run_dir / "export/model.onnx", "--json", "-").output)
    assert model["form"] == "fp32" and "is stale" in model["stale"] and model["gate"]["passed"] is parity["passed"]
    assert model["source"]["path"] == "../model.safetensors"


def test_info_on_an_unfinished_run_says_how_to_finish_it_and_needs_no_torch(tiny_onnx: Path, tmp_path: Path) -> None:
    from tests.test_lean import run_without_torch

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_onnx.parent.parent, run_dir, ignore=shutil.ignore_patterns("export", "eval"))
    meta = json.loads((run_dir / "meta.json").read_text())
    (run_dir / "meta.json").write_text(json.dumps({**meta, "status": "failed", "error": "disk full"}))
    facts = json.loads(run("info", run_dir, "--json", "-").output)
    assert facts["status"] == "failed" and facts["error"] == "disk full"
    assert f"segdeploy train --resume --out {run_dir}" in facts["next"]
    proc, loaded = run_without_torch(tmp_path, "info", str(tiny_onnx))
    assert proc.returncode == 0 and loaded == [], proc.stderr
    assert "onnxruntime fp32" in proc.stdout


# ------------------------------------------------------------------------------ 6. pictures


def test_the_error_colour_is_never_a_class_colour_and_the_legend_says_so() -> None:
    from segdeploy.viz import ERROR_CANDIDATES, error_colour, overlay_figure

    palette = [(230, 30, 30), (255, 0, 255), (0, 160, 0)]  # a class already has the old "wrong" red
    wrong = error_colour(palette)
    taken = np.asarray([*palette, (40, 40, 40)], float)
    assert wrong in ERROR_CANDIDATES and np.sqrt(((taken - wrong) ** 2).sum(1)).min() >= 100
    truth = np.zeros((16, 16), np.int64)
    pred = truth.copy()
    pred[:4] = 1
    fig = overlay_figure(np.full((16, 16, 3), 128, np.uint8), truth, pred, ["a", "b", "c"], palette, 255.0, 255)
    panel = fig.axes[3].get_images()[0].get_array()
    assert tuple(panel[0, 0]) == wrong and tuple(panel[8, 8]) != wrong
    legend = {t.get_text(): h.get_facecolor()[:3] for t, h in zip(fig.legends[0].get_texts(),
                                                                    fig.legends[0].legend_handles, strict=True)}
    assert np.allclose(legend["wrong"], np.asarray(wrong) / 255)


def test_pictures_leave_the_background_class_unpainted_and_carry_a_legend(tmp_path: Path) -> None:
    from PIL import Image

    from segdeploy.predict import PredictOptions, predict_file
    from segdeploy.recipe import ClassesConfig
    from tests.test_predict import EchoBackend

    assert ClassesConfig(names=["background", "lesion"]).background_index() == 0
    assert ClassesConfig(names=["field", "forest"]).background_index() is None  # every land-cover class is painted
    assert ClassesConfig(names=["sky", "car"], background="sky").background_index() == 0
    photo = np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    labels = np.zeros((40, 50), np.uint8)
    labels[10:20, 10:30] = 1
    photo[..., 0] = labels  # the echo model predicts band 0: these labels
    Image.fromarray(photo).save(tmp_path / "x.png")
    backend = EchoBackend(2, 32, bands=3)
    backend.meta.classes, backend.meta.palette = ["background", "lesion"], [[0, 0, 0], [255, 0, 0]]
    res = predict_file(backend, tmp_path / "x.png", tmp_path / "p.png", PredictOptions(tile=32, overlap=8))
    overlay = np.asarray(Image.open(res.files[1]).convert("RGB"))
    assert overlay.shape[0] > 40 + 30  # a title line above and a legend row below the 40 px picture
    top, left = 22, (overlay.shape[1] - 50) // 2  # where the picture is pasted (viz._save_with_legend)
    body = overlay[top:top + 40, left:left + 50].astype(int)
    assert np.array_equal(body[labels == 0], photo[labels == 0])  # background: the photo, no colour cast
    expected = np.clip(photo[labels == 1] * 0.55 + np.array([255, 0, 0]) * 0.45, 0, 255).astype(int)
    assert np.abs(body[labels == 1] - expected).max() <= 1
    legend = overlay[top + 40:]
    assert (np.abs(legend.astype(int) - [255, 0, 0]).sum(-1) == 0).sum() >= 100  # the lesion swatch


# ------------------------------------------------------------------------------ 5. numbers that mean what they say


def test_a_resumed_predict_counts_only_the_work_of_this_run(tmp_path: Path) -> None:
    from segdeploy.predict import PredictOptions, predict_file
    from segdeploy.tiling import window_starts
    from tests.test_predict import ConvBackend, write_tif as write_raster

    h, w = 600, 100
    write_raster(tmp_path / "in.tif", (np.random.default_rng(4).random((3, h, w)) * 255).astype(np.uint8))
    backend = ConvBackend()
    backend.meta.max_pixel_value = 255.0
    opts = PredictOptions(tile=64, overlap=16, batch=4)
    rows, cols = window_starts(h, 64, 16), window_starts(w, 64, 16)

    def ctrl_c(done: int, total: int, pixels: int) -> None:
        if done >= 8 * len(cols):  # past the first 256-row block written to disk
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict_file(backend, tmp_path / "in.tif", tmp_path / "o.tif", opts, progress=ctrl_c)
    on_disk = json.loads((tmp_path / "o.tif.partial.json").read_text())["rows_on_disk"]
    seen = []
    res = predict_file(backend, tmp_path / "in.tif", tmp_path / "o.tif", PredictOptions(tile=64, overlap=16, batch=4,
                       resume=True), progress=lambda d, t, p: seen.append((d, t, p)))
    replay_from = on_disk // 48 - 1  # the tile row above the resume point is recomputed
    assert res.resumed_from_row == on_disk and res.tiles_total == len(rows) * len(cols)
    assert res.tiles == (len(rows) - replay_from) * len(cols) < res.tiles_total
    assert 0 < on_disk < h and res.pixels == (h - on_disk) * w
    assert res.megapixels_per_s == pytest.approx(res.pixels / 1e6 / res.seconds, rel=0.02)
    assert seen[-1] == (res.tiles, res.tiles, res.pixels)  # the bar ends at 100% of this run's work


def test_predicts_peak_memory_is_measured_during_the_call_not_over_the_process(tmp_path: Path) -> None:
    from segdeploy.predict import PredictOptions, predict_file
    from segdeploy.utils import peak_rss_mb
    from tests.test_predict import EchoBackend

    write_tif(tmp_path / "s.tif", 64)
    big = np.ones(400 * 2**20 // 8)  # 400 MB touched, then freed: the process's lifetime peak
    del big
    res = predict_file(EchoBackend(3, 32, bands=3), tmp_path / "s.tif", tmp_path / "o.tif",
                       PredictOptions(tile=32, overlap=8, preview=False))
    assert res.peak_rss_mb < peak_rss_mb() - 300


# ------------------------------------------------------------------------------ 6. long work is never silent


def test_bench_defaults_to_the_models_tile_size_and_shows_progress_with_an_estimate(tiny_onnx: Path,
                                                                                    tmp_path: Path) -> None:
    result = run("bench", tiny_onnx, "--batch", "1,2", "--iters", "2", "--seconds", "0", "--no-accuracy",
                 "--json", tmp_path / "b.json", env={"SEGDEPLOY_PROGRESS_SECONDS": "0"})
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    tile = json.loads((tiny_onnx.parent.parent / "meta.json").read_text())["model_meta"]["tile_size"]
    assert [r["size"] for r in rows] == [tile, tile] and [r["batch"] for r in rows] == [1, 2]
    assert re.search(r"bench: 1/2 rows \(50%\), [\d.]+ (rows/s|s per row), last onnxruntime fp32 batch 1, \S+ elapsed, ETA \S+",
                     result.output), result.output
    from segdeploy.bench import BenchOptions

    assert (BenchOptions().min_iters, BenchOptions().min_seconds, BenchOptions().size) == (10, 1.0, None)


def test_eval_and_export_report_progress_in_a_log(tiny_onnx: Path, tmp_path: Path) -> None:
    result = run("eval", tiny_onnx, "--split", "val", "--out", tmp_path / "ev", env={"SEGDEPLOY_PROGRESS_SECONDS": "0"})
    assert result.exit_code == 0, result.output
    assert re.search(r"eval \S+ · val: 8/8 images \(100%\), [\d.]+ (images/s|s per image)", result.output), result.output


def test_a_heartbeat_keeps_a_log_alive_through_uncountable_work() -> None:
    import io
    import time

    from rich.console import Console

    from segdeploy.progress import Heartbeat

    log = io.StringIO()
    with Heartbeat(Console(file=log, width=200), "export", every=0.2) as beat:
        beat.stage("exporting FP32 ONNX…")
        time.sleep(1.0)
    lines = log.getvalue().splitlines()
    assert lines[0] == "exporting FP32 ONNX…"
    assert any(re.fullmatch(r"export: still exporting FP32 ONNX \(\d+s elapsed\)", line) for line in lines[1:]), lines
