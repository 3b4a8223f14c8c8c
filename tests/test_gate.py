"""The gate's one verdict, the fallback's choice of nodes and where it stops, the split the gate
says it used, and the recipe's rule for export overrides — each on hand-made inputs whose expected
numbers are computed here with numpy, independently of segdeploy's metrics."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from segdeploy.artifact import EXPORT_FORMS, ModelMeta
from segdeploy.errors import RecipeError
from segdeploy.export import sensitivity
from segdeploy.parity import ParityReference, compare, gate_split
from segdeploy.recipe import ParityConfig, check_export_overrides, load
from tests.conftest import RECIPES, demo_overrides

CLASSES = ["field", "road", "water"]
META = ModelMeta(classes=CLASSES, palette=[[0, 0, 0], [1, 1, 1], [2, 2, 2]], mean=[0.0], std=[1.0],
                 max_pixel_value=255.0, bands=1, input_divisor=1, tile_size=10)


def logits_for(labels: np.ndarray) -> torch.Tensor:
    """One-hot logits (N×C×H×W) whose argmax is `labels` (N×H×W)."""
    return torch.from_numpy(np.moveaxis(np.eye(len(CLASSES), dtype=np.float32)[labels], -1, 1).copy())


def iou(pred: np.ndarray, target: np.ndarray, c: int) -> float:
    tp = np.sum((pred == c) & (target == c))
    return tp / (np.sum(pred == c) + np.sum(target == c) - tp)


def test_the_verdict_names_the_class_that_failed_and_the_thresholds_it_used() -> None:
    """A class losing about 3 IoU points fails the gate and is the worst class named, in the same
    verdict (the message used to say "worst classes by IoU drop: none" while a class dropped 2.9 pt)."""
    target = np.zeros((1, 20, 20), np.int64)
    target[0, 16:, :17] = 1  # road: 68 px
    target[0, 16:, 17:] = 2  # water: 12 px
    ref = target.copy()
    cand = target.copy()
    cand[0, 16, :2] = 0  # 2 road pixels called field
    road = (iou(ref, target, 1) - iou(cand, target, 1)) * 100
    field = (iou(ref, target, 0) - iou(cand, target, 0)) * 100
    assert road > 1.0 > field > 0  # only road is over INT8's 1 pt
    thresholds = ParityConfig().thresholds("int8")
    rep = compare(logits_for(ref), logits_for(cand), torch.from_numpy(target), META, thresholds,
                  "onnxruntime (CPU form)", "int8", "val")
    assert not rep.passed and rep.thresholds == thresholds and rep.split == "val"
    assert rep.failures == [f"class 'road' IoU drops {road:.2f} pt (> 1.0 pt, parity.int8_class_iou_drop)"]
    assert [c["class"] for c in rep.worst_classes()] == ["road", "field"]
    assert rep.explain() == (f"onnxruntime (CPU form) int8: {rep.failures[0]} (worst classes by IoU drop: "
                             f"road {road:.2f} pt, field {field:.2f} pt)")
    record = rep.to_dict()
    assert record["worst_classes"] == ["road", "field"] and record["thresholds"]["min_agreement"] == 0.99


def test_an_agreement_failure_without_iou_loss_names_where_the_models_disagree() -> None:
    """Swapped errors keep every class's IoU against ground truth but disagree with the reference:
    the verdict names those classes by their IoU against the reference."""
    target = np.zeros((1, 10, 10), np.int64)
    target[0, :, 5:] = 1
    ref, cand = target.copy(), target.copy()
    ref[0, 0, 0:3] = 1  # the reference calls 3 field pixels road ...
    cand[0, 1, 0:3] = 1  # ... the candidate 3 others: the same IoUs, 6 pixels apart
    rep = compare(logits_for(ref), logits_for(cand), torch.from_numpy(target), META, ParityConfig().thresholds("fp16"),
                  "onnxruntime", "fp16", "train")
    field_vs_ref, road_vs_ref = iou(cand, ref, 0), iou(cand, ref, 1)
    assert field_vs_ref < road_vs_ref < 1
    assert rep.failures == [f"argmax agreement {0.94:.4%} < 99.9% (parity.fp16_agreement)"]
    assert not rep.worst_classes()
    assert (f"no class lost IoU against ground truth; most disagreement with the reference: field (IoU vs reference "
            f"{field_vs_ref:.2%}), road (IoU vs reference {road_vs_ref:.2%})") in rep.explain()
    assert "1 tiles from the training split" in rep.summary()  # the split is said


def _toy_graph() -> onnx.ModelProto:
    """y = (x·cA)·0 + x·cB: node A's rounding never reaches the output; B's does."""
    nodes = [helper.make_node("Mul", ["x", "cA"], ["a"], name="A"),
             helper.make_node("Mul", ["a", "zero"], ["z"], name="Z"),
             helper.make_node("Mul", ["x", "cB"], ["b"], name="B"),
             helper.make_node("Add", ["z", "b"], ["y"], name="Out")]
    inits = [numpy_helper.from_array(np.full((1, 8), 1 / 3, np.float32), "cA"),
             numpy_helper.from_array(np.zeros((1, 8), np.float32), "zero"),
             numpy_helper.from_array(np.full((1, 8), 0.5, np.float32), "cB")]
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_nodes_are_ranked_by_their_measured_effect_on_the_output() -> None:
    x = np.array([[1.0001, 3.14159, -2.71828, 100.01, 0.3, -7.77, 12.345, 0.001]], np.float32)
    f16 = lambda v: v.astype(np.float16).astype(np.float32)  # noqa: E731
    y = (0.5 * x).astype(np.float64)
    power = np.mean(y**2)
    effects = sensitivity.output_effects(_toy_graph(), ["A", "Z", "B", "Out"], sensitivity.Fp16Rounding(), [x])
    b16 = f16(np.float32(0.5) * f16(x))  # B reads x in FP16 and writes its product in FP16
    assert effects["A"] == 0.0 and effects["Z"] == 0.0  # A's error is multiplied by zero
    assert effects["B"] == pytest.approx(np.mean((b16 - y) ** 2) / power, rel=1e-6)
    assert effects["Out"] == pytest.approx(np.mean((f16(0.5 * x) - y) ** 2) / power, rel=1e-6)
    assert effects["B"] > 0
    lo, hi = -8.0, 100.5  # INT8 (CPU form): B's input quantised to uint8 with this calibrated range
    int8 = sensitivity.output_effects(_toy_graph(), ["A", "B"], sensitivity.Int8Quantization({"x": (lo, hi)}, False),
                                      [x])
    scale = (hi - lo) / 255
    zero = np.clip(np.round(-lo / scale), 0, 255)
    dq = ((np.clip(np.round(x / np.float32(scale)) + zero, 0, 255) - zero) * np.float32(scale)).astype(np.float32)
    assert int8["A"] == 0.0 and int8["B"] == pytest.approx(np.mean((0.5 * dq - y) ** 2) / power, rel=1e-4)


def test_the_fallback_keeps_the_most_effective_nodes_and_stops_before_the_share_floor() -> None:
    from segdeploy.export.pipeline import _next_nodes, _Reduced

    flops = {"conv1": 50.0, "conv2": 30.0, "relu": 1.0, "conv3": 19.0}  # 100 in all
    share = lambda kept: sum(v for k, v in flops.items() if k not in kept) / 100  # noqa: E731
    spec = _Reduced(EXPORT_FORMS["int8_cpu"], set(flops), list(flops), set(), lambda k, p: None, share, dict)
    effects = {"conv1": 0.5, "relu": 0.3, "conv3": 0.2, "conv2": 0.0}
    floor = ParityConfig(min_int8_share=0.45).thresholds("int8")
    # round 2 may keep 20% of 4 nodes -> 1; the one that changes the logits most comes first
    assert _next_nodes(effects, set(), spec, floor, 2) == (["conv1"], "")
    # keeping conv1 would leave 50% >= 45%, but conv3 after relu would leave 31%: stop before it
    assert _next_nodes(effects, set(), spec, ParityConfig(min_int8_share=0.4).thresholds("int8"), 4) == (
        ["conv1", "relu"], "")
    added, why = _next_nodes(effects, {"conv1", "relu"}, spec, floor, 4)
    assert added == [] and why == ("INT8 fallback stopped at the share floor: keeping conv3 in FP32 too would leave "
                                   "only 30.0% of the FLOPs in INT8 (< parity.min_int8_share 45%)")
    added, why = _next_nodes(effects, {"conv1", "relu", "conv3"}, spec, floor, 4)
    assert added == [] and "no node left whose INT8 precision measurably changes the logits" in why  # conv2: 0


class _Identity:
    """A numpy backend: the tiles' own values as logits (3 bands -> 3 classes)."""

    max_batch = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x.astype(np.float32)


