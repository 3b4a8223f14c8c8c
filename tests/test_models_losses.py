"""Model specifics (SegNet indices, strided U-Net, freezing, weights) and losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from segdeploy.errors import ModelError, RecipeError, UnknownNameError
from segdeploy.losses import build_loss
from segdeploy.models import (
    ARCHITECTURES,
    ArchFacts,
    build_model,
    check_batch_of_one,
    check_tile_size,
    facts,
    freeze_encoder,
    read_state_dict,
    register_architecture,
)
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


def trains_at(model: nn.Module, size: int, bands: int = 3) -> bool:
    """Plain torch, no segdeploy code: does a batch-2 training forward+backward work at size²?"""
    try:
        model.train()
        model(torch.randn(2, bands, size, size)).mean().backward()
        return True
    except (RuntimeError, ValueError):
        return False


# expected smallest tiles, worked out from each architecture (and checked below with plain torch):
# PAN pools its deepest map 3× by 2 before a 7×7 conv → 8 px there; DPT halves the stride-16 map and
# doubles it back → even maps; mit's first stage reduces keys by an 8×8 conv at stride 4 → 32 px
@pytest.mark.parametrize(("arch", "encoder", "kwargs", "tile", "expected", "step"), [
    ("pan", "tu-test_resnet", {}, 96, 128, 16),  # the example: "Output size is too small"
    ("segformer", "mit_b0", {"encoder_depth": 3, "decoder_segmentation_channels": 16}, 16, 32, 8),
    ("dpt", "tu-test_vit", {"decoder_intermediate_channels": (8, 8, 8, 8), "decoder_fusion_channels": 8}, 16, 32, 16),
])
def test_a_tile_the_model_cannot_train_at_is_refused_naming_the_smallest_that_works(
        arch: str, encoder: str, kwargs: dict, tile: int, expected: int, step: int) -> None:
    import segmentation_models_pytorch as smp

    reference = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, classes=3, **kwargs)
    assert not trains_at(reference, expected - step) and trains_at(reference, expected)
    cfg = ModelConfig(arch=arch, encoder=encoder, kwargs=kwargs)
    model = build_model(cfg, 3, 3)
    with pytest.raises(ModelError) as err:
        check_tile_size(cfg, model, tile, 3)
    msg = str(err.value)
    assert "\n" not in msg and f"data.tile_size={tile}" in msg and msg.endswith(f"set data.tile_size={expected}")
    assert check_tile_size(cfg, model, expected, 3).min_tile == expected  # the suggested fix works


def test_the_tile_check_leaves_the_model_and_the_rng_as_they_were() -> None:
    cfg = ModelConfig(arch="pan", encoder="tu-test_resnet")
    model = build_model(cfg, 3, 3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    expected_draw = torch.rand(3)
    torch.manual_seed(1)
    with pytest.raises(ModelError):
        check_tile_size(cfg, model, 96, 3)
    check_tile_size(cfg, model, 128, 3)
    assert torch.equal(torch.rand(3), expected_draw)
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_static_size_divisor_and_batch_of_one_refusals_name_the_key_to_change() -> None:
    vit = ModelConfig(arch="vit_segmenter", encoder="test_vit", kwargs={"img_size": 64})
    with pytest.raises(ModelError, match=r"accepts only 64×64 inputs; set data.tile_size=64$"):
        check_tile_size(vit, build_model(vit, 3, 2), 96, 3)
    unet = ModelConfig(arch="unet", encoder="resnet18")
    with pytest.raises(ModelError, match=r"data.tile_size=100 is not a multiple of 32.*set data.tile_size=96 or 128$"):
        check_tile_size(unet, build_model(unet, 3, 2), 100, 3)
    deeplab = ModelConfig(arch="deeplabv3", encoder="tu-test_resnet")
    with pytest.raises(ModelError, match=r"batch of 1 .*set train.batch_size=2"):
        check_batch_of_one(deeplab, build_model(deeplab, 3, 2), 32, 3)
    small = ModelConfig(arch="unet", encoder="tu-test_resnet")
    check_batch_of_one(small, build_model(small, 3, 2), 64, 3)  # no BatchNorm on a 1-px map: fine


def test_every_smp_architecture_is_registered_with_facts_read_from_smp() -> None:
    import segmentation_models_pytorch as smp

    assert set(smp.MODEL_ARCHITECTURES_MAPPING) <= set(ARCHITECTURES.names())
    for arch, encoder, kwargs, divisor in [("unet", "resnet18", {}, 32), ("deeplabv3", "resnet18", {}, 8),
                                           ("pan", "resnet18", {}, 16), ("fpn", "resnet18", {"encoder_depth": 4}, 16)]:
        cfg = ModelConfig(arch=arch, encoder=encoder, kwargs=kwargs)
        assert facts(cfg, build_model(cfg, 3, 2)).input_divisor == divisor
    seg = ModelConfig(arch="segnet", kwargs={"widths": [8, 16, 16]})
    assert facts(seg, build_model(seg, 3, 2)) == ArchFacts(input_divisor=8, static_size=None, min_tile=8)
    with pytest.raises(TypeError, match="min_tile"):  # a missing fact is an error, not a default
        register_architecture("incomplete", encoder="none", input_divisor=lambda m: 8, static_size=lambda m: None)


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
