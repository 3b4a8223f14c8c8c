"""`segdeploy import`: a model trained elsewhere becomes a finished run directory, after which
eval, export (behind the same gate), predict, bench and predict --ray work on it exactly as on a
run segdeploy trained. It becomes a run the way a trained model does, through `artifact.Run`.

What it takes (`detect_format`):

- a PyTorch state dict (``.pth .pt .bin .ckpt``, loaded with ``weights_only=True``, or
  ``.safetensors``), nested or not, wrapper prefixes removed where that makes the keys fit
  (`segdeploy.checkpoint`): rebuilt with the recipe's ``model.arch``/``model.encoder``;
- an smp ``save_pretrained`` folder, or a Hub id ``org/name`` through smp's own loader: its
  config.json decides the architecture, and a recipe that says otherwise is an error;
- a TorchScript archive or a ``torch.export`` program (``.pt2``): the architecture travels in the
  file, which the run keeps as it is; sizes and batch are measured by running it;
- a whole pickled model: refused unless ``trust_pickle`` (then an smp model becomes a state dict,
  any other module TorchScript);
- a foreign ``.onnx``: inspected and wrapped by `segdeploy.foreign_onnx`; it becomes the run's
  FP32 export, the reference its FP16/INT8 exports are gated against.

The recipe gives what the file cannot: classes, palette, bands, normalisation, pixel scale, tile
size, and optionally data. Every tensor the model needs must come from the file: a model that
does not fit fails in one line with the likely cause. The run records where it came from (file
name, sha256, format), and the staleness checks treat that file as the run's source.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy import recipe as recipe_mod
from segdeploy.artifact import META_FILE, ModelMeta, Run, import_record, write_onnx_meta
from segdeploy.errors import DataError, ModelError, RecipeError
from segdeploy.recipe import ModelConfig, Recipe
from segdeploy.utils import atomic_path, check_replaceable, staged_dir, versions, writable_location

FORMAT_NAMES = {
    "state_dict": "PyTorch state dict", "smp_folder": "smp save_pretrained folder",
    "smp_hub": "smp model from the Hugging Face Hub", "torchscript": "TorchScript archive",
    "exported_program": "torch.export program", "onnx": "ONNX model",
}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SMP_CONFIG = "config.json"  # smp's save_pretrained folder (huggingface_hub's CONFIG_NAME)
# smp config keys segdeploy maps itself; the others are the architecture's model.kwargs
SMP_OWN_KEYS = ("_model_class", "encoder_name", "encoder_weights", "in_channels", "classes", "activation")
Log = Callable[[str], None]


@dataclass
class ImportOptions:
    """What `segdeploy import` was given: the recipe, its `--set` overrides, `--data`, whether a pickled object may be
    unpickled (`--trust-pickle`) and `--overwrite`."""
    recipe: Path
    overrides: list[str] = field(default_factory=list)  # --set key=value
    data_root: Path | None = None  # --data
    trust_pickle: bool = False
    overwrite: bool = False


@dataclass
class ImportReport:
    """What an import made: the source file, its detected format, the run directory, how the run holds the model
    (MODEL_FORMATS), the file's sha256, the run's ModelMeta, notes and wall seconds."""
    source: str
    format: str  # a FORMAT_NAMES key (a trusted pickle reports what it held)
    run_dir: Path
    model_format: str  # how the run holds the model (artifact.MODEL_FORMATS)
    sha256: str
    meta: ModelMeta
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON types (`import --json`), with the model's input facts."""
        return {"source": self.source, "format": self.format, "run_dir": str(self.run_dir),
                "model_format": self.model_format, "sha256": self.sha256, "notes": self.notes,
                "classes": self.meta.classes, "input_divisor": self.meta.input_divisor,
                "static_size": self.meta.static_size, "static_batch": self.meta.static_batch,
                "tile_size": self.meta.tile_size, "seconds": round(self.seconds, 2)}


