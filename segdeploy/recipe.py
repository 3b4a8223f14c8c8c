"""The recipe: one typed schema for a whole run, serialised as YAML.

CLI flags (``--set a.b=c``, ``--data``) override it; the resolved recipe is saved with every run,
so a run directory can always be reproduced and every later verb knows what it is looking at.
Errors speak in the user's words: ``train.lr must be > 0 (got -1) in recipe.yaml``.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from segdeploy.classes import background_index, default_palette, hierarchy_levels
from segdeploy.errors import RecipeError

RGB = tuple[int, int, int]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CACHE_DEFAULT_MB = 1024  # data.cache: true


class Strict(BaseModel):
    """Base of every recipe section: unknown keys are errors (with did-you-mean), assignments are validated."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClassesConfig(Strict):
    """Class names in label order; palette colours for RGB masks and for display."""

    names: list[str] = Field(min_length=2)
    palette: list[RGB] | None = None
    # parent -> children; leaves are entries of `names`. Metrics are reported per depth.
    hierarchy: dict[str, list[str]] | None = None
    ignore_index: int = 255
    # the class pictures leave unpainted (overlays show the photo there): a name or an index;
    # None: a class named "background" (any case) if there is one, else every class is painted
    background: str | int | None = None

    @model_validator(mode="after")
    def _check(self) -> ClassesConfig:
        if len(set(self.names)) != len(self.names):
            raise ValueError("classes.names has duplicates")
        if isinstance(self.background, int) and not 0 <= self.background < len(self.names):
            raise ValueError(f"classes.background {self.background} is not a class index (0..{len(self.names) - 1})")
        if isinstance(self.background, str) and self.background not in self.names:
            raise ValueError(f"classes.background {self.background!r} is not one of classes.names {self.names}")
        if self.palette is not None:
            if len(self.palette) != len(self.names):
                raise ValueError(
                    f"classes.palette has {len(self.palette)} colours for {len(self.names)} names"
                )
            if len(set(self.palette)) != len(self.palette):
                raise ValueError("classes.palette has duplicate colours")
            for c in self.palette:
                if any(not 0 <= v <= 255 for v in c):
                    raise ValueError(f"classes.palette colour {list(c)} is outside 0..255")
        if 0 <= self.ignore_index < len(self.names):
            raise ValueError(
                f"classes.ignore_index {self.ignore_index} collides with class {self.names[self.ignore_index]!r}"
            )
        if self.hierarchy:
            hierarchy_levels(self.names, self.hierarchy)  # raises ValueError on a bad tree
        return self

    @property
    def num_classes(self) -> int:
        """The number of classes C (len(names))."""
        return len(self.names)

    def background_index(self) -> int | None:
        """The index pictures leave unpainted (see `background`), or None."""
        return background_index(self.names, self.background)

    def display_palette(self) -> list[RGB]:
        """The RGB colour (0..255) of each class: the recipe's palette, else matplotlib's tab20 in order
        (`classes.default_palette`)."""
        if self.palette is not None:
            return [tuple(c) for c in self.palette]  # type: ignore[misc]
        return default_palette(self.num_classes)


class SplitConfig(Strict):
    """Where the train/val/test split comes from."""

    mode: Literal["folders", "lists", "ratio"] = "folders"
    # split -> list file (one key per line), relative to data.root; for mode=lists
    lists: dict[str, str] = Field(default_factory=dict)
    # split -> fraction; for mode=ratio (seeded, stable across runs)
    ratios: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        if self.mode == "lists" and "train" not in self.lists:
            raise ValueError("data.split.lists must name a 'train' list file when mode is 'lists'")
        if self.mode == "ratio" and abs(sum(self.ratios.values()) - 1.0) > 1e-6:
            raise ValueError(f"data.split.ratios must sum to 1 (got {sum(self.ratios.values()):g})")
        return self


