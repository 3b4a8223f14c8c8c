"""`--backend auto`: which of a run's models to run on this machine, and why (one line).

A run directory holds its PyTorch model and the exports that passed the parity gate (`Run.exports`
with their gate records). `choose` picks, among those that passed and are not stale, the fastest
here: a measurement of this machine when `segdeploy bench` recorded one in the run
(`Run.speed_records`, keyed by `machine_fingerprint`), else the documented rule (`rule_order`):

1. a TensorRT engine (INT8, then FP16) where TensorRT is installed and an NVIDIA GPU is visible;
2. ONNX through the best onnxruntime execution provider present (CUDA, else CPU; TensorRT's
   only when asked with ``--provider tensorrt``: it builds an engine at every session start):
   on CUDA FP16 then FP32; on the CPU the INT8 CPU form first where INT8 is fast (`int8_fast`),
   then FP32, then FP16 (mixed FP16 on a CPU runs casts around FP32 kernels: 0.89–1.08× FP32 in
   `benchmarks/results/int8_cpu.json`);
3. PyTorch on a visible NVIDIA GPU when onnxruntime has only its CPU provider; else PyTorch.

``--backend torch|onnx|fp16|int8|engine`` forces one form and is refused in one line when that
form is missing, stale or failed its gate, naming the export command that makes it; ``--provider
cpu|cuda|tensorrt`` forces onnxruntime's execution provider and is refused when onnxruntime here
lacks it. Nothing here imports torch: on an ONNX choice predict stays lean.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

from segdeploy.artifact import EXPORT_FORMS, Export, Run
from segdeploy.errors import ArtifactError, BackendUnavailable, UserError

BACKEND_CHOICES = ("auto", "torch", "onnx", "fp16", "int8", "engine")
# --backend NAME -> the export forms that stand for it, in order of preference
FORCED = {"onnx": ("fp32",), "fp16": ("fp16",), "int8": ("int8_cpu", "int8"), "engine": ("engine", "int8_engine")}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
# CPU features that make onnxruntime's INT8 kernels fast: VNNI / AMX do an int8 dot product in one
# instruction (x86), as do dot-product / i8mm on ARM; plain AVX2 emulates it in three and still
# measured 1.44-2.00x FP32 for the U8S8 form (benchmarks/results/int8_cpu.json, AMD EPYC, AVX2 only)
INT8_FAST_FLAGS = ("AVX512VNNI", "AVX_VNNI", "AMX_INT8", "ASIMDDP", "I8MM", "AVX2")
SPEED_BATCH = {"cpu": 2, "cuda": 8}  # predict's default batch per device: the measurement compared


@dataclass
class Choice:
    """What `choose` picked: the form (a key of `EXPORT_FORMS`, or "torch"), its file (the run
    directory for PyTorch), the options to load it with (`LoadOptions` fields), why, and every
    other candidate with why it was not picked."""

    form: str
    path: Path
    options: dict
    reason: str
    basis: str  # "forced" | "measured" | "rule"
    skipped: dict[str, str] = field(default_factory=dict)
    provider: str = ""  # the onnxruntime execution provider it runs on ('' for PyTorch and engines)

    @property
    def label(self) -> str:
        """How reports name what runs: "PyTorch", or the form's file, label and precision."""
        return "PyTorch" if self.form == "torch" else f"{EXPORT_FORMS[self.form].file} ({EXPORT_FORMS[self.form].label} " \
                                                        f"{EXPORT_FORMS[self.form].precision.upper()})"

    def line(self) -> str:
        """One line for the terminal: what runs and why."""
        device = self.options.get("device", "")
        on = (f" on {self.provider.removesuffix('ExecutionProvider')}" if self.provider else
              f" on {device}" if device and device != "auto" else "")
        return f"model: {self.label}{on} — {self.reason}"

    def to_dict(self) -> dict:
        """The choice as JSON-ready values (the path as a string): predict's `model`, eval's `model_choice`."""
        d = asdict(self)
        d["path"] = str(self.path)
        return d


# ------------------------------------------------------------------------------------ this machine


