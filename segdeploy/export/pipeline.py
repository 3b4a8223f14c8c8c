"""`segdeploy export`: RUN_DIR -> export/model.onnx [-> model.fp16.onnx, model.int8[.cpu].onnx
[-> model.engine, model.int8.engine]] + parity.json.

Each artifact is written as a candidate, gated against a fresh PyTorch FP32 run on real tiles,
and only then renamed into place: a model that failed its gate never sits where a deployment
would pick it up.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from segdeploy import recipe as recipe_mod
from segdeploy.artifact import EXPORT_FORMS, PARITY_FILE, PARITY_SUMMARY, ModelMeta, Run, engine_sidecar, source_record
from segdeploy.errors import UserError
from segdeploy.export import fp16 as fp16_mod
from segdeploy.export import int8 as int8_mod
from segdeploy.export.onnx import ExportPlan, export_onnx, graph_findings, preflight, set_metadata
from segdeploy.parity import ParityReference, ParityReport, as_numpy_batches, gate, parity_tiles
from segdeploy.recipe import Recipe
from segdeploy.utils import atomic_path, versions, writable_location, write_json

FP32_ONNX, FP16_ONNX, ENGINE = (EXPORT_FORMS[k].file for k in ("fp32", "fp16", "engine"))
INT8_ONNX, INT8_CPU_ONNX, INT8_ENGINE = (EXPORT_FORMS[k].file for k in ("int8", "int8_cpu", "int8_engine"))
DERIVED = (FP16_ONNX, ENGINE, INT8_ONNX, INT8_CPU_ONNX, INT8_ENGINE)


@dataclass
class ExportOptions:
    fp16: bool = False
    trt: bool = False
    int8: bool = False
    calib_images: int = 32
    calib_method: str = "minmax"
    opset: int = 17
    tile: int | None = None
    batch: str = "1:4:8"
    workspace_gib: float = 4.0
    max_fallback_rounds: int = 6
    data_root: Path | None = None
    parity_overrides: list[str] = field(default_factory=list)  # "parity.key=value"


@dataclass
class ExportReport:
    run_dir: Path
    out_dir: Path
    plan: ExportPlan
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    parity: dict[str, ParityReport] = field(default_factory=dict)
    engine: dict | None = None
    calibration_keys: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"run_dir": str(self.run_dir), "out_dir": str(self.out_dir), "export": self.plan.to_dict(),
                "files": self.files, "notes": self.notes, "engine": self.engine, "seconds": round(self.seconds, 2),
                "calibration_keys": self.calibration_keys,
                "parity": {k: v.to_dict() for k, v in self.parity.items()},
                "passed": all(r.passed for r in self.parity.values())}


class _Gate:
    """Every candidate against the same fresh PyTorch FP32 logits on the same validation tiles."""

    def __init__(self, reference, rec: Recipe, meta: ModelMeta, tile: int, report: ExportReport,  # noqa: ANN001
                 log: Callable[[str], None]) -> None:
        self.ref = ParityReference(reference, rec, meta, tile)
        self.meta, self.report, self.log = meta, report, log
        log(f"parity tiles: {len(self.ref.x)} × {tile}² from the validation split")

    def __call__(self, backend, key: str, precision: str, label: str = "",  # noqa: ANN001 - a Backend
                 share: tuple[int, int, float] | None = None) -> ParityReport:
        """Compare; `share` = (reduced nodes, counted nodes, share of FLOPs) for reduced precision."""
        rep = self.ref.compare(self.ref.logits_of(backend), self.meta, label or key.split("_")[0], precision)
        if share is not None:
            rep.reduced_nodes, rep.total_nodes, rep.reduced_flops_share = share[0], share[1], round(share[2], 4)
        self.report.parity[key] = rep
        self.log(rep.summary())
        return rep


def export_run(run_dir: Path, opts: ExportOptions, log: Callable[[str], None] = print) -> ExportReport:
    """FP32 ONNX, then (as asked) FP16 ONNX, INT8 ONNX and TensorRT engines, each gated before it
    gets its final name; a failed stage removes the artifacts that would now be stale."""
    from segdeploy.runtime.torch import TorchBackend

    t0 = time.perf_counter()
    run = Run.open_finished(run_dir)
    writable_location(run.export_dir)
    for assignment in opts.parity_overrides:
        if not assignment.startswith("parity."):
            raise UserError(f"export --set {assignment!r}: only parity.* thresholds can change after training")
    if opts.calib_method not in int8_mod.METHODS:
        raise UserError(f"--calib-method {opts.calib_method!r} is unknown; choose from {', '.join(int8_mod.METHODS)}")
    rec = recipe_mod.load(run.recipe_path, opts.parity_overrides, opts.data_root)
    meta, built = run.meta, run.build_model()
    reference = TorchBackend(built, meta, run.root)  # fresh PyTorch FP32 run: the yardstick
    model = copy.deepcopy(built)  # preflight rewrites its copy in place
    plan = preflight(model, meta, opts.tile or meta.tile_size)
    if not plan.dynamic:
        log(f"static export at {plan.tile}×{plan.tile}: {'; '.join(plan.static_reasons)}")
    for f in plan.findings:
        log(f"preflight: {f}")
    out = run.export_dir
    meta = replace(meta, tile_size=plan.tile, static_size=None if plan.dynamic else plan.tile, versions=versions(),
                   source=source_record(run.weights, out))
    out.mkdir(exist_ok=True)
    report = ExportReport(run.root, out, plan)
    gate_ = _Gate(reference, rec, meta, plan.tile, report, log)
    proto32 = _export_fp32(model, meta, plan, out, opts, gate_, report)
    if opts.fp16 or opts.trt:
        _export_fp16(proto32, replace(meta, source=source_record(out / FP32_ONNX, out)), plan, rec, out, opts,
                     gate_, report, log)
        report.files["onnx_fp16"] = str(out / FP16_ONNX)
    if opts.int8:
        _export_int8(replace(meta, source=source_record(out / FP32_ONNX, out)), plan, rec, out, opts, gate_,
                     report, log)
    if opts.trt:
        report.engine = _export_engine(out / FP16_ONNX, ENGINE, "fp16", meta, plan, opts, gate_, report, log)
        if opts.int8:
            _export_engine(out / INT8_ONNX, INT8_ENGINE, "int8", meta, plan, opts, gate_, report, log)
    report.seconds = time.perf_counter() - t0
    report.files.update(_write_parity(report))
    _track(run, report, log)
    return report


def _track(run: Run, report: ExportReport, log: Callable[[str], None]) -> None:
    """The parity reports go to the MLflow run that trained this model, when there is one."""
    from segdeploy.tracking import log_report

    metrics = {f"parity_{k}_agreement": r.agreement for k, r in report.parity.items()}
    try:
        note = log_report(run.info, "export", report.to_dict(), metrics)
    except UserError as exc:
        note = f"export report not logged to MLflow: {exc}"
    if note:
        log(note)


def _export_fp32(model, meta: ModelMeta, plan: ExportPlan, out: Path, opts: ExportOptions, gate_: _Gate,  # noqa: ANN001
                 report: ExportReport):  # noqa: ANN202 - onnx.ModelProto
    import onnx

    from segdeploy.runtime.onnxruntime import OrtBackend

    _, _, max_batch = _batch(opts)
    fp32_path = out / FP32_ONNX
    gate_.log(f"exporting FP32 ONNX ({'dynamic' if plan.dynamic else 'static'} shapes, opset ≥ {opts.opset})…")
    with atomic_path(fp32_path) as cand:
        report.notes += export_onnx(model, meta, cand, plan, opts.opset, max_batch)
        proto32 = onnx.load(str(cand))
        findings = graph_findings(proto32)
        plan.findings += findings
        blocking = [f for f in findings if f.action.startswith("error")]
        if blocking and (opts.trt or opts.fp16):
            raise UserError(f"cannot build for TensorRT: {blocking[0]}")
        rep = gate_(OrtBackend(cand), "onnxruntime_fp32", "fp32")
        _write_parity(report)
        if not rep.passed:
            _drop_stale(out, FP32_ONNX, *DERIVED)
        gate(rep)
    report.files["onnx"] = str(fp32_path)
    return proto32


@dataclass
class _Reduced:
    """One reduced-precision ONNX export: how to write a candidate that keeps some nodes in float,
    and how to measure what share of the FLOPs that leaves reduced."""

    file: str
    key: str  # parity report key
    precision: str  # fp16 | int8
    min_share: float
    share_setting: str
    nodes: set[str]  # the nodes counted in "reduced on N/M nodes"
    write: Callable[[set[str], Path], None]
    share: Callable[[set[str]], float]
    stale: tuple[str, ...]  # what a failure makes stale
    label: str = "onnxruntime"


def _fallback(spec: _Reduced, keep: set[str], reference_proto, calib: list, out: Path,  # noqa: ANN001
              opts: ExportOptions, gate_: _Gate, report: ExportReport, log: Callable[[str], None]) -> None:
    """Gate candidates, keeping the nodes with the largest own error in float, round after round,
    until one passes; fail (typed, nothing written) when rounds run out or too little stays reduced."""
    import onnx

    from segdeploy.runtime.onnxruntime import OrtBackend

    total = len(reference_proto.graph.node)
    for round_ in range(opts.max_fallback_rounds + 1):
        share = spec.share(keep)
        errs: dict[str, float] = {}
        try:
            with atomic_path(out / spec.file) as cand:
                spec.write(keep, cand)
                rep = gate_(OrtBackend(cand), spec.key, spec.precision, spec.label,
                            (len(spec.nodes - keep), len(spec.nodes), share))
                rep.fp32_nodes, rep.fallback_rounds = sorted(keep), round_
                if share < spec.min_share:
                    rep.failures.append(f"only {share:.1%} of the FLOPs run in {spec.precision.upper()} after {round_} "
                                        f"fallback round(s) (< {spec.share_setting} {spec.min_share:.0%}): a mostly-FP32 "
                                        f"model is not an {spec.precision.upper()} export; ship model.onnx or lower "
                                        "the threshold")
                if not rep.passed:
                    if round_ < opts.max_fallback_rounds and share >= spec.min_share:
                        errs = fp16_mod.local_errors(reference_proto, onnx.load(str(cand)), calib[:2])
                    raise _Rejected  # leaving the block deletes the candidate
            return
        except _Rejected:
            if not errs or len(keep) >= total:
                _write_parity(report)
                _drop_stale(out, *spec.stale)
                gate(rep)
            ranked = [n for n in sorted(errs, key=lambda n: -errs[n]) if n not in keep]
            added = ranked[: max(1, math.ceil(total * 0.05 * 2**round_))]
            keep |= set(added)
            log(f"{spec.precision.upper()} fallback round {round_ + 1}: keeping {len(added)} more node(s) in FP32 "
                f"({len(keep)}/{total}, {spec.share(keep):.1%} of FLOPs left in {spec.precision.upper()}): "
                f"{', '.join(added[:6])}{' …' if len(added) > 6 else ''}")


def _export_fp16(proto32, meta: ModelMeta, plan: ExportPlan, rec: Recipe, out: Path, opts: ExportOptions,  # noqa: ANN001
                 gate_: _Gate, report: ExportReport, log: Callable[[str], None]) -> None:
    """Mixed precision: nodes whose measured range would overflow start in FP32; the fallback
    adds more until the gate passes (parity.min_fp16_share of the FLOPs must stay FP16)."""
    calib_x, _ = parity_tiles(rec, meta, plan.tile, rec.parity.samples, "train")
    calib = as_numpy_batches(calib_x, 4)
    ranges = fp16_mod.measure_ranges(proto32, calib)
    flops = fp16_mod.node_flops(proto32, calib[0][:1])
    keep = set(fp16_mod.nodes_out_of_range(proto32, ranges)) | set(fp16_mod.weights_out_of_range(proto32))
    log(f"FP16: activation ranges measured on {len(calib_x)} training tiles; "
        f"{len(keep)} node(s) kept FP32 by range{': ' + ', '.join(sorted(keep)[:8]) if keep else ''}")

    def write(kept: set[str], path: Path) -> None:
        proto16 = fp16_mod.convert(copy.deepcopy(proto32), kept)
        set_metadata(proto16, meta, {"export": plan.to_dict(), "fp32_nodes": sorted(kept),
                                     "fp16_flops_share": round(fp16_mod.reduced_share(flops, kept), 4)})
        fp16_mod.save(proto16, path)

    spec = _Reduced(FP16_ONNX, "onnxruntime_fp16", "fp16", rec.parity.min_fp16_share, "parity.min_fp16_share",
                    {n.name for n in proto32.graph.node}, write, lambda kept: fp16_mod.reduced_share(flops, kept),
                    (FP16_ONNX, ENGINE))
    _fallback(spec, keep, proto32, calib, out, opts, gate_, report, log)


def _export_int8(meta: ModelMeta, plan: ExportPlan, rec: Recipe, out: Path, opts: ExportOptions, gate_: _Gate,
                 report: ExportReport, log: Callable[[str], None]) -> None:
    """Static INT8 in both forms (TensorRT's symmetric S8S8 and the CPU's U8S8), calibrated on
    training tiles only, each gated and fallen back on its own."""
    import onnx

    keys: list[str] = []
    calib_x, _ = parity_tiles(rec, meta, plan.tile, opts.calib_images, "train", keys=keys)
    report.calibration_keys = keys
    calib = as_numpy_batches(calib_x, 4)
    log(f"INT8: calibrating ({opts.calib_method}) on {len(calib_x)} tiles from {len(keys)} training images")
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=out) as work:
        prepared, cache = Path(work) / "prepared.onnx", Path(work) / "calibration.json"
        int8_mod.prepare(out / FP32_ONNX, prepared)
        proto = onnx.load(str(prepared))
        flops = fp16_mod.node_flops(proto, calib[0][:1])
        compute = int8_mod.compute_nodes(proto)
        for form, file in int8_mod.FORMS.items():
            def write(kept: set[str], path: Path, form: str = form) -> None:
                int8_mod.quantize(prepared, path, calib, form, opts.calib_method, kept, cache)
                q = onnx.load(str(path))
                set_metadata(q, meta, {"export": plan.to_dict(), "int8_form": form, "fp32_nodes": sorted(kept),
                                       "int8_flops_share": round(int8_mod.quantized_share(flops, compute, kept), 4),
                                       "calibration": {"method": opts.calib_method, "split": "train", "keys": keys}})
                onnx.save(q, str(path))

            key = "onnxruntime_int8" if form == "tensorrt" else "onnxruntime_int8_cpu"
            spec = _Reduced(file, key, "int8", rec.parity.min_int8_share, "parity.min_int8_share", compute, write,
                            lambda kept: int8_mod.quantized_share(flops, compute, kept),
                            (INT8_ONNX, INT8_CPU_ONNX, INT8_ENGINE),
                            label=f"onnxruntime ({'TensorRT' if form == 'tensorrt' else 'CPU'} form)")
            _fallback(spec, set(), proto, calib, out, opts, gate_, report, log)
            report.files[f"onnx_int8{'_cpu' if form == 'cpu' else ''}"] = str(out / file)


def _export_engine(onnx_path: Path, name: str, precision: str, meta: ModelMeta, plan: ExportPlan,
                   opts: ExportOptions, gate_: _Gate, report: ExportReport, log: Callable[[str], None]) -> dict:
    """Build a strongly typed engine from the gated ONNX of that precision, gate it under a
    hidden candidate name, and only then give it (and its sidecar) the final name."""
    import os

    from segdeploy.export.tensorrt import build_engine, derive_profile
    from segdeploy.runtime.tensorrt import TensorRTBackend

    sidecar = engine_sidecar

    profile = derive_profile(_batch(opts), plan.tile, meta.bands, meta.input_divisor, plan.dynamic)
    final = report.out_dir / name
    cand = final.with_name(f".{name}.candidate")
    meta_engine = replace(meta, source=source_record(onnx_path, report.out_dir))
    try:
        facts = build_engine(onnx_path, cand, profile, meta_engine.to_dict(), precision=precision,
                             workspace_gib=opts.workspace_gib, cache_dir=report.out_dir, log=log)
        rep = gate_(TensorRTBackend(cand), f"tensorrt_{precision}", precision)
        if not rep.passed:
            _write_parity(report)
            _drop_stale(report.out_dir, name)
            gate(rep)
        facts["parity_passed"] = True
        write_json(sidecar(cand), facts)
        os.replace(sidecar(cand), sidecar(final))
        os.replace(cand, final)
    finally:
        cand.unlink(missing_ok=True)
        sidecar(cand).unlink(missing_ok=True)
    report.files["engine" if precision == "fp16" else f"engine_{precision}"] = str(final)
    return facts


def _drop_stale(out: Path, *names: str) -> None:
    """After a failed gate, artifacts of an earlier export would no longer match model.onnx:
    remove them rather than leave a stale model that looks current."""
    for name in names:
        for p in (out / name, out / f"{name}.json"):
            p.unlink(missing_ok=True)


class _Rejected(Exception):
    """A candidate failed its gate (internal: triggers the FP16 fallback)."""


def _batch(opts: ExportOptions) -> tuple[int, int, int]:
    from segdeploy.export.tensorrt import parse_batch

    return parse_batch(opts.batch)


def _write_parity(report: ExportReport) -> dict[str, str]:
    out = report.out_dir
    write_json(out / PARITY_FILE, {"passed": all(r.passed for r in report.parity.values()),
                                     "reports": {k: v.to_dict() for k, v in report.parity.items()}})
    lines = ["# Parity", "", "Each exported model against a fresh PyTorch FP32 run on validation tiles. "
             "IoU drop (pt): the class's IoU against ground truth with PyTorch minus with this model, in points; "
             "positive means this model is worse.", ""]
    for key, r in report.parity.items():
        lines += [f"## {key}: {'PASS' if r.passed else 'FAIL'}", "", r.summary(), ""]
        if r.reduced_flops_share is not None:
            lines += [f"Reduced precision: {r.precision_share()}.", ""]
        if r.failures:
            lines += [f"- {f}" for f in r.failures] + [""]
        if r.fp32_nodes:
            lines += [f"FP32 nodes ({len(r.fp32_nodes)}, {r.fallback_rounds} fallback rounds): "
                      + ", ".join(r.fp32_nodes[:40]) + (" …" if len(r.fp32_nodes) > 40 else ""), ""]
        lines += ["| class | IoU (PyTorch) | IoU | IoU drop (pt) | Dice | IoU vs PyTorch |", "|---|---|---|---|---|---|"]
        f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        for c in r.per_class:
            d = c["iou_drop_points"]
            drop = "-" if d is None else f"{0.0 if abs(d) < 0.005 else d:.2f}"
            lines.append(f"| {c['class']} | {f(c['iou_gt_reference'])} | {f(c['iou_gt'])} | {drop} | "
                         f"{f(c['dice_gt'])} | {f(c['iou_vs_reference'])} |")
        lines.append("")
    with atomic_path(out / PARITY_SUMMARY) as tmp:
        tmp.write_text("\n".join(lines))
    return {"parity": str(out / PARITY_FILE), "parity_summary": str(out / PARITY_SUMMARY)}

