"""`segdeploy export`: RUN_DIR -> RUN/export/ forms (`artifact.EXPORT_FORMS`), as one transaction.

1. Every prerequisite is checked before any work (`_prepare`): the run, the recipe's overrides
   (`recipe.check_export_overrides`), TensorRT and a CUDA GPU for engines, the gate's tiles,
   enough calibration tiles, a writable export folder with room for the asked forms.
2. Every asked form (its sources included, `artifact.forms_for`) is built and gated on its own
   in a hidden staging folder inside RUN/export (`_Builder`); the gate's verdict
   (`parity.judge`, through `parity.ParityReference`) is all export acts on. A reduced-precision
   form that fails gets nodes kept in float, chosen by their measured effect on the logits
   (`export.sensitivity`), round after round, until it passes, the rounds run out, or the next
   node would cross the share floor.
3. Only when every asked form passed are they renamed into RUN/export, and each form's gate
   record merged into parity.json/parity.md (one record per form, kept across commands; a form
   left from an earlier command whose source changed is marked stale with the command that
   rebuilds it). A failure or an interruption leaves RUN/export as it was; a failed attempt's
   report goes to RUN/export-rejected/.

The gate's yardstick is the run's reference backend (`runtime.reference_backend`): a fresh PyTorch
FP32 run, or for an imported ONNX model, which has no PyTorch model, that FP32 ONNX itself (then
the FP32 form is not re-exported: the imported file is staged as it is and recorded as the
reference, and parity.json/parity.md say the reference is ONNX).
"""

from __future__ import annotations

import copy
import math
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from segdeploy import recipe as recipe_mod
from segdeploy.artifact import (
    EXPORT_FORMS,
    STAGING_PREFIX,
    ExportForm,
    ModelMeta,
    Run,
    engine_sidecar,
    flag_order,
    forms_for,
    source_record,
    write_onnx_meta,
)
from segdeploy.errors import DataError, OutputError, ParityError, UserError
from segdeploy.export import fp16 as fp16_mod
from segdeploy.export import int8 as int8_mod
from segdeploy.export import sensitivity
from segdeploy.export.onnx import EXPORT_TIME_LIMIT_S, ExportPlan, export_onnx, graph_findings, preflight
from segdeploy.parity import SPLIT_WORDS, ParityReference, percent, ParityReport, PrecisionUse, as_numpy_batches, parity_tiles
from segdeploy.recipe import Recipe
from segdeploy.utils import file_sha256, versions, writable_location, write_json

SENSITIVITY_TILES = 2  # calibration tiles the per-node effect on the logits is measured on


@dataclass
class ExportOptions:
    """What one `segdeploy export` asks for: the forms (`fp16`, `int8`, `trt`), calibration images and method for
    INT8, the ONNX opset, the tile (px; None: the run's), the engine's batch profile ("min:opt:max") and workspace
    (GiB), fallback rounds, the time limit per ONNX exporter attempt (seconds), the data root and `parity.*`
    overrides for the gate."""
    fp16: bool = False
    trt: bool = False
    int8: bool = False
    calib_images: int = 32
    calib_method: str = "minmax"
    heads: list[str] = field(default_factory=list)  # server heads on the FP32 graph: "argmax", "softmax"
    opset: int = 17
    tile: int | None = None
    batch: str = "1:4:8"
    workspace_gib: float = 4.0
    max_fallback_rounds: int = 6
    export_time_limit: float = EXPORT_TIME_LIMIT_S  # seconds per ONNX exporter attempt (then the next one)
    data_root: Path | None = None
    parity_overrides: list[str] = field(default_factory=list)  # "parity.key=value"

    @property
    def flags(self) -> list[str]:
        """The export flags these options stand for (``--trt`` brings its FP16 source along)."""
        asked = [f for f, on in (("--fp16", self.fp16), ("--int8", self.int8), ("--trt", self.trt)) if on]
        return flag_order(asked + [f"--head={h}" for h in self.heads])

    def args(self, forms: list[ExportForm], gate: bool = True) -> list[str]:
        """The command-line arguments that make `forms` with these options: their flags, then every
        option that differs from its default and applies to them; with `gate=False` only those that
        shape the files (not ``--data`` and ``--set``, which only the gate reads: the files of two
        commands that differ only there are byte-identical)."""
        default, flags = ExportOptions(), {f for form in forms for f in form.flags}
        args = flag_order(flags)
        if self.tile:
            args += ["--tile", str(self.tile)]
        if self.opset != default.opset:
            args += ["--opset", str(self.opset)]
        if self.export_time_limit != default.export_time_limit:  # it decides which exporter made the file
            args += ["--export-time-limit", f"{self.export_time_limit:g}"]
        if "--int8" in flags and self.calib_images != default.calib_images:
            args += ["--calib-images", str(self.calib_images)]
        if "--int8" in flags and self.calib_method != default.calib_method:
            args += ["--calib-method", self.calib_method]
        if "--trt" in flags and self.batch != default.batch:
            args += ["--batch", self.batch]
        if "--trt" in flags and self.workspace_gib != default.workspace_gib:
            args += ["--workspace", f"{self.workspace_gib:g}"]
        if gate and self.data_root is not None:
            args += ["--data", str(self.data_root)]
        for assignment in self.parity_overrides if gate else ():
            args += ["--set", assignment]
        return args


