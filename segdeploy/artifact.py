"""What every artifact (run directory, ONNX file, engine) says about itself, and the one place
that knows a run directory's layout.

`ModelMeta` travels with the weights — in a run's ``meta.json``, in ONNX ``metadata_props`` and
in an engine's sidecar — so predict needs nothing but the file (an engine also needs TensorRT and
the GPU it was built for). `Run` is the one owner of a run directory, for writing and reading
(like transformers' ``save_pretrained``/``from_pretrained`` pair): it creates the run, writes its
weights, resume checkpoint, status, history and names its plot/eval/tensorboard folders, and reads
them back; meta.json's schema lives in that class. No other module spells a run's file names.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from segdeploy.errors import ArtifactError
from segdeploy.onnx_props import metadata_props

META_FILE = "meta.json"
WEIGHTS_FILE = "model.safetensors"
TORCHSCRIPT_FILE = "model.torchscript.pt"  # an imported TorchScript archive (torch.jit.save), kept as it came
PROGRAM_FILE = "model.pt2"  # an imported torch.export program (torch.export.save), kept as it came
RECIPE_FILE = "recipe.yaml"
LAST_CKPT = "last.ckpt"
SPLITS_FILE = "splits.json"
HISTORY_FILE = "history.csv"
PLOTS_DIR = "plots"
TENSORBOARD_DIR = "tensorboard"
ONNX_META_KEY = "segdeploy"  # the metadata_props key of an exported ONNX file
EXPORT_DIR = "export"
EVAL_DIR = "eval"
# an evaluation's directory (RUN/eval/<split>/, or eval --out): metrics.json marks it as one
EVAL_METRICS_FILE, CONFUSION_FILE, OVERLAY_FILE = "metrics.json", "confusion_matrix.png", "overlay_{:02d}.png"
CURVE_FILES = {"loss": "loss.png", "miou": "miou.png"}  # RUN/plots/: training curves by what they plot
PARITY_FILE, PARITY_SUMMARY = "parity.json", "parity.md"


THRESHOLD_FILE = "threshold.json"  # the decision threshold `eval --thresholds` chose (two-class runs)
THRESHOLD_PLOT = "thresholds.png"  # its sweep, in the evaluation's folder
REJECTED_DIR = "export-rejected"  # the last failed export's parity report (export/ itself is left as it was)
STAGING_PREFIX = ".staging-"  # an export builds its forms in RUN/export/.staging-*/ and renames them when all pass
# the flags that ask for export forms, in the order commands show them (a head is `--head NAME`,
# written `--head=NAME` so that each form's flags are single arguments)
EXPORT_FLAGS = ("--fp16", "--int8", "--trt", "--head=argmax", "--head=softmax")
SPEED_FILE = "speed.json"  # `segdeploy bench`'s measurements per machine, what `--backend auto` ranks by


@dataclass(frozen=True)
class ExportForm:
    """One exported form of a run's model: the one table (`EXPORT_FORMS`) that export's dispatch,
    the runtime's suffix map, bench's candidates and hints, `form_of` and the CLI's precision names
    all read (ultralytics' ``export_formats()`` is the model).

    key: the form's name in parity.json and reports; file: its name in RUN/export; suffixes: the
    file suffixes it is loaded by (the first is its own); tag: the precision tag a renamed copy
    keeps in its name (``scene.int8.cpu.onnx``); backend / precision: what runs it, at what
    precision; label: how reports name it; flags: the ``segdeploy export`` flags that make it (its
    sources come with it); source: the key of the form it is derived from ("weights" for the FP32
    ONNX); bench: whether bench measures it as the (backend, precision) candidate; size: its
    expected size relative to the FP32 ONNX, for export's disk-space check (4 bytes per weight
    there, 2 in FP16, 1 in INT8 plus scales; engines a little more); output: what the graph returns
    — "logits" (N×C×H×W float32), "probabilities" (a softmax head: N×C×H×W float32 summing to 1)
    or "labels" (an argmax head: the N×H×W uint8 class map) — the runtime turns a head's output
    back into logits-like scores for tiling (`runtime.onnxruntime`), and `--backend auto` picks
    only forms that return logits."""

    key: str
    file: str
    suffixes: tuple[str, ...]
    tag: str
    backend: str
    precision: str
    label: str
    flags: tuple[str, ...]
    source: str
    bench: bool
    size: float
    output: str = "logits"


EXPORT_FORMS = {f.key: f for f in (
    ExportForm("fp32", "model.onnx", (".onnx",), "", "onnxruntime", "fp32", "onnxruntime", (), "weights", True, 1.0),
    ExportForm("fp16", "model.fp16.onnx", (".onnx",), ".fp16", "onnxruntime", "fp16", "onnxruntime", ("--fp16",),
               "fp32", True, 0.5),
    # INT8 in two forms: symmetric activations for TensorRT (an engine's source), U8S8 for CPUs (what bench runs)
    ExportForm("int8", "model.int8.onnx", (".onnx",), ".int8", "onnxruntime", "int8", "onnxruntime (TensorRT form)",
               ("--int8",), "fp32", False, 0.3),
    ExportForm("int8_cpu", "model.int8.cpu.onnx", (".onnx",), ".int8.cpu", "onnxruntime", "int8",
               "onnxruntime (CPU form)", ("--int8",), "fp32", True, 0.3),
    ExportForm("engine", "model.engine", (".engine", ".plan"), "", "tensorrt", "fp16", "tensorrt", ("--trt",), "fp16",
               True, 0.6),
    ExportForm("int8_engine", "model.int8.engine", (".engine", ".plan"), ".int8", "tensorrt", "int8",
               "tensorrt (INT8)", ("--trt", "--int8"), "int8", True, 0.4),
    # server heads on the FP32 graph (`export --head`): the class map (argmax in the graph) or the probabilities
    ExportForm("argmax", "model.argmax.onnx", (".onnx",), ".argmax", "onnxruntime", "fp32", "onnxruntime (argmax head)",
               ("--head=argmax",), "fp32", False, 1.0, "labels"),
    ExportForm("softmax", "model.softmax.onnx", (".onnx",), ".softmax", "onnxruntime", "fp32",
               "onnxruntime (softmax head)", ("--head=softmax",), "fp32", False, 1.0, "probabilities"),
)}
# derived from the table: a file suffix -> the backend that loads it; the precision names a user may type
SUFFIX_BACKENDS = {s: f.backend for f in EXPORT_FORMS.values() for s in f.suffixes}
PRECISIONS = tuple(dict.fromkeys(f.precision for f in EXPORT_FORMS.values()))


def forms_for(flags: set[str] | tuple[str, ...]) -> list[ExportForm]:
    """The forms a set of ``segdeploy export`` flags makes, sources included, in build order
    (``--trt`` -> fp32, fp16, engine). Raises ValueError for a flag that makes no form."""
    unknown = set(flags) - set(EXPORT_FLAGS)
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not export flags ({', '.join(EXPORT_FLAGS)})")
    wanted = {f.key for f in EXPORT_FORMS.values() if set(f.flags) <= set(flags)}
    for key in list(wanted):
        while key in EXPORT_FORMS:
            wanted.add(key)
            key = EXPORT_FORMS[key].source
    return [f for f in EXPORT_FORMS.values() if f.key in wanted]


def bench_form(backend: str, precision: str) -> ExportForm | None:
    """The form bench measures for (backend, precision), or None when no export makes one."""
    return next((f for f in EXPORT_FORMS.values() if f.bench and (f.backend, f.precision) == (backend, precision)), None)


def flag_order(flags: set[str] | tuple[str, ...] | list[str]) -> list[str]:
    """Export flags in the order commands show them (`EXPORT_FLAGS`)."""
    return [f for f in EXPORT_FLAGS if f in set(flags)]


# What holds a run's model (meta.json "model_format"; absent means "weights"): trained runs and
# imported state dicts keep safetensors weights rebuilt with the recipe's architecture; imported
# TorchScript and torch.export archives carry their architecture; an imported ONNX model is its
# FP32 export (RUN/export/model.onnx) and has no PyTorch model at all.
MODEL_FORMATS = ("weights", "torchscript", "exported_program", "onnx")


@dataclass
class ModelMeta:
    """What a model artifact says about itself, wherever it travels (a run's meta.json, an ONNX file's metadata_props,
    an engine's sidecar): class names and RGB palette (0..255), per-band normalisation (mean/std after dividing by
    max_pixel_value), the number of input bands, the input divisor and tile size in pixels, the static size/batch
    when the model accepts only one, and where a derived artifact came from (`source`). `from_dict` raises
    ArtifactError for a record without the essential fields."""
    classes: list[str]
    palette: list[list[int]]
    mean: list[float]
    std: list[float]
    max_pixel_value: float
    bands: int
    input_divisor: int
    tile_size: int
    ignore_index: int = 255
    static_size: int | None = None
    # the smallest tile (px) the model runs at (None: recorded before segdeploy knew it)
    min_tile_size: int | None = None
    # the one batch size the model accepts (an imported graph with a fixed batch), None: any
    static_batch: int | None = None
    hierarchy: dict[str, list[str]] | None = None
    arch: str = ""
    encoder: str = ""
    recipe_digest: str = ""
    # pixel type the model was trained on (None: recorded before segdeploy checked it)
    input_dtype: str | None = None
    # the class pictures leave unpainted (recipe classes.background); None: by name, see classes.background_index
    background: int | None = None
    # what a derived artifact was made from: {"path": relative to the artifact, "sha256": ...}; an
    # imported model's record also has "format" (the file is foreign: the chain ends there)
    source: dict[str, str] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """The number of classes (the logits' channel count C)."""
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """The record as plain JSON types (what meta.json and metadata_props hold)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> ModelMeta:
        """The record in `d`, unknown keys (from a newer segdeploy) ignored. `source` names the file for the error:
        ArtifactError when classes, mean, std or bands are missing."""
        known = {f for f in cls.__dataclass_fields__}
        missing = [f for f in ("classes", "mean", "std", "bands") if f not in d]
        if missing:
            raise ArtifactError(f"{source} lacks segdeploy metadata {missing}; re-export it with `segdeploy export`")
        return cls(**{k: v for k, v in d.items() if k in known})


def read_run_meta(run_dir: Path) -> dict[str, Any]:
    """RUN/meta.json as a dict. Raises ArtifactError naming the fix for a missing directory, a directory that is not a
    run, or a corrupt file."""
    path = run_dir / META_FILE
    if not run_dir.is_dir():
        raise ArtifactError(f"run directory {run_dir} not found; train one with `segdeploy train RECIPE --out {run_dir}`")
    if not path.is_file():
        raise ArtifactError(f"{run_dir} is not a segdeploy run directory (no {META_FILE})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is corrupt ({exc}); retrain the run") from None


RUN_STATUSES = ("training", "complete", "failed")
HISTORY_FIELDS = ["epoch", "train_loss", "val_loss", "val_miou", "val_mdice", "lr", "seconds", "images_per_s"]


def run_state(path: Path) -> str:
    """absent | empty | foreign (files, but not a run) | complete | unfinished (resumable: it has a
    resume checkpoint, whether it was interrupted or marked "failed") | unstarted (stopped before
    its first epoch ended: nothing to resume and nothing to lose, so a plain retry replaces it)."""
    if not path.exists():
        return "absent"
    if not path.is_dir():
        return "foreign"
    if not any(path.iterdir()):
        return "empty"
    if not (path / META_FILE).is_file():
        return "foreign"
    try:
        status = json.loads((path / META_FILE).read_text()).get("status")
    except (json.JSONDecodeError, AttributeError):
        status = None
    if status == "complete" and Run(path).model_file.is_file():
        return "complete"
    return "unfinished" if (path / LAST_CKPT).is_file() else "unstarted"


def continue_hint(run_dir: Path) -> str:
    """The one command that gets an unfinished run to finished (the README shows the same)."""
    if (run_dir / LAST_CKPT).is_file():
        return f"continue it with `segdeploy train --resume --out {run_dir}`"
    return (f"it stopped before its first epoch ended; start it again with "
            f"`segdeploy train {run_dir / RECIPE_FILE} --out {run_dir}`")


def source_record(source: Path, artifact_dir: Path) -> dict[str, str]:
    """What a derived artifact in `artifact_dir` records about the file it was made from."""
    from segdeploy.utils import file_sha256

    return {"path": os.path.relpath(source, artifact_dir), "sha256": file_sha256(source)}


def import_record(source: Path, run_dir: Path, fmt: str) -> dict[str, str]:
    """What an imported run records about the file it came from: its path relative to `run_dir`
    (the staleness checks follow it), sha256, name and format."""
    return {**source_record(source, run_dir), "file": Path(source).name, "format": fmt}


def check_source(artifact: Path, meta: ModelMeta, read_meta: Callable[[Path], ModelMeta] | None = None) -> None:
    """Refuse an artifact whose source (weights, FP32 ONNX, an imported file) changed after it was
    derived, along the whole chain (engine -> FP16 ONNX -> FP32 ONNX -> the run's model -> the
    file it was imported from), naming the command that rebuilds it (`rebuild_command`, or the
    `segdeploy import` that refreshes an imported run). A copy deployed without its source has
    nothing to be stale against and passes. Raises ArtifactError."""
    from segdeploy.utils import file_sha256

    requested, link, requested_meta = artifact, artifact, meta
    for _ in range(5):  # engine -> fp16 -> fp32 -> run model -> imported file at most
        if not meta.source:
            return
        source = (link.parent / meta.source["path"]).resolve()
        if not source.is_file():
            return
        if file_sha256(source) != meta.source["sha256"]:
            via = "" if link == requested else f" (which {link.name} was made from)"
            if "format" in meta.source:
                run = Run.root_of(link) if link.suffix == ".onnx" else link.parent
                raise ArtifactError(f"{requested} is stale: {source} changed after it was imported{via}; re-import it "
                                    f"with `segdeploy import {source} --recipe {run / RECIPE_FILE} --out {run} --overwrite`")
            raise ArtifactError(f"{requested} is stale: {source} changed after it was exported{via}; "
                                f"re-export it with `{rebuild_command(requested, requested_meta)}`")
        if "format" in meta.source:
            return  # an imported file is where the chain starts
        run = Run.find(source)
        if run is not None and run.model_file == source:
            link, meta = source, run.meta
        elif source.suffix == ".onnx" and read_meta is not None:
            link, meta = source, read_meta(source)
        else:
            return


def rebuild_command(artifact: Path, meta: ModelMeta) -> str:
    """The exact ``segdeploy export`` command that rebuilds an exported form: the arguments of the
    command that made it (its gate record in the run's parity.json, thresholds and --data
    included), else those that shaped it (its metadata's ``export_args``), else its form's flags."""
    import shlex

    form, run = form_of(artifact), Run.find(artifact)
    args = None
    if form is not None and run is not None and Path(artifact).resolve() == run.export_path(form.key).resolve():
        args = run.gate_records().get(form.key, {}).get("args")
    if args is None:
        args = meta.extra.get("export_args")
    if args is None:
        args = list(form.flags) if form is not None else []
    return shlex.join(["segdeploy", "export", str(Run.root_of(artifact)), *args])


def read_onnx_meta(path: Path) -> ModelMeta:
    """The ModelMeta an exported ONNX file carries in its metadata_props, read without loading
    the graph: parsing a model (onnx.load) costs its size in memory again, ~100 MB of predict's
    peak for the demo model."""
    try:
        props = metadata_props(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not a readable ONNX file ({type(exc).__name__}); re-export it with "
                            "`segdeploy export`") from None
    if ONNX_META_KEY not in props:
        raise ArtifactError(f"{path} has no segdeploy metadata; export it with `segdeploy export RUN_DIR`")
    try:
        return ModelMeta.from_dict(json.loads(props[ONNX_META_KEY]), str(path))
    except json.JSONDecodeError:
        raise ArtifactError(f"{path} has corrupt segdeploy metadata; re-export it with `segdeploy export`") from None


def write_onnx_meta(proto, meta: ModelMeta, extra: dict | None = None) -> None:  # noqa: ANN001 - onnx.ModelProto
    """Set an ONNX model's metadata_props: the whole ModelMeta as JSON under ONNX_META_KEY (what
    `read_onnx_meta` reads), plus readable top-level keys for other tools; `extra` is merged into
    ``meta.extra``. Needs no onnx import (the proto is the caller's)."""
    readable = {
        "classes": json.dumps(meta.classes), "palette": json.dumps(meta.palette), "mean": json.dumps(meta.mean),
        "std": json.dumps(meta.std), "max_pixel_value": str(meta.max_pixel_value), "bands": str(meta.bands),
        "input_divisor": str(meta.input_divisor), "tile_size": str(meta.tile_size),
        "recipe_digest": meta.recipe_digest, "segdeploy_version": meta.versions.get("segdeploy", ""),
    }
    doc = meta.to_dict()
    doc["extra"] = {**doc.get("extra", {}), **(extra or {})}
    readable[ONNX_META_KEY] = json.dumps(doc)
    del proto.metadata_props[:]
    for k, v in readable.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


@dataclass
class Export:
    """An export of a run as found on disk: its form, path, why it cannot be used (stale: the
    refusal, with the command that rebuilds it; '' when current) and its gate record from
    parity.json (None when it has none)."""

    form: ExportForm
    path: Path
    stale: str = ""
    gate: dict[str, Any] | None = None


class Run:
    """A run directory: its files named here, its meta.json and recipe read at most once per `Run`
    object (kept on it; `write_status` refreshes meta.json's copy).

    `Run.find` accepts the run directory, an exported file inside RUN/export, or a file beside the
    run's meta.json, and returns None for an artifact deployed without its run."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._info: dict[str, Any] | None = None
        self._recipe = None

    @classmethod
    def find(cls, path: Path) -> Run | None:
        """The run that `path` belongs to: the run directory itself, a file in it (an imported archive), or a file in
        RUN/export; None for an artifact deployed without its run (a directory holding both recipe.yaml and
        meta.json is a run)."""
        path = Path(path)
        for cand in (path, path.parent, path.parent.parent):
            if cand.is_dir() and (cand / RECIPE_FILE).is_file() and (cand / META_FILE).is_file():
                return cls(cand)
        return None

    @classmethod
    def root_of(cls, artifact: Path) -> Path:
        """The run directory an exported file belongs to, by layout when the run is not here
        (RUN/export/model.engine -> RUN): for messages that name the command to run."""
        run = cls.find(artifact)
        if run is not None:
            return run.root
        artifact = Path(artifact)
        return artifact.parent.parent if artifact.parent.name == EXPORT_DIR else artifact.parent

    @classmethod
    def open_finished(cls, root: Path) -> Run:
        """The run at `root`, refused with ArtifactError (and the command that finishes it) unless complete."""
        run = cls(root)
        run.require_finished()
        return run

    # -- files
    @property
    def weights(self) -> Path:
        """RUN/model.safetensors: a trained (or imported state dict's) weights."""
        return self.root / WEIGHTS_FILE

    @property
    def recipe_path(self) -> Path:
        """RUN/recipe.yaml: the resolved recipe the run was trained with."""
        return self.root / RECIPE_FILE

    @property
    def meta_path(self) -> Path:
        """RUN/meta.json: status, the ModelMeta and the run's facts (`write_status` writes it)."""
        return self.root / META_FILE

    @property
    def last_checkpoint(self) -> Path:
        """RUN/last.ckpt: the resume state (`save_checkpoint` / `load_checkpoint`)."""
        return self.root / LAST_CKPT

    @property
    def splits_path(self) -> Path:
        """RUN/splits.json: the keys of each split the run was trained with."""
        return self.root / SPLITS_FILE

    @property
    def history_path(self) -> Path:
        """RUN/history.csv: one row per epoch (HISTORY_FIELDS)."""
        return self.root / HISTORY_FILE

    @property
    def plots_dir(self) -> Path:
        """RUN/plots: the training curves (CURVE_FILES)."""
        return self.root / PLOTS_DIR

    @property
    def tensorboard_dir(self) -> Path:
        """RUN/tensorboard: TensorBoard event files."""
        return self.root / TENSORBOARD_DIR

    @property
    def export_dir(self) -> Path:
        """RUN/export: the exported forms (EXPORT_FORMS) and their gate records."""
        return self.root / EXPORT_DIR

    def eval_dir(self, name: str) -> Path:
        """RUN/eval/`name`: an evaluation's default folder (`name` is e.g. the split)."""
        return self.root / EVAL_DIR / name

    def evaluation_files(self) -> list[Path]:
        """The metrics.json of every evaluation kept under RUN/eval, sorted by path."""
        return sorted((self.root / EVAL_DIR).glob(f"*/{EVAL_METRICS_FILE}"))

    def export_path(self, key: str) -> Path:
        """RUN/export/<file> of the export form `key` (a key of EXPORT_FORMS; KeyError otherwise)."""
        return self.export_dir / EXPORT_FORMS[key].file

    # -- the decision threshold chosen on validation data (two-class runs; predict applies it)
    @property
    def threshold_path(self) -> Path:
        """RUN/threshold.json: the two-class decision threshold `eval --thresholds` recorded."""
        return self.root / THRESHOLD_FILE

    def recorded_threshold(self) -> dict[str, Any] | None:
        """The record `write_threshold` left ({"threshold": T, "metric", "split", "iou", "dice", "model",
        …}), or None when there is none or it is unreadable (predict then uses 0.5, the argmax)."""
        try:
            doc = json.loads(self.threshold_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        ok = isinstance(doc, dict) and isinstance(doc.get("threshold"), (int, float)) and 0 <= doc["threshold"] <= 1
        return doc if ok else None

    def write_threshold(self, record: dict[str, Any]) -> Path:
        """Record the chosen threshold (atomically), replacing an earlier one; its path."""
        from segdeploy.utils import write_json

        write_json(self.threshold_path, record)
        return self.threshold_path

    def split_keys(self) -> dict[str, list[str]]:
        """The keys of every split the run was trained with ({} for a run without splits.json)."""
        try:
            return json.loads(self.splits_path.read_text())
        except (OSError, ValueError):
            return {}

    @property
    def model_format(self) -> str:
        """weights | torchscript | exported_program | onnx (see MODEL_FORMATS)."""
        fmt = self.info.get("model_format", "weights") if self.meta_path.is_file() else "weights"
        if fmt not in MODEL_FORMATS:
            raise ArtifactError(f"{self.meta_path} names an unknown model_format {fmt!r}; re-import the model")
        return fmt

    @property
    def model_file(self) -> Path:
        """The file that holds the run's model: its weights, an imported archive, or for an
        imported ONNX model its FP32 export."""
        return {"weights": self.weights, "torchscript": self.root / TORCHSCRIPT_FILE,
                "exported_program": self.root / PROGRAM_FILE, "onnx": self.export_path("fp32")}[self.model_format]

    @property
    def reference(self) -> str:
        """What export's gate and bench's accuracy compare with: the PyTorch model, or for an ONNX
        import (no PyTorch model exists) the FP32 ONNX itself."""
        return "FP32 ONNX (the imported model)" if self.model_format == "onnx" else "PyTorch FP32"


    # -- writing (the one place a run directory is written)
    @classmethod
    def create(cls, root: Path, recipe_text: str, splits: dict[str, list[str]], meta: ModelMeta,
               world_size: int = 1, epochs_done: int = 0) -> Run:
        """Make (or reuse, on resume) the directory and write the resolved recipe, the split keys and
        meta.json with status "training". Each file is written atomically."""
        from segdeploy.utils import atomic_path, write_json

        run = cls(root)
        run.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(run.recipe_path) as tmp:
            tmp.write_text(recipe_text)
        write_json(run.splits_path, splits)
        run.write_status("training", meta, epochs_done=epochs_done, world_size=world_size)
        return run

    def write_status(self, status: str, meta: ModelMeta | None = None, **fields: Any) -> None:
        """Rewrite meta.json atomically: ``{"status": status, "model_meta": ..., **fields}``.

        `status` is "training", "complete" or "failed" (pass ``error="one line"``); `meta` defaults
        to the model meta already recorded. Only "complete" (with weights) makes a run usable by
        later verbs. Raises ValueError for an unknown status."""
        from segdeploy.utils import write_json

        if status not in RUN_STATUSES:
            raise ValueError(f"run status {status!r} is not one of {RUN_STATUSES}")
        model_meta = meta.to_dict() if meta is not None else self.info["model_meta"]
        write_json(self.meta_path, {"status": status, "model_meta": model_meta, **fields})
        self._info = None

    def save_weights(self, state: dict) -> None:
        """The model's tensors as safetensors (CPU, contiguous), atomically."""
        from safetensors.torch import save_file

        from segdeploy.utils import atomic_path

        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        with atomic_path(self.weights) as tmp:
            save_file(tensors, str(tmp))

    def load_weights(self) -> dict:
        """The weights as a state dict of CPU tensors (safetensors: no unpickling); ArtifactError
        when the file is corrupt."""
        from safetensors.torch import load_file

        try:
            return load_file(str(self.weights))
        except Exception as exc:  # noqa: BLE001 - any failure is the file's
            raise ArtifactError(f"{self.weights} is corrupt ({exc}); retrain the run") from None

    def save_archive(self, source: Path, fmt: str) -> None:
        """Keep an imported TorchScript or torch.export archive in the run, byte for byte,
        atomically; `fmt` is "torchscript" or "exported_program"."""
        import shutil

        from segdeploy.utils import atomic_path

        target = {"torchscript": self.root / TORCHSCRIPT_FILE, "exported_program": self.root / PROGRAM_FILE}[fmt]
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)

    def save_checkpoint(self, state: dict) -> None:
        """The resume state (tensors and plain values only) with torch.save, atomically; a failed
        write (disk full) is an OutputError naming the file."""
        import torch

        from segdeploy.errors import OutputError
        from segdeploy.utils import atomic_path

        path = self.last_checkpoint
        with atomic_path(path) as tmp:
            try:
                torch.save(state, tmp)
            except RuntimeError as exc:  # torch reports a failed write (disk full) as RuntimeError
                if "writ" not in str(exc).lower():
                    raise
                raise OutputError(f"cannot write {path}: {str(exc).splitlines()[0][:120]} (disk full?); "
                                  "free space or train into another --out") from None

    def load_checkpoint(self) -> dict:
        """The resume state, loaded with ``weights_only=True`` (no arbitrary unpickling)."""
        import torch

        return torch.load(self.last_checkpoint, map_location="cpu", weights_only=True)

    def write_history(self, rows: list[dict]) -> None:
        """One row per epoch (HISTORY_FIELDS) as CSV, atomically."""
        from segdeploy.utils import atomic_path

        with atomic_path(self.history_path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, HISTORY_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def read_history(self) -> list[dict]:
        """The epochs recorded so far ([] when none): epoch as int, every other column as float."""
        if not self.history_path.is_file():
            return []
        with self.history_path.open() as f:
            return [{k: (float(v) if k != "epoch" else int(v)) for k, v in row.items()} for row in csv.DictReader(f)]

    # -- contents (read once)
    @property
    def info(self) -> dict[str, Any]:
        """meta.json as a dict, read on first use and kept (rewritten by `write_status`); ArtifactError as
        `read_run_meta`."""
        if self._info is None:
            self._info = read_run_meta(self.root)
        return self._info

    @property
    def meta(self) -> ModelMeta:
        """The run's ModelMeta (from meta.json's model_meta); ArtifactError when it is missing or incomplete."""
        return ModelMeta.from_dict(self.info["model_meta"], str(self.meta_path))

    @property
    def recipe(self):  # noqa: ANN201 - a recipe.Recipe (imported lazily: pydantic schema)
        """The run's recipe (RUN/recipe.yaml through `recipe.load`), read on first use and kept; RecipeError when it
        no longer validates."""
        if self._recipe is None:
            from segdeploy import recipe as recipe_mod

            self._recipe = recipe_mod.load(self.recipe_path)
        return self._recipe

    def require_finished(self) -> dict[str, Any]:
        """meta.json's contents when the run is complete and its model file exists; else ArtifactError naming the
        command that finishes it (or re-imports it)."""
        info = self.info
        if info.get("status") != "complete":
            raise ArtifactError(f"run {self.root} is unfinished (status {info.get('status')!r}); "
                                f"{continue_hint(self.root)}")
        if not self.model_file.is_file():
            name = self.model_file.relative_to(self.root)
            if "imported_from" in info:
                raise ArtifactError(f"run {self.root} has no {name}; import the model again with `segdeploy import`")
            raise ArtifactError(f"run {self.root} has no {name}; {continue_hint(self.root)}")
        return info

    def exports(self) -> list[Export]:
        """The exported forms present in RUN/export, each checked against its source's hash, with
        its gate record."""
        found, records = [], self.gate_records()
        for form in EXPORT_FORMS.values():
            path = self.export_path(form.key)
            if not path.is_file():
                continue
            stale = ""
            try:
                check_source(path, artifact_meta(path), read_onnx_meta)
            except ArtifactError as exc:
                stale = str(exc)
            found.append(Export(form, path, stale, records.get(form.key)))
        return found

    # -- the gate's records (parity.json: one record per form, kept across export commands)
    @property
    def parity_path(self) -> Path:
        """RUN/export/parity.json: the gate record of each exported form."""
        return self.export_dir / PARITY_FILE

    @property
    def rejected_dir(self) -> Path:
        """Where a failed export leaves its parity report (export/ itself stays as it was)."""
        return self.root / REJECTED_DIR

    def gate_records(self) -> dict[str, dict[str, Any]]:
        """Form key -> the gate record parity.json holds for it ({} when there is none or it is
        unreadable: a record is a report, never a reason to refuse a model)."""
        try:
            doc = json.loads(self.parity_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        forms = doc.get("forms") if isinstance(doc, dict) else None
        return {k: v for k, v in forms.items() if k in EXPORT_FORMS and isinstance(v, dict)} if isinstance(forms, dict) else {}

    def write_gate_records(self, records: dict[str, dict[str, Any]], summary: str, where: Path | None = None) -> dict[str, str]:
        """parity.json (``{"passed": every current record passed, "reference": what the forms were
        gated against (`reference`), "forms": {key: record}}``) and
        parity.md (`summary`), atomically, in RUN/export (or `where`); returns their paths by role."""
        from segdeploy.utils import atomic_path, write_json

        folder = self.export_dir if where is None else where
        folder.mkdir(parents=True, exist_ok=True)
        passed = bool(records) and all(r.get("passed") and not r.get("stale") for r in records.values())
        write_json(folder / PARITY_FILE, {"passed": passed, "reference": self.reference, "forms": records})
        with atomic_path(folder / PARITY_SUMMARY) as tmp:
            tmp.write_text(summary)
        return {"parity": str(folder / PARITY_FILE), "parity_summary": str(folder / PARITY_SUMMARY)}


    # -- speed measurements (speed.json: `segdeploy bench`'s, per machine, what `--backend auto` ranks by)
    @property
    def speed_path(self) -> Path:
        """RUN/export/speed.json: `segdeploy bench`'s measurements per machine."""
        return self.export_dir / SPEED_FILE

    def speed_records(self) -> dict[str, dict[str, Any]]:
        """Machine fingerprint key -> ``{"machine": facts, "measured_at": ISO time, "rows": [{"candidate":
        form key | "torch" | "torch:cuda", "provider", "batch", "size", "images_per_s", "file_size",
        "file_mtime_ns"}]}`` ({} when there is none or it is unreadable: a measurement is a hint,
        never a reason to refuse a model)."""
        try:
            doc = json.loads(self.speed_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        machines = doc.get("machines") if isinstance(doc, dict) else None
        return {k: v for k, v in machines.items() if isinstance(v, dict)} if isinstance(machines, dict) else {}

    def write_speed_record(self, key: str, record: dict[str, Any]) -> Path:
        """Replace this machine's measurements (`key`: its fingerprint) in speed.json, atomically,
        keeping the other machines'."""
        from segdeploy.utils import write_json

        machines = self.speed_records() | {key: record}
        self.export_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.speed_path, {"machines": machines})
        return self.speed_path


def engine_sidecar(engine_path: Path) -> Path:
    """An engine's metadata file (TensorRT engines carry no metadata of their own)."""
    return engine_path.with_name(engine_path.name + ".json")


def artifact_meta(path: Path) -> ModelMeta:
    """The ModelMeta of an ONNX file or an engine (from its sidecar), without loading a runtime."""
    if path.suffix == ".onnx":
        return read_onnx_meta(path)
    side = engine_sidecar(path)
    try:
        return ModelMeta.from_dict(json.loads(side.read_text())["model_meta"], str(side))
    except (OSError, KeyError, json.JSONDecodeError):
        raise ArtifactError(f"engine {path} has no readable {side.name}; rebuild it with `segdeploy export --trt`") from None


def form_of(path: Path) -> ExportForm | None:
    """The export form a file stands for: by its name in RUN/export, else (a renamed copy) by its
    suffix and the longest precision tag in its name (``scene.int8.cpu.onnx`` -> int8_cpu); None
    when the suffix is no form's."""
    path = Path(path)
    for form in EXPORT_FORMS.values():
        if path.name == form.file:
            return form
    matches = [f for f in EXPORT_FORMS.values() if path.suffix in f.suffixes and (not f.tag or f"{f.tag}." in path.name)]
    return max(matches, key=lambda f: len(f.tag), default=None)


def run_file_names() -> frozenset[str]:
    """Every file name segdeploy gives a file of a run (this module's *_FILE/*_CKPT/*_PLOT/*_SUMMARY
    constants, dict/tuple values of them, and the table of export forms' files): what a report
    (`--json`, `--csv`, `--plot`) must never be written over."""
    names: set[str] = {f.file for f in EXPORT_FORMS.values()}
    for name, value in globals().items():
        if name.isupper() and name.endswith(("_FILE", "_FILES", "_CKPT", "_SUMMARY", "_PLOT")):
            values = value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else (value,)
            names.update(v for v in values if isinstance(v, str))
    return frozenset(names)


def owning_run(path: Path) -> Path | None:
    """The run directory whose own file `path` is (a name from `run_file_names` inside a run, its
    export/ or eval/ folders), else None."""
    path = Path(path)
    if path.name not in run_file_names():
        return None
    run = Run.find(path.parent)  # the parent itself, or up to two levels above it
    return None if run is None else run.root