class DataConfig(Strict):
    """Files are paired by key: image = image_dir/KEY+image_suffix, mask = mask_dir/KEY+mask_suffix.

    ``{split}`` in a directory is replaced by the split name (mmseg's img_dir/train layout).
    """

    root: str | None = None
    image_dir: str = "images/{split}"
    mask_dir: str = "masks/{split}"
    image_suffix: str = ".png"
    mask_suffix: str = ".png"
    mask_encoding: Literal["index", "palette", "binary"] = "index"
    split: SplitConfig = Field(default_factory=SplitConfig)
    bands: int = Field(3, ge=1, le=64)
    max_pixel_value: float = Field(255.0, gt=0)
    mean: list[float] | Literal["auto"] = Field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] | Literal["auto"] = Field(default_factory=lambda: list(IMAGENET_STD))
    tile_size: int = Field(256, ge=16, description="training crop and default inference tile")
    # decoded training and validation samples (image and mask arrays) kept in memory across epochs,
    # first read first kept, up to a limit: true = 1024 MB, a number = that many MB, false or 0 = none.
    # Samples past the limit are decoded again every epoch; training says how many fit.
    cache: bool | Annotated[int, Field(ge=0)] = True
    # random data.tile_size crops taken from each training image per epoch (with augment.crop):
    # "auto" = ceil(H·W / tile²) for an H×W image, so an epoch sees about as many pixels as the
    # split holds (one crop of a 2448² image at 256² showed 1% of it); an int = that many for every image
    crops_per_image: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"

    @property
    def cache_bytes(self) -> int:
        """The cache limit in bytes (0: no cache)."""
        if isinstance(self.cache, bool):
            return CACHE_DEFAULT_MB * 2**20 if self.cache else 0
        return int(self.cache) * 2**20

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        for name in ("mean", "std"):
            v = getattr(self, name)
            if isinstance(v, list) and len(v) != self.bands:
                raise ValueError(f"data.{name} has {len(v)} values for {self.bands} bands")
        if isinstance(self.std, list) and any(s <= 0 for s in self.std):
            raise ValueError("data.std values must be > 0")
        return self


class ModelConfig(Strict):
    """`model:` — architecture and encoder names (ARCHITECTURES, smp/timm encoders), initial weights (None, "imagenet"
    or a local file), how many encoder stages train, builder kwargs, and whether the network's output is logits or
    one sigmoid channel."""
    arch: str = "unet"
    encoder: str = "resnet18"
    # None: random init; "imagenet": download (online); a path: local .safetensors/.pth state dict
    weights: str | None = None
    # None: whole encoder trains; N: only the last N encoder stages train (0 freezes it all)
    trainable_encoder_stages: int | None = Field(None, ge=0)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    # sigmoid: the network has one output channel z with P(class 1) = sigmoid(z) (two classes);
    # segdeploy reads it as the logits [0, z] (softmax gives [1 - sigmoid(z), sigmoid(z)])
    output: Literal["logits", "sigmoid"] = "logits"


class LossTerm(Strict):
    """One term of `loss:` — a LOSSES name, its weight in the sum, per-class weights (a list, "auto" from pixel
    counts, or none) and its params."""
    name: str
    weight: float = Field(1.0, gt=0)
    class_weights: list[float] | Literal["auto"] | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class OptimizerConfig(Strict):
    """`optimizer:` — adam, adamw or sgd, learning rate, weight decay, SGD momentum."""
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)


class ScheduleConfig(Strict):
    """`schedule:` — the learning-rate schedule over epochs (none, cosine, cosine_restarts, poly, onecycle) and its
    parameters."""
    name: Literal["none", "cosine", "cosine_restarts", "poly", "onecycle"] = "cosine"
    min_lr: float = Field(0.0, ge=0)
    restart_epochs: int = Field(10, ge=1, description="cosine_restarts: epochs in the first cycle")
    restart_mult: int = Field(1, ge=1)
    power: float = Field(0.9, gt=0, description="poly exponent")


class AugmentConfig(Strict):
    """`augment:` — flips (probabilities), 90° rotations, random crops to data.tile_size, brightness/contrast jitter."""
    hflip: float = Field(0.5, ge=0, le=1)
    vflip: float = Field(0.0, ge=0, le=1)
    rot90: bool = False
    crop: bool = Field(True, description="random crops of data.tile_size (padded with ignore_index)")
    brightness: float = Field(0.0, ge=0, le=1)
    contrast: float = Field(0.0, ge=0, le=1)


