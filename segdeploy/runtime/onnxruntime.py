"""onnxruntime backend for .onnx artifacts (CPU; CUDA and TensorRT providers when installed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from segdeploy.artifact import check_source, form_of, read_onnx_meta
from segdeploy.errors import ArtifactError, BackendUnavailable
from segdeploy.runtime.base import Backend, LoadOptions, labels_as_scores
from segdeploy.utils import cpu_count

PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class OrtBackend(Backend):
    """An exported ONNX file on onnxruntime (CPU, or the execution providers asked for, in order). ArtifactError for a
    missing, unreadable or stale file; BackendUnavailable for a provider this onnxruntime lacks."""
    name = "onnxruntime"

    def __init__(self, path: Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"ONNX file {self.path} not found")
        self.meta = read_onnx_meta(self.path)
        check_source(self.path, self.meta, read_onnx_meta)
        available = ort.get_available_providers()
        asked = bool(providers)
        if providers:
            missing = [p for p in providers if p not in available]
            if missing:
                raise BackendUnavailable(f"onnxruntime provider(s) {missing} not installed here (available: {available})")
        else:
            providers = [p for p in PREFERRED if p in available and p != "TensorrtExecutionProvider"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or cpu_count()
        opts.inter_op_num_threads = 1
        if providers[0] == "CPUExecutionProvider":
            # measured: the memory-pattern planner costs ~330 MB at 4×512² for no speed on CPU
            opts.enable_mem_pattern = False
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        except Exception as exc:  # noqa: BLE001
            raise ArtifactError(f"onnxruntime cannot load {self.path}: {str(exc).splitlines()[0][:200]}; "
                                "re-export it with `segdeploy export`") from None
        used = self.session.get_providers()
        if asked and used[0] != providers[0]:  # onnxruntime falls back to the CPU with a log line only
            raise BackendUnavailable(f"onnxruntime did not start {providers[0]} for {self.path} (it runs on "
                                     f"{used[0]}): the provider is installed but cannot run here (check the CUDA/cuDNN/"
                                     "TensorRT libraries it needs); pass --provider cpu to run on the CPU")
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        form = form_of(self.path)
        self.precision = form.precision  # type: ignore[union-attr] - an .onnx always has a form
        self.output = form.output if form is not None else "logits"
        self.device = "cuda" if self.session.get_providers()[0] != "CPUExecutionProvider" else "cpu"
        self.providers = self.session.get_providers()
        self.threads = opts.intra_op_num_threads
        b = inp.shape[1]
        if isinstance(b, int) and b != self.meta.bands:
            raise ArtifactError(f"{self.path} takes {b} bands but its metadata says {self.meta.bands}; re-export it")

    @classmethod
    def load(cls, path: Path, options: LoadOptions = LoadOptions()) -> OrtBackend:
        """The ONNX file at `path` with `options`' providers and CPU threads (see the class for the errors)."""
        return cls(Path(path), list(options.providers) if options.providers else None, options.threads)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 N×C×H×W logits for a float32 N×B×H×W batch. ArtifactError for another band count, or another H×W
        than a static model's."""
        x = np.asarray(batch, dtype=np.float32)
        if x.shape[1] != self.meta.bands:
            raise ArtifactError(f"{self.path} expects {self.meta.bands} bands, got an image with {x.shape[1]}")
        static = self.static_size
        if static and tuple(x.shape[-2:]) != (static, static):
            raise ArtifactError(f"{self.path} is static at {static}×{static}; got {x.shape[-2]}×{x.shape[-1]}")
        (out,) = self.session.run(None, {self.input_name: np.ascontiguousarray(x)})
        return out if self.output == "labels" else out.astype(np.float32, copy=False)

    def to_host(self, out: np.ndarray) -> np.ndarray:
        """Logits-like N×C×H×W float32 scores whose softmax is the model's probabilities: logits as
        they come; a softmax head's probabilities as their logarithm (softmax(log p) = p); an argmax
        head's class map as one-hot scores (0 for the class, -100 elsewhere: softmax ≈ 1 and
        exp(-100) ≈ 4e-44, so its argmax is the class map exactly)."""
        if self.output == "probabilities":
            return np.log(np.maximum(out, np.float32(1e-30)), dtype=np.float32)
        if self.output == "labels":
            return labels_as_scores(out, self.meta.num_classes)
        return np.asarray(out, dtype=np.float32)

    def trim(self) -> None:
        """onnxruntime's CPU arena never shrinks by itself: one tiny run with arena shrinkage
        returns its free chunks (measured: RSS 443 -> 283 MB after batch-2 512² runs of the demo
        U-Net). Static models would need a whole tile: they keep their arena."""
        if self.static_size or self.device != "cpu":
            return
        import onnxruntime as ort

        opts = ort.RunOptions()
        opts.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        side = self.meta.input_divisor
        tiny = np.zeros((1, self.meta.bands, side, side), np.float32)
        self.session.run(None, {self.input_name: tiny}, opts)

    def describe(self) -> str:
        """'onnxruntime <precision> on <first provider> (path)'."""
        return f"onnxruntime {self.precision} on {self.providers[0].removesuffix('ExecutionProvider')} ({self.path})"