@dataclass
class _Prepared:
    """A model ready to be written as a run: its recipe, measured sizes, and how to save it."""

    model_format: str
    recipe: Recipe
    source_file: Path  # the file recorded as the run's source (sha256, staleness)
    save: Callable[[Run, ModelMeta, Path], None]  # (run being written, its meta, final run dir)
    input_divisor: int
    static_size: int | None = None
    static_batch: int | None = None
    arch: str = ""
    encoder: str = ""
    min_tile: int | None = None  # px, from the architecture's registered facts (None: not known)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ entry point


def import_model(source: str, out: Path, opts: ImportOptions, log: Log = print) -> ImportReport:
    """Import `source` into the run directory `out` (see the module docstring). `log` gets the
    warnings that must come before the work (unpickling); what was done is in the report's notes.

    Nothing is written until the model fits; the run is made in a hidden sibling of `out` and
    renamed into place when complete (an existing run is replaced only with ``overwrite``).
    Raises ModelError / RecipeError (one line) for a source that cannot serve, OutputError for an
    --out that holds something else (`utils.check_replaceable`)."""
    t0 = time.perf_counter()
    out = Path(out)
    check_replaceable(out, opts.overwrite, META_FILE, "run")  # before the work, not after it
    writable_location(out)
    fmt = detect_format(source)
    prepared = PREPARERS[fmt](source, opts, log)
    dtype, splits = data_facts(prepared.recipe)
    meta = _model_meta(prepared, out, fmt, dtype)
    record = import_record(prepared.source_file, out, fmt) | {"source": source}
    _write_run(out, prepared, meta, splits, record, opts.overwrite)
    return ImportReport(source, fmt, out, prepared.model_format, record["sha256"], meta, prepared.notes,
                        time.perf_counter() - t0)


def detect_format(source: str) -> str:
    """The FORMAT_NAMES key of what `source` is, by its contents where the suffix cannot tell."""
    from segdeploy import checkpoint as ck

    path = Path(source)
    if path.is_dir():
        if (path / SMP_CONFIG).is_file():
            return "smp_folder"
        raise ModelError(f"{path} is a folder without {SMP_CONFIG}; import a model file or an smp save_pretrained folder")
    if path.is_file():
        if path.suffix == ".onnx":
            return "onnx"
        if ck.is_exported_program(path):
            return "exported_program"
        if ck.is_torchscript(path):
            return "torchscript"
        if path.suffix in ck.STATE_DICT_SUFFIXES:
            return "state_dict"
        raise ModelError(f"{path}: unknown model file type {path.suffix!r}; segdeploy imports state dicts (.pth .pt "
                         ".bin .ckpt .safetensors), TorchScript, torch.export (.pt2), .onnx, or an smp save_pretrained "
                         "folder")
    if HUB_ID.fullmatch(source):
        return "smp_hub"
    raise ModelError(f"{source} not found (not a file, a folder, or a Hugging Face Hub id org/name)")


# ------------------------------------------------------------------------------------ the recipe

_MISSING = object()