class TrainConfig(Strict):
    """`train:` — epochs, batch size, loader workers, device, mixed precision, channels-last, gradient clipping,
    early-stopping patience (epochs), a wall-time limit (minutes), the seed and deterministic mode."""
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1)
    num_workers: int | Literal["auto"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="mixed precision on CUDA")
    channels_last: bool = Field(True, description="channels-last memory format on CUDA")
    grad_clip: float | None = Field(None, gt=0)
    early_stopping: int | None = Field(None, ge=1, description="patience in epochs")
    max_minutes: float | None = Field(None, gt=0, description="stop after this wall time")
    seed: int = Field(0, description="seeds the initial weights, the data order and the augmentation")
    deterministic: bool = Field(False, description="PyTorch's deterministic algorithms on CUDA (slower); CPU runs "
                                "repeat bit for bit without it")


class EvalConfig(Strict):
    """`eval:` — whether class 0 is left out of the means, and how many overlay pictures eval draws."""
    exclude_background: bool = False
    overlays: int = Field(4, ge=0)


class ParityConfig(Strict):
    """Thresholds of the export gate (fractions of pixels; IoU drop in points)."""

    fp32_agreement: float = Field(0.9999, gt=0, le=1)
    fp16_agreement: float = Field(0.999, gt=0, le=1)
    max_class_iou_drop: float = Field(0.5, ge=0)
    samples: int = Field(16, ge=1)
    min_fp16_share: float = Field(0.5, ge=0, le=1, description="least fraction of FLOPs an FP16 export must run "
                                  "in FP16 after the fallback; below it export fails instead of shipping a mostly-FP32 model")
    int8_agreement: float = Field(0.99, gt=0, le=1)
    int8_class_iou_drop: float = Field(1.0, ge=0, description="IoU points any class may lose in INT8")
    min_int8_share: float = Field(0.5, ge=0, le=1, description="least fraction of FLOPs an INT8 export must "
                                  "compute quantized after the fallback")

    def thresholds(self, precision: str) -> GateThresholds:
        """The gate's thresholds for a candidate of `precision` (fp32 | fp16 | int8), with the recipe
        keys that set them. Raises ValueError for another precision."""
        if precision == "int8":
            return GateThresholds(self.int8_agreement, self.int8_class_iou_drop, self.min_int8_share,
                                  ("parity.int8_agreement", "parity.int8_class_iou_drop", "parity.min_int8_share"))
        if precision == "fp16":
            return GateThresholds(self.fp16_agreement, self.max_class_iou_drop, self.min_fp16_share,
                                  ("parity.fp16_agreement", "parity.max_class_iou_drop", "parity.min_fp16_share"))
        if precision == "fp32":
            return GateThresholds(self.fp32_agreement, self.max_class_iou_drop, None,
                                  ("parity.fp32_agreement", "parity.max_class_iou_drop", ""))
        raise ValueError(f"no gate thresholds for precision {precision!r}")


