"""Artifact -> backend. Adding a backend is one module (a `Backend` subclass) and its entry in
`_BACKENDS`; which file suffix it loads comes from the table of export forms
(`artifact.EXPORT_FORMS`). docs/ARCHITECTURE.md, "How to add a backend"."""

from __future__ import annotations

import importlib
from pathlib import Path

from segdeploy.artifact import META_FILE, SUFFIX_BACKENDS, Run
from segdeploy.errors import ArtifactError
from segdeploy.runtime.base import Backend, LoadOptions

# backend name -> (module, class); imported on first use so heavy runtimes load only when chosen
_BACKENDS = {
    "torch": ("segdeploy.runtime.torch", "TorchBackend"),
    "onnxruntime": ("segdeploy.runtime.onnxruntime", "OrtBackend"),
    "tensorrt": ("segdeploy.runtime.tensorrt", "TensorRTBackend"),
}


def backend_for(path: Path) -> str:
    """The backend an artifact needs: "torch" for a run directory, else by file suffix from the table
    of export forms (`artifact.SUFFIX_BACKENDS`); an imported ONNX model's run directory is its FP32
    ONNX. Raises ArtifactError for anything else."""
    path = run_model_path(path)
    if path.is_dir():
        return "torch"
    if path.suffix in SUFFIX_BACKENDS:
        return SUFFIX_BACKENDS[path.suffix]
    raise ArtifactError(f"{path} is not a model artifact: expected a run directory or a "
                        f"{', '.join(sorted(SUFFIX_BACKENDS))} file")


def run_model_path(path: Path) -> Path:
    """The artifact a path stands for: an ONNX import's run directory stands for its FP32 ONNX."""
    if path.is_dir() and (path / META_FILE).is_file() and Run(path).model_format == "onnx":
        return Run(path).export_path("fp32")
    return path


def reference_backend(run: Run) -> Backend:
    """The run's FP32 reference, what export's gate and bench's accuracy columns compare with
    (`Run.reference` names it): a fresh PyTorch run of its model, or for an imported ONNX model,
    which has no PyTorch model, the FP32 ONNX itself."""
    if run.model_format == "onnx":
        return backend_class("onnxruntime").load(run.export_path("fp32"), LoadOptions())
    from segdeploy.models import load_run_model

    return backend_class("torch")(load_run_model(run), run.meta, run.root)


def backend_class(name: str) -> type[Backend]:
    """The Backend class registered as `name` in _BACKENDS, its module imported now (KeyError for an unknown name)."""
    module, cls = _BACKENDS[name]
    return getattr(importlib.import_module(module), cls)


def load_backend(path: str | Path, **options: object) -> Backend:
    """Load any artifact (run dir | .onnx | .engine) with the backend its type calls for; options
    are `LoadOptions` fields (a misspelt one is a TypeError, not silently ignored). A run directory
    of an imported ONNX model runs its FP32 ONNX (it has no PyTorch model)."""
    path = Path(path)
    typed = LoadOptions(**options)  # type: ignore[arg-type]
    if not path.exists():
        raise ArtifactError(f"model {path} not found; pass a run directory, .onnx or .engine")
    path = run_model_path(path)
    # each backend checks the artifact before its runtime: a broken file is named even where the
    # runtime is missing (`available()` answers the runtime question on its own, for bench)
    return backend_class(backend_for(path)).load(path, typed)