def _get(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _plain(value: Any) -> Any:
    """JSON-normal form for comparing a file's setting with the recipe's (tuples are lists)."""
    return json.loads(json.dumps(value))


def resolve_recipe(opts: ImportOptions, facts: dict[str, Any], label: str, notes: list[str]) -> Recipe:
    """The recipe with --set and --data applied and the file's own settings (`facts`, dotted
    keys) filled in: a recipe key that says otherwise is a RecipeError naming both. smp's
    ``model.kwargs.activation`` is left out (segdeploy works on logits; argmax is unchanged)."""
    raw = recipe_mod.load_raw(opts.recipe, opts.overrides, opts.data_root)
    for key, value in facts.items():
        have = _get(raw, key)
        if have is not _MISSING and _plain(have) != _plain(value):
            raise RecipeError(f"{label} has {key}: {json.dumps(_plain(value))} but the recipe sets "
                              f"{json.dumps(_plain(have))}; remove {key} from the recipe (the file decides) or fix it")
        _set(raw, key, _plain(value))
    kwargs = _get(raw, "model.kwargs")
    if isinstance(kwargs, dict) and "activation" in kwargs:
        notes.append(f"model.kwargs.activation {kwargs.pop('activation')!r} left out: segdeploy works on logits "
                     "(the same argmax; softmax gives the probabilities)")
    rec = recipe_mod.validate(raw, f"{opts.recipe} with {label}")
    if rec.data.mean == "auto" or rec.data.std == "auto":
        raise RecipeError(f"data.mean/std 'auto' in {opts.recipe} describe data segdeploy trains on; for a model "
                          "trained elsewhere set the mean and std it was trained with (e.g. ImageNet's)")
    return rec


def _archive_recipe(rec: Recipe, fmt: str, output: str, notes: list[str]) -> Recipe:
    """A recipe whose model section says what the run holds (the file carries the architecture)."""
    if rec.model.arch != "unet" or rec.model.encoder != "resnet18" or rec.model.kwargs:
        notes.append(f"model.arch/encoder/kwargs in the recipe not used: the {FORMAT_NAMES[fmt]} carries its architecture")
    return rec.model_copy(update={"model": ModelConfig(arch=fmt, encoder="", output=output)})


def data_facts(rec: Recipe) -> tuple[str | None, dict[str, list[str]]]:
    """With data: the pixel type of the first validation image (what the model was fed) and the
    keys of every split found; without: (None, {})."""
    from segdeploy.data.dataset import discover, split_defined
    from segdeploy.data.decode import open_image

    if rec.data.root is None:
        return None, {}
    splits: dict[str, list[Any]] = {}
    for split in ("train", "val", "test"):
        try:
            if split == "val" or split_defined(rec.data, split):
                splits[split] = discover(rec.data, split)
        except DataError:
            if split == "val":
                raise
    with open_image(splits["val"][0].image, rec.data.bands) as first:
        dtype = str(first.dtype)
    return dtype, {k: [s.key for s in v] for k, v in splits.items()}


# ------------------------------------------------------------------------------------ writing the run


def _model_meta(p: _Prepared, out: Path, fmt: str, dtype: str | None) -> ModelMeta:
    rec, cls = p.recipe, p.recipe.classes
    tile = p.static_size or rec.data.tile_size
    if tile % p.input_divisor:
        tile += p.input_divisor - tile % p.input_divisor
        p.notes.append(f"tile size {rec.data.tile_size} rounded up to {tile}, a multiple of the input divisor "
                       f"{p.input_divisor}")
    return ModelMeta(
        classes=cls.names, palette=[list(c) for c in cls.display_palette()], mean=list(rec.data.mean),
        std=list(rec.data.std), max_pixel_value=rec.data.max_pixel_value, bands=rec.data.bands,
        input_divisor=p.input_divisor, tile_size=tile, ignore_index=cls.ignore_index, static_size=p.static_size,
        static_batch=p.static_batch, min_tile_size=p.min_tile, hierarchy=cls.hierarchy, arch=p.arch, encoder=p.encoder,
        recipe_digest=rec.digest(), input_dtype=dtype, source=import_record(p.source_file, out, fmt),
        versions=versions(), extra={"import": {"format": fmt, "file": p.source_file.name, **p.extra,
                                               "notes": p.notes}})


def _write_run(out: Path, p: _Prepared, meta: ModelMeta, splits: dict[str, list[str]], record: dict,
               overwrite: bool) -> None:
    """Make the run through `Run` in a hidden sibling (`utils.staged_dir`: the outputs rule), put
    in place when complete; an earlier run is replaced only with `overwrite`."""
    with staged_dir(out, overwrite, META_FILE, "run") as work:
        run = Run.create(work, p.recipe.to_yaml(), splits, meta)
        p.save(run, meta, out)
        run.write_status("complete", meta, model_format=p.model_format, imported_from=record)


# ------------------------------------------------------------------------------------ state dicts


def _prepare_state_dict(source: str, opts: ImportOptions, log: Log) -> _Prepared:
    """A state dict file, or (trusted) a pickled whole model or checkpoint."""
    from segdeploy import checkpoint as ck

    path = Path(source)
    obj = ck.read_object(path, opts.trust_pickle, warn=lambda m: log(f"warning: {m}"))
    module = _find_module(obj)
    if module is not None:
        return _prepare_module(module, path, opts, log)
    found = ck.find_state_dict(obj, path)
    notes = [f"weights found under {found.where}"] if found.nested else []
    rec = resolve_recipe(opts, {}, path.name, notes)
    return _prepare_weights(found.tensors, path, rec, notes)


def _find_module(obj: Any) -> Any:
    """A whole nn.Module in what a (trusted) pickle held, at the top or under a container key."""
    from torch import nn

    from segdeploy.checkpoint import CONTAINER_KEYS

    for _ in range(3):
        if isinstance(obj, nn.Module):
            return obj
        if not isinstance(obj, dict):
            return None
        obj = next((obj[k] for k in CONTAINER_KEYS if k in obj), None)
    return None


def _prepare_weights(tensors: dict[str, Any], path: Path, rec: Recipe, notes: list[str]) -> _Prepared:
    """Rebuild the recipe's architecture and fill every tensor from the file (strictly)."""
    from segdeploy.models import facts

    model, rec = fit_weights(tensors, path.name, rec, notes)
    arch = facts(rec.model, model)
    return _Prepared("weights", rec, path, lambda run, meta, out: run.save_weights(model.state_dict()),
                     arch.input_divisor, arch.static_size, arch=rec.model.arch, encoder=rec.model.encoder,
                     min_tile=arch.min_tile, notes=notes)


def fit_weights(tensors: dict[str, Any], label: str, rec: Recipe, notes: list[str]):  # noqa: ANN201 - (nn.Module, Recipe)
    """The recipe's model with every tensor from `tensors`, in eval mode, and the recipe (with
    ``model.output: sigmoid`` when the file's head has one channel for two classes).

    Raises ModelError: how many tensors matched, the first missing / unexpected / wrong-shaped
    one, and the likely cause (the head's classes, the bands, the architecture the keys look like)."""
    from segdeploy import checkpoint as ck
    from segdeploy.models import build_model, inner_network

    def attempt(cfg: ModelConfig):  # noqa: ANN202
        model = build_model(cfg, rec.data.bands, rec.classes.num_classes)
        return model, ck.match_state_dict(tensors, inner_network(model).state_dict())

    cfg = rec.model.model_copy(update={"weights": None})
    model, match = attempt(cfg)
    one_channel = any(got[:1] == (1,) and want[:1] == (2,) for _, got, want in match.mismatched)
    if not match.complete and cfg.output == "logits" and rec.classes.num_classes == 2 and one_channel:
        sig_model, sig_match = attempt(cfg.model_copy(update={"output": "sigmoid"}))
        if sig_match.complete:
            model, match, cfg = sig_model, sig_match, cfg.model_copy(update={"output": "sigmoid"})
            notes.append("the head has one channel for two classes: read as a sigmoid (model.output: sigmoid, "
                         "logits [0, z])")
    if not match.complete:
        cause = ck.likely_cause(match, rec.classes.num_classes, rec.data.bands, tensors, cfg.encoder)
        raise ModelError(f"{label} does not fit model.arch={cfg.arch} model.encoder={cfg.encoder}: {match.summary()}"
                         f"{'; likely cause: ' + cause if cause else ''}")
    inner_network(model).load_state_dict(match.loaded, strict=False)
    notes += [f"all {match.matched} tensors loaded"] + match.notes()
    return model.eval(), rec.model_copy(update={"model": cfg})


# ------------------------------------------------------------------------------------ smp folders and the Hub


def _prepare_smp(source: str, opts: ImportOptions, log: Log) -> _Prepared:
    """smp's own loader (`smp.from_pretrained`) for a save_pretrained folder or a Hub id; the
    config it saved decides the architecture."""
    import segmentation_models_pytorch as smp

    from segdeploy.models import fail_fast_when_offline

    hub = not Path(source).is_dir()
    try:
        with fail_fast_when_offline(), contextlib.redirect_stdout(io.StringIO()):  # smp prints where it loads from
            model = smp.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - any failure is the source's
        names = {c.__name__ for c in type(exc).__mro__}
        if hub and names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "Timeout"}:
            raise ModelError(f"{source} is no file or folder here, and as a Hugging Face Hub id it cannot be fetched: "
                             f"offline and not in the local cache ({type(exc).__name__}); where there is network, "
                             f"`huggingface-cli download {source}` caches it, or smp's save_pretrained writes a folder "
                             "to import") from None
        raise ModelError(f"smp cannot load {source}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    return _prepare_smp_model(model, _smp_weights_file(source, hub), source, opts)


def _smp_weights_file(source: str, hub: bool) -> Path:
    """The file recorded as an smp model's source: its weights (else its config), in the folder or
    in the Hugging Face cache."""
    from huggingface_hub import constants, try_to_load_from_cache

    names = (constants.SAFETENSORS_SINGLE_FILE, constants.PYTORCH_WEIGHTS_NAME, SMP_CONFIG)
    if not hub:
        return next((Path(source) / n for n in names if (Path(source) / n).is_file()))
    for name in names:
        cached = try_to_load_from_cache(source, name)
        if isinstance(cached, str):
            return Path(cached)
    raise ModelError(f"smp loaded {source} but its files are not in the Hugging Face cache; import a save_pretrained "
                     "folder instead")


def _prepare_smp_model(model: Any, source_file: Path, label: str, opts: ImportOptions) -> _Prepared:
    import segmentation_models_pytorch as smp

    config = dict(model.config)
    arch = {c.__name__: k for k, c in smp.MODEL_ARCHITECTURES_MAPPING.items()}[type(model).__name__]
    facts = {"model.arch": arch, "model.encoder": config["encoder_name"], "data.bands": config["in_channels"]}
    facts |= {f"model.kwargs.{k}": v for k, v in config.items() if k not in SMP_OWN_KEYS}
    notes: list[str] = []
    rec = resolve_recipe(opts, facts, f"{label} (smp config)", notes)
    classes, activation = int(config["classes"]), config.get("activation")
    if classes == 1 and rec.classes.num_classes == 2:
        rec = rec.model_copy(update={"model": rec.model.model_copy(update={"output": "sigmoid"})})
        notes.append("one output channel for two classes: read as a sigmoid (model.output: sigmoid, logits [0, z])")
    elif classes != rec.classes.num_classes:
        raise RecipeError(f"{label}'s segmentation head has {classes} classes, the recipe has "
                          f"{rec.classes.num_classes} (classes.names)")
    if activation not in (None, "identity"):
        notes.append(f"smp activation {activation!r} left out: segdeploy works on logits (the same argmax)")
    return _prepare_weights(dict(model.state_dict()), source_file, rec, notes)


# ------------------------------------------------------------------------------------ archives (TorchScript, .pt2)


def _prepare_archive(source: str, opts: ImportOptions, log: Log, fmt: str = "",
                     record: Path | None = None) -> _Prepared:
    """A TorchScript or torch.export archive: kept as it is; sizes and batch measured by running it."""
    from segdeploy import checkpoint as ck

    path = Path(source)
    fmt = fmt or ("exported_program" if ck.is_exported_program(path) else "torchscript")
    notes: list[str] = []
    rec = resolve_recipe(opts, {}, path.name, notes)
    module, example = _load_archive(path, fmt)
    probe = probe_module(module, rec.data.bands, rec.classes.num_classes, rec.data.tile_size, example)
    notes += [f"measured: {probe.describe()}", *probe.notes]
    rec = _archive_recipe(rec, fmt, probe.output, notes)
    return _Prepared(fmt, rec, record or path, lambda run, meta, out: run.save_archive(path, fmt), probe.divisor,
                     probe.static_size, probe.static_batch, arch=fmt, notes=notes)


def _load_archive(path: Path, fmt: str):  # noqa: ANN202 - (nn.Module, example input shape or None)
    import warnings

    import torch

    from segdeploy.models import ExportedProgramModule

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice: TorchScript is what was given
            if fmt == "torchscript":
                return torch.jit.load(str(path), map_location="cpu").eval(), None
            program = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure is the file's
        raise ModelError(f"cannot load {path} as {FORMAT_NAMES[fmt]}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]}") from None
    shape = None
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs:
            val = node.meta.get("val")
            shape = tuple(d if isinstance(d, int) else None for d in val.shape) if val is not None else None
            break
    return ExportedProgramModule(program.module()), shape


def _prepare_module(module: Any, path: Path, opts: ImportOptions, log: Log) -> _Prepared:
    """A (trusted) unpickled whole model: an smp model becomes weights; any other module is
    converted to TorchScript (scripted, else traced), which the run keeps: no class needed later."""
    import segmentation_models_pytorch as smp
    import torch

    if type(module).__name__ in {c.__name__ for c in smp.MODEL_ARCHITECTURES_MAPPING.values()} and hasattr(module, "config"):
        return _prepare_smp_model(module.eval(), path, path.name, opts)
    rec = recipe_mod.load(opts.recipe, opts.overrides, opts.data_root)
    module = module.eval()
    try:
        scripted, how = torch.jit.script(module), "scripted"
    except Exception:  # noqa: BLE001 - not scriptable: trace it
        example = torch.zeros(1, rec.data.bands, rec.data.tile_size, rec.data.tile_size)
        with torch.inference_mode(False), torch.no_grad():
            scripted = torch.jit.trace(module, example)
        how = f"traced at 1×{rec.data.bands}×{rec.data.tile_size}×{rec.data.tile_size}"
    tmp = Path(tempfile.mkdtemp(prefix=".segdeploy-import-")) / "model.ts"
    atexit.register(shutil.rmtree, tmp.parent, True)  # the run keeps its own copy
    scripted.save(str(tmp))
    prepared = _prepare_archive(str(tmp), opts, log, "torchscript", record=path)
    prepared.notes.insert(0, f"the pickled {type(module).__name__} was converted to TorchScript ({how}); the run "
                             "keeps that, so no Python class is needed later")
    return prepared


@dataclass
class ModuleProbe:
    """What running a module told: sizes, batch, and what its output means."""

    divisor: int
    static_size: int | None
    static_batch: int | None
    output: str  # logits | sigmoid (model.output)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """The measured input sizes (static or any multiple of the divisor), fixed batch and output, in words."""
        sizes = f"static {self.static_size}²" if self.static_size else f"any multiple of {self.divisor}"
        batch = f", batch fixed at {self.static_batch}" if self.static_batch else ""
        return f"input sizes: {sizes}{batch}; output: {self.output}"


def probe_module(module: Any, bands: int, num_classes: int, tile: int,
                 example: tuple[int | None, ...] | None = None) -> ModuleProbe:
    """Run a module (TorchScript, torch.export, any nn.Module) on seeded noise: the batch and
    sizes it takes (the divisor: the smallest step, up to 128, at which it still gives an output
    of the input's size), and whether its output is C logits or one sigmoid channel.

    Raises ModelError when it does not run at the tile size, or its output does not fit the recipe."""
    example = example or (None,) * 4
    fixed_size = example[2] if isinstance(example[2], int) and example[2] == example[3] else None
    size = fixed_size or tile
    batches = [example[0]] if isinstance(example[0], int) else [2, 1]
    y, batch, error = None, 0, ""
    for batch in batches:
        y, error = _run_module(module, batch, bands, size)
        if y is not None:
            break
    if y is None:
        raise ModelError(f"the model does not run on a {batch}×{bands}×{size}×{size} input ({error}); check data.bands "
                         "and data.tile_size")
    probe = ModuleProbe(0, fixed_size, batch if (len(batches) == 1 or batch == 1) else None,
                        _module_output(y, batch, size, num_classes))
    if probe.static_batch and len(batches) > 1:
        probe.notes.append("a batch of 2 fails inside the model: batch fixed at 1")
    if y.shape[1] > 1 and bool((y >= 0).all() and (y <= 1).all()) and np.allclose(y.sum(1), 1, atol=1e-3):
        probe.notes.append("the model outputs probabilities (a softmax inside): argmax is right, but predict --probs "
                           "would soften them again; return logits for exact confidences")
    probe.divisor = _static_divisor(size) if fixed_size else _module_divisor(module, bands, size, batch)
    if not probe.divisor:
        probe.static_size, probe.divisor = size, _static_divisor(size)
        probe.notes.append(f"runs at {size}² but at none of the sizes probed above it: static at {size}")
    return probe


def _static_divisor(size: int) -> int:
    """A static model's divisor: tiles are padded to multiples of it (any that divides the size)."""
    import math

    return math.gcd(size, 32)


def _run_module(module: Any, batch: int, bands: int, size: int) -> tuple[np.ndarray | None, str]:
    import torch

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((batch, bands, size, size)).astype(np.float32))
    try:
        with torch.inference_mode():
            y = module(x)
    except Exception as exc:  # noqa: BLE001 - a refused size is an answer
        return None, str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    if not isinstance(y, torch.Tensor):
        raise ModelError(f"the model returns a {type(y).__name__}; segdeploy needs one N×C×H×W tensor of scores")
    return y.float().numpy(), ""


