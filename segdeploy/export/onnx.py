"""torch -> ONNX: preflight (rewrite what TensorRT lacks, decide dynamic vs static), export,
check, simplify, and embed the model's metadata.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from segdeploy.artifact import ModelMeta, write_onnx_meta
from segdeploy.errors import ArtifactError, UserError
from segdeploy.utils import atomic_path

INPUT_NAME, OUTPUT_NAME = "input", "logits"


@dataclass
class Finding:
    """A construct that breaks or drifts in TensorRT, and what export did about it."""

    construct: str
    where: str
    action: str  # rewritten | static | gated | error

    def __str__(self) -> str:
        return f"{self.construct} at {self.where}: {self.action}"


@dataclass
class ExportPlan:
    """How the FP32 ONNX is exported: dynamic or static H×W (static at `tile` px, with the reasons), the preflight
    findings (constructs rewritten or risky for TensorRT) and a fixed batch (None: dynamic)."""
    dynamic: bool
    tile: int
    findings: list[Finding] = field(default_factory=list)
    static_reasons: list[str] = field(default_factory=list)
    batch: int | None = None  # the model's fixed batch (an imported graph), None: dynamic

    def to_dict(self) -> dict:
        """The plan as JSON types (the ONNX metadata's export record, `export --json`)."""
        return {"dynamic": self.dynamic, "tile": self.tile, "static_reasons": self.static_reasons, "batch": self.batch,
                "findings": [asdict(f) for f in self.findings]}


class FixedAdaptiveAvgPool2d(nn.Module):
    """AdaptiveAvgPool2d for one known input size, as two matrix products with PyTorch's bin edges.

    Exact for any (non-divisible) size, and only MatMul in ONNX — TensorRT's adaptive pooling
    support is limited to divisible sizes.
    """

    def __init__(self, output_size: tuple[int, int], input_size: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("rows", _bin_matrix(output_size[0], input_size[0]))
        self.register_buffer("cols", _bin_matrix(output_size[1], input_size[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N×C×H×W (H, W the input size given) -> N×C×h×w (the output size) average-pooled: rows @ x @ colsᵀ."""
        return self.rows @ x @ self.cols.T


def _bin_matrix(out: int, size: int) -> torch.Tensor:
    m = torch.zeros(out, size)
    for i in range(out):
        start, end = (i * size) // out, -(-((i + 1) * size) // out)  # floor, ceil
        m[i, start:end] = 1.0 / (end - start)
    return m


def _pair(v: int | tuple[int | None, int | None] | None, like: tuple[int, int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    return (v[0] or like[0], v[1] or like[1])  # type: ignore[index]


def preflight(model: nn.Module, meta: ModelMeta, tile: int) -> ExportPlan:
    """Rewrite TensorRT-hostile constructs in place (the architecture's registered export rewrites,
    then adaptive pooling) and decide static vs dynamic shapes. Raises UserError for a tile the
    model cannot run at (not a multiple of its divisor, below its smallest tile)."""
    from segdeploy.models import export_rewrites

    if tile % meta.input_divisor:
        raise UserError(f"--tile {tile} is not a multiple of the model's input divisor {meta.input_divisor}; "
                        f"use {tile - tile % meta.input_divisor or meta.input_divisor}")
    if meta.min_tile_size and tile < meta.min_tile_size and not meta.static_size:
        raise UserError(f"--tile {tile} is below the smallest tile {meta.min_tile_size} the model runs at "
                        f"({meta.arch}); use --tile {meta.min_tile_size} or larger")
    plan = ExportPlan(dynamic=True, tile=tile, batch=meta.static_batch)
    if meta.static_size:
        plan.dynamic = False
        if tile != meta.static_size:
            plan.static_reasons.append(f"the model accepts only {meta.static_size}×{meta.static_size}; tile set to it")
            plan.tile = meta.static_size
        plan.static_reasons.append("learnt positional embeddings fix the input size" if meta.arch == "vit_segmenter"
                                   else f"the model runs only at {plan.tile}×{plan.tile} (measured when imported)")
    plan.findings += [Finding(*rewrite) for rewrite in export_rewrites(meta.arch, model)]
    # adaptive pooling to more than one bin: measure each input size at the tile, then rewrite
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, tuple(i[0].shape[-2:])))
             for n, m in model.named_modules() if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))]
    if hooks:
        with torch.inference_mode():
            model(torch.zeros(plan.batch or 1, meta.bands, plan.tile, plan.tile))
        for h in hooks:
            h.remove()
    for name, size in sizes.items():
        mod = model.get_submodule(name)
        out = _pair(mod.output_size, size)
        if out == (1, 1):
            continue  # global pooling: ReduceMean, fine everywhere
        if isinstance(mod, nn.AdaptiveMaxPool2d):
            raise UserError(f"adaptive max pooling to {out} at {name} cannot be exported for TensorRT; "
                            "use average pooling in this architecture")
        divisible = size[0] % out[0] == 0 and size[1] % out[1] == 0
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, FixedAdaptiveAvgPool2d(out, size))
        plan.dynamic = False
        plan.findings.append(Finding(
            f"adaptive average pooling {size[0]}×{size[1]} → {out[0]}×{out[1]}"
            + ("" if divisible else " (non-divisible)"), name, f"rewritten as fixed bin averaging, static at {plan.tile}"))
    if any(f.action.startswith("rewritten as fixed") for f in plan.findings):
        plan.static_reasons.append("adaptive pooling bins depend on the input size")
    return plan


def graph_findings(model_proto) -> list[Finding]:  # noqa: ANN001 - onnx.ModelProto
    """Ops in the exported graph that TensorRT lacks (error) or that may drift (gated)."""
    out: list[Finding] = []
    for node in model_proto.graph.node:
        where = node.name or node.op_type
        if node.op_type == "MaxUnpool":
            out.append(Finding("MaxUnpool", where, "error: TensorRT has no MaxUnpool; rewrite the model"))
        elif node.op_type == "MaxPool" and len([o for o in node.output if o]) > 1:
            out.append(Finding("MaxPool with indices output", where, "error: TensorRT cannot return pooling indices"))
        elif node.op_type == "Resize":
            mode = next((a.s.decode() for a in node.attribute if a.name == "coordinate_transformation_mode"), "half_pixel")
            if mode == "align_corners":
                out.append(Finding("Resize with align_corners", where, "gated: supported by TensorRT; drift is caught by the parity gate"))
    return out


EXPORT_TIME_LIMIT_S = 300.0  # per exporter attempt; ExportOptions.export_time_limit, --export-time-limit
# (eight model/encoder pairs took 20–120 s on two cores; tf_efficientnet's "same" padding never
# finished in the dynamic-shape torch.export exporter)


def export_onnx(model: nn.Module, meta: ModelMeta, path: Path, plan: ExportPlan, opset: int = 17,
                max_batch: int = 8, time_limit: float = EXPORT_TIME_LIMIT_S,
                log: Callable[[str], None] = lambda _: None) -> list[str]:
    """Export, check, simplify and annotate; returns notes (the exporter used and why others were
    not). Atomic. Each exporter attempt runs in a child process stopped after `time_limit` seconds
    (`export_bounded`); when no attempt gives a dynamic-shape model, `plan` becomes static at its
    tile and the metadata says so. Raises ArtifactError when every exporter fails."""
    import onnx

    if opset < 17:
        raise UserError(f"--opset {opset} is too old: ≥ 17 keeps LayerNorm as one op")
    model = model.eval().cpu()
    notes: list[str] = []
    with atomic_path(path) as tmp:
        export_bounded(model, meta, tmp, plan, opset, max_batch, time_limit, notes, log)
        proto = onnx.load(str(tmp))
        try:
            onnx.checker.check_model(proto, full_check=True)
        except Exception as exc:  # noqa: BLE001
            raise ArtifactError(f"exported ONNX failed onnx.checker: {exc}") from None
        proto = simplify(proto, notes)
        name_nodes(proto)
        name_dynamic_axes(proto)
        write_onnx_meta(proto, replace(meta, static_size=None if plan.dynamic else plan.tile), {"export": plan.to_dict()})
        onnx.save(proto, str(tmp))
    return notes


EXPORTERS = {"dynamo": "torch.export (dynamo)", "torchscript": "TorchScript"}


def export_bounded(model: nn.Module, meta: ModelMeta, path: Path, plan: ExportPlan, opset: int, max_batch: int,
                   time_limit: float, notes: list[str], log: Callable[[str], None]) -> None:
    """Try the exporters in turn, each in a child process given `time_limit` seconds: torch.export
    then TorchScript with dynamic height and width (when the plan allows them; the result must
    match PyTorch at another size, `dynamic_mismatch`), then both static at the plan's tile. The
    first that succeeds is kept; why the others were not is logged and noted."""
    x = torch.zeros(plan.batch or 2, meta.bands, plan.tile, plan.tile)
    shapes = (True, False) if plan.dynamic else (False,)
    failed: list[str] = []
    for dynamic in shapes:
        for exporter in EXPORTERS:
            label = f"{EXPORTERS[exporter]} with {'dynamic' if dynamic else f'static {plan.tile}×{plan.tile}'} shapes"
            problem = run_bounded(partial(_export_with, exporter, model, x, path, dynamic, opset, max_batch, plan.batch), time_limit)
            if not problem and dynamic:
                problem = dynamic_mismatch(model, path, meta, plan.tile)
            if not problem:
                notes.append(f"exporter: {label}" + (f" (not: {'; '.join(failed)})" if failed else ""))
                if not dynamic and plan.dynamic:
                    plan.dynamic = False
                    plan.static_reasons.append("no exporter gave a correct dynamic-shape model: " + "; ".join(failed))
                return
            failed.append(f"{label}: {problem}")
            log(f"export: {failed[-1]}; trying the next exporter")
    raise ArtifactError(f"no exporter could export {meta.arch or 'the model'}: {'; '.join(failed)}; if one only ran "
                        f"out of time, pass --export-time-limit with more seconds (now {time_limit:g})")


def run_bounded(fn: Callable[[], None], seconds: float) -> str:
    """Run `fn` in a child process (forked where the platform can: nothing to pickle or re-import)
    and wait at most `seconds`: '' when it returned, else why not (its error's first line, or the
    time limit; the child is then killed — a thread stuck in an exporter could not be stopped)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(fn, send), daemon=True, name="segdeploy-exporter")
    child.start()
    send.close()
    try:
        if not receive.poll(seconds):
            return f"stopped after {seconds:g} s (--export-time-limit)"
        return receive.recv()
    except EOFError:
        child.join(5)
        return f"the exporter process died (exit code {child.exitcode})"
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receive.close()


def _child(fn: Callable[[], None], send) -> None:  # noqa: ANN001 - a multiprocessing Connection
    """The exporter's process: its chatter goes to /dev/null, its outcome through the pipe. One
    intra-op thread: GNU OpenMP, initialised by the parent's computations, deadlocks a forked child
    that opens a parallel region (TorchScript's tracing of a ConvNeXt hung until killed); with one
    thread PyTorch never opens one."""
    import os

    torch.set_num_threads(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
        send.send("")
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as one line
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        send.send(f"{type(exc).__name__}: {first}" if first else type(exc).__name__)
    finally:
        send.close()


def dynamic_mismatch(model: nn.Module, path: Path, meta: ModelMeta, tile: int) -> str:
    """'' when the ONNX file at `path` gives PyTorch's logits (max |Δ| ≤ 1e-3 of the largest, or
    1e-3) on a batch of 1 at (tile + d) × (tile + 2d), d the input divisor: a size and batch the
    exporter never saw, where an exporter that baked a shape into the graph fails or differs."""
    import numpy as np
    import onnxruntime as ort

    d = meta.input_divisor
    x = torch.randn(meta.static_batch or 1, meta.bands, tile + d, tile + 2 * d, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(x).float().numpy()
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {INPUT_NAME: x.numpy()})[0]
    except Exception as exc:  # noqa: BLE001 - any failure is the export's
        return f"fails at {tile + d}×{tile + 2 * d} ({type(exc).__name__})"
    if got.shape != expected.shape:
        return f"gives shape {got.shape} at {tile + d}×{tile + 2 * d}, not {expected.shape}"
    err = float(np.abs(got - expected).max())
    if err > 1e-3 * max(1.0, float(np.abs(expected).max())):
        return f"differs from PyTorch at {tile + d}×{tile + 2 * d} (max |Δlogit| {err:.3g})"
    return ""


def _export_with(exporter: str, model: nn.Module, x: torch.Tensor, path: Path, dynamic: bool, opset: int,
                 max_batch: int, static_batch: int | None) -> None:
    if exporter == "dynamo":
        _export_dynamo(model, x, path, dynamic, opset, max_batch, static_batch)
    else:
        _export_torchscript(model, x, path, dynamic, opset, static_batch)


def _export_dynamo(model: nn.Module, x: torch.Tensor, path: Path, dynamic: bool, opset: int, max_batch: int,
                   static_batch: int | None) -> None:
    from torch.export import Dim

    from segdeploy.models import ExportedProgramModule

    # an imported torch.export program has its own batch range, which a range of ours may contradict
    batch = Dim.DYNAMIC if isinstance(model, ExportedProgramModule) else Dim("batch", min=1, max=max(max_batch, 2) * 64)
    shapes = {} if static_batch else {0: batch}
    if dynamic:
        shapes.update({2: Dim.DYNAMIC, 3: Dim.DYNAMIC})
    torch.onnx.export(model, (x,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      opset_version=max(opset, 18), dynamo=True, dynamic_shapes=({**shapes},), external_data=False,
                      verbose=False, report=False)
    import onnx

    proto = onnx.load(str(path))
    if proto.opset_import[0].version < 17:
        raise RuntimeError("opset too low")


def _export_torchscript(model: nn.Module, x: torch.Tensor, path: Path, dynamic: bool, opset: int,
                        static_batch: int | None) -> None:
    axes = {} if static_batch else {0: "batch"}
    if dynamic:
        axes.update({2: "height", 3: "width"})
    torch.onnx.export(model, (x,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      opset_version=opset, dynamo=False, dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes})


def simplify(proto, notes: list[str]):  # noqa: ANN001, ANN201
    """onnxslim: constant folding and dead-node removal; keep the original if it fails."""
    try:
        import onnxslim

        slim = onnxslim.slim(proto)
        before, after = len(proto.graph.node), len(slim.graph.node)
        notes.append(f"onnxslim: {before} → {after} nodes")
        return slim
    except Exception as exc:  # noqa: BLE001 - simplification is an optimisation, not a requirement
        notes.append(f"onnxslim skipped ({type(exc).__name__})")
        return proto


AXIS_NAMES = {0: "batch", 2: "height", 3: "width"}


def name_dynamic_axes(proto) -> None:  # noqa: ANN001
    """The exporter's symbols (s0, s53…) for the input's batch, height and width become 'batch',
    'height' and 'width' everywhere in the graph: what users see in Netron and TensorRT profiles."""
    import re

    dims = proto.graph.input[0].type.tensor_type.shape.dim
    mapping = {dims[i].dim_param: name for i, name in AXIS_NAMES.items()
               if i < len(dims) and dims[i].dim_param and dims[i].dim_param != name}
    if not mapping:
        return
    symbol = re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(map(re.escape, mapping)) + r")(?![A-Za-z0-9_])")
    for info in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = symbol.sub(lambda m: mapping[m.group(1)], dim.dim_param)


def name_nodes(proto) -> None:  # noqa: ANN001
    """Give every node a unique name: the FP16 fallback reports and blocks nodes by name."""
    seen: set[str] = set()
    for i, node in enumerate(proto.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


HEAD_OUTPUTS = {"labels": "labels", "probabilities": "probabilities"}  # a head's output: its graph output's name


def add_head(proto, output: str, num_classes: int) -> None:  # noqa: ANN001 - onnx.ModelProto, changed in place
    """Append a server head to an FP32 graph whose one output is N×C×H×W logits: ``output``
    "labels" — ArgMax over the classes (axis 1, the first of equal scores, as numpy's argmax) then
    Cast to uint8 (uint16 beyond 256 classes): the N×H×W class map; "probabilities" — Softmax over
    axis 1: N×C×H×W float32. The graph's output is replaced by the head's, named after it."""
    from onnx import TensorProto, helper

    graph = proto.graph
    logits = graph.output[0]
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in logits.type.tensor_type.shape.dim]
    name = HEAD_OUTPUTS[output]
    if output == "labels":
        dtype = TensorProto.UINT8 if num_classes <= 256 else TensorProto.UINT16
        graph.node.extend([
            helper.make_node("ArgMax", [logits.name], ["segdeploy_argmax"], name="segdeploy_head_argmax", axis=1,
                             keepdims=0),
            helper.make_node("Cast", ["segdeploy_argmax"], [name], name="segdeploy_head_cast", to=dtype)])
        info = helper.make_tensor_value_info(name, dtype, [dims[0], *dims[2:]] if len(dims) == 4 else None)
    else:
        graph.node.append(helper.make_node("Softmax", [logits.name], [name], name="segdeploy_head_softmax", axis=1))
        info = helper.make_tensor_value_info(name, TensorProto.FLOAT, dims or None)
    del graph.output[:]
    graph.output.append(info)
