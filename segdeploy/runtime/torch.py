"""PyTorch backend: a finished run directory (FP32; FP16 autocast, channels-last, compile on CUDA)."""

from __future__ import annotations

from pathlib import Path

import torch

from segdeploy.artifact import RECIPE_FILE, WEIGHTS_FILE, ModelMeta, require_finished
from segdeploy.errors import ArtifactError, BackendUnavailable
from segdeploy.runtime.base import Backend


def load_run_model(run_dir: Path) -> tuple[torch.nn.Module, ModelMeta]:
    """Rebuild the model from the run's recipe and load its weights (safetensors; no pickle)."""
    from safetensors.torch import load_file

    from segdeploy import recipe as recipe_mod
    from segdeploy.models import build_model

    info = require_finished(run_dir)
    meta = ModelMeta.from_dict(info["model_meta"], str(run_dir))
    rec = recipe_mod.load(run_dir / RECIPE_FILE)
    model_cfg = rec.model.model_copy(update={"weights": None})  # weights come from the run
    model = build_model(model_cfg, meta.bands, meta.num_classes)
    try:
        state = load_file(str(run_dir / WEIGHTS_FILE))
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(f"{run_dir / WEIGHTS_FILE} is corrupt ({exc}); retrain the run") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(
            f"{run_dir / WEIGHTS_FILE} does not match the recipe's model "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors); retrain the run"
        )
    return model.eval(), meta


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model: torch.nn.Module, meta: ModelMeta, path: Path, device: str = "cpu",
                 precision: str = "fp32", compile: bool = False) -> None:
        if precision not in ("fp32", "fp16"):
            raise BackendUnavailable(f"torch backend precision must be fp32 or fp16 (got {precision})")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable("CUDA is not available for the torch backend; use device cpu")
        if precision == "fp16" and not device.startswith("cuda"):
            raise BackendUnavailable("torch fp16 autocast needs a CUDA GPU; use fp32 on CPU")
        self.meta, self.path, self.device, self.precision = meta, path, device, precision
        self.model = model.to(device).eval()
        if device.startswith("cuda"):
            self.model = self.model.to(memory_format=torch.channels_last)
        self._forward = torch.compile(self.model) if compile else self.model

    @classmethod
    def load(cls, path: Path, device: str = "cpu", precision: str = "fp32", compile: bool = False,
             threads: int | None = None, **_: object) -> TorchBackend:
        if threads:
            torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, meta = load_run_model(Path(path))
        return cls(model, meta, Path(path), device=device, precision=precision, compile=compile)

    def prepare(self, batch: object) -> torch.Tensor:
        x = torch.as_tensor(batch, dtype=torch.float32)
        return x.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def run(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch
        if self.device.startswith("cuda"):
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.precision == "fp16"):
                return self._forward(x).float()
        return self._forward(x).float()

    def to_host(self, logits: torch.Tensor) -> object:
        return logits.float().cpu().numpy()

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