def _module_output(y: np.ndarray, batch: int, size: int, num_classes: int) -> str:
    if y.ndim != 4 or y.shape[0] != batch or y.shape[2:] != (size, size):
        raise ModelError(f"the model's output is {list(y.shape)} for a {batch}×…×{size}×{size} input; segdeploy needs "
                         "N×C×H×W scores of the input's size")
    if y.shape[1] == num_classes:
        return "logits"
    if y.shape[1] == 1 and num_classes == 2:
        if y.min() >= 0 and y.max() <= 1:
            raise ModelError("the model outputs one channel in [0, 1] (it ends in a sigmoid); save it without the final "
                             "sigmoid (return the logit z) and import that")
        return "sigmoid"
    raise ModelError(f"the model outputs {y.shape[1]} classes, the recipe has {num_classes} (classes.names)")


def _module_divisor(module: Any, bands: int, size: int, batch: int) -> int:
    from segdeploy.foreign_onnx import DIVISOR_STEPS

    for step in DIVISOR_STEPS:
        if size % step:
            continue
        y, _ = _run_module(module, batch, bands, size + step)
        if y is not None and y.ndim == 4 and y.shape[2:] == (size + step, size + step):
            return step
    return 0


# ------------------------------------------------------------------------------------ foreign ONNX


