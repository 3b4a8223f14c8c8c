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
    name: ClassVar[str]
    precision: str = "fp32"
    device: str = "cpu"
    meta: ModelMeta
    path: Path

    @classmethod
    @abstractmethod
    def load(cls, path: Path, options: LoadOptions) -> Backend: ...

    @classmethod
    def available(cls, precision: str = "fp32") -> str:
        """'' when this backend can run at `precision` here, else why not (one line)."""
        return ""

    @abstractmethod
    def run(self, batch: object) -> object:
        """Logits for a batch already `prepare`d, left where the backend computed them."""

    def prepare(self, batch: np.ndarray) -> object:
        return batch

    def to_host(self, logits: object) -> np.ndarray:
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
    def static_shape(self) -> tuple[int, int] | None:
        """(H, W) when the artifact accepts only one spatial size."""
        s = self.meta.static_size
        return (s, s) if s else None

    @property
    def max_batch(self) -> int | None:
        return self.meta.static_batch

    def describe(self) -> str:
        return f"{self.name} {self.precision} on {self.device} ({self.path})"
