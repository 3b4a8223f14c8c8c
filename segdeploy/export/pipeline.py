"""`segdeploy export`: RUN_DIR -> export/model.onnx [-> model.fp16.onnx [-> model.engine]] + parity.json.

Each artifact is written as a candidate, gated against a fresh PyTorch FP32 run on real tiles,
and only then renamed into place: a model that failed its gate never sits where a deployment
would pick it up.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from segdeploy import recipe as recipe_mod
from segdeploy.artifact import RECIPE_FILE, WEIGHTS_FILE, ModelMeta, require_finished, source_record
from segdeploy.errors import UserError
from segdeploy.export import fp16 as fp16_mod
from segdeploy.export.onnx import ExportPlan, export_onnx, graph_findings, preflight, set_metadata
from segdeploy.parity import ParityReport, as_numpy_batches, compare, gate, parity_tiles, run_batched
from segdeploy.recipe import Recipe
from segdeploy.utils import atomic_path, versions, writable_location, write_json

FP32_ONNX, FP16_ONNX, ENGINE = "model.onnx", "model.fp16.onnx", "model.engine"


@dataclass
class ExportOptions:
    fp16: bool = False
    trt: bool = False
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
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"run_dir": str(self.run_dir), "out_dir": str(self.out_dir), "export": self.plan.to_dict(),
                "files": self.files, "notes": self.notes, "engine": self.engine, "seconds": round(self.seconds, 2),
                "parity": {k: v.to_dict() for k, v in self.parity.items()},
                "passed": all(r.passed for r in self.parity.values())}


def export_run(run_dir: Path, opts: ExportOptions, log: Callable[[str], None] = print) -> ExportReport:
    from segdeploy.runtime.onnxruntime import OrtBackend
    from segdeploy.runtime.torch import TorchBackend, load_run_model

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    require_finished(run_dir)
    writable_location(run_dir / "export")
    for assignment in opts.parity_overrides:
        if not assignment.startswith("parity."):
            raise UserError(f"export --set {assignment!r}: only parity.* thresholds can change after training")
    rec = recipe_mod.load(run_dir / RECIPE_FILE, opts.parity_overrides, opts.data_root)
    reference = TorchBackend.load(run_dir)  # fresh PyTorch FP32 run: the yardstick
    model, meta = load_run_model(run_dir)  # a second copy: preflight rewrites it in place
    plan = preflight(model, meta, opts.tile or meta.tile_size)
    if not plan.dynamic:
        log(f"static export at {plan.tile}×{plan.tile}: {'; '.join(plan.static_reasons)}")
    for f in plan.findings:
        log(f"preflight: {f}")
    meta = replace(meta, tile_size=plan.tile, static_size=None if plan.dynamic else plan.tile, versions=versions(),
                   source=source_record(run_dir / WEIGHTS_FILE, run_dir / "export"))
    out = run_dir / "export"
    out.mkdir(exist_ok=True)
    report = ExportReport(run_dir, out, plan)
    _, _, max_batch = _batch(opts)

    # ---- tiles: parity on the validation split, FP16 calibration on the training split
    x, y = parity_tiles(rec, meta, plan.tile, rec.parity.samples, "val")
    ref = run_batched(reference, x)
    log(f"parity tiles: {len(x)} × {plan.tile}² from the validation split")

    def gated(candidate: Path, key: str, precision: str, backend_factory) -> ParityReport:  # noqa: ANN001
        rep = compare(ref, run_batched(backend_factory(candidate), x), y, meta, rec.parity, key.split("_")[0], precision)
        report.parity[key] = rep
        log(rep.summary())
        return rep

    # ---- FP32 ONNX
    fp32_path = out / FP32_ONNX
    with atomic_path(fp32_path) as cand:
        report.notes += export_onnx(model, meta, cand, plan, opts.opset, max_batch)
        import onnx

        proto32 = onnx.load(str(cand))
        findings = graph_findings(proto32)
        plan.findings += findings
        blocking = [f for f in findings if f.action.startswith("error")]
        if blocking and (opts.trt or opts.fp16):
            raise UserError(f"cannot build for TensorRT: {blocking[0]}")
        rep = gated(cand, "onnxruntime_fp32", "fp32", lambda p: OrtBackend(p))
        _write_parity(report)
        if not rep.passed:
            _drop_stale(out, FP32_ONNX, FP16_ONNX, ENGINE)
        gate(rep)
    report.files["onnx"] = str(fp32_path)

    # ---- FP16 ONNX with the fallback loop
    if opts.fp16 or opts.trt:
        meta16 = replace(meta, source=source_record(fp32_path, out))
        _export_fp16(proto32, meta16, plan, rec, out, opts, gated, report, log)
        report.files["onnx_fp16"] = str(out / FP16_ONNX)

    # ---- TensorRT engine
    if opts.trt:
        from segdeploy.export.tensorrt import build_engine, derive_profile
        from segdeploy.runtime.tensorrt import TensorRTBackend

        profile = derive_profile(_batch(opts), plan.tile, meta.bands, meta.input_divisor, plan.dynamic)
        engine_path = out / ENGINE
        meta_engine = replace(meta, source=source_record(out / FP16_ONNX, out))
        report.engine = build_engine(out / FP16_ONNX, engine_path, profile, meta_engine.to_dict(),
                                     workspace_gib=opts.workspace_gib, cache_dir=out, log=log)
        rep = compare(ref, run_batched(TensorRTBackend(engine_path), x), y, meta, rec.parity, "tensorrt", "fp16")
        report.parity["tensorrt_fp16"] = rep
        log(rep.summary())
        if not rep.passed:
            engine_path.rename(engine_path.with_suffix(".engine.rejected"))
            _write_parity(report)
            gate(rep)
        report.engine["parity_passed"] = True
        write_json(engine_path.with_name(engine_path.name + ".json"), report.engine)
        report.files["engine"] = str(engine_path)

    report.seconds = time.perf_counter() - t0
    report.files.update(_write_parity(report))
    return report


def _export_fp16(proto32, meta: ModelMeta, plan: ExportPlan, rec: Recipe, out: Path, opts: ExportOptions,  # noqa: ANN001
                 gated: Callable, report: ExportReport, log: Callable[[str], None]) -> None:
    """FP16 candidates, each gated, keeping more nodes FP32 until one passes; refused when the
    nodes it had to keep leave less than ``parity.min_fp16_share`` of the FLOPs in FP16."""
    from segdeploy.runtime.onnxruntime import OrtBackend

    calib_x, _ = parity_tiles(rec, meta, plan.tile, rec.parity.samples, "train")
    calib = as_numpy_batches(calib_x, 4)
    ranges = fp16_mod.measure_ranges(proto32, calib)
    flops = fp16_mod.node_flops(proto32, calib[0][:1])
    keep = set(fp16_mod.nodes_out_of_range(proto32, ranges)) | set(fp16_mod.weights_out_of_range(proto32))
    if keep:
        log(f"FP16: {len(keep)} node(s) kept FP32 by measured range: {', '.join(sorted(keep)[:8])}")
    fp16_path = out / FP16_ONNX
    total = len(proto32.graph.node)
    for round_ in range(opts.max_fallback_rounds + 1):
        share = fp16_mod.reduced_share(flops, keep)
        proto16 = fp16_mod.convert(copy.deepcopy(proto32), keep)
        set_metadata(proto16, meta, {"export": plan.to_dict(), "fp32_nodes": sorted(keep),
                                     "fp16_flops_share": round(share, 4)})
        try:
            with atomic_path(fp16_path) as cand:
                fp16_mod.save(proto16, cand)
                rep = gated(cand, "onnxruntime_fp16", "fp16", lambda p: OrtBackend(p))
                rep.fp32_nodes, rep.fallback_rounds = sorted(keep), round_
                rep.reduced_nodes, rep.total_nodes, rep.reduced_flops_share = total - len(keep), total, round(share, 4)
                if share < rec.parity.min_fp16_share:
                    rep.failures.append(f"only {share:.1%} of the FLOPs run in FP16 after {round_} fallback round(s) "
                                        f"(< parity.min_fp16_share {rec.parity.min_fp16_share:.0%}): a mostly-FP32 "
                                        "model is not an FP16 export; ship model.onnx or lower the threshold")
                if not rep.passed:
                    raise _Rejected  # leaving the block deletes the candidate
            return
        except _Rejected:
            if round_ == opts.max_fallback_rounds or len(keep) >= total or share < rec.parity.min_fp16_share:
                _write_parity(report)
                _drop_stale(out, FP16_ONNX, ENGINE)
                gate(rep)
            errs = fp16_mod.local_errors(proto32, proto16, calib[:2])
            ranked = [n for n in sorted(errs, key=lambda n: -errs[n]) if n not in keep]
            added = ranked[: max(1, math.ceil(total * 0.05 * 2**round_))]
            keep |= set(added)
            log(f"FP16 fallback round {round_ + 1}: keeping {len(added)} more node(s) in FP32 "
                f"({len(keep)}/{total}, {fp16_mod.reduced_share(flops, keep):.1%} of FLOPs left in FP16): "
                f"{', '.join(added[:6])}{' …' if len(added) > 6 else ''}")


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
    write_json(out / "parity.json", {"passed": all(r.passed for r in report.parity.values()),
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
    with atomic_path(out / "parity.md") as tmp:
        tmp.write_text("\n".join(lines))
    return {"parity": str(out / "parity.json"), "parity_summary": str(out / "parity.md")}

