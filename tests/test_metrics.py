"""Metrics checked against torchmetrics on random label maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassF1Score, MulticlassJaccardIndex, MulticlassPrecision, MulticlassRecall

from segdeploy.classes import hierarchy_levels
from segdeploy.metrics import ConfusionMatrix, level_mious


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_metrics_match_torchmetrics_with_ignore_index(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    c = 5
    target = torch.randint(0, c, (4, 32, 32), generator=g)
    pred = torch.where(torch.rand(4, 32, 32, generator=g) < 0.6, target, torch.randint(0, c, (4, 32, 32), generator=g))
    target[:, :3] = 255  # ignored rows
    cm = ConfusionMatrix(c, 255)
    cm.update(pred[:2], target[:2])  # streaming: two updates
    cm.update(pred[2:], target[2:])
    m = cm.compute()
    kw = dict(num_classes=c, ignore_index=255, average="none")
    np.testing.assert_allclose(m.iou, MulticlassJaccardIndex(**kw)(pred, target).numpy(), atol=1e-6)
    np.testing.assert_allclose(m.dice, MulticlassF1Score(**kw)(pred, target).numpy(), atol=1e-6)
    np.testing.assert_allclose(m.precision, MulticlassPrecision(**kw)(pred, target).numpy(), atol=1e-6)
    np.testing.assert_allclose(m.recall, MulticlassRecall(**kw)(pred, target).numpy(), atol=1e-6)
    assert m.miou == pytest.approx(float(MulticlassJaccardIndex(num_classes=c, ignore_index=255)(pred, target)), abs=1e-6)
    valid = target != 255
    assert m.pixel_accuracy == pytest.approx(float((pred[valid] == target[valid]).float().mean()))
    assert m.matrix.sum() == int(valid.sum())


def test_absent_class_is_nan_and_excluded_from_mean_and_background_exclusion() -> None:
    target = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1]])
    cm = ConfusionMatrix(3, None)
    cm.update(pred, target)
    m = cm.compute()
    assert np.isnan(m.iou[2])
    assert m.miou == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert cm.compute(exclude_background=True).miou == pytest.approx(2 / 3)


PARTS = ["background", "low_hand", "torso", "low_leg", "head", "up_leg", "up_hand"]
TREE = {"body": ["upper_body", "lower_body"], "upper_body": ["low_hand", "up_hand", "torso", "head"],
        "lower_body": ["low_leg", "up_leg"]}


def test_hierarchy_levels_group_leaves_by_ancestor() -> None:
    levels = hierarchy_levels(PARTS, TREE)
    assert levels[0] == ["background"] + ["body"] * 6
    assert levels[1] == ["background", "upper_body", "upper_body", "lower_body", "upper_body", "lower_body", "upper_body"]
    assert levels[2] == PARTS


def test_level_miou_equals_miou_of_relabelled_maps() -> None:
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, 7, (2, 40, 40), generator=g)
    pred = torch.where(torch.rand(2, 40, 40, generator=g) < 0.5, target, torch.randint(0, 7, (2, 40, 40), generator=g))
    cm = ConfusionMatrix(7, None)
    cm.update(pred, target)
    got = level_mious(cm.matrix, PARTS, TREE)
    for d, groups in enumerate(hierarchy_levels(PARTS, TREE)):
        labels = list(dict.fromkeys(groups))
        lut = torch.tensor([labels.index(gr) for gr in groups])
        ref = MulticlassJaccardIndex(num_classes=len(labels))(lut[pred], lut[target])
        assert list(got.values())[d] == pytest.approx(float(ref), abs=1e-6)


def test_bad_hierarchy_is_rejected() -> None:
    with pytest.raises(ValueError, match="two parents"):
        hierarchy_levels(["a", "b"], {"x": ["a"], "y": ["a"]})
    with pytest.raises(ValueError, match="neither a class name nor a group"):
        hierarchy_levels(["a", "b"], {"x": ["a", "zzz"]})


def test_the_default_palette_is_matplotlibs_tab20_without_importing_matplotlib() -> None:
    """recipe fills a missing palette from `classes.TAB20`, written out so the schema never imports
    matplotlib; it must be the colormap it names."""
    import subprocess
    import sys

    from matplotlib import colormaps

    from segdeploy.classes import default_palette

    tab20 = colormaps["tab20"]
    assert default_palette(23) == [tuple(int(255 * v) for v in tab20(i % 20)[:3]) for i in range(23)]
    code = ("import sys; from segdeploy.recipe import ClassesConfig; ClassesConfig(names=list('abc'), "
            "hierarchy={'g': ['a', 'b']}).display_palette(); print(sorted({'matplotlib', 'numpy'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
