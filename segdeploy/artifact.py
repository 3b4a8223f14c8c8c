"""What every artifact (run directory, ONNX file, engine) says about itself.

`ModelMeta` travels with the weights — in a run's ``meta.json``, in ONNX ``metadata_props`` and
in an engine's sidecar — so predict/bench/eval need nothing but the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from segdeploy.errors import ArtifactError

META_FILE = "meta.json"
WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "recipe.yaml"
LAST_CKPT = "last.ckpt"
SPLITS_FILE = "splits.json"
ONNX_META_KEY = "segdeploy"  # the metadata_props key of an exported ONNX file


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
    # pixel type the model was trained on (None: recorded before segdeploy checked it)
    input_dtype: str | None = None
    # what a derived artifact was made from: {"path": relative to the artifact, "sha256": ...}
    source: dict[str, str] | None = None
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


def run_state(path: Path) -> str:
    """absent | empty | foreign (files, but not a run) | complete | unfinished (resumable) |
    unstarted (interrupted before its first epoch ended: nothing to resume)."""
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
    if status == "complete" and (path / WEIGHTS_FILE).is_file():
        return "complete"
    return "unfinished" if (path / LAST_CKPT).is_file() else "unstarted"


def continue_hint(run_dir: Path) -> str:
    """The one command that gets an unfinished run to finished."""
    if (run_dir / LAST_CKPT).is_file():
        return f"continue it with `segdeploy train {run_dir / RECIPE_FILE} --out {run_dir} --resume`"
    return (f"it stopped before its first epoch ended; start it again with "
            f"`segdeploy train {run_dir / RECIPE_FILE} --out {run_dir} --overwrite`")


def require_finished(run_dir: Path) -> dict[str, Any]:
    info = read_run_meta(run_dir)
    if info.get("status") != "complete":
        raise ArtifactError(f"run {run_dir} is unfinished (status {info.get('status')!r}); {continue_hint(run_dir)}")
    if not (run_dir / WEIGHTS_FILE).is_file():
        raise ArtifactError(f"run {run_dir} has no {WEIGHTS_FILE}; {continue_hint(run_dir)}")
    return info


def source_record(source: Path, artifact_dir: Path) -> dict[str, str]:
    """What a derived artifact in `artifact_dir` records about the file it was made from."""
    from segdeploy.utils import file_sha256

    return {"path": os.path.relpath(source, artifact_dir), "sha256": file_sha256(source)}


def check_source(artifact: Path, meta: ModelMeta, read_meta: Callable[[Path], ModelMeta] | None = None) -> None:
    """Refuse an artifact whose source (weights, FP32 ONNX) changed after it was derived, along the
    whole chain (engine -> FP16 ONNX -> FP32 ONNX -> weights). A copy deployed without its source
    has nothing to be stale against and passes."""
    from segdeploy.utils import file_sha256

    requested, link = artifact, artifact
    for _ in range(4):  # engine -> fp16 -> fp32 -> weights at most
        if not meta.source:
            return
        source = (link.parent / meta.source["path"]).resolve()
        if not source.is_file():
            return
        if file_sha256(source) != meta.source["sha256"]:
            via = "" if link == requested else f" (which {link.name} was made from)"
            raise ArtifactError(f"{requested} is stale: {source} changed after it was exported{via}; "
                                "re-export with `segdeploy export RUN`")
        if source.suffix != ".onnx" or read_meta is None:
            return
        link, meta = source, read_meta(source)


def read_onnx_meta(path: Path) -> ModelMeta:
    """The ModelMeta an exported ONNX file carries in its metadata_props."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(f"{path} is not a readable ONNX file ({type(exc).__name__}); re-export it with "
                            "`segdeploy export`") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if ONNX_META_KEY not in props:
        raise ArtifactError(f"{path} has no segdeploy metadata; export it with `segdeploy export RUN_DIR`")
    return ModelMeta.from_dict(json.loads(props[ONNX_META_KEY]), str(path))
