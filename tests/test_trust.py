"""Trust at the edges: no lost run, no silent wrong number, one clean line for every refusal.

Each test injects one fault the way a user (or the machine) brings it, and checks the exit code,
that the message names the file, and that nothing earlier was lost or half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from PIL import Image
from typer.testing import CliRunner

from segdeploy import recipe
from segdeploy.cli import app
from segdeploy.errors import ArtifactError, DataError, ParityError
from segdeploy.train import fit
from tests.conftest import RECIPES, demo_overrides

runner = CliRunner()


def run(*args: object, **kw: object):  # noqa: ANN201
    return runner.invoke(app, [str(a) for a in args], **kw)


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path -> sha256): 'byte-identical' made checkable."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(result, code: int = 2) -> str:  # noqa: ANN001
    assert result.exit_code == code, result.output
    text = result.output.strip()
    assert len(text.splitlines()) == 1, text
    assert text.startswith("error: ") and "Traceback" not in text and "unexpected" not in text
    return text


def copy_data(synth_dir: Path, dst: Path) -> Path:
    shutil.copytree(synth_dir, dst, ignore=shutil.ignore_patterns("scene"))
    return dst


@pytest.fixture
def mounted(tmp_path: Path):  # noqa: ANN201
    """A tiny tmpfs mounted under tmp_path: mounted('ro') is read-only, mounted('full') holds 96 KiB."""
    mounts: list[Path] = []

    def mount(kind: str) -> Path:
        point = tmp_path / f"mnt-{kind}"
        point.mkdir()
        opts = "size=96k" if kind == "full" else "size=1m,ro"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", str(point)], capture_output=True)


# ----------------------------------------------------------------------------- nothing lost


def test_overwrite_validates_first_and_a_failed_overwrite_leaves_the_old_run_byte_identical(
        tiny_run: Path, synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = tmp_path / "run"
    shutil.copytree(tiny_run, old)
    before = tree_digest(old)
    # bad data: refused before anything is touched
    text = one_line_error(run("train", RECIPES / "demo.yaml", "--data", tmp_path / "does-not-exist", "--out", old,
                              "--overwrite", "--no-progress"))
    assert "does-not-exist" in text and tree_digest(old) == before
    # interrupted half-way through the new training: the old run stays, no temporary directory is left
    import segdeploy.train as train_mod

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_stop_reason", interrupt)
    rec = recipe.load(RECIPES / "demo.yaml", demo_overrides(), synth_dir)
    with pytest.raises(KeyboardInterrupt):
        fit(rec, old, overwrite=True, progress=False)
    assert tree_digest(old) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # a complete overwrite replaces it, and the new run is readable by others (umask, not 0700)
    monkeypatch.undo()
    result = fit(rec.model_copy(update={"train": rec.train.model_copy(update={"epochs": 1})}), old, overwrite=True,
                 progress=False)
    assert result.run_dir == old and json.loads((old / "meta.json").read_text())["epochs_run"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert (old.stat().st_mode & 0o777) == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_unfinished_run_hints_lead_somewhere(tiny_run: Path, synth_dir: Path, tmp_path: Path) -> None:
    """A run that stopped before its first epoch ended has nothing to resume and nothing to lose:
    --resume says to start it again, a plain retry replaces it, and no hint sends the user in a circle."""
    from segdeploy.train import plan_output

    rec = recipe.load(RECIPES / "demo.yaml", demo_overrides(), synth_dir)
    early = tmp_path / "early"
    shutil.copytree(tiny_run, early)
    (early / "last.ckpt").unlink()
    (early / "meta.json").write_text(json.dumps({"status": "training", "epochs_done": 0}))
    with pytest.raises(ArtifactError, match="stopped before its first epoch ended.*start it again without --resume"):
        fit(rec, early, resume=True, progress=False)
    assert plan_output(early, resume=False, overwrite=False) == "replace"  # the plain retry the hint names
    with pytest.raises(ArtifactError, match=r"segdeploy train .*early/recipe.yaml --out .*early`"):
        from segdeploy.artifact import Run

        Run(early).require_finished()
    with pytest.raises(ArtifactError, match="nothing to resume in .*fresh.*drop --resume"):
        fit(rec, tmp_path / "fresh", resume=True, progress=False)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not a segdeploy run directory"):
        fit(rec, foreign, overwrite=True, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_relative_data_root_resolves_against_the_recipe_and_runs_work_from_any_directory(
        tiny_run: Path, synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = copy_data(synth_dir, tmp_path / "project" / "data")
    recipe_file = tmp_path / "project" / "recipes" / "mine.yaml"
    recipe_file.parent.mkdir()
    raw = recipe.read_yaml(RECIPES / "demo.yaml")
    raw["data"]["root"] = "../data"
    recipe_file.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    assert recipe.load(recipe_file).data.root == str(data.resolve())
    assert recipe.load(recipe_file, data_root=Path("project/data")).data.root == str(data.resolve())
    # a run's saved recipe holds the absolute root: eval works from another directory
    saved = recipe.load(tiny_run / "recipe.yaml")
    assert Path(saved.data.root).is_absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = run("eval", tiny_run, "--split", "val", "--out", tmp_path / "ev")
    assert result.exit_code == 0, result.output


def test_outputs_follow_the_umask(tiny_run: Path, tmp_path: Path) -> None:
    from segdeploy.utils import atomic_path, write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"x")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o644
        os.umask(0o027)
        write_json(tmp_path / "c.json", {"x": 1})
        assert (tmp_path / "c.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    # what training wrote through the same helper
    for name in ("model.safetensors", "meta.json", "history.csv", "recipe.yaml", "splits.json", "plots/loss.png"):
        assert (tiny_run / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name


def test_quickstart_refuses_to_replace_earlier_results(tmp_path: Path) -> None:
    earlier = tmp_path / "qs"
    (earlier / "run").mkdir(parents=True)
    (earlier / "run" / "meta.json").write_text("{}")
    before = tree_digest(earlier)
    text = one_line_error(run("quickstart", earlier, "--no-progress"))
    assert str(earlier) in text and "--overwrite" in text
    assert tree_digest(earlier) == before


# ----------------------------------------------------------------------------- no silent wrong answer


def test_a_16_bit_image_among_8_bit_ones_is_refused_before_training(synth_dir: Path, tmp_path: Path) -> None:
    data = copy_data(synth_dir, tmp_path / "d")
    img = np.asarray(Image.open(data / "val/val0002_sat.png"))
    Image.fromarray(img[..., 0].astype(np.uint16) * 257).save(data / "val/val0002_sat.png")  # 16-bit grey
    text = one_line_error(run("train", RECIPES / "demo.yaml", "--data", data, "--out", tmp_path / "run",
                              "--set", "data.tile_size=64", "--no-progress"))
    assert "val0002_sat.png" in text and "uint16" in text and "uint8" in text
    assert not (tmp_path / "run").exists()  # no half-made run directory
    report = run("data", "inspect", data, "--json", tmp_path / "r.json", "--plot", tmp_path / "c.png")
    assert report.exit_code != 0
    problems = json.loads((tmp_path / "r.json").read_text())["problems"]
    assert any("val0002_sat.png" in p["file"] and "uint16" in p["problem"] for p in problems)


def test_values_above_max_pixel_value_and_an_unreachable_scale_are_refused(tmp_path: Path) -> None:
    from segdeploy.data.dataset import PixelFormatCheck

    cfg = recipe.validate({"data": {"root": str(tmp_path), "max_pixel_value": 255},
                           "classes": {"names": ["a", "b"]}}, "t").data
    check = PixelFormatCheck(cfg)
    assert check.problem(tmp_path / "a.tif", np.full((2, 2, 3), 200, np.uint16)) is None
    msg = check.problem(tmp_path / "b.tif", np.full((2, 2, 3), 4000, np.uint16))
    assert msg and "b.tif has values up to 4000, above data.max_pixel_value 255" in msg
    cfg16 = cfg.model_copy(update={"max_pixel_value": 65535.0})
    msg = PixelFormatCheck(cfg16).problem(tmp_path / "c.png", np.zeros((2, 2, 3), np.uint8))
    assert msg and "c.png is uint8" in msg and "data.max_pixel_value: 255" in msg


def test_a_broken_val_mask_fails_before_any_training_and_leaves_no_run_dir(synth_dir: Path, tmp_path: Path) -> None:
    data = copy_data(synth_dir, tmp_path / "d")
    (data / "val/val0005_mask.png").write_bytes(b"\x89PNG broken")
    rec = recipe.load(RECIPES / "demo.yaml", demo_overrides(), data)
    with pytest.raises(DataError, match=r"cannot read mask .*val0005_mask.png"):
        fit(rec, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_ratio_split_is_stable_when_files_are_added_or_removed() -> None:
    from segdeploy.data.dataset import Sample, ratio_split

    def samples(keys: list[str]) -> list[Sample]:
        return [Sample(k, Path(k), Path(k)) for k in keys]

    ratios = {"train": 0.7, "val": 0.15, "test": 0.15}
    base = [f"img{i:04d}" for i in range(300)]
    before = {name: {s.key for s in items} for name, items in ratio_split(samples(base), ratios, 7).items()}
    assert 150 < len(before["train"]) < 270 and before["val"] and before["test"]
    grown = base + [f"new{i:04d}" for i in range(200)]
    shrunk = base[50:]
    for keys in (grown, shrunk, list(reversed(grown))):
        after = {name: {s.key for s in items} for name, items in ratio_split(samples(keys), ratios, 7).items()}
        for name in ratios:  # every key that is still there stays in its split
            assert before[name] & set(keys) <= after[name]
    assert ratio_split(samples(base), ratios, 8)["val"] != ratio_split(samples(base), ratios, 7)["val"]


def test_the_run_records_the_keys_of_every_split(tiny_run: Path, synth_dir: Path) -> None:
    splits = json.loads((tiny_run / "splits.json").read_text())
    assert set(splits) == {"train", "val", "test"}
    assert splits["val"] == sorted(p.name.removesuffix("_sat.png") for p in (synth_dir / "val").glob("*_sat.png"))
    assert len(splits["train"]) == 24 and not set(splits["train"]) & set(splits["test"])
    meta = json.loads((tiny_run / "meta.json").read_text())["model_meta"]
    assert meta["input_dtype"] == "uint8" and meta["max_pixel_value"] == 255


@pytest.mark.parametrize("mode", ["ratio", "lists"])
def test_inspect_finds_every_layout_problem(tmp_path: Path, mode: str) -> None:
    from segdeploy.data.inspect import inspect

    img, msk = tmp_path / "images", tmp_path / "masks"
    img.mkdir()
    msk.mkdir()
    for k in range(12):
        Image.fromarray(np.full((8, 8, 3), k, np.uint8)).save(img / f"k{k:02d}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(msk / f"k{k:02d}.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img / "lonely.png")  # image without mask
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(msk / "orphan.png")  # mask without image
    data: dict = {"root": str(tmp_path), "image_dir": "images", "mask_dir": "masks"}
    if mode == "ratio":
        data["split"] = {"mode": "ratio", "ratios": {"train": 0.9, "val": 0.1, "test": 0.0}}
    else:
        (tmp_path / "train.txt").write_text("\n".join(f"k{k:02d}" for k in range(8)))
        (tmp_path / "val.txt").write_text("k08\nk09\nk01\n")  # k01 is also in train
        data["split"] = {"mode": "lists", "lists": {"train": "train.txt", "val": "val.txt", "test": "val.txt"}}
    rec = recipe.validate({"data": data, "classes": {"names": ["a", "b"]}}, "t")
    problems = [p["problem"] for p in inspect(rec).problems]
    assert any("lonely.png has no mask" in p for p in problems)
    assert any("orphan.png has no image" in p for p in problems)
    if mode == "lists":
        assert any("k01.png is in both the train and val splits" in p for p in problems)
        assert any("val.txt is used for the val and test splits" in p for p in problems)
    else:
        tiny = recipe.validate({**rec.model_dump(mode="json"), "data": {**data, "split": {
            "mode": "ratio", "ratios": {"train": 0.98, "val": 0.01, "test": 0.01}}}}, "t")
        assert any("split 'val' is empty" in p or "split 'test' is empty" in p for p in
                   [p["problem"] for p in inspect(tiny).problems])


def test_fp16_that_keeps_most_of_the_compute_in_fp32_fails_and_writes_no_fp16_model(tiny_run: Path,
                                                                                      tmp_path: Path) -> None:
    from segdeploy.export.pipeline import ExportOptions, export_run

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("export", "eval"))
    strict = ["parity.fp16_agreement=1.0", "parity.max_class_iou_drop=0.0", "parity.samples=4",
              "parity.min_fp16_share=0.999"]
    with pytest.raises(ParityError, match=r"FP16 fallback stopped at the share floor: keeping \S+ in FP32 too would "
                                          r"leave only [\d.]+% of the FLOPs in FP16 \(< parity.min_fp16_share 99.9%\)"):
        export_run(run_dir, ExportOptions(fp16=True, parity_overrides=strict, max_fallback_rounds=3), log=lambda m: None)
    assert not (run_dir / "export").exists()  # nothing exported: not even the FP32 model that passed


def test_a_stale_export_is_refused_by_eval_predict_and_bench_with_the_command_that_rebuilds_it(
        tiny_fp16: Path, synth_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from segdeploy.artifact import Run

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_fp16, run_dir)  # exported with --fp16
    fp16 = json.loads((run_dir / "export/parity.json").read_text())["forms"]["fp16"]
    assert 0.5 <= fp16["reduced_flops_share"] <= 1.0 and fp16["reduced_nodes"] <= fp16["total_nodes"]
    assert "Reduced precision: FP16 on" in (run_dir / "export/parity.md").read_text()
    assert run("eval", run_dir / "export/model.fp16.onnx", "--out", tmp_path / "ok").exit_code == 0
    # retrain (here: change one weight) without re-exporting
    state = load_file(str(run_dir / "model.safetensors"))
    name = next(iter(state))
    state[name] = state[name] + 1
    save_file(state, str(run_dir / "model.safetensors"))
    for artifact, flags in (("model.onnx", ""), ("model.fp16.onnx", " --fp16")):
        text = one_line_error(run("eval", run_dir / "export" / artifact, "--out", tmp_path / "e"))
        assert f"{artifact} is stale" in text and "model.safetensors changed" in text
        assert f"re-export it with `segdeploy export {run_dir}{flags}`" in text
    text = one_line_error(run("predict", run_dir / "export/model.onnx", synth_dir / "scene/scene.tif",
                              "--out", tmp_path / "p.tif", "--no-progress"))
    assert "is stale" in text and not (tmp_path / "p.tif").exists()
    bench = run("bench", run_dir / "export/model.onnx", "--batch", "1", "--size", "64", "--iters", "2",
                "--seconds", "0.1", "--json", tmp_path / "b.json")
    assert bench.exit_code == 1
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert rows and all(r["p50_ms"] is None and "is stale" in r["reason"] for r in rows)
    # a plain export rebuilds model.onnx only: the FP16 form is left, named stale with its exact command ...
    result = run("export", run_dir, "--json", tmp_path / "x.json")
    assert result.exit_code == 0, result.output
    stale = json.loads((tmp_path / "x.json").read_text())["stale"]
    command = f"segdeploy export {run_dir} --fp16"
    assert list(stale) == ["fp16"] and "model.onnx changed" in stale["fp16"] and f"`{command}`" in stale["fp16"]
    assert json.loads((run_dir / "export/parity.json").read_text())["forms"]["fp16"]["stale"] == stale["fp16"]
    # ... and that command makes it current again
    assert run(*command.split()[1:]).exit_code == 0
    assert [(e.form.key, e.stale) for e in Run(run_dir).exports()] == [("fp32", ""), ("fp16", "")]


def test_comparison_table_averages_over_the_same_classes_in_every_row() -> None:
    from rich.console import Console

    from segdeploy.cli.evaluate import comparison_tables
    from segdeploy.evaluate import EvalReport
    from segdeploy.metrics import metrics_from_matrix

    names = ["a", "b", "c"]
    # class c is absent from the ground truth; model 2 predicts it on 10 pixels, model 1 never
    m1 = metrics_from_matrix(np.array([[90, 10, 0], [10, 90, 0], [0, 0, 0]]), names)
    m2 = metrics_from_matrix(np.array([[80, 10, 10], [10, 90, 0], [0, 0, 0]]), names)
    assert np.isnan(m1.iou[2]) and m2.iou[2] == 0  # the trap: 0 for one model, "-" for the other
    reports = [EvalReport(f"runs/m{i}", "torch", "test", 1, m, 0.0, Path(".")) for i, m in enumerate((m1, m2))]
    console = Console(width=200, record=True)
    for table in comparison_tables(reports, 200):
        console.print(table)
    text = console.export_text()
    cells = [line.replace("│", " ").split() for line in text.splitlines()]
    rows = {c[0]: c for c in cells if c and c[0] in ("m0", "m1")}  # short names: the runs' own
    assert rows["m0"][-1] == "-" and rows["m1"][-1] == "-"
    assert float(rows["m0"][1]) == pytest.approx((m1.iou[0] + m1.iou[1]) / 2, abs=1e-4)
    assert float(rows["m1"][1]) == pytest.approx((m2.iou[0] + m2.iou[1]) / 2, abs=1e-4)
    assert "means over the 2 classes present in the ground truth (absent: c)" in " ".join(text.split())


def test_parity_report_reads_drop_as_worse_and_lists_only_real_drops() -> None:
    from segdeploy.parity import Measurement, judge
    from segdeploy.recipe import ParityConfig

    rows = [{"class": "a", "iou_drop_points": 1.25, "iou_vs_reference": 0.9},
            {"class": "b", "iou_drop_points": 0.001, "iou_vs_reference": 0.99},
            {"class": "c", "iou_drop_points": -0.4, "iou_vs_reference": 0.98},
            {"class": "d", "iou_drop_points": None, "iou_vs_reference": None}]
    m = Measurement(4, 64, 0.1, 0.01, 0.05, 0.9999, 0.9995, rows)
    rep = judge(m, ParityConfig().thresholds("fp16"), "onnxruntime", "fp16", "val")
    assert [c["class"] for c in rep.worst_classes(5)] == ["a"]
    assert "worst classes by IoU drop: a 1.25 pt" in rep.summary() and "+" not in rep.summary()
    rep = judge(Measurement(4, 64, 0.1, 0.01, 0.05, 0.9999, 0.9995, rows[1:]), ParityConfig().thresholds("fp16"),
                "onnxruntime", "fp16", "val")
    assert "no class lost IoU against ground truth; most disagreement with the reference: c (IoU vs reference " \
           "98.00%), b (IoU vs reference 99.00%)" in rep.summary()


def test_freezing_a_random_encoder_warns_once_and_the_untested_training_paths_run(
        synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trainable_encoder_stages on random weights, class_weights: auto, grad clipping and max_minutes."""
    import io

    import torch
    from rich.console import Console

    from segdeploy.data.dataset import suggested_class_weights
    from segdeploy.data.inspect import inspect, recipe_for_data

    clips: list[float] = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, m: clips.append(m) or real_clip(p, m))
    rec = recipe.load(RECIPES / "demo.yaml", demo_overrides(**{
        "train.epochs": 3, "model.trainable_encoder_stages": 2, "train.grad_clip": 0.5,
        "loss": "[{name: ce, class_weights: auto}]", "train.max_minutes": 1e-6}), synth_dir)
    buf = io.StringIO()
    result = fit(rec, tmp_path / "run", progress=False, console=Console(file=buf, width=300))
    log = buf.getvalue()
    assert log.count("freezes a randomly initialised encoder") == 1
    expected = suggested_class_weights(np.asarray(inspect(recipe_for_data(synth_dir), ("train",)).pixel_counts["train"]))
    assert f"class weights (auto, median frequency): {expected}" in log
    steps = 24 // 8
    assert clips == [0.5] * steps  # one clip per step of the single epoch max_minutes allowed
    assert result.epochs_run == 1 and result.stopped_early == "train.max_minutes=1e-06 reached"