def cpu_features() -> set[str]:
    """The CPU features numpy detected (AVX2, AVX512VNNI, ASIMDDP, …), plus AVX_VNNI / AMX_INT8 /
    I8MM from /proc/cpuinfo where Linux has it (numpy does not report those)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as found
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as found  # type: ignore[no-redef]
    flags = {k for k, v in found.items() if v}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return flags
    words = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith(("flags", "Features"))), [])
    return flags | {w.upper() for w in words if w in ("avx_vnni", "amx_int8", "i8mm")}


def int8_fast(features: set[str] | None = None) -> str:
    """'' when INT8 ONNX is not expected to beat FP32 on this CPU, else the feature that makes it
    fast (the rule's source is in `INT8_FAST_FLAGS`)."""
    features = cpu_features() if features is None else features
    return next((f for f in INT8_FAST_FLAGS if f in features), "")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo's "model name", else `platform.processor()`)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def nvidia_gpus() -> list[str]:
    """The NVIDIA GPUs the driver shows (/proc/driver/nvidia), without importing torch or CUDA."""
    names = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            names += [line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if line.startswith("Model")]
        except OSError:
            continue
    return names


def machine_fingerprint() -> dict:
    """What makes a speed measurement valid only here: the CPU model, its INT8-relevant features,
    the core count and the GPUs; ``key`` is a short hash of the rest."""
    relevant = sorted(f for f in cpu_features() if f in INT8_FAST_FLAGS or f.startswith(("AVX512F", "AVX512_")))
    facts = {"cpu": cpu_model(), "features": relevant, "cores": os.cpu_count(), "gpus": nvidia_gpus()}
    return {"key": hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16], **facts}


def ort_providers() -> list[str]:
    """onnxruntime's execution providers here (`ort.get_available_providers()`), in its order."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def check_provider(provider: str | None) -> str | None:
    """The onnxruntime provider name for ``--provider`` (None: none asked), refused in one line
    when onnxruntime here does not have it (instead of its silent fall-back to the CPU)."""
    if provider is None:
        return None
    if provider not in PROVIDERS:
        raise UserError(f"--provider {provider!r} is unknown; choose from {', '.join(PROVIDERS)}")
    name, available = PROVIDERS[provider], ort_providers()
    if name not in available:
        fix = {"cuda": "install onnxruntime-gpu (with CUDA and cuDNN)", "tensorrt": "install onnxruntime-gpu and TensorRT",
               "cpu": "reinstall onnxruntime"}[provider]
        raise BackendUnavailable(f"--provider {provider}: onnxruntime {_ort_version()} here has no {name} (available: "
                                 f"{', '.join(available)}); {fix}, or pass --provider cpu")
    return name


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def tensorrt_here() -> str:
    """'' when TensorRT engines can run here (tensorrt importable and an NVIDIA GPU visible),
    else why not; checked without importing torch."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    return "" if nvidia_gpus() else "no NVIDIA GPU is visible"


# ------------------------------------------------------------------------------------ choosing


def usable(export: Export, run: Run) -> str:
    """'' when an export may be run (its gate passed, it is not stale; an imported ONNX model's
    model.onnx is the run's model itself, the gate's reference), else why not (one line)."""
    if export.stale:
        return export.stale
    if export.form.key == "fp32" and run.model_format == "onnx":
        return ""
    if export.gate is None:
        return f"{export.path} has no gate record in parity.json; re-export it with `{make_command(export.path.parent.parent, export.form.key)}`"
    if export.gate.get("passed") is not True:
        return (f"{export.path} failed its parity gate ({'; '.join(export.gate.get('failures', [])[:2]) or 'see parity.md'}); "
                f"re-export it with `{make_command(export.path.parent.parent, export.form.key)}`")
    return ""


def make_command(run_dir: Path, key: str) -> str:
    """The ``segdeploy export`` command that makes form `key` (its gate record's arguments when
    there is one, else the form's flags)."""
    import shlex

    run = Run(run_dir)
    args = run.gate_records().get(key, {}).get("args") or list(EXPORT_FORMS[key].flags)
    return shlex.join(["segdeploy", "export", str(run_dir), *args])


def choose(run_dir: Path, backend: str = "auto", provider: str | None = None, device: str = "auto") -> Choice:
    """The model of `run_dir` to run here: `backend` "auto" (the fastest usable one, see the
    module's rule) or one of `BACKEND_CHOICES` (refused when missing, stale or failed: the error
    names the export command that makes it); `provider` one of `PROVIDERS` or None.
    Raises UserError (ArtifactError, BackendUnavailable) in one line."""
    if backend not in BACKEND_CHOICES:
        raise UserError(f"--backend {backend!r} is unknown; choose from {', '.join(BACKEND_CHOICES)}")
    run = Run.open_finished(Path(run_dir))
    ort_name = check_provider(provider)
    if backend == "torch" and provider is not None:
        raise UserError("--provider picks onnxruntime's execution provider, and --backend torch runs PyTorch; "
                        "drop one of them")
    has_torch_model = run.model_format != "onnx"
    exports = {e.form.key: e for e in run.exports()}
    skipped = {k: why for k, e in exports.items() if (why := usable(e, run))}
    ready = {k: e for k, e in exports.items() if k not in skipped and EXPORT_FORMS[k].output == "logits"}
    if backend != "auto":
        return _forced(run, backend, ort_name, ready, skipped, has_torch_model, device)
    order = rule_order(ort_name, has_torch_model)
    candidates = [k for k in order if k in ready or (k.startswith("torch") and has_torch_model)]
    if not candidates:
        raise ArtifactError(_nothing_here(run, ort_name, skipped))
    measured = _measured(run, candidates, ready, ort_name)
    if measured is not None:
        key, reason = measured
        return _choice(run, key, ready, ort_name, reason, "measured", skipped, device)
    reason = _rule_reason(candidates[0], candidates, ort_name, run, skipped)
    return _choice(run, candidates[0], ready, ort_name, reason, "rule", skipped, device)


