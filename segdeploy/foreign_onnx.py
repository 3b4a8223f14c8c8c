"""A foreign ONNX model (exported elsewhere, without segdeploy's metadata) turned into one that
predict, eval, bench and export take like their own: a float32 N×B×H×W normalised input and an
N×C×H×W output of logits-like scores (softmax gives the model's probabilities, argmax its labels).

What the file does is measured with onnxruntime, not guessed from names: the input layout (NCHW
or NHWC, from the declared shape or by running both), fixed or dynamic batch and size, the size
divisor (the smallest step of sizes at which it runs with an output of the input's size), and
what the output holds (logits, probabilities, log-probabilities, one sigmoid channel for two
classes, or labels). Nodes are added only where needed, each stated in `OnnxPlan.actions`:

- NHWC input: a Transpose from NCHW. float16 input: a Cast.
- A final Softmax / LogSoftmax / Sigmoid / ArgMax over the classes: removed, so the output is the
  scores they were computed from (exact: the same argmax, and softmax gives the same
  probabilities for Softmax/LogSoftmax).
- Probabilities with no such node to remove: log(max(p, 1e-6)) (softmax(log p) = p).
- One sigmoid channel p (two classes): logits [0, log p - log(1 - p)]; one logit channel z: [0, z]
  (softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)]).
- Labels: one-hot scores (argmax gives the labels back).
- NHWC output: a Transpose; an output smaller than the input by a whole factor: a bilinear Resize.

No torch: the core install (onnx, onnxruntime, numpy) imports foreign ONNX models.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy.errors import ModelError

INPUT, OUTPUT = "input", "logits"
DIVISOR_STEPS = (1, 2, 4, 8, 16, 32, 64, 128)
PROB_EPS = 1e-6  # floor before log(): representable in FP16, far below any class argmax can pick (≥ 1/C)
ACTIVATIONS = ("Softmax", "LogSoftmax", "Sigmoid", "ArgMax")
MIN_OPSET = 13  # Resize with sizes and no roi, Squeeze with axes as an input


@dataclass
class OnnxPlan:
    """What a foreign ONNX model takes and gives, and what was done to it (in words)."""

    input_layout: str  # NCHW | NHWC
    output_kind: str  # logits | log_probabilities | probabilities | sigmoid | binary_logit | labels
    output_layout: str  # NCHW | NHWC | NHW
    scale: int = 1  # the output is the input's size / scale before the Resize
    static_size: int | None = None
    static_batch: int | None = None
    input_divisor: int = 1
    actions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON types (recorded in the imported run's metadata)."""
        from dataclasses import asdict

        return asdict(self)


def load_foreign(path: Path):  # noqa: ANN201 - onnx.ModelProto
    """The model, refused in one line when it is unreadable or already a segdeploy export."""
    import onnx

    from segdeploy.artifact import ONNX_META_KEY

    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {str(exc)[:120]})") from None
    if any(p.key == ONNX_META_KEY for p in proto.metadata_props):
        raise ModelError(f"{path} is already a segdeploy export (it carries segdeploy's metadata); predict, eval and "
                         "bench take it as it is")
    return proto


# ------------------------------------------------------------------------------------ running


class _Runner:
    """onnxruntime sessions of one graph (original or wrapped), on CPU."""

    def __init__(self, proto) -> None:  # noqa: ANN001
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # the probes' shape errors are expected answers, not news
        self.run_options = ort.RunOptions()
        self.run_options.log_severity_level = 4
        try:
            self.session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0][:200]}") from None
        self.input = self.session.get_inputs()[0].name

        self.error = ""

    def __call__(self, x: np.ndarray) -> list[np.ndarray] | None:
        """All outputs, or None when the model cannot run on `x` (a size or layout it refuses)."""
        try:
            return self.session.run(None, {self.input: x}, self.run_options)
        except Exception as exc:  # noqa: BLE001 - a refused probe is an answer
            self.error = str(exc).splitlines()[0][:160]
            return None


def _probe_input(layout: str, batch: int, bands: int, size: int, dtype: Any = np.float32) -> np.ndarray:
    """The same normal noise image in either layout (seeded), so probes of both layouts compare."""
    x = np.random.default_rng(0).standard_normal((batch, bands, size, size)).astype(dtype)
    return x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))


# ------------------------------------------------------------------------------------ the input


def _dims(value_info) -> list[int | None]:  # noqa: ANN001
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def graph_input(proto):  # noqa: ANN001, ANN201
    """The one image input (graph inputs that are not initialisers)."""
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); segdeploy feeds "
                         "one image tensor")
    return inputs[0]