def test_early_stopping_stops_when_val_miou_stops_improving(synth_dir: Path, tmp_path: Path) -> None:
    rec = recipe.load(RECIPES / "demo.yaml", demo_overrides(**{
        "train.epochs": 6, "train.early_stopping": 1, "optimizer.lr": 1e-9, "schedule.name": "none",
        "model.trainable_encoder_stages": 0}), synth_dir)
    result = fit(rec, tmp_path / "run", progress=False)
    assert result.stopped_early == "no val mIoU gain for 1 epochs"
    assert result.epochs_run == result.best_epoch + 1 < 6
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + result.epochs_run


def test_offline_imagenet_weights_fail_fast_without_retrying(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from huggingface_hub import constants

    import segdeploy.models as models
    from segdeploy.errors import ModelError
    from segdeploy.recipe import ModelConfig

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    attempts: list[int] = []
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: attempts.append(1) or False)
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="model.weights: /path/to/encoder.safetensors"):
        models.build_model(ModelConfig(arch="unet", encoder="resnet18", weights="imagenet"), 3, 2)
    assert attempts == [1] and time.perf_counter() - t0 < 15
    assert constants.HF_HUB_OFFLINE is False  # restored for the rest of the process


# ----------------------------------------------------------------------------- predict: what a raster says