@dataclass
class FormResult:
    """One asked form in one export command: its verdict (None: not built, `note` says why), the
    fallback rounds that led to it, when it was gated and the command that made it."""

    form: ExportForm
    report: ParityReport | None = None
    rounds: list[dict] = field(default_factory=list)
    note: str = ""
    gated_at: str = ""
    command: str = ""
    args: list[str] = field(default_factory=list)  # the command's arguments after the run directory
    reference: bool = False  # the form is the gate's reference itself (an imported FP32 ONNX): nothing to gate

    @property
    def passed(self) -> bool:
        """True when the form passed its gate (or is the gate's reference itself)."""
        return self.reference or (self.report is not None and self.report.passed)

    def record(self) -> dict:
        """The form's gate record, as parity.json keeps it."""
        base = self.report.to_dict() if self.report is not None else {"passed": self.reference,
                                                                     "precision": self.form.precision}
        return {"form": self.form.key, "file": self.form.file, "label": self.form.label, **base,
                "gated_at": self.gated_at, "command": self.command, "args": self.args, "rounds": self.rounds,
                "note": self.note,
                "stale": ""}


@dataclass
class ExportReport:
    """What an export did: the run and output folder, the ONNX plan, the files written by role, notes, each form's
    result, stale forms (why, with the rebuild command), the engine's facts, calibration keys, the gate's tiles and
    the wall seconds."""
    run_dir: Path
    out_dir: Path
    plan: ExportPlan
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    results: dict[str, FormResult] = field(default_factory=dict)
    stale: dict[str, str] = field(default_factory=dict)  # form key -> why it is stale, with the command that rebuilds it
    engine: dict | None = None
    calibration_keys: list[str] = field(default_factory=list)
    gate_tiles: str = ""
    seconds: float = 0.0

    @property
    def parity(self) -> dict[str, ParityReport]:
        """Form key -> the gate's verdict, for every form that was built."""
        return {k: r.report for k, r in self.results.items() if r.report is not None}

    @property
    def passed(self) -> bool:
        """True when there was something to gate and every form passed."""
        return bool(self.results) and all(r.passed for r in self.results.values())

    def failure(self) -> str:
        """One line: which asked forms failed (and why), which passed, and that nothing was replaced."""
        failed = [r.report.explain() if r.report is not None else f"{r.form.file}: {r.note}"
                  for r in self.results.values() if not r.passed]
        notes = [f"{r.form.file}: {r.note}" for r in self.results.values() if r.report is not None and r.note
                 and not r.passed]
        passed = [r.form.file for r in self.results.values() if r.passed]
        return (f"parity gate failed for {'; '.join(failed)}{'; ' if notes else ''}{'; '.join(notes)}. "
                f"Passed: {', '.join(passed) or 'none'}. Nothing in {self.out_dir} was replaced; "
                f"the report is in {Run(self.run_dir).rejected_dir}")

    def to_dict(self) -> dict:
        """The report as JSON types (`export --json`), each form's gate record included."""
        return {"run_dir": str(self.run_dir), "out_dir": str(self.out_dir), "export": self.plan.to_dict(),
                "files": self.files, "notes": self.notes, "engine": self.engine, "seconds": round(self.seconds, 2),
                "calibration_keys": self.calibration_keys, "gate_tiles": self.gate_tiles,
                "parity": {k: r.record() for k, r in self.results.items()}, "stale": self.stale,
                "passed": self.passed}


def export_run(run_dir: Path, opts: ExportOptions, log: Callable[[str], None] = print) -> ExportReport:
    """Build and gate every form `opts` asks for (with its sources) and replace the old ones only
    when all pass. Raises UserError before any work when a prerequisite is missing, ParityError
    (exit 3, the ExportReport attached) when a form fails its gate; either way, and on an
    interruption, RUN/export is left byte for byte as it was."""
    t0 = time.perf_counter()
    job = _prepare(Path(run_dir), opts, log)
    with _Staging(job.run.export_dir) as stage:
        builder = _Builder(job, stage, log)
        builder.build_all()
        report = builder.report
        if report.passed:
            report.files.update(_commit(job, stage, report, log))
    report.seconds = time.perf_counter() - t0
    if not report.passed:
        _write_rejected(job, report)
        raise ParityError(report.failure(), report)
    _track(job.run, report, log)
    return report