def input_layout(dims: list[int | None], bands: int) -> str | None:
    """NCHW or NHWC from the declared shape; None when the shape cannot tell (probe both)."""
    if len(dims) != 4:
        raise ModelError(f"the model's input has rank {len(dims)} ({dims}); segdeploy feeds N×B×H×W images")
    first, last = dims[1] == bands, dims[3] == bands
    if first and not last:
        return "NCHW"
    if last and not first:
        return "NHWC"
    if first and last:
        return "NCHW"
    known = [d for d in (dims[1], dims[3]) if d is not None]
    if not known:
        return None
    shape = "×".join("?" if d is None else str(d) for d in dims)
    raise ModelError(f"the model's input ({shape}) takes {min(known)} bands, the recipe has {bands}; set data.bands: "
                     f"{min(known)} (and data.mean/std for them)")


def _spatial(dims: list[int | None], layout: str) -> tuple[int | None, int | None]:
    return (dims[2], dims[3]) if layout == "NCHW" else (dims[1], dims[2])


# ------------------------------------------------------------------------------------ the output


def _producers(graph) -> dict[str, Any]:  # noqa: ANN001
    return {o: n for n in graph.node for o in n.output}


def _attr(node, name: str, default: Any) -> Any:  # noqa: ANN001
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def strip_activations(proto, actions: list[str]) -> str:  # noqa: ANN001
    """Remove a final ArgMax / Softmax / LogSoftmax / Sigmoid over the class axis (at most two,
    e.g. Softmax then ArgMax) by making its input the graph's output. Returns the new output name."""
    import onnx

    out = proto.graph.output[0].name
    for _ in range(2):
        node = _producers(proto.graph).get(out)
        if node is None or node.op_type not in ACTIVATIONS:
            break
        axis = _attr(node, "axis", -1 if node.op_type != "ArgMax" else 0)
        if node.op_type in ("Softmax", "LogSoftmax", "ArgMax") and axis not in (1, -1, 3):
            break  # over some other axis: not a class activation
        out = node.input[0]
        what = {"ArgMax": "labels (ArgMax)", "Softmax": "probabilities (Softmax)",
                "LogSoftmax": "log-probabilities (LogSoftmax)", "Sigmoid": "a Sigmoid"}[node.op_type]
        actions.append(f"output was {what}: the final {node.op_type} removed, the scores before it are the output")
    if out != proto.graph.output[0].name:
        del proto.graph.output[:]
        proto.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
        _drop_dead_nodes(proto)
    return out