def _echo(bands: int = 1, dtype: str | None = "uint8"):  # noqa: ANN202
    from tests.test_predict import EchoBackend

    backend = EchoBackend(4, 32, bands=bands)
    backend.meta.input_dtype = dtype
    return backend


def _tif(path: Path, arr: np.ndarray, **profile: object) -> Path:
    bands = arr[None] if arr.ndim == 2 else arr
    with rasterio.open(path, "w", driver="GTiff", width=bands.shape[2], height=bands.shape[1], count=bands.shape[0],
                       dtype=str(bands.dtype), crs="EPSG:32633",
                       transform=rasterio.transform.from_origin(0, 100, 1, 1), **profile) as dst:
        dst.write(bands)
    return path


def test_predict_refuses_another_pixel_type_unless_told_how_to_rescale(tmp_path: Path) -> None:
    from segdeploy.predict import PredictOptions, predict_file

    labels = np.random.default_rng(0).integers(0, 4, (40, 40))
    src = _tif(tmp_path / "u16.tif", (labels * 1000).astype(np.uint16))
    backend = _echo()
    backend.meta.max_pixel_value = 1.0
    with pytest.raises(DataError, match=r"u16.tif is uint16 but the model was trained on uint8 .*--max-pixel-value"):
        predict_file(backend, src, tmp_path / "o.tif", PredictOptions(tile=32, overlap=8))
    assert not (tmp_path / "o.tif").exists()
    predict_file(backend, src, tmp_path / "o.tif", PredictOptions(tile=32, overlap=8, max_pixel_value=1000))
    with rasterio.open(tmp_path / "o.tif") as out:
        assert np.array_equal(out.read(1), labels)