# ------------------------------------------------------------------------------------ prerequisites


@dataclass
class _Job:
    """Everything an export needs, gathered and checked before any file is written."""

    run: Run
    rec: Recipe
    opts: ExportOptions
    forms: list[ExportForm]
    meta: ModelMeta  # the exported model's: tile size, static size, versions
    model: object  # the torch module, rewritten by preflight (None for an imported ONNX model)
    plan: ExportPlan
    reference: ParityReference
    range_tiles: list  # FP16 activation ranges: training tiles
    calib_tiles: list  # INT8 calibration: training tiles
    calib_keys: list[str]


def _prepare(run_dir: Path, opts: ExportOptions, log: Callable[[str], None]) -> _Job:
    """Check every prerequisite, cheapest first, and load what the build needs; write nothing."""
    from segdeploy.runtime import reference_backend

    run = Run.open_finished(run_dir)
    forms = forms_for(opts.flags)
    rec = recipe_mod.load_for_export(run.recipe_path, opts.parity_overrides, opts.data_root)
    _check_tools(opts, forms)
    writable_location(run.export_dir)
    _check_space(run, forms)
    backend = reference_backend(run)  # the yardstick: a fresh PyTorch FP32 run, or an imported FP32 ONNX
    model, plan = _plan(run, backend, opts)
    if not plan.dynamic:
        log(f"static export at {plan.tile}×{plan.tile}: {'; '.join(plan.static_reasons)}")
    for f in plan.findings:
        log(f"preflight: {f}")
    meta = replace(backend.meta if model is None else run.meta, tile_size=plan.tile,
                   static_size=None if plan.dynamic else plan.tile, versions=versions())
    range_tiles, calib_tiles, keys = _training_tiles(rec, meta, plan, forms, opts, log)
    reference = ParityReference(backend, rec, meta, plan.tile)
    log(f"parity tiles: {reference.describe()}; reference: {run.reference}")
    return _Job(run, rec, opts, forms, meta, model, plan, reference, range_tiles, calib_tiles, keys)


def _plan(run: Run, backend, opts: ExportOptions) -> tuple[object, ExportPlan]:  # noqa: ANN001 - a Backend
    """(the torch module preflight rewrote, its plan); for an imported ONNX model (None, the plan
    its own fixed sizes make: there is nothing to re-export)."""
    if run.model_format != "onnx":
        model = copy.deepcopy(backend.model)  # preflight rewrites its copy in place
        return model, preflight(model, run.meta, opts.tile or run.meta.tile_size)
    meta = backend.meta
    tile = meta.static_size or opts.tile or meta.tile_size
    if tile % meta.input_divisor:
        raise UserError(f"--tile {tile} is not a multiple of the model's input divisor {meta.input_divisor}; "
                        f"use {tile - tile % meta.input_divisor or meta.input_divisor}")
    plan = ExportPlan(dynamic=meta.static_size is None, tile=tile, batch=meta.static_batch)
    if not plan.dynamic:
        plan.static_reasons.append(f"the imported ONNX model is fixed at {tile}×{tile}")
    return None, plan


def _check_tools(opts: ExportOptions, forms: list[ExportForm]) -> None:
    """Options the asked forms use, and TensorRT + a CUDA GPU for engines (BackendUnavailable)."""
    if any(f.precision == "int8" for f in forms) and opts.calib_method not in int8_mod.METHODS:
        raise UserError(f"--calib-method {opts.calib_method!r} is unknown; choose from {', '.join(int8_mod.METHODS)}")
    from segdeploy.export.tensorrt import current_device, parse_batch

    parse_batch(opts.batch)  # the ONNX export's largest batch comes from it too
    if any(f.backend == "tensorrt" for f in forms):
        current_device()  # TensorRT importable, recent enough, and a CUDA GPU visible


def _check_space(run: Run, forms: list[ExportForm]) -> None:
    """Refuse (OutputError) when the export folder's file system cannot hold the asked forms beside
    the old ones: each form's expected size (`ExportForm.size`) times the weights' size, plus the
    INT8 work files, with a quarter to spare."""
    fp32_bytes = run.model_file.stat().st_size
    need = fp32_bytes * 1.25 * (sum(f.size for f in forms) + (1.0 if any(f.precision == "int8" for f in forms) else 0.0))
    where = run.export_dir if run.export_dir.is_dir() else run.root
    free = shutil.disk_usage(where).free
    if free < need:
        raise OutputError(f"{run.export_dir}: not enough disk space for {', '.join(f.file for f in forms)} "
                          f"(about {need / 2**20:.0f} MB needed, {free / 2**20:.0f} MB free); free some space there")


