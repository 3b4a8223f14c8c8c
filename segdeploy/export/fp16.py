"""FP32 ONNX -> mixed-precision ONNX: the precision lives in the graph (strongly typed TensorRT).

Choice of tool (see docs/EXPORT.md): onnxruntime's bundled float16 converter
(`onnxruntime.transformers.float16`, the maintained copy of onnxconverter-common's) — no new
dependency, keeps graph inputs/outputs FP32 (`keep_io_types`), and blocks individual nodes by
name. NVIDIA ModelOpt AutoCast does the same job but pulls in a large dependency tree from
NVIDIA's own index; casting in PyTorch before export bakes one precision into the module and
cannot be revised per node after the parity gate.

Which nodes stay FP32 is measured, not guessed: every intermediate tensor's range is recorded
on real calibration tiles; nodes whose inputs or outputs come near the FP16 limit stay FP32.
When the parity gate still fails, the export pipeline keeps more nodes in FP32, ranked by
their measured effect on the logits (`export/sensitivity.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

FP16_MAX = 65504.0
# headroom: calibration tiles do not show every activation the field will produce
RANGE_LIMIT = FP16_MAX / 16


def float_value_infos(proto):  # noqa: ANN001, ANN202
    """Tensor name -> ValueInfo of every float (FP32/FP16) intermediate tensor and graph output,
    from ONNX shape inference."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    infos = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    return {n: vi for n, vi in infos.items()
            if vi.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}