def test_predict_honours_gdal_masks_alpha_and_band_order(tmp_path: Path) -> None:
    from rasterio.enums import ColorInterp

    from segdeploy.predict import PredictOptions, predict_file

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, (48, 48)).astype(np.uint8)
    invalid = np.zeros((48, 48), bool)
    invalid[:10, :20] = True
    opts = PredictOptions(tile=32, overlap=8)
    # 1. an internal per-dataset mask (what GDAL writes for .msk / internal masks) and no nodata value
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        src = _tif(tmp_path / "masked.tif", labels)
        with rasterio.open(src, "r+") as dst:
            dst.write_mask(np.where(invalid, 0, 255).astype(np.uint8))
    predict_file(_echo(), src, tmp_path / "m.tif", opts)
    with rasterio.open(tmp_path / "m.tif") as out:
        pred = out.read(1)
    assert (pred[invalid] == 255).all() and np.array_equal(pred[~invalid], labels[~invalid])
    # 2. RGBA for an RGB model: colour bands used, alpha is the validity mask
    rgb_model = _echo(bands=3)
    rgba = np.stack([labels, np.zeros_like(labels), np.zeros_like(labels), np.where(invalid, 0, 255).astype(np.uint8)])
    src = _tif(tmp_path / "rgba.tif", rgba, photometric="RGB", alpha="YES")
    res = predict_file(rgb_model, src, tmp_path / "a.tif", opts)
    with rasterio.open(tmp_path / "a.tif") as out:
        pred = out.read(1)
    assert (pred[invalid] == 255).all() and np.array_equal(pred[~invalid], labels[~invalid])
    assert res.bands == [1, 2, 3] and any("alpha band 4" in n for n in res.notes)
    # 3. a BGR file: its colour interpretation puts red first; --bands overrides
    bgr = np.stack([np.zeros_like(labels), np.ones_like(labels), labels])
    src = _tif(tmp_path / "bgr.tif", bgr)
    with rasterio.open(src, "r+") as dst:
        dst.colorinterp = (ColorInterp.blue, ColorInterp.green, ColorInterp.red)
    res = predict_file(rgb_model, src, tmp_path / "b.tif", opts)
    with rasterio.open(tmp_path / "b.tif") as out:
        assert np.array_equal(out.read(1), labels)
    assert res.bands == [3, 2, 1] and any("colour interpretation" in n for n in res.notes)
    res = predict_file(rgb_model, src, tmp_path / "c.tif", PredictOptions(tile=32, overlap=8, bands=[2, 1, 3]))
    with rasterio.open(tmp_path / "c.tif") as out:
        assert (out.read(1) == 1).all() and res.bands == [2, 1, 3]
    with pytest.raises(DataError, match="--bands 1,2,7: .*has bands 1..3 only"):
        predict_file(rgb_model, src, tmp_path / "d.tif", PredictOptions(tile=32, overlap=8, bands=[1, 2, 7]))


