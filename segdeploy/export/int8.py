"""FP32 ONNX -> INT8 QDQ ONNX by static post-training quantization (`onnxruntime.quantization`).

Two forms, because the targets differ (docs/EXPORT.md has the measurements):

- ``tensorrt`` (``model.int8.onnx``): int8 weights per channel and symmetric, int8 activations
  symmetric (zero point 0) — the explicit-quantization form a strongly typed TensorRT network
  consumes;
- ``cpu`` (``model.int8.cpu.onnx``): the same weights with asymmetric uint8 activations (U8S8),
  which onnxruntime's VNNI kernels run about twice as fast on x86 CPUs.

Calibration tiles come from the training split only: validation tiles belong to the gate.
Which nodes stay in float is measured, like the FP16 fallback: each node's own quantization
error (its output error minus what its inputs already carry) on real tiles.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from segdeploy.artifact import EXPORT_FORMS
from segdeploy.errors import UserError

FORMS = {"tensorrt": EXPORT_FORMS["int8"], "cpu": EXPORT_FORMS["int8_cpu"]}  # INT8 form -> its export form
METHODS = ("minmax", "entropy", "percentile")
# the nodes whose arithmetic INT8 makes cheap; the share of their FLOPs that is quantized is reported
COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def prepare(fp32_path: Path, out_path: Path) -> None:
    """onnxruntime's documented pre-processing (graph optimisation + ONNX shape inference).
    Symbolic shape inference is skipped: it fails on dynamic-shape exports ("Incomplete symbolic
    shape inference") and the ONNX shape inference that follows is enough for static quantization."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)


class _Tiles:
    """CalibrationDataReader over pre-made batches (NCHW float32, normalised like predict)."""

    def __init__(self, batches: list[np.ndarray], input_name: str) -> None:
        self._items = iter([{input_name: b.astype(np.float32)} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def quantize(model_path: Path, out_path: Path, batches: list[np.ndarray], form: str, method: str,
             exclude: Iterable[str], cache_path: Path) -> None:
    """Write the QDQ model of `form`; calibration ranges are cached in `cache_path` (one run of
    the calibration tiles serves every form and every fallback round)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if form not in FORMS:
        raise UserError(f"INT8 form {form!r} is unknown; choose from {', '.join(FORMS)}")
    if method not in METHODS:
        raise UserError(f"--calib-method {method!r} is unknown; choose from {', '.join(METHODS)}")
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    input_name = onnx.load(str(model_path), load_external_data=False).graph.input[0].name
    symmetric = form == "tensorrt"
    quantize_static(
        str(model_path), str(out_path), _Tiles(batches, input_name),  # type: ignore[arg-type]
        quant_format=QuantFormat.QDQ, per_channel=True, calibrate_method=calib,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
        nodes_to_exclude=sorted(set(exclude)), calibration_cache_path=str(cache_path),
        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
    )


def form_name(key: str) -> str:
    """The INT8 form ("tensorrt" | "cpu") of an export form key ("int8" | "int8_cpu"); KeyError otherwise."""
    return next(name for name, form in FORMS.items() if form.key == key)


def compute_nodes(proto) -> set[str]:  # noqa: ANN001
    """Names of the nodes that do the FLOP-heavy work quantization targets (COMPUTE_OPS: Conv, ConvTranspose, MatMul,
    Gemm)."""
    return {n.name for n in proto.graph.node if n.op_type in COMPUTE_OPS}


# activations quantize_static folds into the quantization of the tensor before them: keeping one in
# float does not remove that error, it moves the quantization before it (to a wider range)
REMOVABLE_ACTIVATIONS = ("Relu", "Clip")


def quantizable_nodes(proto) -> list[str]:  # noqa: ANN001
    """The nodes the INT8 fallback may keep in float: those quantize_static quantizes in QDQ format
    (onnxruntime's QDQ and QLinear op registries, its default `op_types_to_quantize`) but the
    removable activations. Measured on the tiny test model (benchmarks/int8_fallback_ranking.py),
    keeping its 12 most effective candidates in float raised the CPU form's agreement from 96.6% to
    99.2% with Relu excluded, and left it at 96.4% with Relu among the candidates."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    ops = (set(QDQRegistry) | set(QLinearOpsRegistry)) - set(REMOVABLE_ACTIVATIONS)
    return [n.name for n in proto.graph.node if n.op_type in ops]


def quantized_share(flops: dict[str, float], compute: set[str], excluded: Iterable[str]) -> float:
    """Fraction of all FLOPs computed by compute nodes that are quantized."""
    excluded = set(excluded)
    total = sum(flops.values())
    return sum(flops.get(n, 0.0) for n in compute - excluded) / total if total else 0.0
