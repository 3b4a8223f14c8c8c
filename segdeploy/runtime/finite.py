"""Logits that are finite, or an error naming the tile.

A reduced-precision model (FP16, INT8) can overflow where its FP32 source does not, e.g. on an
input outside its calibration range: NaN/Inf logits, which an argmax turns into class 0 without a
word. `FiniteLogits` checks each batch once (one ``np.isfinite(...).all()``), recomputes only the
offending items at FP32 — the FP32 ONNX an export was derived from, or the torch model without
autocast — and records them by name; where there is no FP32 form, or it is not finite either, it
raises `NonFiniteError` naming the item. predict, eval and the parity gate use it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from segdeploy.artifact import EXPORT_FORMS, form_of, read_onnx_meta
from segdeploy.errors import NonFiniteError
from segdeploy.runtime.base import Backend

Run = Callable[[Backend, np.ndarray], np.ndarray]


def fp32_source(backend: Backend) -> Backend | None:
    """An FP32 backend of the same model, or None when `backend` is FP32 already or its FP32
    source is not here: torch without autocast, or the FP32 ONNX at the head of the artifact's
    source chain (FP16/INT8 ONNX -> FP32 ONNX; engine -> FP16 ONNX -> FP32 ONNX)."""
    if backend.name == "torch":
        if backend.precision == "fp32":
            return None
        from segdeploy.runtime.torch import TorchBackend

        return TorchBackend(backend.model, backend.meta, backend.path, backend.device, "fp32")  # type: ignore[attr-defined]
    if backend.precision == "fp32":
        return None
    path, meta = Path(backend.path), backend.meta
    for _ in range(3):  # engine -> fp16 -> fp32 at most
        if not meta.source:
            return None
        path = (path.parent / meta.source["path"]).resolve()
        if path.suffix != ".onnx" or not path.is_file():
            return None
        meta = read_onnx_meta(path)
        form = form_of(path)
        if form is not None and form.precision == "fp32":
            from segdeploy.runtime import load_backend

            return load_backend(path, threads=getattr(backend, "threads", None))
    return None


class FiniteLogits:
    """Finite logits for a backend's batches: `check` passes finite ones through untouched and
    recomputes non-finite items at FP32; `recomputed` names them (for the summary and JSON)."""

    def __init__(self, backend: Backend, unit: str = "tile") -> None:
        self.backend, self.unit = backend, unit
        self.recomputed: list[str] = []
        self.fallback_name = ""
        self._fallback: Backend | None = None
        self._looked = False

    def fallback(self) -> Backend | None:
        """The FP32 form the artifact was derived from (`fp32_source`), loaded on first use; None when there is none
        (an FP32 artifact, or one deployed without its source)."""
        if not self._looked:
            self._looked = True
            self._fallback = fp32_source(self.backend)
            if self._fallback is not None:
                self.fallback_name = self._fallback.describe()
        return self._fallback

    def check(self, batch: np.ndarray, logits: np.ndarray, name: Callable[[int], str],
              run: Run = lambda b, x: b(x)) -> np.ndarray:
        """`logits` (N×C×H×W, of `batch`) with every non-finite item recomputed at FP32 by
        ``run(fp32_backend, items)``. Raises NonFiniteError naming the first item that cannot be."""
        if np.isfinite(logits).all():
            return logits
        bad = [i for i in range(len(logits)) if not np.isfinite(logits[i]).all()]
        what = f"{name(bad[0])}{f' and {len(bad) - 1} more in its batch' if len(bad) > 1 else ''}"
        fallback = self.fallback()
        if fallback is None:
            fix = ("check the input's scale (--max-pixel-value) and nodata" if self.backend.precision == "fp32" else
                   f"put the FP32 {EXPORT_FORMS['fp32'].file} it was exported from beside it, or use that one")
            raise NonFiniteError(f"{self.backend.describe()} gives non-finite logits (NaN/Inf) on {what}, and there "
                                 f"is no FP32 form to recompute it with; {fix}")
        redo = run(fallback, batch[bad])
        still = [bad[k] for k in range(len(bad)) if not np.isfinite(redo[k]).all()]
        if still:
            raise NonFiniteError(f"{self.backend.describe()} gives non-finite logits on {name(still[0])}, and so does "
                                 f"{self.fallback_name}; check the input's scale (--max-pixel-value) and nodata there")
        logits[bad] = redo
        self.recomputed += [name(i) for i in bad]
        return logits

    def summary(self) -> str:
        """One line for the report, '' when nothing was recomputed."""
        if not self.recomputed:
            return ""
        n = len(self.recomputed)
        return (f"{n} {self.unit}{'s' if n != 1 else ''} gave non-finite logits at {self.backend.precision.upper()} and "
                f"{'were' if n != 1 else 'was'} recomputed at FP32 ({self.fallback_name}): {', '.join(self.recomputed[:3])}"
                f"{' …' if n > 3 else ''}")