def test_predict_over_directories_and_globs(tiny_run: Path, synth_dir: Path, tmp_path: Path) -> None:
    pictures = tmp_path / "pics"
    pictures.mkdir()
    for name in ("test0000", "test0001", "test0002"):
        shutil.copy(synth_dir / f"test/{name}_sat.png", pictures / f"{name}.png")
    result = run("predict", tiny_run, pictures, "--out", tmp_path / "dir_out", "--tile", "64", "--overlap", "16",
                 "--no-progress", "--json", tmp_path / "d.json")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "dir_out").glob("*_pred.png")) == [
        "test0000_pred.png", "test0001_pred.png", "test0002_pred.png"]
    result = run("predict", tiny_run, str(pictures / "test000[12].png"), "--out", tmp_path / "glob_out",
                 "--tile", "64", "--overlap", "16", "--no-progress", "--json", tmp_path / "g.json")
    assert result.exit_code == 0, result.output
    done = json.loads((tmp_path / "g.json").read_text())["results"]
    assert [Path(r["input"]).name for r in done] == ["test0001.png", "test0002.png"]
    one = np.asarray(Image.open(tmp_path / "glob_out/test0001_pred.png"))
    assert np.array_equal(one, np.asarray(Image.open(tmp_path / "dir_out/test0001_pred.png")))