def _drop_dead_nodes(proto) -> None:  # noqa: ANN001
    needed = {o.name for o in proto.graph.output}
    keep = []
    for node in reversed(proto.graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    del proto.graph.node[:]
    proto.graph.node.extend(reversed(keep))


def classify_output(y: np.ndarray, size: int, num_classes: int) -> tuple[str, str, int]:
    """(kind, layout, scale) of a probe's output for an input of `size`²: kind is logits |
    log_probabilities | probabilities | sigmoid | binary_logit | labels; layout NCHW | NHWC | NHW.
    Raises ModelError when the class count or the spatial size does not fit."""
    if y.ndim == 3:
        layout, channels, spatial = "NHW", 1, y.shape[1:]
    elif y.ndim == 4:
        nchw = y.shape[1] in (num_classes, 1) and y.shape[2] == y.shape[3]
        layout = "NCHW" if nchw or y.shape[3] not in (num_classes, 1) else "NHWC"
        channels, spatial = (y.shape[1], y.shape[2:]) if layout == "NCHW" else (y.shape[3], y.shape[1:3])
    else:
        raise ModelError(f"the model's output has shape {list(y.shape)}; segdeploy needs N×C×H×W scores or N×H×W labels")
    if spatial[0] != spatial[1] or size % spatial[0]:
        raise ModelError(f"the model's output is {spatial[0]}×{spatial[1]} for a {size}×{size} input; segdeploy needs "
                         "the input's size or a whole fraction of it")
    scale = size // spatial[0]
    integral = y.dtype.kind in "iub" or bool(np.all(np.equal(np.mod(y, 1), 0)))
    if channels == 1 and integral:
        return "labels", layout, scale
    if channels == 1:
        if num_classes != 2:
            raise ModelError(f"the model outputs one channel (a binary model), the recipe has {num_classes} classes; "
                             "set two classes.names (background first)")
        return ("sigmoid" if y.min() >= 0 and y.max() <= 1 else "binary_logit"), layout, scale
    if channels != num_classes:
        raise ModelError(f"the model outputs {channels} classes, the recipe has {num_classes} (classes.names)")
    axis = 1 if layout == "NCHW" else 3
    if y.min() >= 0 and y.max() <= 1 and np.allclose(y.sum(axis), 1, atol=1e-3):
        return "probabilities", layout, scale
    if y.max() <= 1e-6 and np.allclose(np.log(np.exp(y.astype(np.float64)).sum(axis)), 0, atol=1e-3):
        return "log_probabilities", layout, scale
    return "logits", layout, scale


# ------------------------------------------------------------------------------------ wrapping


class _Graph:
    """Appends nodes and constants to a graph under names that cannot clash with its own."""

    def __init__(self, proto) -> None:  # noqa: ANN001
        self.proto, self.graph = proto, proto.graph
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.used = {n for node in self.graph.node for n in (*node.input, *node.output)}
        self.used |= {v.name for v in (*self.graph.input, *self.graph.output, *self.graph.initializer)}
        self.front: list[Any] = []  # nodes that feed the original graph (input side)
        self.back: list[Any] = []

    def name(self, base: str) -> str:
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name

    def node(self, op: str, inputs: list[str], front: bool = False, output: str | None = None, **attrs: Any) -> str:
        import onnx

        out = output or self.name(f"segdeploy/{op.lower()}")
        (self.front if front else self.back).append(
            onnx.helper.make_node(op, inputs, [out], name=self.name(f"segdeploy_{op}"), **attrs))
        return out

    def const(self, values: Any, dtype: Any) -> str:
        import onnx

        name = self.name("segdeploy/const")
        self.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def squeeze(self, x: str, axis: int, op: str = "Squeeze") -> str:
        if self.opset >= 13:
            return self.node(op, [x, self.const([axis], np.int64)])
        return self.node(op, [x], axes=[axis])

    def finish(self) -> None:
        nodes = [*self.front, *self.graph.node, *self.back]
        del self.graph.node[:]
        self.graph.node.extend(nodes)


def wrap(proto, plan: OnnxPlan, scores: str, num_classes: int, bands: int, float16_output: bool = False) -> None:  # noqa: ANN001
    """Rewrite the graph in place to NCHW float32 normalised input -> N×C×H×W logits-like output."""
    g = _Graph(proto)
    x = _wrap_input(g, plan, bands)
    s = _wrap_scores(g, plan, scores, num_classes, float16_output)
    if plan.scale > 1:
        if g.opset < MIN_OPSET:
            raise ModelError(f"the model's output is 1/{plan.scale} of its input and its opset {g.opset} < "
                             f"{MIN_OPSET} has no Resize to sizes; re-export it with opset ≥ {MIN_OPSET}")
        nc = g.node("Slice", [g.node("Shape", [s]), g.const([0], np.int64), g.const([2], np.int64)])
        hw = g.node("Slice", [g.node("Shape", [x]), g.const([2], np.int64), g.const([4], np.int64)])
        sizes = g.node("Concat", [nc, hw], axis=0)
        mode = "nearest" if plan.output_kind == "labels" else "linear"
        s = g.node("Resize", [s, "", "", sizes], mode=mode, coordinate_transformation_mode="half_pixel")
        plan.actions.append(f"output is 1/{plan.scale} of the input's size: resized to it ({mode})")
    out = g.name(OUTPUT)
    g.node("Identity", [s], output=out)
    g.finish()
    _set_output(proto, out, plan, num_classes)
    _drop_dead_nodes(proto)
    name_nodes(proto)


def _wrap_input(g: _Graph, plan: OnnxPlan, bands: int) -> str:
    """The NCHW float32 input the caller feeds; Transpose / Cast nodes to what the graph takes."""
    import onnx

    inp = graph_input(g.proto)
    elem = inp.type.tensor_type.elem_type
    if plan.input_layout == "NCHW" and elem == onnx.TensorProto.FLOAT:
        return inp.name
    dims = _dims(inp)
    h, w = _spatial(dims, plan.input_layout)
    new = g.name(INPUT)
    shape = [dims[0] or "batch", bands, h or "height", w or "width"]
    g.graph.input.remove(inp)
    g.graph.input.insert(0, onnx.helper.make_tensor_value_info(new, onnx.TensorProto.FLOAT, shape))
    x = new
    if plan.input_layout == "NHWC":
        x = g.node("Transpose", [x], front=True, perm=[0, 2, 3, 1])
        plan.actions.append("input is NHWC: a Transpose from NCHW added")
    if elem == onnx.TensorProto.FLOAT16:
        x = g.node("Cast", [x], front=True, to=onnx.TensorProto.FLOAT16)
        plan.actions.append("input is float16: a Cast from float32 added")
    g.node("Identity", [x], front=True, output=inp.name)
    return new


def _wrap_scores(g: _Graph, plan: OnnxPlan, s: str, num_classes: int, float16_output: bool) -> str:
    """N×C×H×W float32 logits-like scores from what the graph outputs."""
    import onnx

    kind, layout = plan.output_kind, plan.output_layout
    if kind == "labels":
        labels = s if layout == "NHW" else g.squeeze(s, 1 if layout == "NCHW" else 3)
        labels = g.node("Cast", [labels], to=onnx.TensorProto.INT64)
        s = g.node("OneHot", [labels, g.const([num_classes], np.int64), g.const([0.0, 1.0], np.float32)], axis=1)
        plan.actions.append("output is labels: one-hot scores made from them (argmax gives the labels back)")
        return s
    if float16_output:
        s = g.node("Cast", [s], to=onnx.TensorProto.FLOAT)
    if layout == "NHWC":
        s = g.node("Transpose", [s], perm=[0, 3, 1, 2])
        plan.actions.append("output is NHWC: a Transpose to NCHW added")
    elif layout == "NHW":
        s = g.squeeze(s, 1, "Unsqueeze")
    if kind == "probabilities":
        s = g.node("Log", [g.node("Max", [s, g.const(PROB_EPS, np.float32)])])
        plan.actions.append(f"output is probabilities: log(max(p, {PROB_EPS:g})) taken (softmax gives p back)")
    elif kind in ("sigmoid", "binary_logit"):
        if kind == "sigmoid":
            eps = g.const(PROB_EPS, np.float32)
            one_minus = g.node("Sub", [g.const(1.0, np.float32), s])
            s = g.node("Sub", [g.node("Log", [g.node("Max", [s, eps])]), g.node("Log", [g.node("Max", [one_minus, eps])])])
        s = g.node("Concat", [g.node("Sub", [s, s]), s], axis=1)
        plan.actions.append(f"output is one {'sigmoid probability' if kind == 'sigmoid' else 'logit'} channel: two-class "
                            "logits [0, z] made from it (softmax gives [1 - sigmoid(z), sigmoid(z)])")
    return s


def _set_output(proto, name: str, plan: OnnxPlan, num_classes: int) -> None:  # noqa: ANN001
    import onnx

    side = plan.static_size or None
    shape = [plan.static_batch or "batch", num_classes, side or "height", side or "width"]
    del proto.graph.output[:]
    proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))