def _prepare_onnx(source: str, opts: ImportOptions, log: Log) -> _Prepared:
    """A foreign ONNX model, wrapped (`foreign_onnx.make_deployable`); the run's FP32 export."""
    from segdeploy.foreign_onnx import make_deployable

    path = Path(source)
    notes: list[str] = []
    rec = resolve_recipe(opts, {}, path.name, notes)
    proto, plan = make_deployable(path, rec.data.bands, rec.classes.num_classes, rec.data.tile_size, notes.append)
    notes += plan.actions
    rec = _archive_recipe(rec, "onnx", "logits", notes)

    def save(run: Run, meta: ModelMeta, out: Path) -> None:
        import onnx

        onnx_meta = replace(meta, source=import_record(path, Run(out).export_dir, "onnx"))
        write_onnx_meta(proto, onnx_meta, {"import": {**meta.extra["import"], "onnx_plan": plan.to_dict()}})
        target = run.export_path("fp32")
        target.parent.mkdir(exist_ok=True)
        with atomic_path(target) as tmp:
            onnx.save(proto, str(tmp))

    return _Prepared("onnx", rec, path, save, plan.input_divisor, plan.static_size, plan.static_batch, arch="onnx",
                     notes=notes, extra={"onnx_plan": plan.to_dict()})


