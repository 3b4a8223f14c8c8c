"""Which nodes matter: each node's effect on the model's output when it alone runs in reduced precision.

Layer-wise sensitivity analysis — reduce one node at a time and measure the final logits — is
how NVIDIA's TensorRT/ModelOpt and Intel Neural Compressor choose the layers to keep in float.
Building one model per node costs about a second each (quantize_static or the FP16 converter,
then a new onnxruntime session); here one instrumented copy of the FP32 graph holds, for every
candidate node, a reduced version of what it reads behind a switch (a graph input,
``REDUCE_INPUT``: float[N], one entry per candidate), so one session measures every node:

- FP16: the node's float inputs, weights and outputs rounded through half precision, what the
  float16 converter's Casts do around a node (its FP16 arithmetic itself is not modelled);
- INT8: the node's float inputs quantised and dequantised with the calibrated range
  (onnxruntime's calibration cache, the ranges quantize_static itself uses), symmetric int8
  (TensorRT form) or asymmetric uint8 (CPU form); weights of Conv/ConvTranspose/MatMul/Gemm
  symmetric int8 per output channel, like the QDQ models the pipeline writes.

The effect of a node is the mean squared change of the final logits, relative to their mean
square, over the calibration tiles; a node whose reduction does not change the output scores 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

REDUCE_INPUT = "segdeploy_reduce_switch"
WEIGHT_AXES = {"Conv": 0, "ConvTranspose": 1}  # the output-channel axis of each compute op's weight


@dataclass(frozen=True)
class Fp16Rounding:
    """FP16: every float tensor a node reads or writes rounded through half precision."""

    outputs: bool = True

    def activation(self, name: str, tag: str) -> tuple[list, list, str]:
        """(nodes, initializers, reduced tensor name) that round `name` through FP16."""
        from onnx import TensorProto, helper

        half, back = f"{tag}_h", f"{tag}_r"
        return ([helper.make_node("Cast", [name], [half], to=TensorProto.FLOAT16, name=f"{tag}_cast16"),
                 helper.make_node("Cast", [half], [back], to=TensorProto.FLOAT, name=f"{tag}_cast32")], [], back)

    def weight(self, op_type: str, index: int, w: np.ndarray, attrs: dict) -> np.ndarray | None:
        """The initializer as FP16 stores it."""
        return w.astype(np.float16).astype(np.float32)


@dataclass(frozen=True)
class Int8Quantization:
    """INT8: activations quantised with calibrated ranges (`ranges`: tensor -> (lowest, highest)),
    symmetric int8 or asymmetric uint8; compute nodes' weights symmetric int8 per output channel."""

    ranges: dict[str, tuple[float, float]]
    symmetric: bool
    outputs: bool = False

    def activation(self, name: str, tag: str) -> tuple[list, list, str] | None:
        """(nodes, initializers, reduced tensor name) that quantise and dequantise `name`; None
        when it has no calibrated range."""
        from onnx import helper, numpy_helper

        if name not in self.ranges:
            return None
        lo, hi = min(self.ranges[name][0], 0.0), max(self.ranges[name][1], 0.0)
        if self.symmetric:
            scale, zero = max(abs(lo), abs(hi)) / 127.0, np.array(0, np.int8)
        else:
            scale = (hi - lo) / 255.0
            zero = np.array(np.clip(round(-lo / scale), 0, 255) if scale > 0 else 0, np.uint8)
        if not scale > 0:
            return None
        inits = [numpy_helper.from_array(np.array(scale, np.float32), f"{tag}_scale"),
                 numpy_helper.from_array(zero, f"{tag}_zero")]
        nodes = [helper.make_node("QuantizeLinear", [name, f"{tag}_scale", f"{tag}_zero"], [f"{tag}_q"], name=f"{tag}_q"),
                 helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_scale", f"{tag}_zero"], [f"{tag}_r"],
                                  name=f"{tag}_dq")]
        return nodes, inits, f"{tag}_r"

    def weight(self, op_type: str, index: int, w: np.ndarray, attrs: dict) -> np.ndarray | None:
        """A compute node's weight (input 1) quantised per output channel; None for any other input."""
        if index != 1 or op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm") or w.ndim < 2:
            return None
        axis = WEIGHT_AXES.get(op_type, 0 if attrs.get("transB") else w.ndim - 1)
        others = tuple(a for a in range(w.ndim) if a != axis)
        scale = np.abs(w).max(axis=others, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        return (np.clip(np.round(w / scale), -127, 127) * scale).astype(np.float32)


def instrument(proto, candidates: list[str], reduction) -> object:  # noqa: ANN001 - onnx.ModelProto in and out
    """A copy of `proto` in which candidate node i becomes an ``If`` on ``REDUCE_INPUT[i] > 0``: its
    reduced version (inputs, weights and with FP16 outputs through `reduction`) when on, the node
    itself when off, so only one runs (the weights stay constant initializers) and with every
    switch off the output is the FP32 model's bit for bit."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from segdeploy.export.fp16 import topological_sort

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    g = model.graph
    infos = _value_infos(model)
    index = {name: i for i, name in enumerate(candidates)}
    weights = {i.name: i for i in g.initializer}
    g.input.append(helper.make_tensor_value_info(REDUCE_INPUT, TensorProto.FLOAT, [len(candidates)]))
    nodes, inits = [], [numpy_helper.from_array(np.array(0.0, np.float32), "sens_zero")]
    for node in g.node:
        if node.name not in index:
            nodes.append(node)
            continue
        tag = f"sens{index[node.name]}"
        inits.append(numpy_helper.from_array(np.array(index[node.name], np.int64), f"{tag}_i"))
        nodes += [helper.make_node("Gather", [REDUCE_INPUT, f"{tag}_i"], [f"{tag}_s"], name=f"{tag}_gather"),
                  helper.make_node("Greater", [f"{tag}_s", "sens_zero"], [f"{tag}_on"], name=f"{tag}_on")]
        reduced, extra = _reduced_branch(node, tag, reduction, infos, weights)
        inits += extra
        plain = _branch(f"{tag}_plain", [_copy(node, list(node.input), [f"{tag}_p{k}" for k in range(len(node.output))])],
                        [(f"{tag}_p{k}", infos.get(o)) for k, o in enumerate(node.output)])
        nodes.append(helper.make_node("If", [f"{tag}_on"], list(node.output), name=f"{tag}_if",
                                      then_branch=reduced, else_branch=plain))
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    topological_sort(model)
    return model


def _value_infos(model) -> dict:  # noqa: ANN001
    """Tensor name -> ValueInfo (inferred types) of every tensor, graph inputs included."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    return {vi.name: vi for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}


def _reduced_branch(node, tag: str, reduction, infos: dict, inits: dict):  # noqa: ANN001, ANN202
    """The If's then-branch: `node` reading reduced inputs/weights (and writing reduced outputs)."""
    from onnx import TensorProto, helper, numpy_helper

    body, extra, inputs = [], [], list(node.input)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    is_float = lambda n: n in infos and infos[n].type.tensor_type.elem_type == TensorProto.FLOAT  # noqa: E731
    for j, name in enumerate(node.input):
        if name in inits:
            if inits[name].data_type == TensorProto.FLOAT:
                w = reduction.weight(node.op_type, j, numpy_helper.to_array(inits[name]), attrs)
                if w is not None:
                    extra.append(numpy_helper.from_array(w, f"{tag}_w{j}"))
                    inputs[j] = f"{tag}_w{j}"
        elif is_float(name):
            made = reduction.activation(name, f"{tag}_in{j}")
            if made is not None:
                body += made[0]
                extra += made[1]
                inputs[j] = made[2]
    outs = [f"{tag}_r{k}" for k in range(len(node.output))]
    raw = [f"{tag}_raw{k}" if reduction.outputs and is_float(o) else outs[k] for k, o in enumerate(node.output)]
    body.append(_copy(node, inputs, raw))
    for k, o in enumerate(node.output):
        if raw[k] != outs[k]:
            made = reduction.activation(raw[k], f"{tag}_out{k}")
            body += made[0] + [helper.make_node("Identity", [made[2]], [outs[k]], name=f"{tag}_out{k}_id")]
            extra += made[1]
    return _branch(f"{tag}_reduced", body, [(outs[k], infos.get(o)) for k, o in enumerate(node.output)]), extra


def _copy(node, inputs: list[str], outputs: list[str]):  # noqa: ANN001, ANN202
    from onnx import NodeProto

    out = NodeProto()
    out.CopyFrom(node)
    del out.input[:], out.output[:]
    out.input.extend(inputs)
    out.output.extend(outputs)
    out.name = f"{node.name}__{outputs[0]}"
    return out


def _branch(name: str, nodes: list, outputs: list):  # noqa: ANN001, ANN202
    """A subgraph whose outputs carry the types (not the shapes) of the tensors they stand for."""
    from onnx import TensorProto, helper

    values = [helper.make_tensor_value_info(o, vi.type.tensor_type.elem_type if vi is not None else TensorProto.FLOAT,
                                            None) for o, vi in outputs]
    return helper.make_graph(nodes, name, [], values)


def output_effects(proto, candidates: Iterable[str], reduction, batches: list[np.ndarray],  # noqa: ANN001
                   threads: int | None = None) -> dict[str, float]:
    """Candidate node -> mean squared change of the model's first output, relative to its mean
    square, when that node alone runs reduced (`Fp16Rounding` or `Int8Quantization`), over `batches`
    (N×B×H×W float32, normalised like predict). With the switch off the instrumented graph must
    reproduce the FP32 output exactly; RuntimeError when it does not."""
    import onnxruntime as ort

    names = [n.name for n in proto.graph.node if n.name in set(candidates)]
    if not names:
        return {}
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(instrument(proto, names, reduction).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    in_name, out_name = proto.graph.input[0].name, proto.graph.output[0].name
    effects = dict.fromkeys(names, 0.0)
    for batch in batches:
        feed = {in_name: batch.astype(np.float32)}
        ref = plain.run([out_name], feed)[0].astype(np.float64)
        off = sess.run([out_name], {**feed, REDUCE_INPUT: np.zeros(len(names), np.float32)})[0]
        if not np.allclose(off, ref, rtol=1e-5, atol=1e-5):
            raise RuntimeError("the instrumented graph does not reproduce the FP32 output with every switch off")
        power = float(np.mean(ref**2)) + 1e-12
        for i, name in enumerate(names):
            switch = np.zeros(len(names), np.float32)
            switch[i] = 1.0
            out = sess.run([out_name], {**feed, REDUCE_INPUT: switch})[0].astype(np.float64)
            effects[name] += float(np.mean((out - ref) ** 2)) / power / len(batches)
    return effects


def calibrated_ranges(cache_path) -> dict[str, tuple[float, float]]:  # noqa: ANN001 - a Path
    """tensor -> (lowest, highest) from onnxruntime's calibration cache (what quantize_static used)."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    out = {}
    for name, td in load_tensors_data(cache_path).items():
        lo, hi = td.range_value
        out[name] = (float(np.min(lo)), float(np.max(hi)))
    return out
