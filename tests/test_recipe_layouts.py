"""Every shipped recipe passes `data inspect` on a tiny copy of the layout its dataset ships in
(README's recipe table and each recipe's header), built here file by file; and the split-leak
check compares files, not names."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from segdeploy import recipe
from segdeploy.data.inspect import inspect
from tests.conftest import RECIPES

RECIPE_FILES = sorted(p for p in RECIPES.glob("*.yaml") if not p.name.startswith("_"))
RNG = np.random.default_rng(7)


def _image(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _labels(h: int, w: int, classes: int) -> np.ndarray:
    return RNG.integers(0, classes, (h, w)).astype(np.uint8)


def deepglobe(root: Path, rec: recipe.Recipe) -> dict:
    """DeepGlobe land cover: train/<id>_sat.jpg + train/<id>_mask.png (RGB palette), one folder."""
    palette = np.asarray(rec.classes.palette, np.uint8)
    (root / "train").mkdir(parents=True)
    counts = np.zeros(rec.classes.num_classes, np.int64)
    for i in range(30):
        labels = _labels(40, 40, rec.classes.num_classes)
        Image.fromarray(_image(40, 40)).save(root / "train" / f"{100 + i * 37}_sat.jpg", quality=90)
        Image.fromarray(palette[labels]).save(root / "train" / f"{100 + i * 37}_mask.png")
        counts += np.bincount(labels.ravel(), minlength=len(counts))
    return {"total": 30, "pixels": counts}


def lesion(root: Path, rec: recipe.Recipe) -> dict:
    """PH2/ISIC-style lesions: images/<id>.jpg + masks/<id>_segmentation.png, binary 0/255."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    counts = np.zeros(2, np.int64)
    for i in range(30):
        labels = _labels(36, 48, 2)
        Image.fromarray(_image(36, 48)).save(root / "images" / f"ISIC_{i:07d}.jpg")
        Image.fromarray(labels * 255).save(root / "masks" / f"ISIC_{i:07d}_segmentation.png")
        counts += np.bincount(labels.ravel(), minlength=2)
    return {"total": 30, "pixels": counts}


def mmseg(root: Path, rec: recipe.Recipe) -> dict:
    """mmsegmentation: img_dir/{train,val}/NNNN.png + ann_dir/... (index masks), each split numbered
    from zero (equal names, different files), and no test folder."""
    counts: dict[str, np.ndarray] = {}
    for split, n in (("train", 6), ("val", 3)):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        counts[split] = np.zeros(rec.classes.num_classes, np.int64)
        for i in range(n):
            labels = _labels(32, 32, rec.classes.num_classes)
            Image.fromarray(_image(32, 32)).save(root / "img_dir" / split / f"{i:04d}.png")
            Image.fromarray(labels).save(root / "ann_dir" / split / f"{i:04d}.png")
            counts[split] += np.bincount(labels.ravel(), minlength=len(counts[split]))
    return {"splits": {"train": 6, "val": 3}, "pixels_by_split": counts}