def rule_order(ort_name: str | None, has_torch_model: bool = True) -> list[str]:
    """Candidates in the rule's order of preference for this machine: form keys, "torch" (CPU) and
    "torch:cuda"; `ort_name` restricts the ONNX forms to that provider (and leaves out engines
    and PyTorch)."""
    gpus, trt = nvidia_gpus(), tensorrt_here()
    provider = ort_name or best_provider()
    order = ["int8_engine", "engine"] if not ort_name and not trt else []
    if provider == PROVIDERS["tensorrt"]:
        order += ["int8", "fp16", "fp32"]
    elif provider == PROVIDERS["cuda"]:
        order += ["fp16", "fp32"]
    else:
        gpu_torch = gpus and has_torch_model and importlib.util.find_spec("torch") is not None
        order += (["torch:cuda"] if gpu_torch and not ort_name else []) + (["int8_cpu"] if int8_fast() else [])
        order += ["fp32", "fp16"]
    return order if ort_name else order + ["torch"]


def best_provider() -> str:
    """CUDA when onnxruntime here has it, else the CPU (TensorRT's provider only when asked)."""
    return PROVIDERS["cuda"] if PROVIDERS["cuda"] in ort_providers() else PROVIDERS["cpu"]


def _rule_reason(key: str, candidates: list[str], ort_name: str | None, run: Run, skipped: dict[str, str]) -> str:
    others = [k for k in candidates if k != key]
    rest = f"; ahead of {', '.join(others[:3])}" if others else ""
    if key in ("engine", "int8_engine"):
        return f"TensorRT and an NVIDIA GPU ({', '.join(nvidia_gpus())}) are here{rest}"
    if key == "torch:cuda":
        return f"an NVIDIA GPU is visible and onnxruntime here has only its CPU provider{rest}"
    if key == "torch":  # why no export serves: none yet, or each one's reason with its fix
        return (f"no export of {run.root} can serve ({'; '.join(skipped.values())})" if skipped else
                f"no ONNX export of {run.root} yet (make one with `segdeploy export {run.root}`)")
    provider = ort_name or best_provider()
    if key == "int8_cpu":
        return (f"rule: INT8 is fast on this CPU ({int8_fast()}: U8S8 measured 1.44-2.00x FP32 on AVX2 alone, "
                f"benchmarks/results/int8_cpu.json){rest}; no `segdeploy bench` measurement of this machine in the run")
    why = {"fp16": "FP16 runs on the GPU's tensor cores", "int8": "INT8 on TensorRT's provider",
           "fp32": ("FP32 (mixed FP16 on a CPU is no faster; no usable INT8 CPU form, or INT8 not fast here)"
                    if provider == PROVIDERS["cpu"] else "FP32 (no usable FP16 form)")}[key]
    return f"rule: {why} ({provider.removesuffix('ExecutionProvider')}){rest}; no `segdeploy bench` measurement of this machine"


def _nothing_here(run: Run, ort_name: str | None, skipped: dict[str, str]) -> str:
    why = f" ({'; '.join(skipped.values())})" if skipped else ""
    if ort_name:
        return (f"run {run.root} has no gated ONNX export to run with --provider{why}; export one with "
                f"`segdeploy export {run.root}`")
    return (f"run {run.root} is an imported ONNX model whose model.onnx cannot be used{why}" if run.model_format == "onnx"
            else f"run {run.root} has nothing to run{why}")


def _forced(run: Run, backend: str, ort_name: str | None, ready: dict[str, Export], skipped: dict[str, str],
            has_torch_model: bool, device: str) -> Choice:
    """The one form `--backend` names, or a one-line refusal naming the command that makes it."""
    if backend == "torch":
        if not has_torch_model:
            raise ArtifactError(f"run {run.root} is an imported ONNX model: it has no PyTorch model; use --backend onnx")
        return Choice("torch", run.root, {"device": device}, "forced by --backend torch", "forced", skipped)
    if backend == "engine" and ort_name:
        raise UserError("--provider picks onnxruntime's execution provider, and --backend engine runs TensorRT "
                        "itself; drop --provider")
    keys = FORCED[backend]
    if backend == "int8" and ort_name == PROVIDERS["tensorrt"]:
        keys = ("int8", "int8_cpu")  # the symmetric form is the one TensorRT runs
    for key in keys:
        if key in ready:
            return _choice(run, key, ready, ort_name, f"forced by --backend {backend}", "forced", skipped)
    for key in keys:
        if key in skipped:
            raise ArtifactError(f"--backend {backend}: {skipped[key]}")
    form = EXPORT_FORMS[keys[0]]
    raise ArtifactError(f"--backend {backend}: run {run.root} has no {form.file}; make it with "
                        f"`{make_command(run.root, form.key)}`")


