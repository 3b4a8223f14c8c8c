"""Tile geometry: padding to the model's divisor, window grids, blend weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def padded_size(n: int, divisor: int) -> int:
    return int(math.ceil(n / divisor) * divisor)


def pad_to_multiple(x: torch.Tensor, divisor: int, mode: str = "reflect") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad N×B×H×W on the bottom/right to multiples of `divisor`; returns the original (H, W).

    Reflection falls back to replication where the pad is wider than the image allows.
    """
    h, w = x.shape[-2:]
    ph, pw = padded_size(h, divisor) - h, padded_size(w, divisor) - w
    if ph == 0 and pw == 0:
        return x, (h, w)
    if mode == "reflect" and (ph >= h or pw >= w):
        mode = "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


def forward_padded(backend, batch: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - any Backend
    """Logits for a batch of any size: padded to the model's divisor (or its static size), cropped back."""
    static = backend.static_shape
    h, w = batch.shape[-2:]
    if static is not None:
        if h > static[0] or w > static[1]:
            raise ValueError(f"image {h}×{w} is larger than the static model size {static}; use tiled predict")
        x = F.pad(batch, (0, static[1] - w, 0, static[0] - h), mode="replicate")
    else:
        x, _ = pad_to_multiple(batch, backend.meta.input_divisor)
    return backend(x)[..., :h, :w]