@dataclass(frozen=True)
class GateThresholds:
    """What one candidate must meet to pass the export gate (recipe `parity:`; docs/EXPORT.md).

    min_agreement: least fraction of valid pixels whose argmax equals the reference's (0..1);
    max_class_iou_drop: most IoU points (0..100) any class may lose against ground truth;
    min_reduced_share: least fraction of the FLOPs that must run in reduced precision (None for
    FP32); keys: the recipe keys that set the three, for messages."""

    min_agreement: float
    max_class_iou_drop: float
    min_reduced_share: float | None = None
    keys: tuple[str, str, str] = ("", "", "")

    def to_dict(self) -> dict[str, Any]:
        """The thresholds as JSON types (recorded in each form's gate record)."""
        return {"min_agreement": self.min_agreement, "max_class_iou_drop": self.max_class_iou_drop,
                "min_reduced_share": self.min_reduced_share, "keys": list(self.keys)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateThresholds:
        """From `to_dict`'s output (a gate record in parity.json). Raises KeyError/TypeError when malformed."""
        return cls(float(d["min_agreement"]), float(d["max_class_iou_drop"]),
                   None if d.get("min_reduced_share") is None else float(d["min_reduced_share"]),
                   tuple(d.get("keys") or ("", "", "")))  # type: ignore[arg-type]


class Recipe(Strict):
    """The whole recipe, validated: data, classes, model, loss terms, optimizer, schedule, augment, train, eval and
    parity sections. `load` reads one from YAML (with `extends:` and `--set`); RecipeError for anything invalid,
    naming the key."""
    name: str = "run"
    description: str = ""
    data: DataConfig = Field(default_factory=DataConfig)
    classes: ClassesConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: list[LossTerm] = Field(default_factory=lambda: [LossTerm(name="ce")])
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    parity: ParityConfig = Field(default_factory=ParityConfig)

    @field_validator("loss", mode="before")
    @classmethod
    def _loss_shorthand(cls, v: Any) -> Any:
        """``loss: dice`` and ``loss: [ce, dice]`` are shorthands for ``[{name: ...}]``."""
        if isinstance(v, (str, dict)):
            v = [v]
        if isinstance(v, list):
            return [{"name": t} if isinstance(t, str) else t for t in v]
        return v

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if self.data.mask_encoding == "palette" and self.classes.palette is None:
            raise ValueError("classes.palette is required when data.mask_encoding is 'palette'")
        if self.data.mask_encoding == "binary" and self.classes.num_classes != 2:
            raise ValueError("data.mask_encoding 'binary' needs exactly 2 classes.names")
        return self

    def to_yaml(self) -> str:
        """The resolved recipe as YAML (what RUN/recipe.yaml holds), keys in schema order."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def digest(self) -> str:
        """Stable hash of what determines the model's behaviour (not paths or epochs)."""
        d = self.model_dump(mode="json", include={"data", "classes", "model"})
        d["data"].pop("root", None)
        d["classes"].pop("background", None)  # display only: pictures, not the model
        d["data"].pop("crops_per_image", None)  # how much of the data an epoch sees, like train.epochs
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# loading, overrides and error wording


def _field_names_at(loc: tuple[Any, ...]) -> list[str]:
    """Valid keys of the schema object that `loc` points into (for did-you-mean)."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        field = model.model_fields.get(part)
        if field is None:
            break
        model = _inner_model(field.annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _inner_model(ann: Any) -> Any:
    """The BaseModel inside Optional[...]/list[...] annotations, else the annotation."""
    args = getattr(ann, "__args__", None)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in args or ():
        m = _inner_model(a)
        if isinstance(m, type) and issubclass(m, BaseModel):
            return m
    return ann


UNION_MEMBER = re.compile(r"^(function-|constrained-|literal\[|list\[|dict\[|tuple\[|nullable\[)|^(bool|int|float|str|none)$")


def _format_error(err: ValidationError, source: str) -> str:
    """One line for the first failing key. A key whose type is a union (``data.cache: bool | int``)
    fails once per member; the member's tag is left out of the key's name, and a constraint the
    value broke (``≥ 0``) is said rather than another member's type mismatch."""
    def key(e: Any) -> tuple:
        return tuple(p for p in e["loc"] if not (isinstance(p, str) and UNION_MEMBER.search(p)))

    errors = err.errors()
    same = [e for e in errors if key(e) == key(errors[0])]
    e = next((e for e in same if not e["type"].endswith(("_type", "_parsing")) and e["type"] != "literal_error"), same[0])
    loc = key(e)
    dotted = ".".join(str(p) for p in loc) or "recipe"
    kind = e["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        prefix = ".".join(str(p) for p in loc[:-1])
        close = difflib.get_close_matches(key, _field_names_at(loc[:-1]), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(repr(f'{prefix}.{c}' if prefix else c) for c in close)}?)" if close else ""
        if not hint:  # a right key in the wrong section: train.lr -> optimizer.lr
            homes = [f"{sec}.{key}" for sec in Recipe.model_fields if key in _field_names_at((sec,))]
            hint = f" (did you mean {', '.join(repr(h) for h in homes)}?)" if homes else ""
        return f"unknown key {dotted!r} in {source}{hint}"
    if kind == "missing":
        return f"{dotted} is required in {source}"
    if kind == "value_error":
        msg = str(e["msg"]).removeprefix("Value error, ")
        return f"{msg} in {source}"
    got = e.get("input")
    got_s = json.dumps(got) if isinstance(got, (int, float, str, bool, type(None))) else type(got).__name__
    msg = str(e["msg"])
    msg = msg[0].lower() + msg[1:]
    words = [str(o["ctx"]["expected"]) for o in same if o is not e and o["type"] == "literal_error" and "ctx" in o]
    msg += "".join(f", or {w}" for w in words)  # crops_per_image: an integer, or 'auto'
    return f"{dotted}: {msg} (got {got_s}) in {source}"


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `--set key.path=value` to the raw recipe dict in place (value parsed as YAML; list items by index).
    RecipeError for a malformed assignment or a path that does not exist."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r} must look like key.path=value")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            try:
                node = node[int(part)]
                continue
            except (ValueError, IndexError):
                raise RecipeError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a valid list index")
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, (dict, list)):
            raise RecipeError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = nxt
    parsed = yaml.safe_load(value) if value.strip() else None
    if isinstance(node, list):
        node[int(parts[-1])] = parsed
    else:
        node[parts[-1]] = parsed