def _choice(run: Run, key: str, ready: dict[str, Export], ort_name: str | None, reason: str, basis: str,
            skipped: dict[str, str], device: str = "auto") -> Choice:
    if key.startswith("torch"):
        return Choice("torch", run.root, {"device": "cuda" if key == "torch:cuda" else device}, reason, basis, skipped)
    options = {"providers": [ort_name]} if ort_name else {}  # asked: the backend checks it is the one used
    provider = (ort_name or best_provider()) if EXPORT_FORMS[key].backend == "onnxruntime" else ""
    return Choice(key, ready[key].path, options, reason, basis, skipped, provider)


def candidate_file(run: Run, key: str) -> Path:
    """The file a candidate runs: an export, or the run's model for PyTorch."""
    return run.model_file if key.startswith("torch") else run.export_path(key)


def file_stamp(path: Path) -> dict:
    """Size and modification time: a measurement applies to the file it measured, not to a re-export."""
    st = path.stat()
    return {"file_size": st.st_size, "file_mtime_ns": st.st_mtime_ns}


def _measured(run: Run, candidates: list[str], ready: dict[str, Export], ort_name: str | None) -> tuple[str, str] | None:
    """(the fastest candidate, why) from `segdeploy bench`'s record of this machine in the run, when
    it measured at least two of the candidates at one batch and size (predict's default batch
    preferred); None otherwise. A row of a file changed since, or of another provider, is ignored."""
    record = run.speed_records().get(machine_fingerprint()["key"])
    if not record:
        return None
    provider = ort_name or best_provider()
    groups: dict[tuple[int, int], dict[str, float]] = {}
    for row in record.get("rows", []):
        key = row.get("candidate")
        if key not in candidates or (not key.startswith("torch") and EXPORT_FORMS[key].backend == "onnxruntime"
                                     and row.get("provider") != provider):
            continue
        path = candidate_file(run, key)
        if not path.is_file() or file_stamp(path) != {k: row.get(k) for k in ("file_size", "file_mtime_ns")}:
            continue
        group = groups.setdefault((int(row["batch"]), int(row["size"])), {})
        group[key] = max(group.get(key, 0.0), float(row["images_per_s"]))
    usable_groups = {g: v for g, v in groups.items() if len(v) >= 2}
    if not usable_groups:
        return None
    batch = SPEED_BATCH["cuda" if provider != PROVIDERS["cpu"] else "cpu"]
    (b, size), speeds = min(usable_groups.items(), key=lambda kv: (abs(kv[0][0] - batch), -kv[0][1]))
    ranked = sorted(speeds, key=lambda k: -speeds[k])
    numbers = ", ".join(f"{k} {speeds[k]:.3g} img/s" for k in ranked)
    return ranked[0], (f"the fastest measured on this machine by `segdeploy bench` ({record.get('measured_at', '?')}, "
                       f"batch {b}, {size}²): {numbers}")


def resolve(model: Path, backend: str = "auto", provider: str | None = None, device: str = "auto") -> Choice:
    """What predict, eval and bench run for MODEL: for a run directory `choose`'s pick; for a file
    (.onnx, .engine) that file, with `provider` checked (`--backend` other than auto is refused: it
    picks among a run's forms). Raises UserError in one line."""
    from segdeploy.artifact import META_FILE, form_of

    model = Path(model)
    if model.is_dir() and (model / META_FILE).is_file():
        return choose(model, backend, provider, device)
    if backend not in BACKEND_CHOICES:
        raise UserError(f"--backend {backend!r} is unknown; choose from {', '.join(BACKEND_CHOICES)}")
    form = form_of(model)
    if backend != "auto":
        raise UserError(f"--backend {backend} picks one of a run directory's forms, and {model} is one file; pass the "
                        f"run directory, or drop --backend")
    ort_name = check_provider(provider)
    if ort_name and (form is None or form.backend != "onnxruntime"):
        raise UserError(f"--provider picks onnxruntime's execution provider, and {model} is not an .onnx model; "
                        "drop --provider")
    options = {"providers": [ort_name]} if ort_name else {}
    shown = (ort_name or best_provider()) if form is not None and form.backend == "onnxruntime" else ""
    return Choice(form.key if form is not None else "file", model, options, "the file given", "file", {}, shown)