def name_nodes(proto) -> None:  # noqa: ANN001
    """Every node a unique name (export's FP16/INT8 fallback keeps nodes in FP32 by name); the
    same rule as `segdeploy.export.onnx.name_nodes`, here without importing torch."""
    seen: set[str] = set()
    for i, node in enumerate(proto.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


# ------------------------------------------------------------------------------------ the whole import


def make_deployable(path: Path, bands: int, num_classes: int, tile: int,
                    log: Callable[[str], None] = lambda _: None):  # noqa: ANN201 - (onnx.ModelProto, OnnxPlan)
    """Inspect a foreign ONNX model with onnxruntime and wrap it (see the module docstring).

    `tile` is the size probed first for a model with dynamic sizes (the recipe's data.tile_size).
    Returns the wrapped graph (metadata not yet set) and its plan; raises ModelError in one line
    when the model cannot serve: several inputs, another rank or type, a class count or band
    count that differs from the recipe, a size it refuses, an output that is no class map."""
    import onnx

    proto = load_foreign(path)
    inp = graph_input(proto)
    dtype = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}.get(inp.type.tensor_type.elem_type)
    if dtype is None:
        kind = onnx.TensorProto.DataType.Name(inp.type.tensor_type.elem_type)
        raise ModelError(f"{path} takes {kind} input; segdeploy feeds normalised float32 images (export the model with "
                         "a float input and the normalisation in the recipe's data.mean/std)")
    dims = _dims(inp)
    plan = OnnxPlan("NCHW", "logits", "NCHW")
    scores = strip_activations(proto, plan.actions)
    probe = _Probe(proto, dims, bands, tile, dtype)
    plan.input_layout, plan.static_batch, plan.static_size = probe.layout, probe.static_batch, probe.static_size
    plan.actions[:0] = probe.notes
    plan.output_kind, plan.output_layout, plan.scale = classify_output(probe.y, probe.size, num_classes)
    plan.input_divisor = probe.divisor(plan.scale)
    if plan.static_size is None and plan.input_divisor == 0:
        plan.static_size, plan.input_divisor = probe.size, math.gcd(probe.size, 32)
        plan.actions.append(f"runs at {probe.size}² but at none of the sizes probed above it: exported static at {probe.size}")
    log(f"ONNX input {plan.input_layout}, output {plan.output_kind.replace('_', '-')} ({plan.output_layout}); "
        + (f"static {plan.static_size}²" if plan.static_size else f"any size that is a multiple of {plan.input_divisor}")
        + (f", batch fixed at {plan.static_batch}" if plan.static_batch else ""))
    reference = probe.y
    wrap(proto, plan, scores, num_classes, bands, float16_output=probe.y.dtype == np.float16)
    _check_wrapped(proto, plan, probe, reference, num_classes)
    onnx.checker.check_model(proto)
    return proto, plan


