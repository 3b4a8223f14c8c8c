"""What every artifact (run directory, ONNX file, engine) says about itself.

`ModelMeta` travels with the weights — in a run's ``meta.json``, in ONNX ``metadata_props`` and
in an engine's sidecar — so predict/bench/eval need nothing but the file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy.errors import ArtifactError

META_FILE = "meta.json"
WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "recipe.yaml"
LAST_CKPT = "last.ckpt"


@dataclass
class ModelMeta:
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
    hierarchy: dict[str, list[str]] | None = None
    arch: str = ""
    encoder: str = ""
    recipe_digest: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> ModelMeta:
        known = {f for f in cls.__dataclass_fields__}
        missing = [f for f in ("classes", "mean", "std", "bands") if f not in d]
        if missing:
            raise ArtifactError(f"{source} lacks segdeploy metadata {missing}; re-export it with `segdeploy export`")
        return cls(**{k: v for k, v in d.items() if k in known})

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """H×W×B (file dtype) -> B×H×W float32, scaled and standardised like in training."""
        x = image.astype(np.float32).transpose(2, 0, 1) / np.float32(self.max_pixel_value)
        mean = np.asarray(self.mean, np.float32)[:, None, None]
        std = np.asarray(self.std, np.float32)[:, None, None]
        return (x - mean) / std


def read_run_meta(run_dir: Path) -> dict[str, Any]:
    path = run_dir / META_FILE
    if not run_dir.is_dir():
        raise ArtifactError(f"run directory {run_dir} not found; train one with `segdeploy train RECIPE --out {run_dir}`")
    if not path.is_file():
        raise ArtifactError(f"{run_dir} is not a segdeploy run directory (no {META_FILE})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is corrupt ({exc}); retrain the run") from None


def require_finished(run_dir: Path) -> dict[str, Any]:
    info = read_run_meta(run_dir)
    if info.get("status") != "complete":
        raise ArtifactError(
            f"run {run_dir} is unfinished (status {info.get('status')!r}); "
            f"continue it with `segdeploy train {run_dir / RECIPE_FILE} --out {run_dir} --resume`"
        )
    if not (run_dir / WEIGHTS_FILE).is_file():
        raise ArtifactError(f"run {run_dir} has no {WEIGHTS_FILE}; retrain it")
    return info
