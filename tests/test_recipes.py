"""Meta-tests that keep the catalogue honest, and the recipe schema's error wording."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segdeploy import recipe
from segdeploy.errors import RecipeError
from segdeploy.models import ARCHITECTURES, build_model, facts
from tests.conftest import RECIPES

RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))


def test_catalogue_covers_every_setup_of_the_brief() -> None:
    names = {p.stem for p in RECIPE_FILES}
    expected = {"demo", "deepglobe_unet", "deepglobe_fpn", "deepglobe_pspnet", "satellite_vit_large",
                "satellite_irv2_unet", "multiclass_deeplabv3plus_weighted_ce", "pascal_part_hierarchy_unet",
                "pascal_part_hierarchy_deeplabv3plus"}
    expected |= {f"lesion_{a}_{l}" for a in ("segnet", "unet", "unet_strided") for l in ("bce", "dice", "focal")}
    assert expected <= names


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
def test_every_recipe_validates_and_builds_its_model(path: Path) -> None:
    rec = recipe.load(path)
    # the architecture under test, not the download: weights stay random here (offline)
    model = build_model(rec.model.model_copy(update={"weights": None}), rec.data.bands, rec.classes.num_classes).eval()
    known = facts(rec.model, model)
    size = known.static_size or max(128, known.input_divisor * 2, known.min_tile)
    with torch.inference_mode():
        out = model(torch.randn(1, rec.data.bands, size, size))
    assert out.shape == (1, rec.classes.num_classes, size, size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ARCHITECTURES.names())
def test_every_registered_architecture_runs_on_a_tiny_input(arch: str) -> None:
    encoder = {"dpt": "tu-test_vit", "segformer": "mit_b0", "vit_segmenter": "test_vit"}.get(arch, "resnet18")
    kwargs = {"vit_segmenter": {"img_size": 64}, "segnet": {"widths": [8, 16, 16]},
              "unet_strided": {"widths": [8, 16, 32]}}.get(arch, {})
    model = build_model(recipe.ModelConfig(arch=arch, encoder=encoder, kwargs=kwargs), 4, 3).eval()
    size = 64 if arch in ("vit_segmenter", "segnet", "unet_strided") else 128
    with torch.inference_mode():
        assert model(torch.randn(2, 4, size, size)).shape == (2, 3, size, size)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


BASE = "classes: {names: [a, b]}\n"


def test_misspelt_key_in_file_names_key_file_and_suggestion(tmp_path: Path) -> None:
    p = _write(tmp_path, BASE + "optimizer: {lrr: 0.1}\n")
    with pytest.raises(RecipeError, match=r"unknown key 'optimizer.lrr' in .*r.yaml \(did you mean 'optimizer.lr'\?\)"):
        recipe.load(p)


def test_key_in_wrong_section_points_to_its_home(tmp_path: Path) -> None:
    p = _write(tmp_path, BASE)
    with pytest.raises(RecipeError, match=r"unknown key 'train.lr' in --set .*did you mean 'optimizer.lr'"):
        recipe.load(p, ["train.lr=0.1"])


def test_range_and_type_errors_speak_in_user_terms(tmp_path: Path) -> None:
    p = _write(tmp_path, BASE + "optimizer: {lr: -1}\n")
    with pytest.raises(RecipeError, match=r"optimizer.lr: input should be greater than 0 \(got -1\) in .*r.yaml"):
        recipe.load(p)
    with pytest.raises(RecipeError, match=r"train.epochs: .*integer.*\(got \"many\"\)"):
        recipe.load(_write(tmp_path, BASE), ["train.epochs=many"])


def test_cross_field_rules(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="classes.palette is required"):
        recipe.load(_write(tmp_path, BASE + "data: {mask_encoding: palette}\n"))
    with pytest.raises(RecipeError, match="data.mean has 3 values for 4 bands"):
        recipe.load(_write(tmp_path, BASE + "data: {bands: 4}\n"))
    with pytest.raises(RecipeError, match="classes.palette has 1 colours for 2 names"):
        recipe.load(_write(tmp_path, "classes: {names: [a, b], palette: [[0, 0, 0]]}\n"))


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"r.yaml line \d+ is not valid YAML"):
        recipe.load(_write(tmp_path, BASE + "model: {arch: [unet\n"))


def test_overrides_are_typed_by_yaml_and_data_sets_root(tmp_path: Path) -> None:
    rec = recipe.load(_write(tmp_path, BASE), ["train.epochs=3", "loss=[ce, dice]", "augment.rot90=true"], tmp_path)
    assert rec.train.epochs == 3 and [t.name for t in rec.loss] == ["ce", "dice"] and rec.augment.rot90 is True
    assert rec.data.root == str(tmp_path)


def test_extends_merges_deeply_and_refuses_cycles(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(BASE + "model: {arch: fpn, encoder: resnet34}\ntrain: {epochs: 7}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nmodel: {encoder: resnet18}\n")
    rec = recipe.load(tmp_path / "child.yaml")
    assert (rec.model.arch, rec.model.encoder, rec.train.epochs) == ("fpn", "resnet18", 7)
    (tmp_path / "base.yaml").write_text("extends: child.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        recipe.load(tmp_path / "child.yaml")


def test_resolved_recipe_round_trips_and_digest_ignores_root(tmp_path: Path) -> None:
    rec = recipe.load(RECIPES / "demo.yaml", data_root=tmp_path)
    again = recipe.validate(__import__("yaml").safe_load(rec.to_yaml()), "saved")
    assert again == rec
    other = recipe.load(RECIPES / "demo.yaml", ["train.epochs=1"], data_root="/elsewhere")
    assert other.digest() == rec.digest()
    assert recipe.load(RECIPES / "demo.yaml", ["model.encoder=resnet34"]).digest() != rec.digest()