class _Probe:
    """The original model run on random inputs: which layout it takes, at which batch and sizes."""

    def __init__(self, proto, dims: list[int | None], bands: int, tile: int, dtype: Any) -> None:  # noqa: ANN001
        self.run, self.bands, self.dtype, self.notes = _Runner(proto), bands, dtype, []
        layout = input_layout(dims, bands)
        layouts = [layout] if layout else ["NCHW", "NHWC"]
        h, w = _spatial(dims, layouts[0])
        if (h is None) != (w is None) or (h is not None and h != w):
            raise ModelError(f"the model's input is fixed at {h}×{w}; segdeploy's tiles are square, so it needs a "
                             "square fixed size or dynamic sizes")
        self.static_size, self.size = h, h or tile
        self.static_batch = dims[0]
        batches = [dims[0]] if dims[0] else [2, 1]
        for lay in layouts:
            for batch in batches:
                out = self.run(_probe_input(lay, batch, bands, self.size, dtype))
                if out is not None:
                    self.layout, self.y, self.batch = lay, out[0], batch
                    if not dims[0] and batch == 1:
                        self.static_batch = 1
                        self.notes.append("a batch of 2 fails inside the graph: batch fixed at 1")
                    if layout is None:
                        self.notes.append(f"input layout {lay}: the declared shape {dims} could not tell, the probe did")
                    return
        raise ModelError(f"the model does not run on a {batches[-1]}×{bands}×{self.size}×{self.size} image in "
                         f"{' or '.join(layouts)} layout ({self.run.error}); check data.bands and data.tile_size")

    def divisor(self, scale: int) -> int:
        """The smallest size step at which the model runs with an output of the input's size
        (over the scale); 0 when none of the steps works (static); the static size's when fixed."""
        if self.static_size:
            return math.gcd(self.static_size, 32)
        for step in DIVISOR_STEPS:
            size = self.size + step
            if self.size % step or size % scale:
                continue
            out = self.run(_probe_input(self.layout, 1, self.bands, size, self.dtype))
            if out is None:
                continue
            spatial = out[0].shape[2:] if out[0].ndim == 4 and out[0].shape[2] == out[0].shape[3] else out[0].shape[1:3]
            if tuple(spatial) == (size // scale, size // scale):
                return step
        return 0


def _check_wrapped(proto, plan: OnnxPlan, probe: _Probe, raw: np.ndarray, num_classes: int) -> None:  # noqa: ANN001
    """The wrapped graph's class map must be the original's, pixel for pixel (on the probe input)."""
    x = _probe_input("NCHW", probe.batch, probe.bands, probe.size, np.float32)
    out = _Runner(proto)(x)
    if out is None or out[0].shape != (probe.batch, num_classes, probe.size, probe.size):
        raise ModelError(f"the wrapped model does not give {probe.batch}×{num_classes}×{probe.size}×{probe.size} "
                         "scores; this is a segdeploy bug, please report it with the model's input/output shapes")
    if plan.scale != 1:
        return  # the original's map is smaller: compared through predict in the tests
    got = out[0].argmax(1)
    want = _class_map(raw, plan)
    agree = float((got == want).mean())
    if agree < 0.9999:
        raise ModelError(f"the wrapped model agrees with the original on only {agree:.4%} of pixels; this is a "
                         "segdeploy bug, please report it with the model's input/output shapes")


def _class_map(y: np.ndarray, plan: OnnxPlan) -> np.ndarray:
    """The original output as N×H×W labels."""
    if plan.output_kind == "labels":
        return y.reshape(y.shape[0], *y.shape[-2:]) if plan.output_layout != "NHWC" else y[..., 0]
    if plan.output_layout == "NHWC":
        y = y.transpose(0, 3, 1, 2)
    elif plan.output_layout == "NHW":
        y = y[:, None]
    if y.shape[1] == 1:
        threshold = 0.5 if plan.output_kind == "sigmoid" else 0.0
        return (y[:, 0] > threshold).astype(np.int64)
    return y.argmax(1)