def validate(raw: dict[str, Any], source: str) -> Recipe:
    """`raw` as a Recipe; RecipeError with every problem worded by key (and did-you-mean), `source` naming the file."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_format_error(err, source)) from None


def read_yaml(path: Path) -> dict[str, Any]:
    """The YAML mapping in `path`; RecipeError for a missing file, invalid YAML (with its line) or a top level that is
    not a mapping."""
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found; pass a YAML file (see recipes/ for examples)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path} must be a YAML mapping of recipe sections")
    return raw


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _anchor_data_root(raw: dict[str, Any], base: Path) -> None:
    """A relative ``data.root`` means relative to `base` (the recipe file's folder, or the working
    directory for ``--data``/``--set``): store it absolute so the run works from anywhere."""
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("root"), str) and data["root"].strip():
        root = Path(data["root"]).expanduser()
        data["root"] = str(root if root.is_absolute() else (base / root).resolve())


def read_recipe_raw(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's mapping with ``extends: base.yaml`` (relative to the file) merged underneath;
    a relative ``data.root`` resolves against the file that sets it, like ``extends``."""
    raw = read_yaml(path)
    _anchor_data_root(raw, path.resolve().parent)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    base_path = (path.parent / str(parent)).resolve()
    if base_path in _seen:
        raise RecipeError(f"{path}: 'extends' forms a cycle through {base_path}")
    if not base_path.is_file():
        raise RecipeError(f"{path}: extends {parent!r} but {base_path} does not exist")
    return _deep_merge(read_recipe_raw(base_path, (*_seen, base_path)), raw)


# the sections a finished run's recipe may change after training: what it learnt must not change under it
EXPORT_MUTABLE_SECTIONS = ("parity",)


def check_export_overrides(assignments: list[str] | tuple[str, ...]) -> None:
    """The recipe's rule for export: only the gate's thresholds (``parity.*``) may be overridden on a
    trained run. Raises RecipeError naming the first other key."""
    for assignment in assignments:
        section = assignment.split("=", 1)[0].strip().split(".")[0]
        if section not in EXPORT_MUTABLE_SECTIONS:
            raise RecipeError(f"export --set {assignment!r}: only parity.* thresholds can change after training "
                              "(the weights were trained with the rest); retrain to change it")


def load_for_export(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                    data_root: str | Path | None = None) -> Recipe:
    """A trained run's recipe with export's overrides (`check_export_overrides`) and ``--data``."""
    check_export_overrides(overrides)
    return load(path, overrides, data_root)


def load_raw(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
             data_root: str | Path | None = None) -> dict[str, Any]:
    """The recipe's mapping with what it extends, ``--set`` overrides and ``--data`` applied, not
    yet validated as a whole (the file itself is): the keys present are the ones the user set."""
    path = Path(path)
    raw = read_recipe_raw(path)
    validate(raw, str(path))  # errors in the file itself are reported against the file
    raw = copy.deepcopy(raw)
    for assignment in overrides:
        apply_override(raw, assignment)
    if data_root is not None:
        raw.setdefault("data", {})["root"] = str(data_root)
    _anchor_data_root(raw, Path.cwd())
    return raw


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = (), data_root: str | Path | None = None) -> Recipe:
    """Read a recipe file (and what it extends), apply ``--set`` overrides and ``--data``, validate."""
    raw = load_raw(path, overrides, data_root)
    return validate(raw, f"--set overrides of {path}" if overrides else str(path))
