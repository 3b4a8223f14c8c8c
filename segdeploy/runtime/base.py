"""One interface for every inference backend.

A backend is loaded from an artifact path and maps a float32 N×B×H×W batch (already normalised
with ``meta``) to float32 N×C×H×W logits. Heavy libraries are imported inside each backend's
module so that choosing one never imports the others.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch

from segdeploy.artifact import ModelMeta


class Backend(ABC):
    name: ClassVar[str]
    precision: str = "fp32"
    device: str = "cpu"
    meta: ModelMeta
    path: Path

    @classmethod
    @abstractmethod
    def load(cls, path: Path, **options: object) -> Backend: ...

    @abstractmethod
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits for a normalised float32 N×B×H×W batch, as a float32 tensor on ``self.device``."""

    @property
    def static_shape(self) -> tuple[int, int] | None:
        """(H, W) when the artifact accepts only one spatial size."""
        s = self.meta.static_size
        return (s, s) if s else None

    @property
    def max_batch(self) -> int | None:
        return None

    def describe(self) -> str:
        return f"{self.name} {self.precision} on {self.device} ({self.path})"