def _training_tiles(rec: Recipe, meta: ModelMeta, plan: ExportPlan, forms: list[ExportForm], opts: ExportOptions,
                    log: Callable[[str], None]) -> tuple[list, list, list[str]]:
    """FP16 range tiles and INT8 calibration tiles from the training split only (validation tiles
    belong to the gate), in batches of 4 or of the model's fixed batch; DataError when there are
    fewer than asked, naming the number that fits."""
    range_tiles, calib_tiles, keys, tile = [], [], [], plan.tile
    if any(f.precision == "fp16" for f in forms):
        x, _ = parity_tiles(rec, meta, tile, rec.parity.samples, "train")
        range_tiles = _batches(x, plan)
    if any(f.precision == "int8" for f in forms):
        x, _ = parity_tiles(rec, meta, tile, opts.calib_images, "train", keys=keys)
        if len(x) < opts.calib_images:
            raise DataError(f"--calib-images {opts.calib_images}: the training split holds only {len(x)} tiles of "
                            f"{tile}² ({len(keys)} images); pass --calib-images {len(x)} or add training images")
        calib_tiles = _batches(x, plan)
        log(f"INT8: {len(x)} calibration tiles from {len(keys)} training images ({opts.calib_method})")
    return range_tiles, calib_tiles, keys


