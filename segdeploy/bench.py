"""`segdeploy bench`: latency, throughput, memory and accuracy of every backend in one table.

What is timed: the backend's forward alone — a normalised float32 N×B×S×S batch in, logits out
(pre- and post-processing excluded; `--tiled` measures the whole predict pipeline separately).
Each row: warm-up, then at least `min_iters` runs and `min_seconds` of them; CUDA events on
GPU, `perf_counter` on CPU; the same seeded input and the same stated thread count for every
CPU backend. Accuracy comes from the parity machinery on real tiles: mIoU/Dice against ground
truth and argmax agreement against PyTorch FP32.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from segdeploy.artifact import EXPORT_FORMS, PRECISIONS, Run, artifact_meta, bench_form, form_of
from segdeploy.errors import UserError
from segdeploy.runtime import backend_class, backend_for, load_backend
from segdeploy.runtime.base import Backend
from segdeploy.utils import RssSampler

# plain words in JSON/CSV; the table shows them as marks (cli/bench.py)
OK, GATE_FAIL, UNAVAILABLE = "ok", "gate_failed", "unavailable"
TORCH_PRECISIONS = ("fp32", "fp16")  # a run directory on PyTorch (FP16: autocast on CUDA); no PyTorch INT8 deployment path
# every backend bench knows: PyTorch for a run directory, and those of the export forms (artifact.EXPORT_FORMS)
BACKENDS = ("torch", *dict.fromkeys(f.backend for f in EXPORT_FORMS.values()))


@dataclass
class Candidate:
    """One (backend, precision) bench may measure for a model: the file that holds it (None with the `reason` it is
    missing, e.g. the export command that makes it) and its gate record from parity.json, whose thresholds judge
    its accuracy here too."""
    model: str  # what the user passed
    backend: str
    precision: str
    artifact: Path | None  # None: not available for this model
    reason: str = ""
    gate: dict | None = None  # the export's gate record of this form (parity.json): its thresholds judge it here too


@dataclass
class BenchRow:
    """One row of the bench table: a candidate at one batch size and input size (px). Latencies are per batch in
    milliseconds (backend forward only, input already on the device); throughput in images/s and MP/s; memory in
    MiB (peak RSS during the row, peak GPU allocation); FLOPs as TFLOP/s; accuracy (mIoU, mDice, agreement with the
    reference) on the same tiles for every row; `status` says whether it ran, and `reason` why not."""
    model: str
    backend: str
    precision: str
    batch: int
    size: int
    status: str
    reason: str = ""
    device: str = ""
    provider: str = ""  # onnxruntime's execution provider ('' for other backends)
    threads: int | None = None
    iterations: int = 0
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    std_ms: float | None = None
    images_per_s: float | None = None
    megapixels_per_s: float | None = None
    tflops: float | None = None
    peak_rss_mb: float | None = None
    # PyTorch was already loaded in the bench process when the row was timed (the reference, a torch
    # row, FLOP counting): its ~650 MB are in peak_rss_mb, whatever the row's backend
    rss_includes_torch: bool = False
    peak_gpu_mb: float | None = None
    build_s: float | None = None
    engine_mb: float | None = None
    miou: float | None = None
    mdice: float | None = None
    agreement: float | None = None
    tiled_mp_per_s: float | None = None
    tiled_peak_rss_mb: float | None = None
    tta: str = "none"  # --tta: the mode of the two columns below
    tta_p50_ms: float | None = None  # the batch's tiles test-time augmented: every view forward, softmax averaged
    tta_mp_per_s: float | None = None  # tile pixels per second with TTA (the plain MP/s column is without)

    def to_dict(self) -> dict:
        """The row as JSON types, one key per column (CSV_FIELDS order)."""
        return asdict(self)


@dataclass
class BenchOptions:
    """What bench measures: which backends and precisions, batch sizes, the input size (px; None: each model's static
    size, else its tile size), CPU threads (None: all cores), the data for the accuracy columns (None: the run's
    recipe's), an image to time predict on end to end (`tiled`, with `tiled_run`), and how long each row is timed
    (warm-up runs, then at least `min_iters` runs and `min_seconds` seconds)."""
    backends: tuple[str, ...] = BACKENDS
    precisions: tuple[str, ...] = PRECISIONS
    batches: tuple[int, ...] = (1, 8)
    size: int | None = None  # None: each model's tile size (what predict feeds it)
    threads: int | None = None
    data: Path | None = None
    tiled: Path | None = None  # an image `tiled_run` predicts end to end, once per candidate
    # (backend, image, scratch dir) -> megapixels per second: the caller's, since bench imports no
    # other verb (the CLI passes `predict.time_file`); required with `tiled`
    tiled_run: Callable[[Backend, Path, Path], float] | None = None
    # a row: warm-up, then >= min_iters runs and >= min_seconds; a first table of the demo model at
    # its 128² tile on 2 CPU cores takes about a minute with these (--iters/--seconds for more)
    min_iters: int = 10
    min_seconds: float = 1.0
    warmup: int = 3
    accuracy: bool = True
    tta: str = "none"  # also time each row's batch test-time augmented (tiling.tta_forward), and --tiled with it
    record: bool = False  # write the measured speeds into each run (`record_speeds`; the CLI's default)


@dataclass
class BenchReport:
    """All rows, the CPU threads used, the machine's description, and per model the classes its mIoU/mDice average
    over and the tiles its accuracy columns come from."""
    rows: list[BenchRow] = field(default_factory=list)
    threads: int = 0
    machine: dict = field(default_factory=dict)
    # model -> the classes its mIoU/mDice columns average over (present in the tiles' ground truth)
    miou_classes: dict[str, list[str]] = field(default_factory=dict)
    # model -> the tiles its accuracy columns come from ("16 × 64² tiles from the validation split")
    accuracy_tiles: dict[str, str] = field(default_factory=dict)
    # run directory -> what `--backend auto` runs there now (runtime.choose.Choice), after this measurement
    auto: dict[str, dict] = field(default_factory=dict)
    note: str = ("latency = backend forward only (normalised float32 in, logits out); "
                 "pre/post-processing excluded")

    @property
    def measured(self) -> int:
        """How many rows have a latency (ran), as opposed to unavailable or failed ones."""
        return sum(1 for r in self.rows if r.p50_ms is not None)

    def to_dict(self) -> dict:
        """The report as JSON types (what `bench --json` writes)."""
        return {"note": self.note, "threads": self.threads, "machine": self.machine,
                "miou_classes": self.miou_classes, "accuracy_tiles": self.accuracy_tiles, "auto": self.auto,
                "rows": [r.to_dict() for r in self.rows]}


# ------------------------------------------------------------------------------------ candidates


def candidates(model: Path, opts: BenchOptions) -> list[Candidate]:
    """Every (backend, precision) this model has an artifact for, plus those it could have: a run
    directory brings its exports (through `Run`, each form bench measures per the table of export
    forms, with its gate record), a single file only itself."""
    model = Path(model)
    if not model.exists():
        return [Candidate(str(model), "?", "?", None, f"{model} not found")]
    try:
        kind = backend_for(model)
    except UserError as exc:
        return [Candidate(str(model), "?", "?", None, str(exc))]
    found: dict[tuple[str, str], tuple[Path, dict | None]] = {}
    is_run = model.is_dir()
    if is_run:
        if kind == "torch":  # an imported ONNX model's run has no PyTorch model
            found = {("torch", p): (model, None) for p in TORCH_PRECISIONS}
        found |= {(e.form.backend, e.form.precision): (e.path, e.gate) for e in Run(model).exports() if e.form.bench}
    elif (form := form_of(model)) is not None:
        found[(form.backend, form.precision)] = (model, _gate_record(model, form))
    out = []
    for backend in opts.backends:
        for precision in opts.precisions:
            if (precision not in TORCH_PRECISIONS) if backend == "torch" else bench_form(backend, precision) is None:
                continue  # nothing makes it: engines come from the mixed-precision ONNX, PyTorch has no INT8 path
            art, gate = found.get((backend, precision), (None, None))
            if art is None and not is_run:
                continue  # a single artifact: only its own backend is relevant
            reason = "" if art else ("an imported ONNX model has no PyTorch model" if backend == "torch"
                                     else _missing(backend, precision))
            out.append(Candidate(str(model), backend, precision, art, reason, gate))
    if is_run and "onnxruntime" in opts.backends and "fp32" in opts.precisions:  # server heads: timed, never auto's pick
        out += [Candidate(str(model), f"onnxruntime {e.form.key} head", "fp32", e.path, "", e.gate)
                for e in Run(model).exports() if e.form.output != "logits"]
    return out


def _gate_record(path: Path, form) -> dict | None:  # noqa: ANN001 - an ExportForm
    """The gate record of an export file in its run's RUN/export (None for a copy elsewhere)."""
    run = Run.find(path)
    if run is None or path.resolve() != run.export_path(form.key).resolve():
        return None
    return run.gate_records().get(form.key)


def _missing(backend: str, precision: str) -> str:
    """Why a run has no artifact for (backend, precision), and the command that makes it."""
    import shlex

    form = bench_form(backend, precision)
    command = shlex.join(["segdeploy", "export", "RUN", *(form.flags if form else ())])
    return f"{'no engine' if backend == 'tensorrt' else 'not exported'}: run `{command}`"


def availability(c: Candidate) -> str:
    """'' when the backend can run here, else why not (the most fundamental reason first: a
    runtime that cannot run here before an artifact that was not made)."""
    if c.backend not in BACKENDS:
        return c.reason
    return backend_class(c.backend).available(c.precision) or (c.reason if c.artifact is None else "")


def load(c: Candidate, threads: int) -> Backend:
    """Every backend from the same options; each reads the ones that apply to it."""
    return load_backend(c.artifact, device="auto", precision=c.precision, threads=threads)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ measuring


def time_backend(backend: Backend, x: np.ndarray, opts: BenchOptions) -> dict:
    """Forward latency with the input already where the backend runs (no host copies timed)."""
    cuda = backend.device.startswith("cuda")
    xin = backend.prepare(x)
    if cuda:
        import torch  # CUDA backends (torch, TensorRT) run on torch's CUDA runtime

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(opts.warmup):
        backend.run(xin)
    backend.synchronize()
    times: list[float] = []
    start = time.perf_counter()
    with RssSampler() as rss:
        while len(times) < opts.min_iters or (time.perf_counter() - start < opts.min_seconds and len(times) < 1000):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                backend.run(xin)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                backend.run(xin)
                times.append((time.perf_counter() - t0) * 1000)
    arr = np.asarray(times)
    mean_s = arr.mean() / 1000
    return {"iterations": len(arr), "p50_ms": float(np.percentile(arr, 50)), "p90_ms": float(np.percentile(arr, 90)),
            "p99_ms": float(np.percentile(arr, 99)), "std_ms": float(arr.std()),
            "images_per_s": len(x) / mean_s, "peak_rss_mb": rss.peak,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def count_flops(run: Run | None, bands: int, size: int) -> float | None:
    """FLOPs of one image through the PyTorch model (torch.utils.flop_counter), or None."""
    if run is None:
        return None
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from segdeploy.models import load_run_model

        model = load_run_model(run)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, bands, size, size))
        return float(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - FLOPs are a column, not a reason to fail
        return None


# ------------------------------------------------------------------------------------ driver


def bench(models: list[Path], opts: BenchOptions, log=print,  # noqa: ANN001
          progress: Callable[[int, str], None] | None = None) -> BenchReport:
    """One job per (candidate, batch): load the candidate once, measure accuracy once, time each batch.
    `progress(rows in all, "")` is called once the rows are known, then `progress(rows done, label)`
    after each row (for a bar with an estimate). Raises ValueError for `opts.tiled` without
    `opts.tiled_run`."""
    from dataclasses import replace

    from segdeploy.utils import cpu_count

    if opts.tiled and opts.tiled_run is None:
        raise ValueError("BenchOptions.tiled needs tiled_run, the pipeline it times (e.g. segdeploy.predict.time_file)")
    threads = opts.threads or cpu_count()  # every CPU backend runs with this many (torch: while it runs)
    report = BenchReport(threads=threads, machine=_machine())
    plan = [(Path(m), replace(opts, size=opts.size or model_size(Path(m)))) for m in models]
    plan = [(m, o, auto_candidates(m, o, log) if "auto" in o.backends else candidates(m, o)) for m, o in plan]
    total = sum(len(cands) * len(o.batches) for _, o, cands in plan)
    done = 0
    if progress:
        progress(total, "")

    def rows_done(n: int, label: str) -> None:  # an unavailable candidate is one row for all its batches
        nonlocal done
        done += n
        if progress:
            progress(done, label)

    for model, mopts, cands in plan:
        run = Run.find(model)
        reference = AccuracyColumns(run, mopts, log)
        flops = FlopCache(run)
        for cand in cands:
            report.rows += _bench_candidate(cand, mopts, threads, reference, flops, log, rows_done)
        if reference.classes:
            report.miou_classes[str(model)] = reference.classes
        if reference.ref is not None:
            report.accuracy_tiles[str(model)] = reference.ref.describe()
        if model.is_dir() and run is not None:
            _after_run(run, [r for r in report.rows if r.model == str(model)], report, mopts.record, log)
    return report


def auto_candidates(model: Path, opts: BenchOptions, log) -> list[Candidate]:  # noqa: ANN001
    """``--backend auto``: the one candidate `--backend auto` runs for a run directory (a file is
    its own candidate)."""
    from dataclasses import replace

    from segdeploy.runtime.choose import resolve

    everything = candidates(model, replace(opts, backends=BACKENDS, precisions=PRECISIONS))
    if not model.is_dir():
        return everything
    choice = resolve(model)
    log(choice.line())
    backend, precision = ("torch", "fp32") if choice.form == "torch" else \
        (EXPORT_FORMS[choice.form].backend, EXPORT_FORMS[choice.form].precision)
    return [c for c in everything if (c.backend, c.precision) == (backend, precision)]


def _after_run(run: Run, rows: list[BenchRow], report: BenchReport, record: bool, log) -> None:  # noqa: ANN001
    """Record this machine's speeds in the run (what `--backend auto` ranks by next time), then
    what auto picks now, in the report."""
    from segdeploy.runtime.choose import choose

    try:
        path = record_speeds(run, rows) if record else None
        if path is not None:
            log(f"speeds recorded for this machine in {path} (`--backend auto` ranks by them)")
        report.auto[str(run.root)] = choose(run.root).to_dict()
    except (UserError, OSError) as exc:
        log(f"--backend auto: {_one_line(exc)}")


def _candidate_key(row: BenchRow) -> str | None:
    """The `runtime.choose` candidate a row measured (None for a server head: auto never picks one)."""
    if row.backend == "torch":  # auto runs PyTorch at FP32 (FP16 autocast is bench's own row)
        return None if row.precision != "fp32" else "torch:cuda" if row.device.startswith("cuda") else "torch"
    form = bench_form(row.backend, row.precision) if row.backend in BACKENDS else None
    return form.key if form is not None else None


def record_speeds(run: Run, rows: list[BenchRow]) -> Path | None:
    """Merge the measured rows into the run's speed record of this machine (`Run.write_speed_record`,
    keyed by `runtime.choose.machine_fingerprint`): a row replaces the one of the same candidate,
    provider, batch and size. Returns the file, or None when nothing was measured."""
    from datetime import datetime, timezone

    from segdeploy.runtime.choose import candidate_file, file_stamp, machine_fingerprint

    new = []
    for r in rows:
        key = _candidate_key(r)
        if r.images_per_s is None or key is None or not candidate_file(run, key).is_file():
            continue
        new.append({"candidate": key, "provider": r.provider, "batch": r.batch, "size": r.size,
                    "images_per_s": r.images_per_s, "threads": r.threads, **file_stamp(candidate_file(run, key))})
    if not new:
        return None
    fp = machine_fingerprint()
    ident = lambda d: (d.get("candidate"), d.get("provider"), d.get("batch"), d.get("size"))  # noqa: E731
    replaced = {ident(n) for n in new}
    old = [d for d in run.speed_records().get(fp["key"], {}).get("rows", []) if ident(d) not in replaced]
    return run.write_speed_record(fp["key"], {"machine": fp, "rows": old + new,
                                              "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def model_size(model: Path) -> int:
    """Bench's default input size (px): a static-size model's one size, else the tile size it was
    trained for; 512 when unknown."""
    try:
        run = Run.find(model)
        meta = run.meta if run is not None and model.is_dir() else artifact_meta(model)
        return int(meta.static_size or meta.tile_size)
    except Exception:  # noqa: BLE001 - an unreadable model is reported by its row, not here
        return 512


def _bench_candidate(cand: Candidate, opts: BenchOptions, threads: int, reference: AccuracyColumns, flops: FlopCache,
                     log, on_rows: Callable[[int, str], None] = lambda n, label: None) -> list[BenchRow]:  # noqa: ANN001
    """The candidate's rows, one per batch (one in all when it cannot run); `on_rows(n, label)`
    after each n rows of the plan are done."""
    def unavailable(why: str) -> list[BenchRow]:
        on_rows(len(opts.batches), f"{cand.backend} {cand.precision}")
        return [BenchRow(cand.model, cand.backend, cand.precision, 0, opts.size, UNAVAILABLE, why)]

    why = availability(cand)
    if why:
        return unavailable(why)
    try:
        backend = load(cand, threads)
    except Exception as exc:  # noqa: BLE001 - the row says why; the table goes on
        return unavailable(_one_line(exc))
    acc = reference.accuracy(cand, backend) if opts.accuracy else Accuracy()
    common = {"device": backend.device, "threads": threads if backend.device == "cpu" else None,
              "provider": (getattr(backend, "providers", None) or [""])[0],
              "miou": acc.miou, "mdice": acc.mdice, "agreement": acc.agreement,
              **(_tiled(backend, opts) if opts.tiled and getattr(backend, "output", "logits") != "labels" else {}), **_engine_facts(cand)}
    rows = []
    for batch in opts.batches:
        row = BenchRow(cand.model, cand.backend, cand.precision, batch, opts.size, OK, **common)
        _time_row(row, backend, opts, flops)
        if row.status == OK and acc.failure:
            row.status, row.reason = GATE_FAIL, acc.failure
        log(f"{cand.backend} {cand.precision} batch {batch}: {row.status} "
            f"{'' if row.p50_ms is None else f'{row.p50_ms:.1f} ms p50'} {row.reason}")
        rows.append(row)
        on_rows(1, f"{cand.backend} {cand.precision} batch {batch}")
    return rows


def _time_row(row: BenchRow, backend: Backend, opts: BenchOptions, flops: FlopCache) -> None:
    """Fill a row's timing columns, or mark it unavailable with the reason."""
    meta, static = backend.meta, backend.static_size
    if static and static != opts.size:
        row.status, row.reason = UNAVAILABLE, f"static model: {static}×{static} only (use --size {static})"
        return
    if meta.static_batch and row.batch != meta.static_batch:
        row.status, row.reason = UNAVAILABLE, f"the model's batch is fixed at {meta.static_batch} (use --batch {meta.static_batch})"
        return
    if backend.max_batch and row.batch > backend.max_batch:
        row.status, row.reason = UNAVAILABLE, f"engine profile allows batch ≤ {backend.max_batch}"
        return
    if opts.size % meta.input_divisor:
        d = meta.input_divisor
        fits = " or ".join(f"--size {n}" for n in (opts.size - opts.size % d, opts.size - opts.size % d + d) if n > 0)
        row.status, row.reason = UNAVAILABLE, f"--size must be a multiple of {d}: {fits}"
        return
    if meta.min_tile_size and opts.size < meta.min_tile_size:
        row.status, row.reason = UNAVAILABLE, f"--size must be ≥ {meta.min_tile_size}, the smallest the model runs at"
        return
    x = np.random.default_rng(0).standard_normal((row.batch, meta.bands, opts.size, opts.size), dtype=np.float32)
    try:
        t = time_backend(backend, x, opts)
    except Exception as exc:  # noqa: BLE001
        row.status, row.reason = UNAVAILABLE, _one_line(exc)
        return
    for k, v in t.items():
        setattr(row, k, _round(v))
    row.rss_includes_torch = "torch" in sys.modules
    row.megapixels_per_s = _round(t["images_per_s"] * opts.size**2 / 1e6)
    per_image = flops.get(meta.bands, opts.size)
    if per_image:
        row.tflops = _round(per_image * t["images_per_s"] / 1e12, 4)
    if opts.tta != "none":
        row.tta = opts.tta
        row.tta_p50_ms = _round(time_tta(backend, x, opts))
        row.tta_mp_per_s = _round(row.batch * opts.size**2 / 1e6 / (row.tta_p50_ms / 1e3))


def time_tta(backend: Backend, x: np.ndarray, opts: BenchOptions) -> float:
    """Median wall time (ms) of `tiling.tta_forward` on a host batch: every view through the backend
    (host in, host out, as predict calls it), the views' softmax averaged. Same warm-up and minimum
    iterations/seconds as `time_backend`."""
    from segdeploy.tiling import tta_forward

    def once() -> float:
        t0 = time.perf_counter()
        tta_forward(lambda b, _: backend(b), x, opts.tta, backend.max_batch)
        return time.perf_counter() - t0

    for _ in range(opts.warmup):
        once()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < opts.min_iters or (time.perf_counter() - start < opts.min_seconds and len(times) < 1000):
        times.append(once())
    return float(np.median(times) * 1e3)


class FlopCache:
    """FLOPs per image of the run's PyTorch model, counted once per size."""

    def __init__(self, run: Run | None) -> None:
        self.run, self.cache = run, {}

    def get(self, bands: int, size: int) -> float | None:
        """FLOPs of one `bands`×`size`² image through the run's PyTorch model (`count_flops`), counted once per size;
        None when there is no run or counting failed."""
        if size not in self.cache:
            self.cache[size] = count_flops(self.run, bands, size)
        return self.cache[size]


@dataclass
class Accuracy:
    """A candidate's accuracy columns on the reference tiles (None when not measured): mIoU and mDice over the classes
    present, pixel agreement with the reference's argmax (0..1), and why it fails the parity gate ('' when it
    passes or was not checked)."""
    miou: float | None = None
    mdice: float | None = None
    agreement: float | None = None
    failure: str = ""  # why the candidate fails the parity gate ('' when it passes or was not checked)


class AccuracyColumns:
    """Accuracy columns of a run's candidates against `parity.ParityReference` (export's gate
    compares with the same), made once, on first use; the classes every mean covers."""

    def __init__(self, run: Run | None, opts: BenchOptions, log) -> None:  # noqa: ANN001
        self.run, self.opts, self.log = run, opts, log
        self.ref = None  # a parity.ParityReference, made on first use
        self.classes: list[str] = []

    def _make(self, tile: int) -> None:
        from segdeploy import recipe as recipe_mod
        from segdeploy.parity import ParityReference
        from segdeploy.runtime import reference_backend

        rec = self.run.recipe if self.opts.data is None else recipe_mod.load(self.run.recipe_path,
                                                                             data_root=self.opts.data)
        self.ref = ParityReference(reference_backend(self.run), rec, self.run.meta, tile)

    @staticmethod
    def thresholds(cand: Candidate):  # noqa: ANN205 - a recipe.GateThresholds, or None for the recipe's
        """The thresholds a form was gated with at export (its gate record), so bench judges it the
        same way; None (the recipe's) for PyTorch and for forms without a record."""
        if not cand.gate or "thresholds" not in cand.gate:
            return None
        from segdeploy.recipe import GateThresholds

        return GateThresholds.from_dict(cand.gate["thresholds"])

    def accuracy(self, cand: Candidate, backend: Backend) -> Accuracy:
        """mIoU / mDice vs ground truth and agreement vs PyTorch FP32, on parity tiles."""
        if self.run is None:
            return Accuracy()
        try:
            from segdeploy.metrics import ConfusionMatrix

            if self.ref is None:
                self._make(backend.static_size or backend.meta.tile_size)
            logits = self.ref.logits_of(backend)
            rep = self.ref.compare(logits, backend.meta, cand.backend, cand.precision, self.thresholds(cand),
                                   output=getattr(backend, "output", "logits"))
            cm = ConfusionMatrix(backend.meta.num_classes, backend.meta.ignore_index)
            cm.update(logits.argmax(1), self.ref.y)
            m = cm.compute(backend.meta.classes)
            present = m.present()  # the same tiles for every row: every mean covers the same classes
            self.classes = self.classes or [m.names[i] for i in present]
            judged = "the thresholds it was gated with at export" if cand.gate else "the recipe's thresholds"
            return Accuracy(_round(m.mean_over(m.iou, present), 4), _round(m.mean_over(m.dice, present), 4),
                            _round(rep.agreement, 6), "" if rep.passed else f"fails the parity gate ({judged}): "
                            + "; ".join(rep.failures))
        except Exception as exc:  # noqa: BLE001 - no data here: accuracy columns stay empty
            self.log(f"accuracy skipped for {cand.backend} {cand.precision}: {_one_line(exc)}")
            return Accuracy()


def _tiled(backend: Backend, opts: BenchOptions) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, RssSampler() as rss:
        mps = opts.tiled_run(backend, Path(opts.tiled), Path(tmp))  # type: ignore[arg-type, misc]
    return {"tiled_mp_per_s": _round(mps), "tiled_peak_rss_mb": _round(rss.peak)}


def _engine_facts(c: Candidate) -> dict:
    if c.backend != "tensorrt" or c.artifact is None:
        return {}
    import json

    from segdeploy.artifact import engine_sidecar

    side = json.loads(engine_sidecar(c.artifact).read_text())
    return {"build_s": side.get("build_seconds"), "engine_mb": _round(c.artifact.stat().st_size / 2**20)}


def _round(v: float | None, digits: int = 3) -> float | None:
    """`v` to `digits` decimals, but never fewer than 4 significant figures (0.03255 MP/s must not
    become 0.033: a 1.4% error in a number people compare); None for a missing or NaN value."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    v = float(v)
    if v == 0 or not math.isfinite(v):
        return v
    return round(v, max(digits, 3 - math.floor(math.log10(abs(v)))))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def _machine() -> dict:
    import os
    import platform

    from segdeploy.utils import versions

    gpu = None
    if sys.modules.get("torch") is not None:  # loaded when a candidate needed it: never only for this column
        import torch

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "gpu": gpu, **versions()}


# ------------------------------------------------------------------------------------ outputs

CSV_FIELDS = list(BenchRow.__dataclass_fields__)


def write_csv(report: BenchReport, path: Path) -> None:
    """The report's rows as CSV (CSV_FIELDS columns) at `path`, atomically."""
    from segdeploy.utils import atomic_path

    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        for r in report.rows:
            w.writerow(r.to_dict())


def plot(report: BenchReport, path: Path) -> Path:
    """Latency (p50, with p90 whiskers) against batch size, one line per backend/precision."""
    from segdeploy.viz import new_figure, save_figure

    fig = new_figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    series: dict[str, list[BenchRow]] = {}
    for r in report.rows:
        if r.p50_ms is not None:
            series.setdefault(f"{Path(r.model).name}: {r.backend} {r.precision}", []).append(r)
    for label, rows in series.items():
        rows.sort(key=lambda r: r.batch)
        b = [r.batch for r in rows]
        p50 = np.array([r.p50_ms for r in rows])
        p90 = np.array([r.p90_ms for r in rows])
        ax.errorbar(b, p50, yerr=[np.zeros_like(p50), p90 - p50], marker="o", capsize=3, label=label)
    ax.set_xlabel("batch size")
    ax.set_ylabel("latency per batch, ms (p50, whisker to p90)")
    ax.set_xscale("log", base=2)
    batches = sorted({r.batch for rows in series.values() for r in rows})
    ax.set_xticks(batches, [str(b) for b in batches])  # 1, 2, 4, 8 — not 2⁰, 2¹
    ax.minorticks_off()
    ax.set_title(f"segdeploy bench · {report.rows[0].size if report.rows else ''} px · {report.threads} CPU threads")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def log_to_mlflow(report: BenchReport) -> list[str]:
    """Each run's rows go to the MLflow run that trained it, when there is one."""
    from segdeploy.errors import UserError
    from segdeploy.tracking import log_report

    notes = []
    for model in sorted({r.model for r in report.rows}):
        run = Run.find(Path(model))
        if run is None:
            continue
        rows = [r.to_dict() for r in report.rows if r.model == model]
        metrics = {f"bench_{r['backend']}_{r['precision']}_b{r['batch']}_p50_ms": r["p50_ms"] for r in rows}
        try:
            note = log_report(run.info, "bench", {"machine": report.machine, "rows": rows}, metrics)
        except UserError as exc:
            note = f"bench rows not logged to MLflow: {exc}"
        if note:
            notes.append(note)
    return notes