def test_the_gate_says_which_split_its_tiles_came_from(synth_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data, ignore=shutil.ignore_patterns("val", "scene"))
    rec = load(RECIPES / "demo.yaml", demo_overrides(**{"parity.samples": 2}), data)
    meta = ModelMeta(classes=rec.classes.names, palette=[[0, 0, 0]] * 5, mean=[0.0] * 3, std=[1.0] * 3,
                     max_pixel_value=255.0, bands=3, input_divisor=32, tile_size=64)
    split, why = gate_split(rec.data)
    assert split == "train" and "no validation split" in why and "which the model has seen" in why
    ref = ParityReference(_Identity(), rec, meta, 64)  # type: ignore[arg-type]
    assert ref.split == "train" and ref.describe().startswith("2 × 64² tiles from the training split (no validation")
    assert ref.compare(ref.logits, meta, "onnxruntime", "fp32").to_dict()["split"] == "train"
    assert gate_split(load(RECIPES / "demo.yaml", demo_overrides(), synth_dir).data) == ("val", "")


def test_only_parity_keys_may_change_at_export() -> None:
    check_export_overrides(["parity.int8_agreement=0.98", "parity.samples=4"])
    with pytest.raises(RecipeError, match=r"export --set 'model.encoder=resnet34': only parity.\* thresholds"):
        check_export_overrides(["parity.samples=4", "model.encoder=resnet34"])
