"""Training run directories, resume, and evaluation of a run."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from segdeploy import recipe
from segdeploy.errors import ArtifactError, DataError
from segdeploy.evaluate import evaluate
from segdeploy.train import fit
from tests.conftest import RECIPES, demo_overrides


def test_run_directory_is_self_describing(tiny_run: Path) -> None:
    names = {p.name for p in tiny_run.iterdir()}
    assert {"model.safetensors", "recipe.yaml", "meta.json", "history.csv", "last.ckpt", "plots"} <= names
    meta = json.loads((tiny_run / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["epochs_run"] == 2
    mm = meta["model_meta"]
    assert mm["classes"] == ["field", "forest", "water", "road", "building"]
    assert mm["palette"][3] == [128, 128, 128] and mm["input_divisor"] == 32 and mm["bands"] == 3
    assert len(mm["mean"]) == 3 and mm["recipe_digest"] == recipe.load(tiny_run / "recipe.yaml").digest()
    rows = list(csv.DictReader((tiny_run / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert max(float(r["val_miou"]) for r in rows) == pytest.approx(meta["best_val_miou"])
    assert (tiny_run / "plots/loss.png").stat().st_size > 1000 and (tiny_run / "plots/miou.png").is_file()
    # resume state holds tensors and plain values only
    state = torch.load(tiny_run / "last.ckpt", weights_only=True)
    assert state["epoch"] == 2


def test_resume_continues_where_it_stopped(synth_dir: Path, tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    rec = recipe.load(RECIPES / "demo.yaml", demo_overrides(**{"train.epochs": 3}), synth_dir)
    result = fit(rec, run, resume=True, progress=False)
    assert result.epochs_run == 3
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    other = recipe.load(RECIPES / "demo.yaml", demo_overrides(**{"model.encoder": "resnet34"}), synth_dir)
    with pytest.raises(ArtifactError, match="different recipe"):
        fit(other, run, resume=True, progress=False)
    with pytest.raises(ArtifactError, match="already holds a finished run; pass --overwrite .* --resume"):
        fit(rec, run, progress=False)


def test_unfinished_run_is_refused_with_the_resume_command(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "half"
    shutil.copytree(tiny_run, run)
    meta = json.loads((run / "meta.json").read_text())
    meta["status"] = "training"
    (run / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"unfinished .* --resume"):
        evaluate(run)


def test_bad_data_fails_before_anything_is_written(synth_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data, ignore=shutil.ignore_patterns("scene"))
    (data / "val" / "val0000_mask.png").unlink()
    rec = recipe.load(RECIPES / "demo.yaml", demo_overrides(), data)
    with pytest.raises(DataError, match=r"val0000_sat.png has no mask"):
        fit(rec, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_eval_matches_training_validation_and_writes_plots(tiny_run: Path, tmp_path: Path) -> None:
    report = evaluate(tiny_run, "val", out_dir=tmp_path / "ev")  # the session run is shared: written elsewhere
    meta = json.loads((tiny_run / "meta.json").read_text())
    assert report.images == 8
    assert report.metrics.miou == pytest.approx(meta["best_val_miou"], abs=1e-6)
    out = report.to_dict()
    assert len(out["per_class"]) == 5 and len(out["confusion_matrix"]) == 5
    assert sum(map(sum, out["confusion_matrix"])) == 8 * 64 * 64  # every val pixel counted once
    files = {p.name for p in report.files}
    assert {"metrics.json", "confusion_matrix.png", "overlay_00.png"} <= files
    from PIL import Image

    # a titled four-panel figure (image / ground truth / prediction / errors) with a legend row
    assert Image.open(report.out_dir / "overlay_00.png").size == (1300, 390)


def test_hierarchy_run_reports_levels(synth_dir: Path, tmp_path: Path) -> None:
    tree = "{natural: [field, forest, water], built: [road, building]}"
    rec = recipe.load(RECIPES / "demo.yaml", demo_overrides(**{"train.epochs": 1, "classes.hierarchy": tree}), synth_dir)
    fit(rec, tmp_path / "run", progress=False)
    meta = json.loads((tmp_path / "run/meta.json").read_text())
    levels = meta["best_val_levels"]
    assert list(levels) == ["level0 (2 classes)", "level1 (5 classes)"]
    assert levels["level1 (5 classes)"] == pytest.approx(meta["best_val_miou"], abs=1e-6)
    report = evaluate(tmp_path / "run", "val")
    assert report.metrics.levels == pytest.approx(levels)