def pascal_part(root: Path, rec: recipe.Recipe) -> dict:
    """Pascal-part (the original project's layout): JPEGImages/<id>.jpg, gt_masks/<id>.npy,
    train_id.txt and val_id.txt; no test list."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "gt_masks").mkdir()
    ids = {"train": [f"2008_{i:06d}" for i in range(5)], "val": [f"2009_{i:06d}" for i in range(3)]}
    counts: dict[str, np.ndarray] = {}
    for split, keys in ids.items():
        counts[split] = np.zeros(rec.classes.num_classes, np.int64)
        for k in keys:
            labels = _labels(30, 44, rec.classes.num_classes)
            Image.fromarray(_image(30, 44)).save(root / "JPEGImages" / f"{k}.jpg")
            np.save(root / "gt_masks" / f"{k}.npy", labels.astype(np.int64))
            counts[split] += np.bincount(labels.ravel(), minlength=len(counts[split]))
        (root / f"{split}_id.txt").write_text("\n".join(keys) + "\n")
    return {"splits": {"train": 5, "val": 3}, "pixels_by_split": counts}


def satellite(root: Path, rec: recipe.Recipe) -> dict:
    """Aerial city tiles: images/*.jpg + masks/*.png coloured with the recipe's palette."""
    palette = np.asarray(rec.classes.palette, np.uint8)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    counts = np.zeros(rec.classes.num_classes, np.int64)
    for i in range(50):
        labels = _labels(32, 32, rec.classes.num_classes)
        Image.fromarray(_image(32, 32)).save(root / "images" / f"image_part_{i:03d}.jpg")
        Image.fromarray(palette[labels]).save(root / "masks" / f"image_part_{i:03d}.png")
        counts += np.bincount(labels.ravel(), minlength=len(counts))
    return {"total": 50, "pixels": counts}


LAYOUTS: dict[str, Callable[[Path, recipe.Recipe], dict]] = {
    "deepglobe": deepglobe, "lesion": lesion, "multiclass": mmseg, "pascal_part": pascal_part, "satellite": satellite,
}


def layout_of(path: Path) -> str:
    return "demo" if path.stem == "demo" else next(k for k in LAYOUTS if path.stem.startswith(k))


def test_every_shipped_recipe_has_a_layout_here() -> None:
    assert all(layout_of(p) for p in RECIPE_FILES)


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
def test_each_recipe_passes_inspect_on_its_documented_layout(path: Path, tmp_path: Path, synth_dir: Path) -> None:
    layout = layout_of(path)
    if layout == "demo":
        root, expected = synth_dir, None
    else:
        root = tmp_path / layout
        expected = LAYOUTS[layout](root, recipe.load(path))
    rec = recipe.load(path, data_root=root)
    report = inspect(rec)
    assert report.ok, report.problems
    if expected is None:
        return
    if "splits" in expected:  # lists and folders: exact splits, absent ones absent
        assert report.splits == expected["splits"]
        for split, counts in expected["pixels_by_split"].items():
            assert report.pixel_counts[split] == counts.tolist()
    else:  # a seeded ratio split: every image in exactly one split, every pixel counted once
        assert sum(report.splits.values()) == expected["total"] and set(report.splits) == set(rec.data.split.ratios)
        assert np.sum([report.pixel_counts[s] for s in report.splits], axis=0).tolist() == expected["pixels"].tolist()


def test_pascal_part_layout_passes_data_inspect_on_the_command_line(tmp_path: Path) -> None:
    from segdeploy.cli import app

    root = tmp_path / "pascal_part"
    pascal_part(root, recipe.load(RECIPES / "pascal_part_hierarchy_unet.yaml"))
    result = CliRunner().invoke(app, ["data", "inspect", str(RECIPES / "pascal_part_hierarchy_unet.yaml"),
                                      "--data", str(root), "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    import re

    assert "no integrity problems found" in result.output and re.search(r"\bval \(3\)", result.output)
    assert not re.search(r"\btest \(\d+\)", result.output)  # an absent split is absent


def _mmseg_recipe(root: Path) -> recipe.Recipe:
    return recipe.load(RECIPES / "multiclass_deeplabv3plus_weighted_ce.yaml", data_root=root)


def test_the_same_image_in_two_splits_is_a_leak_whatever_its_name_and_equal_names_are_not(tmp_path: Path) -> None:
    from segdeploy.data.dataset import discover, images_in_several_splits, leak_message

    root = tmp_path / "mm"
    mmseg(root, _mmseg_recipe(root))
    rec = _mmseg_recipe(root)
    splits = {s: discover(rec.data, s) for s in ("train", "val")}
    assert {s.key for s in splits["train"]} & {s.key for s in splits["val"]}  # equal names ...
    assert images_in_several_splits(splits) == []  # ... of different files: no leak
    # a test split holding a renamed copy of a val image (same bytes), and a train image
    for d in ("img_dir", "ann_dir"):
        (root / d / "test").mkdir()
        shutil.copy(root / d / "val" / "0002.png", root / d / "test" / "renamed.png")
        shutil.copy(root / d / "train" / "0005.png", root / d / "test" / "0000.png")
    splits["test"] = discover(rec.data, "test")
    shared = images_in_several_splits(splits)
    assert sorted((s.splits, s.paths[0].name, s.paths[1].name) for s in shared) == [
        (("train", "test"), "0005.png", "0000.png"), (("val", "test"), "0002.png", "renamed.png")]
    message = leak_message([s for s in shared if s.splits == ("val", "test")])
    assert "the val and test splits" in message and "training" not in message and "\n" not in message
    problems = inspect(rec).problems
    assert sum("are the same image" in p["problem"] for p in problems) == 2


def test_training_refuses_a_leak_naming_the_two_splits(tmp_path: Path) -> None:
    from segdeploy.errors import DataError
    from segdeploy.train import prepare_data

    root = tmp_path / "mm"
    mmseg(root, _mmseg_recipe(root))
    rec = _mmseg_recipe(root)
    for d in ("img_dir", "ann_dir"):
        shutil.copy(root / d / "train" / "0001.png", root / d / "val" / "copy.png")
    with pytest.raises(DataError, match=r"0001.png and .*copy.png are the same image, in the train and val splits "
                                        r"\(1 such image in all\)"):
        prepare_data(rec, console=None)


class ConstantBackend:
    """Predicts class 1 everywhere: enough to see which split eval scores."""

    name, precision, device, max_batch, static_size = "constant", "fp32", "cpu", None, None

    def __init__(self, classes: int) -> None:
        from segdeploy.artifact import ModelMeta

        self.meta = ModelMeta(classes=[f"c{i}" for i in range(classes)], palette=[[i, i, i] for i in range(classes)],
                              mean=[0.0] * 3, std=[1.0] * 3, max_pixel_value=255, bands=3, input_divisor=32,
                              tile_size=64)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = np.zeros((len(batch), self.meta.num_classes, *batch.shape[-2:]), np.float32)
        out[:, 1] = 1.0
        return out

    def describe(self) -> str:
        return "constant"


def test_eval_without_a_test_split_scores_val_and_says_so_and_an_absent_split_is_refused(tmp_path: Path) -> None:
    from segdeploy.errors import DataError
    from segdeploy.evaluate import evaluate

    path = RECIPES / "pascal_part_hierarchy_unet.yaml"
    expected = pascal_part(tmp_path / "pp", recipe.load(path))
    backend = ConstantBackend(7)
    report = evaluate(tmp_path / "m.onnx", recipe_path=path, data_root=tmp_path / "pp", backend=backend, plots=False)
    assert (report.split, report.images, report.split_reason) == ("val", 3, "the layout defines no test split")
    truth = expected["pixels_by_split"]["val"]
    assert report.metrics.matrix[:, 1].tolist() == truth.tolist()  # every val pixel, predicted as class 1
    with pytest.raises(DataError, match=r"defines no test split \(it has train, val\); use --split val$"):
        evaluate(tmp_path / "m.onnx", "test", recipe_path=path, data_root=tmp_path / "pp", backend=backend)