def _batches(x, plan: ExportPlan) -> list:  # noqa: ANN001 - a torch.Tensor of tiles
    """Batches of 4 tiles, or of the model's fixed batch (whole batches only)."""
    if not plan.batch:
        return as_numpy_batches(x, 4)
    return as_numpy_batches(x[: max(len(x) // plan.batch, 1) * plan.batch], plan.batch)


# ------------------------------------------------------------------------------------ building


class _Staging:
    """A hidden folder inside RUN/export where an export builds its forms; removed on leaving,
    whatever happened (and RUN/export too, when this export created it and left it empty)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def __enter__(self) -> Path:
        self.created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.out))
        return self.dir

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.created and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()


@dataclass
class _Reduced:
    """A reduced-precision form for the fallback loop: how to write a candidate that keeps some
    nodes in float, the nodes counted and those it may keep, the share of FLOPs left reduced,
    and each candidate node's measured effect on the logits (computed on first need)."""

    form: ExportForm
    nodes: set[str]
    candidates: list[str]
    keep: set[str]
    write: Callable[[set[str], Path], None]
    share: Callable[[set[str]], float]
    effects: Callable[[], dict[str, float]]


class _Builder:
    """Builds and gates every asked form of one export in the staging folder; each form's result
    (verdict, rounds, command) is kept in `report.results`. Forms are built in table order; one
    whose source failed is not built."""

    # export form key (artifact.EXPORT_FORMS) -> the method that builds and gates it: with the
    # form's row in the table, the one place a new form takes (tests/test_export.py checks both agree)
    BUILDERS = {"fp32": "_fp32", "fp16": "_fp16", "int8": "_int8_form", "int8_cpu": "_int8_form",
                "engine": "_engine", "int8_engine": "_engine", "argmax": "_head", "softmax": "_head"}

    def __init__(self, job: _Job, stage: Path, log: Callable[[str], None]) -> None:
        self.job, self.stage, self.log, self.opts = job, stage, log, job.opts
        self.report = ExportReport(job.run.root, job.run.export_dir, job.plan, calibration_keys=job.calib_keys,
                                   gate_tiles=job.reference.describe())
        self.proto32 = None
        self._int8: dict | None = None
        self.builders = {key: getattr(self, method) for key, method in self.BUILDERS.items()}

    def build_all(self) -> None:
        for form in self.job.forms:
            source = self.report.results.get(form.source)
            if form.source in EXPORT_FORMS and (source is None or not source.passed):
                result = FormResult(form, note=f"not built: its source {EXPORT_FORMS[form.source].file} failed its gate")
            else:
                result = self.builders[form.key](form)
            result.gated_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
            result.args = self.opts.args([form])
            result.command = shlex.join(["segdeploy", "export", str(self.job.run.root), *result.args])
            self.report.results[form.key] = result

    def gate(self, backend, form: ExportForm, usage: PrecisionUse | None = None) -> ParityReport:  # noqa: ANN001
        """The verdict on one candidate (thresholds: the recipe's for its precision, with --set)."""
        ref = self.job.reference
        rep = ref.compare(ref.logits_of(backend), self.job.meta, form.label, form.precision, usage=usage,
                          output=form.output)
        self.log(rep.summary())
        return rep

    def meta_for(self, form: ExportForm, source: dict[str, str]) -> ModelMeta:
        """The form's metadata: what it was made from and the arguments that rebuild it."""
        return replace(self.job.meta, source=source,
                       extra={**self.job.meta.extra, "export_args": self.opts.args([form], gate=False)})

    def source_of(self, form: ExportForm) -> dict[str, str]:
        path = self.stage / EXPORT_FORMS[form.source].file  # named as it will be beside the form in RUN/export
        return {"path": path.name, "sha256": file_sha256(path)}

    # -- the forms
    def _fp32(self, form: ExportForm) -> FormResult:
        import onnx

        from segdeploy.export.tensorrt import parse_batch
        from segdeploy.runtime.onnxruntime import OrtBackend

        path = self.stage / form.file
        if self.job.model is None:  # an imported ONNX model: it is the reference, staged as it is
            shutil.copy2(self.job.run.export_path(form.key), path)
            self.proto32 = onnx.load(str(path))
            return FormResult(form, note="the imported model itself: the gate's reference (it has no PyTorch model)",
                              reference=True)
        meta = self.meta_for(form, source_record(self.job.run.model_file, self.job.run.export_dir))
        self.log(f"exporting FP32 ONNX ({'dynamic' if self.job.plan.dynamic else 'static'} shapes, "
                 f"opset ≥ {self.opts.opset})…")
        self.report.notes += export_onnx(self.job.model, meta, path, self.job.plan, self.opts.opset,
                                         parse_batch(self.opts.batch)[2], self.opts.export_time_limit, self.log)
        if not self.job.plan.dynamic:  # an exporter fallback may have made it static: the derived forms are too
            self.job.meta = replace(self.job.meta, static_size=self.job.plan.tile)
        self.proto32 = onnx.load(str(path))
        findings = graph_findings(self.proto32)
        self.job.plan.findings += findings
        blocking = [f for f in findings if f.action.startswith("error")]
        if blocking and any(f.key in ("fp16", "engine") for f in self.job.forms):
            raise UserError(f"cannot build for TensorRT: {blocking[0]}")
        return FormResult(form, self.gate(OrtBackend(path), form))

    def _head(self, form: ExportForm) -> FormResult:
        """The FP32 graph with a server head (`export.onnx.add_head`), gated like the FP32 form: its
        class map (argmax head) or its probabilities (softmax head) against the reference's."""
        import onnx

        from segdeploy.export.onnx import add_head
        from segdeploy.runtime.onnxruntime import OrtBackend

        path, proto = self.stage / form.file, copy.deepcopy(self.proto32)
        add_head(proto, form.output, self.job.meta.num_classes)
        write_onnx_meta(proto, self.meta_for(form, self.source_of(form)), {"export": self.job.plan.to_dict(),
                                                                         "head": form.output})
        onnx.save(proto, str(path))
        return FormResult(form, self.gate(OrtBackend(path), form))

    def _fp16(self, form: ExportForm) -> FormResult:
        """Mixed precision: nodes whose measured range would overflow start in FP32; the fallback
        keeps more, by their measured effect on the logits, until the gate passes."""
        proto32, calib = self.proto32, self.job.range_tiles
        ranges = fp16_mod.measure_ranges(proto32, calib)
        flops = fp16_mod.node_flops(proto32, calib[0][:1])
        keep = set(fp16_mod.nodes_out_of_range(proto32, ranges)) | set(fp16_mod.weights_out_of_range(proto32))
        self.log(f"FP16: activation ranges measured on {sum(len(b) for b in calib)} training tiles; {len(keep)} node(s) "
                 f"kept FP32 by range{': ' + ', '.join(sorted(keep)[:8]) if keep else ''}")
        meta = self.meta_for(form, self.source_of(form))

        def write(kept: set[str], path: Path) -> None:
            proto16 = fp16_mod.convert(copy.deepcopy(proto32), kept)
            write_onnx_meta(proto16, meta, {"export": self.job.plan.to_dict(), "fp32_nodes": sorted(kept),
                                         "fp16_flops_share": round(fp16_mod.reduced_share(flops, kept), 4)})
            fp16_mod.save(proto16, path)

        nodes = [n.name for n in proto32.graph.node]
        effects = lambda: sensitivity.output_effects(  # noqa: E731
            proto32, nodes, sensitivity.Fp16Rounding(), [calib[0][:SENSITIVITY_TILES]])
        spec = _Reduced(form, set(nodes), nodes, keep, write, lambda kept: fp16_mod.reduced_share(flops, kept), effects)
        return self.fallback(spec)

    def _int8_form(self, form: ExportForm) -> FormResult:
        """Static INT8 in this form (TensorRT's symmetric S8S8 or the CPU's U8S8), calibrated once for
        both forms on training tiles, gated and fallen back on its own."""
        import onnx

        work, name = self.int8_work(), int8_mod.form_name(form.key)
        meta = self.meta_for(form, self.source_of(form))

        def write(kept: set[str], path: Path) -> None:
            int8_mod.quantize(work["prepared"], path, self.job.calib_tiles, name, self.opts.calib_method, kept,
                              work["cache"])
            q = onnx.load(str(path))
            write_onnx_meta(q, meta, {"export": self.job.plan.to_dict(), "int8_form": name,
                                   "fp32_nodes": sorted(kept), "int8_flops_share": round(share(kept), 4),
                                   "calibration": {"method": self.opts.calib_method, "split": "train",
                                                   "keys": self.job.calib_keys}})
            onnx.save(q, str(path))

        def share(kept: set[str]) -> float:
            return int8_mod.quantized_share(work["flops"], work["compute"], kept)

        def effects() -> dict[str, float]:
            reduction = sensitivity.Int8Quantization(sensitivity.calibrated_ranges(work["cache"]), name == "tensorrt")
            return sensitivity.output_effects(work["proto"], work["quantizable"], reduction,
                                              [self.job.calib_tiles[0][:SENSITIVITY_TILES]])

        spec = _Reduced(form, work["compute"], work["quantizable"], set(), write, share, effects)
        return self.fallback(spec)

    def int8_work(self) -> dict:
        """onnxruntime's pre-processed FP32 model, its per-node FLOPs and nodes, and the calibration
        cache path (filled by the first quantization: one calibration serves both forms)."""
        import onnx

        if self._int8 is None:
            folder = self.stage / "int8-work"
            folder.mkdir()
            prepared = folder / "prepared.onnx"
            int8_mod.prepare(self.stage / EXPORT_FORMS["fp32"].file, prepared)
            proto = onnx.load(str(prepared))
            self._int8 = {"prepared": prepared, "cache": folder / "calibration.json", "proto": proto,
                          "flops": fp16_mod.node_flops(proto, self.job.calib_tiles[0][:1]),
                          "compute": int8_mod.compute_nodes(proto), "quantizable": int8_mod.quantizable_nodes(proto)}
        return self._int8

    def _engine(self, form: ExportForm) -> FormResult:
        """A strongly typed engine from the gated ONNX of its precision, gated like the others."""
        from segdeploy.export.tensorrt import build_engine, derive_profile, parse_batch
        from segdeploy.runtime.tensorrt import TensorRTBackend

        job, out = self.job, self.job.run.export_dir
        for cache in out.glob("*.cache"):  # the timing cache persists next to the engines
            shutil.copy2(cache, self.stage / cache.name)
        batch = (job.plan.batch,) * 3 if job.plan.batch else parse_batch(self.opts.batch)
        profile = derive_profile(batch, job.plan.tile, job.meta.bands, job.meta.input_divisor, job.plan.dynamic)
        path, source = self.stage / form.file, self.stage / EXPORT_FORMS[form.source].file
        facts = build_engine(source, path, profile, self.meta_for(form, self.source_of(form)).to_dict(),
                             precision=form.precision, workspace_gib=self.opts.workspace_gib, cache_dir=self.stage,
                             log=self.log)
        rep = self.gate(TensorRTBackend(path), form)
        facts.update(parity_passed=rep.passed, timing_cache=str(out / Path(facts["timing_cache"]).name))
        write_json(engine_sidecar(path), facts)
        if form.key == "engine":
            self.report.engine = facts
        return FormResult(form, rep)

    # -- the fallback
    def fallback(self, spec: _Reduced) -> FormResult:
        """Gate a candidate; while it fails, keep more nodes in float — those whose reduction
        changes the logits most, measured — and gate again. Stops when it passes, when the rounds
        run out, or when the next node would leave less than the share floor reduced."""
        from segdeploy.runtime.onnxruntime import OrtBackend

        path, keep, rounds, added = self.stage / spec.form.file, set(spec.keep), [], []
        effects: dict[str, float] | None = None
        note, p = "", spec.form.precision.upper()
        for round_ in range(self.opts.max_fallback_rounds + 1):
            spec.write(keep, path)
            share = spec.share(keep)
            usage = PrecisionUse(len(spec.nodes - keep), len(spec.nodes), round(share, 4), tuple(sorted(keep)))
            rep = self.gate(OrtBackend(path), spec.form, usage)
            rounds.append({"round": round_, "fp32_nodes": len(keep), "added": added, "reduced_flops_share": round(share, 4),
                           "agreement": rep.agreement, "worst_class_drop": round(rep.worst_drop, 4), "passed": rep.passed})
            if rep.passed:
                break
            if round_ == self.opts.max_fallback_rounds:
                note = f"{p} fallback gave up after {round_} round(s)"
                break
            effects = spec.effects() if effects is None else effects
            added, note = _next_nodes(effects, keep, spec, rep.thresholds, round_)
            if not added:
                break
            keep |= set(added)
            self.log(f"{spec.form.label} {p} fallback round {round_ + 1}: keeping {len(added)} more node(s) in FP32, "
                     f"those changing the logits most ({len(keep)}/{len(spec.candidates)}, "
                     f"{spec.share(keep):.1%} of FLOPs left in {p}): {', '.join(added[:6])}{' …' if len(added) > 6 else ''}")
        return FormResult(spec.form, rep, rounds, "" if rep.passed else note)


def _next_nodes(effects: dict[str, float], keep: set[str], spec: _Reduced, thresholds, round_: int,  # noqa: ANN001
                ) -> tuple[list[str], str]:
    """The nodes the next fallback round keeps in float — the 5%, 10%, 20%… of the candidates whose
    measured effect on the logits is largest — stopping before the share floor is crossed; and,
    when there are none, why the fallback stops."""
    p, floor = spec.form.precision.upper(), thresholds.min_reduced_share or 0.0
    ranked = [n for n in sorted(effects, key=lambda n: -effects[n]) if n not in keep and effects[n] > 0]
    if not ranked:
        return [], f"{p} fallback stopped: no node left whose {p} precision measurably changes the logits"
    added: list[str] = []
    for name in ranked[: max(1, math.ceil(len(spec.candidates) * 0.05 * 2**round_))]:
        share = spec.share(keep | set(added) | {name})
        if share < floor:
            why = (f"{p} fallback stopped at the share floor: keeping {name} in FP32 too would leave only {share:.1%} of "
                   f"the FLOPs in {p} (< {thresholds.keys[2]} {percent(floor)})")
            return added, "" if added else why
        added.append(name)
    return added, ""


# ------------------------------------------------------------------------------------ committing


def _commit(job: _Job, stage: Path, report: ExportReport, log: Callable[[str], None]) -> dict[str, str]:
    """Rename every built form (derived forms first: an interruption between renames can only leave a
    new form whose source is the old one, which is refused as stale, never the reverse) and the
    timing caches into RUN/export, then merge the gate records into parity.json/parity.md."""
    out, files = job.run.export_dir, {}
    for result in reversed(list(report.results.values())):
        name = result.form.file
        if result.form.backend == "tensorrt":
            os.replace(engine_sidecar(stage / name), engine_sidecar(out / name))
        os.replace(stage / name, out / name)
        files[result.form.key] = str(out / name)
    for cache in stage.glob("*.cache"):
        os.replace(cache, out / cache.name)
    records = _merge_records(job.run, report, log)
    files.update(job.run.write_gate_records(records, parity_markdown(records, job.run.reference)))
    shutil.rmtree(job.run.rejected_dir, ignore_errors=True)  # an earlier failure's report no longer applies
    return files


def _merge_records(run: Run, report: ExportReport, log: Callable[[str], None]) -> dict[str, dict]:
    """One record per form in RUN/export: this command's, and the earlier ones of forms it did not
    rebuild, each checked against its source now (`Run.exports`; stale: the refusal, with the
    command that rebuilds it)."""
    records = {}
    for export in run.exports():
        key = export.form.key
        if key in report.results:
            records[key] = report.results[key].record()
            continue
        records[key] = {**(export.gate or {"form": key, "file": export.form.file, "label": export.form.label,
                                           "passed": None, "note": "no gate record: exported before segdeploy kept one"}),
                        "stale": export.stale}
        if export.stale:
            report.stale[key] = export.stale
            log(f"stale: {export.stale}")
    return records


def _write_rejected(job: _Job, report: ExportReport) -> None:
    """A failed export's report, beside RUN/export (which is left as it was)."""
    records = {k: r.record() for k, r in report.results.items()}
    report.files.update(job.run.write_gate_records(records, parity_markdown(records, job.run.reference),
                                                   where=job.run.rejected_dir))


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


# ------------------------------------------------------------------------------------ parity.md


def parity_markdown(records: dict[str, dict], reference: str = "PyTorch FP32") -> str:
    """parity.md: a section per form's gate record (verdict, thresholds, split, when, the command,
    the fallback rounds with what each recovered, the per-class table), against `reference`
    (`Run.reference`: PyTorch FP32, or an imported model's own FP32 ONNX)."""
    ref = "PyTorch" if reference.startswith("PyTorch") else "FP32 ONNX"
    against = ("a fresh PyTorch FP32 run of the model" if ref == "PyTorch" else
               "the imported model's own FP32 ONNX (it has no PyTorch model, so the reference is ONNX, not PyTorch)")
    lines = ["# Parity", "", f"Each exported form against {against}, with the thresholds it was gated with. IoU drop "
             f"(pt): the class's IoU against ground truth with {ref} minus with this form, in points; positive means "
             "this form is worse.", ""]
    for key, r in records.items():
        lines += _record_lines(key, r, ref)
    return "\n".join(lines)


def _record_lines(key: str, r: dict, ref: str = "PyTorch") -> list[str]:
    verdict = "STALE" if r.get("stale") else {True: "PASS", False: "FAIL"}.get(r.get("passed"), "NO RECORD")
    lines = [f"## {r.get('file', key)} ({r.get('label', '')} {r.get('precision', '')}): {verdict}", ""]
    if r.get("stale"):
        lines += [f"Stale: {r['stale']}", ""]
    if "agreement" in r:
        t = r["thresholds"]
        lines += [f"Agreement {r['agreement']:.4%} (≥ {percent(t['min_agreement'])}), worst class IoU drop "
                  f"{max((c['iou_drop_points'] or 0.0) for c in r['per_class']) if r['per_class'] else 0.0:.2f} pt "
                  f"(≤ {t['max_class_iou_drop']}), max |Δlogit| {r['max_abs']:.3g}, cosine {r['cosine']:.6f}; "
                  f"{r['tiles']} tiles of {r['tile']}² from the {SPLIT_WORDS.get(r['split'], r['split'])} split; gated {r.get('gated_at', '')} by "
                  f"`{r.get('command', '')}`.", ""]
        if r.get("reduced_flops_share") is not None:
            lines += [f"Reduced precision: {r['precision'].upper()} on {r['reduced_nodes']}/{r['total_nodes']} nodes, "
                      f"{r['reduced_flops_share']:.1%} of FLOPs (≥ {percent(t['min_reduced_share'])}).", ""]
    lines += [f"- {f}" for f in r.get("failures", [])] + ([f"- {r['note']}"] if r.get("note") else [])
    lines += _rounds_table(r.get("rounds", [])) + _class_table(r.get("per_class", []), ref)
    if r.get("fp32_nodes"):
        lines += [f"FP32 nodes ({len(r['fp32_nodes'])}): " + ", ".join(r["fp32_nodes"][:40])
                  + (" …" if len(r["fp32_nodes"]) > 40 else ""), ""]
    return lines + [""]


def _rounds_table(rounds: list[dict]) -> list[str]:
    """What each fallback round kept in float and what it recovered (agreement, worst class drop)."""
    if len(rounds) < 2:
        return []
    lines = ["", "| round | nodes kept FP32 | reduced FLOPs | agreement | recovered (pt) | worst class drop (pt) | "
             "recovered (pt) |", "|---|---|---|---|---|---|---|"]
    for prev, r in zip([None, *rounds[:-1]], rounds, strict=True):
        da = "-" if prev is None else f"{(r['agreement'] - prev['agreement']) * 100:+.3f}"
        dd = "-" if prev is None else f"{prev['worst_class_drop'] - r['worst_class_drop']:+.2f}"
        lines.append(f"| {r['round']} | {r['fp32_nodes']} | {r['reduced_flops_share']:.1%} | {r['agreement']:.4%} | "
                     f"{da} | {r['worst_class_drop']:.2f} | {dd} |")
    return lines + [""]


def _class_table(per_class: list[dict], ref: str = "PyTorch") -> list[str]:
    if not per_class:
        return []
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = ["", f"| class | IoU ({ref}) | IoU | IoU drop (pt) | Dice | IoU vs {ref} |", "|---|---|---|---|---|---|"]
    for c in per_class:
        d = c["iou_drop_points"]
        drop = "-" if d is None else f"{0.0 if abs(d) < 0.005 else d:.2f}"
        lines.append(f"| {c['class']} | {f(c['iou_gt_reference'])} | {f(c['iou_gt'])} | {drop} | {f(c['dice_gt'])} | "
                     f"{f(c['iou_vs_reference'])} |")
    return lines + [""]
