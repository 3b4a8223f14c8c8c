"""The CLI contract: verb names, one-line errors with exit codes, JSON output, quickstart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from segdeploy.cli import app
from tests.conftest import RECIPES

runner = CliRunner()


def run(*args: str):  # noqa: ANN201
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_every_verb() -> None:
    out = run("--help").output
    for verb in ("train", "eval", "export", "predict", "bench", "data", "quickstart", "import"):
        assert verb in out
    data_help = run("data", "--help").output
    assert "synth" in data_help and "inspect" in data_help


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "missing.yaml"], "error: recipe missing.yaml not found"),
        (["train", RECIPES / "demo.yaml", "--set", "train.lr=1"], "did you mean 'optimizer.lr'"),
        (["train", RECIPES / "demo.yaml", "--set", "model.arch=unett"], "unknown architecture 'unett' in model.arch"),
        (["train", RECIPES / "demo.yaml", "--set", "model.encoder=resnt18"], "did you mean 'resnet18'"),
        (["train", RECIPES / "demo.yaml"], "data.root is not set"),
        (["eval", "nowhere"], "model nowhere not found"),
        (["eval", "model.pt"], "not found"),
    ],
)
def test_bad_input_is_one_line_nonzero_without_traceback(args: list, message: str) -> None:
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_several_overrides_after_one_set_name_the_command_line_that_works() -> None:
    """`--set a=1 b=2` was "Got unexpected extra argument(s)" with no hint; the hint's command line parses,
    and each override reaches the recipe (a misspelt second key is caught by the recipe's own check)."""
    demo = RECIPES / "demo.yaml"
    result = run("train", demo, "--set", "train.epochs=3", "data.tile_size=64", "train.lr=1")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    fix = "--set data.tile_size=64 --set train.lr=1"
    assert f"--set takes one key=value, so repeat it: {fix}" in result.output
    fixed = run("train", demo, "--set", "train.epochs=3", *fix.split())
    assert fixed.exit_code == 2 and "'train.lr'" in fixed.output and "did you mean 'optimizer.lr'" in fixed.output
    other = run("train", demo, "extra_arg")  # another usage error: no --set hint
    assert other.exit_code == 2 and "repeat it" not in other.output


def test_debug_shows_the_traceback() -> None:
    import traceback

    from segdeploy.errors import RecipeError

    plain = run("train", "missing.yaml")
    assert isinstance(plain.exception, SystemExit) and "Traceback" not in plain.output
    result = run("--debug", "train", "missing.yaml")
    assert result.exit_code != 0 and isinstance(result.exception, RecipeError)
    shown = "".join(traceback.format_exception(*result.exc_info))
    assert shown.startswith("Traceback") and "recipe.py" in shown and "RecipeError: recipe missing.yaml not found" in shown
    after = run("train", "missing.yaml", "--debug")  # after the verb means the same
    assert isinstance(after.exception, RecipeError)
    nested = run("data", "inspect", "nowhere.yaml", "--debug")
    assert isinstance(nested.exception, RecipeError)


def test_unknown_palette_colour_fails_train_naming_file_and_colour(synth_dir: Path, tmp_path: Path) -> None:
    import shutil

    import numpy as np
    from PIL import Image

    data = tmp_path / "d"
    shutil.copytree(synth_dir, data, ignore=shutil.ignore_patterns("scene"))
    m = np.asarray(Image.open(data / "train/train0003_mask.png")).copy()
    m[0, 0] = (7, 7, 7)
    Image.fromarray(m).save(data / "train/train0003_mask.png")
    result = run("train", RECIPES / "demo.yaml", "--data", data, "--out", tmp_path / "run", "--set", "train.epochs=1",
                 "--set", "data.tile_size=64", "--no-progress")
    assert result.exit_code == 2
    assert "train0003_mask.png has colour [7, 7, 7]" in result.output
    meta = tmp_path / "run" / "meta.json"
    assert not meta.exists() or json.loads(meta.read_text())["status"] != "complete"


def test_data_inspect_json_and_chart(synth_dir: Path, tmp_path: Path) -> None:
    result = run("data", "inspect", synth_dir, "--json", tmp_path / "r.json", "--plot", tmp_path / "c.png")
    assert result.exit_code == 0, result.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["ok"] and rep["splits"]["train"] == 24 and len(rep["suggested_class_weights"]) == 5
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_eval_json_has_per_class_and_confusion(tiny_run: Path, tmp_path: Path) -> None:
    result = run("eval", tiny_run, "--split", "test", "--json", tmp_path / "e.json", "--out", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    rep = json.loads((tmp_path / "e.json").read_text())
    assert rep["split"] == "test" and rep["images"] == 8
    assert [c["class"] for c in rep["per_class"]] == ["field", "forest", "water", "road", "building"]
    assert {"iou", "dice", "precision", "recall", "f1"} <= set(rep["per_class"][0])
    assert len(rep["confusion_matrix"]) == 5 and 0 <= rep["miou"] <= 1
    assert "IoU" in result.output and "building" in result.output


def test_quickstart_trains_the_demo_to_real_accuracy(tmp_path: Path) -> None:
    """The README's promise: the demo recipe learns (test mIoU ≥ 0.75) on 2 CPU cores."""
    result = run("quickstart", tmp_path / "qs", "--scene-size", "512", "--epochs", "6", "--no-progress",
                 "--json", tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["test_miou"] >= 0.75 and summary["best_val_miou"] >= 0.75
    for path in summary["artifacts"].values():
        assert Path(path).exists()
    assert summary["parity"]["fp32"]["passed"] and summary["parity"]["fp16"]["passed"]
    assert summary["parity"]["fp16"]["agreement"] >= 0.999
    assert summary["scene_prediction"]["pixel_accuracy"] >= 0.9
    # predict's peak memory is its own process's, not this (training) process's lifetime peak
    from segdeploy.utils import peak_rss_mb

    assert 0 < summary["scene_prediction"]["peak_rss_mb"] < peak_rss_mb() / 2


def test_predict_cli_writes_geotiff_and_json_and_fails_in_one_line(tiny_run: Path, synth_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred.tif"
    result = run("predict", tiny_run, synth_dir / "scene/scene.tif", "--out", out, "--tile", "64", "--overlap", "16",
                 "--no-progress", "--json", tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "p.json").read_text())["results"][0]
    assert summary["width"] == 256 and summary["tiles"] == 25 and summary["megapixels_per_s"] > 0
    assert out.exists() and not (tmp_path / "pred.tif.partial.json").exists()
    bad = run("predict", tiny_run, tmp_path / "nope.tif", "--out", tmp_path / "x.tif")
    assert bad.exit_code == 2 and "error: input" in bad.output and "not found" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    odd = run("predict", tiny_run, synth_dir / "scene/scene.tif", "--out", tmp_path / "y.tif", "--tile", "50")
    assert odd.exit_code == 2 and "multiple of the model's input divisor 32" in odd.output


def test_data_synth_cli(tmp_path: Path) -> None:
    result = run("data", "synth", tmp_path / "s", "--tile", "32", "--scene-size", "64", "--train", "3", "--val", "2",
                 "--test", "1", "--json", tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "s.json").read_text())
    assert info["splits"] == {"train": 3, "val": 2, "test": 1}
    assert len(list((tmp_path / "s/train").glob("*_sat.png"))) == 3 and Path(info["scene"]).exists()
    assert (tmp_path / "s/dataset.yaml").exists()


def test_eval_several_runs_prints_a_comparison_table(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    first, other = tmp_path / "first", tmp_path / "other"  # copies: the session run is shared, read-only
    for copy in (first, other):
        shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("eval", "export"))
    result = runner.invoke(app, ["eval", str(first), str(other), "--json", str(tmp_path / "c.json")],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "model comparison" in result.output
    rep = json.loads((tmp_path / "c.json").read_text())
    assert [m["model"] for m in rep["models"]] == [str(first), str(other)]
    assert rep["models"][0]["miou"] == rep["models"][1]["miou"]  # same weights, same numbers