# ----------------------------------------------------------------------------- clean errors for every verb


def test_unwritable_outputs_are_one_line_in_every_verb(tiny_run: Path, synth_dir: Path, tmp_path: Path,
                                                       mounted) -> None:  # noqa: ANN001
    ro = mounted("ro")
    (tmp_path / "afile").write_text("x")
    scene = synth_dir / "scene/scene.tif"
    cases = [
        (["predict", tiny_run, scene, "--out", "/proc/x.tif"], "/proc/x.tif"),
        (["predict", tiny_run, scene, "--out", "/sys/x.tif"], "/sys/x.tif"),
        (["predict", tiny_run, scene, "--out", ro / "x.tif"], "read-only"),
        (["predict", tiny_run, scene, "--out", tmp_path / "afile" / "x.tif"], "afile"),
        (["train", RECIPES / "demo.yaml", "--data", synth_dir, "--out", "/proc/run"], "/proc/run"),
        (["train", RECIPES / "demo.yaml", "--data", synth_dir, "--out", ro / "run"], "read-only"),
        (["eval", tiny_run, "--out", "/proc/ev"], "/proc/ev"),
        (["eval", tiny_run, "--out", ro / "ev"], "read-only"),
        (["data", "synth", ro / "s", "--tile", "32", "--scene-size", "64"], "read-only"),
        (["bench", tiny_run, "--csv", "/proc/b.csv"], "/proc/b.csv"),
        (["eval", tiny_run, "--out", tmp_path / "ev2", "--json", ro / "m.json"], "read-only"),
    ]
    for args, named in cases:
        text = one_line_error(run(*args, "--no-progress") if args[0] in ("predict", "train") else run(*args))
        assert named in text and "cannot write" in text, (args, text)
    assert not list(ro.iterdir())
    # export into a run that sits on a read-only file system
    ro_run = tmp_path / "ro_run"
    shutil.copytree(tiny_run, ro_run, ignore=shutil.ignore_patterns("export", "eval"))
    subprocess.run(["mount", "--bind", "-o", "ro", str(ro_run), str(ro_run)], check=True)
    try:
        text = one_line_error(run("export", ro_run))
        assert "ro_run/export" in text and "read-only" in text
    finally:
        subprocess.run(["umount", str(ro_run)], check=True)


