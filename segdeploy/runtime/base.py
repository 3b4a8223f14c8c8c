"""One interface for every inference backend.

A backend is loaded from an artifact path and maps a float32 N×B×H×W numpy batch (already
normalised with ``meta``) to float32 N×C×H×W numpy logits. Heavy libraries are imported inside
each backend's module so that choosing one never imports the others: onnxruntime needs no torch.

Timing wants the device-resident form too: ``prepare`` moves a host batch to where the backend
runs (a CUDA tensor for torch and TensorRT), ``run`` maps that to logits without leaving the
device, and ``synchronize`` waits for the device; ``__call__`` is host in, host out.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from segdeploy.artifact import ModelMeta


OFF_CLASS_SCORE = -100.0  # an argmax head's one-hot scores: 0 for the predicted class, this elsewhere


def labels_as_scores(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """An N×H×W (or N×1×H×W) integer class map as N×C×H×W float32 one-hot scores (0 for the class,
    `OFF_CLASS_SCORE` elsewhere), so the tiler and the gate read an argmax head like logits."""
    labels = np.asarray(labels).reshape(len(labels), *labels.shape[-2:]).astype(np.int64)
    scores = np.full((len(labels), num_classes, *labels.shape[-2:]), OFF_CLASS_SCORE, np.float32)
    np.put_along_axis(scores, labels[:, None], 0.0, axis=1)
    return scores


@dataclass(frozen=True)
class LoadOptions:
    """Every option a backend may take when loaded; each backend reads the ones that apply to it."""

    device: str = "auto"  # torch: auto | cpu | cuda
    precision: str = "fp32"  # torch: fp32 | fp16 (autocast, CUDA only)
    threads: int | None = None  # CPU threads (torch, onnxruntime)
    providers: tuple[str, ...] | None = None  # onnxruntime execution providers, in order
    compile: bool = False  # torch.compile (torch)


class Backend(ABC):
    """One loaded model on one runtime: numpy in, numpy out. `backend(batch)` maps a normalised float32 N×B×H×W batch
    to float32 N×C×H×W logits (a new array the caller owns); `prepare`/`run`/ `to_host` split that so bench can
    time `run` alone. `meta` is the artifact's ModelMeta."""
    name: ClassVar[str]
    precision: str = "fp32"
    device: str = "cpu"
    meta: ModelMeta
    path: Path

    @classmethod
    @abstractmethod
    def load(cls, path: Path, options: LoadOptions) -> Backend:
        """The artifact at `path` (a run directory, .onnx or .engine: the one this backend runs),
        loaded with the `options` that apply to it (device, precision, threads, providers,
        compile). The artifact is checked before the runtime: ArtifactError for a missing, corrupt
        or stale file (naming the command that rebuilds it), then BackendUnavailable when this
        machine lacks the runtime, device or precision."""

    @classmethod
    def available(cls, precision: str = "fp32") -> str:
        """'' when this backend can run at `precision` here, else why not (one line)."""
        return ""

    @classmethod
    def needs_gpu(cls, options: dict) -> bool:
        """Whether a process running this backend with `options` (LoadOptions fields) needs a GPU:
        what a Ray worker asks its cluster for. False here (CPU runtimes)."""
        return False

    @abstractmethod
    def run(self, batch: object) -> object:
        """Logits for a batch already `prepare`d, left where the backend computed them."""

    def prepare(self, batch: np.ndarray) -> object:
        """The batch where `run` needs it (e.g. a device tensor); here, unchanged."""
        return batch

    def to_host(self, logits: object) -> np.ndarray:
        """`run`'s output as a float32 numpy N×C×H×W array on the host."""
        return np.asarray(logits, dtype=np.float32)

    def synchronize(self) -> None:
        """Wait until the device has finished (no-op on CPU)."""

    def trim(self) -> None:
        """Give back memory the backend keeps between calls (its allocator's free blocks), when
        it can; predict calls this at the end of a scene so writing the outputs and the preview
        do not add to the inference peak."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """float32 N×C×H×W logits on the host for a normalised float32 N×B×H×W host batch: a new
        array the caller owns (predict softmaxes it in place). A model with a fixed batch
        (`ModelMeta.static_batch`) gets a smaller batch padded with zeros, its extra outputs cut."""
        fixed = self.meta.static_batch
        if fixed and len(batch) < fixed:
            pad = np.zeros((fixed - len(batch), *batch.shape[1:]), dtype=batch.dtype)
            return self.to_host(self.run(self.prepare(np.concatenate([batch, pad]))))[: len(batch)].copy()
        return self.to_host(self.run(self.prepare(batch)))

    @property
    def static_size(self) -> int | None:
        """The one H = W (px) the loaded artifact accepts (`ModelMeta.static_size`; an engine's
        fixed profile), None when any multiple of the input divisor works."""
        return self.meta.static_size

    @property
    def max_batch(self) -> int | None:
        """The largest batch the artifact accepts (a fixed-batch import; an engine's profile), None: any."""
        return self.meta.static_batch

    def describe(self) -> str:
        """'onnxruntime fp16 on CPU (path)': runtime, precision, device and artifact, for logs and reports."""
        return f"{self.name} {self.precision} on {self.device} ({self.path})"
