"""Model specifics (SegNet indices, strided U-Net, freezing, weights) and losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from segdeploy.errors import ModelError, RecipeError, UnknownNameError
from segdeploy.losses import build_loss
from segdeploy.models import build_model, freeze_encoder, read_state_dict
from segdeploy.recipe import LossTerm, ModelConfig


def test_segnet_upsamples_with_pooling_indices() -> None:
    m = build_model(ModelConfig(arch="segnet", kwargs={"widths": [8, 16]}), 3, 2)
    kinds = {type(x) for x in m.modules()}
    assert nn.MaxUnpool2d in kinds and all(p.return_indices for p in m.modules() if isinstance(p, nn.MaxPool2d))
    assert not any(isinstance(x, (nn.Upsample, nn.ConvTranspose2d)) for x in m.modules())


def test_strided_unet_has_no_pooling_and_no_interpolation() -> None:
    m = build_model(ModelConfig(arch="unet_strided", kwargs={"widths": [8, 16, 32]}), 3, 2)
    assert not any(isinstance(x, (nn.MaxPool2d, nn.AvgPool2d, nn.Upsample)) for x in m.modules())
    assert sum(isinstance(x, nn.ConvTranspose2d) for x in m.modules()) == 2
    assert sum(isinstance(x, nn.Conv2d) and x.stride == (2, 2) for x in m.modules()) == 2


def test_freeze_all_but_last_two_encoder_stages() -> None:
    m = build_model(ModelConfig(arch="unet", encoder="resnet18"), 3, 4)
    frozen_bn = freeze_encoder(m, 2)
    trainable = {n.split(".")[0] for n, p in m.encoder.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    assert all(p.requires_grad for p in m.decoder.parameters())
    assert frozen_bn and all(not any(p.requires_grad for p in b.parameters()) for b in frozen_bn)
    with pytest.raises(ModelError, match="exposes only its last 2 stages"):
        freeze_encoder(build_model(ModelConfig(arch="unet", encoder="resnet18"), 3, 4), 3)


def test_imagenet_offline_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as err:
        build_model(ModelConfig(arch="unet", encoder="resnet18", weights="imagenet"), 3, 2)
    msg = str(err.value)
    assert "\n" not in msg and "resnet18" in msg and "model.weights: /path/to/encoder.safetensors" in msg


def test_local_encoder_weights_load_from_safetensors_and_pth(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = build_model(ModelConfig(arch="unet", encoder="resnet18"), 3, 2)
    save_file({k: v.contiguous() for k, v in src.encoder.state_dict().items()}, str(tmp_path / "enc.safetensors"))
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in src.encoder.state_dict().items()}}, tmp_path / "enc.pth")
    for f in ("enc.safetensors", "enc.pth"):
        dst = build_model(ModelConfig(arch="fpn", encoder="resnet18", weights=str(tmp_path / f)), 3, 2)
        torch.testing.assert_close(dst.encoder.conv1.weight, src.encoder.conv1.weight)
    with pytest.raises(ModelError, match="does not fit"):
        build_model(ModelConfig(arch="unet", encoder="resnet34", weights=str(tmp_path / "enc.safetensors")), 3, 2)


def test_checkpoints_are_never_unpickled(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (print, ("pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ModelError, match="pickled Python object.*--trust-pickle"):
        read_state_dict(tmp_path / "evil.pth")


@pytest.mark.parametrize("name", ["ce", "bce", "dice", "focal", "jaccard", "lovasz", "tversky"])
def test_each_loss_prefers_the_right_answer_and_ignores_ignore_index(name: str) -> None:
    target = torch.randint(0, 3, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    good = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 8 - 4
    bad = good.roll(1, dims=1)
    loss = build_loss([LossTerm(name=name)], 3, 255)
    assert float(loss(good, target)) < float(loss(bad, target))
    masked = target.clone()
    masked[:, :8] = 255
    wrong_top = good.clone()
    wrong_top[:, :, :8] = bad[:, :, :8]  # errors only where the target is ignored
    assert float(loss(wrong_top, masked)) == pytest.approx(float(loss(good, masked)), abs=1e-5)


def test_weighted_sum_and_class_weights() -> None:
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    ce = build_loss([LossTerm(name="ce")], 3, 255)(logits, target)
    dice = build_loss([LossTerm(name="dice")], 3, 255)(logits, target)
    both = build_loss([LossTerm(name="ce", weight=2), LossTerm(name="dice", weight=0.5)], 3, 255)(logits, target)
    assert float(both) == pytest.approx(2 * float(ce) + 0.5 * float(dice), rel=1e-5)
    w = build_loss([LossTerm(name="ce", class_weights=[0.1, 1, 1])], 3, 255)(logits, target)
    ref = torch.nn.functional.cross_entropy(logits, target, weight=torch.tensor([0.1, 1, 1]))
    assert float(w) == pytest.approx(float(ref), rel=1e-5)
    with pytest.raises(RecipeError, match="class_weights has 2 values for 3 classes"):
        build_loss([LossTerm(name="ce", class_weights=[1, 1])], 3, 255)
    with pytest.raises(UnknownNameError, match=r"unknown loss 'dise'.*did you mean 'dice'"):
        build_loss([LossTerm(name="dise")], 3, 255)