def test_a_full_disk_leaves_nothing_partial(tiny_run: Path, mounted, tmp_path: Path) -> None:  # noqa: ANN001
    full = mounted("full")
    (full / "filler").write_bytes(b"\0" * 84 * 1024)  # a few KB left: no output below fits
    big = np.random.default_rng(0).integers(0, 255, (3, 700, 700)).astype(np.uint8)
    src = _tif(tmp_path / "noise.tif", big)
    text = one_line_error(run("predict", tiny_run, src, "--out", full / "pred.tif", "--tile", "64", "--overlap", "16",
                              "--probs", "--no-progress"))
    assert "pred.tif" in text and "disk is full" in text
    assert [p.name for p in full.iterdir()] == ["filler"]  # no partial raster, no state file
    text = one_line_error(run("eval", tiny_run, "--out", full / "ev"))
    assert "disk is full" in text and not list((full / "ev").glob("*.tmp*"))


def test_bad_predict_arguments_are_one_line(tiny_run: Path, synth_dir: Path, tmp_path: Path) -> None:
    scene = synth_dir / "scene/scene.tif"
    text = one_line_error(run("predict", tiny_run, scene, "--out", tmp_path / "o.tif", "--bands", "3,x,1"))
    assert "--bands '3,x,1'" in text
    text = one_line_error(run("predict", tiny_run, scene, "--out", tmp_path / "o.tif", "--bands", "1,2"))
    assert "--bands gives 2 bands but the model expects 3" in text
    assert not (tmp_path / "o.tif").exists()