def with_all_outputs(proto):  # noqa: ANN001, ANN201
    """A copy of the graph whose every float intermediate tensor is also a graph output."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    infos = float_value_infos(model)
    existing = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for out in node.output:
            if out in infos and out not in existing:
                model.graph.output.append(infos[out])
                existing.add(out)
    return model


def run_all(proto, batches: Iterable[np.ndarray], threads: int | None = None) -> list[dict[str, np.ndarray]]:  # noqa: ANN001
    """Every float tensor of the graph for each batch: onnxruntime on the CPU with graph optimisation off (so every
    node's output is addressable) and all outputs exposed; one {tensor name: array} dict per input batch (N×B×H×W
    float32), `threads` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep node outputs addressable
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(with_all_outputs(proto).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    in_name = sess.get_inputs()[0].name
    results = []
    for batch in batches:
        results.append(dict(zip(names, sess.run(None, {in_name: batch.astype(np.float32)}), strict=True)))
    return results


def measure_ranges(proto, batches: Iterable[np.ndarray]) -> dict[str, float]:  # noqa: ANN001
    """max |x| of every float tensor (node outputs and graph input) over the calibration batches."""
    ranges: dict[str, float] = {}
    for outs in run_all(proto, batches):
        for name, arr in outs.items():
            if arr.dtype.kind == "f" and arr.size:
                ranges[name] = max(ranges.get(name, 0.0), float(np.nanmax(np.abs(arr.astype(np.float32)))))
    return ranges


def nodes_out_of_range(proto, ranges: dict[str, float], limit: float = RANGE_LIMIT) -> list[str]:  # noqa: ANN001
    """Nodes that read or write a tensor whose measured range exceeds `limit`."""
    init = {i.name: i for i in proto.graph.initializer}
    keep = []
    for node in proto.graph.node:
        tensors = [t for t in list(node.input) + list(node.output) if t and t not in init]
        if any(ranges.get(t, 0.0) > limit for t in tensors):
            keep.append(node.name)
    return keep


def weights_out_of_range(proto, limit: float = FP16_MAX) -> list[str]:  # noqa: ANN001
    """Nodes with a weight that does not fit FP16 at all."""
    from onnx import numpy_helper

    big = {i.name for i in proto.graph.initializer
           if i.data_type == 1 and np.abs(numpy_helper.to_array(i)).max(initial=0) > limit}
    return [n.name for n in proto.graph.node if any(t in big for t in n.input)]


def convert(proto, keep_fp32: Iterable[str]):  # noqa: ANN001, ANN201
    """Mixed precision: every float node in FP16 except `keep_fp32`; graph I/O stays FP32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    out = convert_float_to_float16(proto, keep_io_types=True, node_block_list=sorted(set(keep_fp32)),
                                   disable_shape_infer=False)
    _drop_duplicate_casts(out)
    _remove_cast_round_trips(out)
    topological_sort(out)
    return out


def topological_sort(proto) -> None:  # noqa: ANN001
    """The converter appends its Cast nodes at the end; ONNX requires producers before consumers."""
    available = {i.name for i in proto.graph.input} | {i.name for i in proto.graph.initializer} | {""}
    pending = list(proto.graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise RuntimeError(f"FP16 graph has a cycle or a missing input at {rest[0].name}")
        pending = rest
    del proto.graph.node[:]
    proto.graph.node.extend(ordered)


def _remove_cast_round_trips(proto) -> None:  # noqa: ANN001
    """Cast(→fp16) followed by Cast(→fp32) only rounds a tensor that two FP32 nodes exchange
    (or the FP32 graph input) through half precision. Rewire the consumers to the original
    tensor, so nodes kept in FP32 really see FP32 data."""
    import onnx

    to = lambda n: next((a.i for a in n.attribute if a.name == "to"), None)  # noqa: E731
    producers = {o: n for n in proto.graph.node for o in n.output}
    graph_outputs = {o.name for o in proto.graph.output}
    rename: dict[str, str] = {}
    dead: set[int] = set()
    for node in proto.graph.node:
        if node.op_type != "Cast" or to(node) != onnx.TensorProto.FLOAT:
            continue
        src = producers.get(node.input[0])
        if src is None or src.op_type != "Cast" or to(src) != onnx.TensorProto.FLOAT16:
            continue
        original = src.input[0]
        origin = producers.get(original)
        if origin is not None and origin.op_type == "Cast" and to(origin) == onnx.TensorProto.FLOAT16:
            continue  # the "original" is itself half precision
        if node.output[0] in graph_outputs:
            node.op_type = "Identity"
            del node.attribute[:]
            node.input[0] = original
        else:
            rename[node.output[0]] = original
            dead.add(id(node))
    if not rename and not dead:
        return
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    kept = [n for n in proto.graph.node if id(n) not in dead]
    used = {i for n in kept for i in n.input} | graph_outputs
    kept = [n for n in kept if not (n.op_type == "Cast" and to(n) == onnx.TensorProto.FLOAT16
                                    and not any(o in used for o in n.output))]
    del proto.graph.node[:]
    proto.graph.node.extend(kept)


def _drop_duplicate_casts(proto) -> None:  # noqa: ANN001
    """The converter inserts the same Cast twice when one tensor feeds several FP32 nodes
    (same name, same output: an invalid graph). Keep the first of each identical Cast."""
    seen: set[tuple] = set()
    keep = []
    for node in proto.graph.node:
        if node.op_type == "Cast":
            key = (tuple(node.input), tuple(node.output), tuple(a.i for a in node.attribute if a.name == "to"))
            if key in seen:
                continue
            seen.add(key)
        keep.append(node)
    if len(keep) != len(proto.graph.node):
        del proto.graph.node[:]
        proto.graph.node.extend(keep)


def node_flops(proto, batch: np.ndarray) -> dict[str, float]:  # noqa: ANN001
    """Floating-point operations of each node for one real batch (2 per multiply-accumulate for
    Conv/ConvTranspose/MatMul/Gemm, one per output element for everything else), from the tensor
    shapes that batch actually produces: the measure of how much of a model runs in reduced precision."""
    shapes = {name: arr.shape for name, arr in run_all(proto, [batch])[0].items()}
    shapes[proto.graph.input[0].name] = batch.shape
    shapes.update({i.name: tuple(i.dims) for i in proto.graph.initializer})
    size = lambda name: float(np.prod(shapes[name])) if name in shapes else 0.0  # noqa: E731
    flops: dict[str, float] = {}
    for node in proto.graph.node:
        out = node.output[0] if node.output else ""
        weight = shapes.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type == "Conv" and weight:
            flops[node.name] = 2 * size(out) * float(np.prod(weight[1:]))
        elif node.op_type == "ConvTranspose" and weight:
            flops[node.name] = 2 * size(node.input[0]) * float(np.prod(weight[1:]))
        elif node.op_type in ("MatMul", "Gemm") and node.input[0] in shapes:
            transposed = node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute)
            k = shapes[node.input[0]][0 if transposed else -1]
            flops[node.name] = 2 * size(out) * float(k)
        else:
            flops[node.name] = size(out)
    return flops


def reduced_share(flops: dict[str, float], kept: Iterable[str]) -> float:
    """Fraction of the FLOPs computed by nodes not kept in full precision."""
    kept = set(kept)
    total = sum(flops.values())
    return sum(v for n, v in flops.items() if n not in kept) / total if total else 0.0


def save(proto, path: Path) -> None:  # noqa: ANN001
    """Write the ONNX `proto` to `path` atomically (temp file + rename)."""
    import onnx

    from segdeploy.utils import atomic_path

    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