PREPARERS: dict[str, Callable[[str, ImportOptions, Log], _Prepared]] = {
    "state_dict": _prepare_state_dict, "smp_folder": _prepare_smp, "smp_hub": _prepare_smp,
    "torchscript": _prepare_archive, "exported_program": _prepare_archive, "onnx": _prepare_onnx,
}


# ------------------------------------------------------------------------------------ does it do what the user thinks


@dataclass
class PredictionCheck:
    """The verdict on an imported model's predictions against the val masks."""

    status: str  # ok | warning | undecided
    message: str
    pixel_accuracy: float | None = None
    kappa: float | None = None  # Cohen's kappa: agreement beyond chance

    def to_dict(self) -> dict[str, Any]:
        """The check as JSON types: status, message, pixel accuracy and Cohen's kappa against the masks."""
        return {"status": self.status, "message": self.message, "pixel_accuracy": self.pixel_accuracy,
                "kappa": self.kappa}


CAUSES = ("check the usual causes: normalisation (data.mean/std), pixel scale (data.max_pixel_value), "
          "band order (data.bands, --bands) and BGR vs RGB")
ONE_CLASS_SHARE = 0.98  # "nearly all one class"
MIN_KAPPA = 0.1  # below: slight or no agreement beyond chance (Landis & Koch 1977 call 0-0.2 "slight")
MIN_PIXELS = 1000


