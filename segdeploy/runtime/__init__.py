"""Artifact -> backend. Adding a backend is one module and one entry in `_BACKENDS`; which file
suffix it loads comes from the table of export forms (`artifact.EXPORT_FORMS`)."""

from __future__ import annotations

import importlib
from pathlib import Path

from segdeploy.artifact import SUFFIX_BACKENDS
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
    of export forms (`artifact.SUFFIX_BACKENDS`). Raises ArtifactError for anything else."""
    if path.is_dir():
        return "torch"
    if path.suffix in SUFFIX_BACKENDS:
        return SUFFIX_BACKENDS[path.suffix]
    raise ArtifactError(f"{path} is not a model artifact: expected a run directory or a "
                        f"{', '.join(sorted(SUFFIX_BACKENDS))} file")


def backend_class(name: str) -> type[Backend]:
    module, cls = _BACKENDS[name]
    return getattr(importlib.import_module(module), cls)


def load_backend(path: str | Path, **options: object) -> Backend:
    """Load any artifact (run dir | .onnx | .engine) with the backend its type calls for; options
    are `LoadOptions` fields (a misspelt one is a TypeError, not silently ignored)."""
    path = Path(path)
    typed = LoadOptions(**options)  # type: ignore[arg-type]
    if not path.exists():
        raise ArtifactError(f"model {path} not found; pass a run directory, .onnx or .engine")
    # each backend checks the artifact before its runtime: a broken file is named even where the
    # runtime is missing (`available()` answers the runtime question on its own, for bench)
    return backend_class(backend_for(path)).load(path, typed)