def test_outputs_that_exist_are_replaced_not_refused(tiny_run: Path, synth_dir: Path, tmp_path: Path) -> None:
    """The writability check looks at the folder: an existing output file is replaced (with --overwrite)."""
    scene = synth_dir / "scene/scene.tif"
    args = ["predict", tiny_run, scene, "--out", tmp_path / "p.tif", "--tile", "64", "--overlap", "16",
            "--no-progress", "--no-preview", "--json", tmp_path / "p.json"]
    for again in ([], ["--overwrite"]):  # a finished output is replaced with --overwrite (README: Outputs)
        result = run(*args, *again)
        assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "p.json").read_text())["results"][0]["output"] == str(tmp_path / "p.tif")


def test_a_failure_mid_training_marks_the_run_failed_and_resumable(synth_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected error after the first epoch is recorded in meta.json ("failed", with the error),
    the run keeps its resume checkpoint, and every hint names --resume."""
    import segdeploy.train as train_mod
    from segdeploy.artifact import Run, run_state

    real, calls = train_mod.validate, []

    def flaky(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated loss of the data volume")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "validate", flaky)
    rec = recipe.load(RECIPES / "demo.yaml", demo_overrides(**{"train.epochs": 2}), synth_dir)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated"):
        fit(rec, out, progress=False)
    info = json.loads((out / "meta.json").read_text())
    assert info["status"] == "failed" and "simulated loss of the data volume" in info["error"]
    assert info["epochs_done"] == 1 and run_state(out) == "unfinished"
    with pytest.raises(ArtifactError, match=r"unfinished \(status 'failed'\).*--resume"):
        Run(out).require_finished()
    with pytest.raises(ArtifactError, match="continue it with --resume"):
        fit(rec, out, progress=False)


def test_a_tile_the_model_cannot_train_at_is_refused_before_anything_is_written(synth_dir: Path, tmp_path: Path) -> None:
    """The issue's example, `model.arch=pan data.tile_size=96` (a tiny encoder of the same stride)."""
    from segdeploy.models import build_model, check_tile_size

    out = tmp_path / "run"
    args = ["--set", "model.arch=pan", "--set", "model.encoder=tu-test_resnet"]
    text = one_line_error(run("train", RECIPES / "demo.yaml", "--data", synth_dir, "--out", out, *args,
                              "--set", "data.tile_size=96"))
    assert "data.tile_size=96" in text and text.endswith("set data.tile_size=128") and not out.exists()
    fixed = recipe.load(RECIPES / "demo.yaml", ["model.arch=pan", "model.encoder=tu-test_resnet", "data.tile_size=128"],
                        synth_dir)
    model = build_model(fixed.model, 3, fixed.classes.num_classes)
    check_tile_size(fixed.model, model, 128, 3)  # the suggested fix passes the same check


def test_a_failure_before_the_first_epoch_ends_marks_the_run_failed_and_a_plain_retry_replaces_it(
        synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import segdeploy.train as train_mod
    from segdeploy.artifact import run_state

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("Given input size: (1x1x1). Calculated output size: (1x0x0). Output size is too small")

    monkeypatch.setattr(train_mod, "_train_epoch", broken)
    rec = recipe.load(RECIPES / "demo.yaml", demo_overrides(**{"train.epochs": 1}), synth_dir)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="Output size is too small"):
        fit(rec, out, progress=False)
    info = json.loads((out / "meta.json").read_text())
    assert info["status"] == "failed" and "Output size is too small" in info["error"] and run_state(out) == "unstarted"
    assert train_mod.plan_output(out, resume=False, overwrite=False) == "replace"  # no --overwrite demanded