def check_predictions(matrix: np.ndarray, names: list[str]) -> PredictionCheck:
    """Judge a confusion matrix (rows: truth, columns: prediction) of an imported model on the
    val split: predictions nearly all one class (≥ 98% of pixels) while the masks are not, or
    agreement with the masks no better than chance (Cohen's kappa < 0.1), are warnings naming the
    usual causes; too few pixels, or masks that are themselves nearly one class, cannot decide."""
    m = np.asarray(matrix, dtype=np.float64)
    total = m.sum()
    if total < MIN_PIXELS:
        return PredictionCheck("undecided", f"cannot tell whether the model works: only {int(total)} labelled pixels")
    truth, pred = m.sum(1) / total, m.sum(0) / total
    accuracy = float(np.trace(m) / total)
    chance = float((truth * pred).sum())
    kappa = (accuracy - chance) / (1 - chance) if chance < 1 else 0.0
    if truth.max() >= ONE_CLASS_SHARE:
        return PredictionCheck("undecided", f"cannot tell whether the model works: {truth.max():.1%} of the val mask "
                               f"pixels are {names[int(truth.argmax())]!r}", accuracy, kappa)
    if pred.max() >= ONE_CLASS_SHARE:
        return PredictionCheck("warning", f"the model predicts {names[int(pred.argmax())]!r} on {pred.max():.1%} of the "
                               f"val pixels (the masks: {truth[int(pred.argmax())]:.1%}); {CAUSES}", accuracy, kappa)
    if kappa < MIN_KAPPA:
        return PredictionCheck("warning", f"the model agrees with the val masks hardly better than chance (pixel "
                               f"accuracy {accuracy:.1%}, {chance:.1%} by chance, Cohen's kappa {kappa:.2f}); {CAUSES}",
                               accuracy, kappa)
    return PredictionCheck("ok", f"predictions agree with the val masks (pixel accuracy {accuracy:.1%}, Cohen's kappa "
                           f"{kappa:.2f})", accuracy, kappa)
