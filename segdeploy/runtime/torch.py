"""PyTorch backend: a finished run directory (FP32; FP16 autocast, channels-last, compile on CUDA)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from segdeploy.artifact import ModelMeta, Run
from segdeploy.errors import BackendUnavailable
from segdeploy.runtime.base import Backend, LoadOptions
from segdeploy.utils import pick_device


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count is process-wide (``torch.set_num_threads``): `n` threads for
    the block, the count as it was after it, so a backend loaded with ``threads`` leaves the rest of
    the process (training, another backend, the caller's own torch) alone. None or 0: unchanged."""
    saved = torch.get_num_threads()
    if not n or n == saved:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


class TorchBackend(Backend):
    """A PyTorch model in memory (a finished run's, or the one being trained) on CPU or CUDA: FP32, or FP16 autocast
    on CUDA; channels-last and torch.compile on CUDA when asked. BackendUnavailable for a device or precision this
    machine lacks."""
    name = "torch"
    threads: int | None = None  # intra-op threads while it runs (`intra_op_threads`); None: torch's own

    def __init__(self, model: torch.nn.Module, meta: ModelMeta, path: Path, device: str = "cpu",
                 precision: str = "fp32", compile: bool = False, channels_last: bool = True) -> None:
        """A backend over a model in memory (a loaded run, or the model being trained: then pass the
        training's `channels_last`, so wrapping it changes nothing about its parameters)."""
        if precision not in ("fp32", "fp16"):
            raise BackendUnavailable(f"torch backend precision must be fp32 or fp16 (got {precision})")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable("CUDA is not available for the torch backend; use device cpu")
        if precision == "fp16" and not device.startswith("cuda"):
            raise BackendUnavailable("torch fp16 autocast needs a CUDA GPU; use fp32 on CPU")
        self.meta, self.path, self.device, self.precision = meta, path, device, precision
        self.model = model.to(device).eval()
        self.channels_last = channels_last and device.startswith("cuda")
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._forward = torch.compile(self.model) if compile else self.model

    @classmethod
    def load(cls, path: Path, options: LoadOptions = LoadOptions()) -> TorchBackend:
        """The finished run at `path` (`models.load_run_model`) on `options.device` ("auto": CUDA
        when there is one). `options.threads` applies while it runs, not to the process. Raises
        ArtifactError for a run that cannot be loaded, BackendUnavailable for a device or precision
        this machine lacks."""
        device = pick_device("auto") if options.device == "auto" else options.device
        from segdeploy.models import load_run_model

        run = Run(Path(path))
        backend = cls(load_run_model(run), run.meta, run.root, device=device, precision=options.precision,
                      compile=options.compile)
        backend.threads = options.threads
        return backend

    @classmethod
    def needs_gpu(cls, options: dict) -> bool:
        """When it would run on CUDA: a GPU is visible and the device is not "cpu" ("auto", the
        default, picks CUDA then)."""
        return options.get("device", "auto") != "cpu" and torch.cuda.is_available()

    @classmethod
    def available(cls, precision: str = "fp32") -> str:
        """'' when torch runs at `precision` here; FP16 needs a CUDA GPU."""
        return "torch fp16 needs a CUDA GPU" if precision == "fp16" and not torch.cuda.is_available() else ""

    def prepare(self, batch: object) -> torch.Tensor:
        """The batch as a float32 tensor on the backend's device."""
        x = torch.as_tensor(batch, dtype=torch.float32)
        return x.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def run(self, batch: torch.Tensor) -> torch.Tensor:
        """float32 N×C×H×W logits (a tensor on the device) for a prepared N×B×H×W batch, in inference mode."""
        x = batch
        if self.device.startswith("cuda"):
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.precision == "fp16"):
                return self._forward(x).float()
        with intra_op_threads(self.threads):
            return self._forward(x).float()

    def to_host(self, logits: torch.Tensor) -> object:
        """The logits as a float32 numpy array on the host."""
        return logits.float().cpu().numpy()

    def synchronize(self) -> None:
        """Wait for the GPU (no-op on CPU)."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
