"""TensorRT backend for .engine artifacts: device buffers are torch CUDA tensors (no pycuda)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from segdeploy.artifact import ModelMeta, Run, check_source, engine_sidecar, read_onnx_meta
from segdeploy.errors import ArtifactError, BackendUnavailable
from segdeploy.runtime.base import Backend, LoadOptions

# ----------------------------------------------------------------------------- the TensorRT here
# (export/tensorrt.py builds engines with these; the runtime must not import export)

MIN_TRT = (10, 12)


def import_tensorrt():  # noqa: ANN201
    """The tensorrt module; BackendUnavailable when it is not installed or older than MIN_TRT (strongly typed FP16
    needs 10.12)."""
    try:
        import tensorrt as trt
    except Exception as exc:  # noqa: BLE001
        raise BackendUnavailable(
            f"TensorRT is not installed ({type(exc).__name__}); install it on a machine with an NVIDIA GPU: "
            "pip install 'segdeploy[trt]'"
        ) from None
    if parse_version(trt.__version__)[:2] < MIN_TRT:
        raise BackendUnavailable(f"TensorRT {trt.__version__} is too old; segdeploy needs ≥ 10.12 (strongly typed FP16)")
    return trt


def parse_version(v: str) -> tuple[int, ...]:
    """'10.12.0.36' -> (10, 12, 0): the first three integers of a version string."""
    return tuple(int(p) for p in re.findall(r"\d+", v)[:3])


@dataclass
class DeviceInfo:
    """The GPU an engine is built on or run on: its name, compute capability ("8.9"), CUDA and TensorRT versions."""
    gpu_name: str
    compute_capability: str
    cuda_version: str
    trt_version: str


def current_device() -> DeviceInfo:
    """This machine's GPU and runtime versions; BackendUnavailable without TensorRT or a CUDA GPU."""
    import torch

    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT needs a CUDA GPU and none is visible")
    major, minor = torch.cuda.get_device_capability()
    return DeviceInfo(torch.cuda.get_device_name(), f"{major}.{minor}", str(torch.version.cuda), trt.__version__)


def check_engine_compat(engine_meta: dict, here: DeviceInfo, path: Path) -> None:
    """Refuse an engine built for another GPU or TensorRT version with the command that fixes it."""
    built = engine_meta.get("device", {})
    problems = []
    if built.get("trt_version") != here.trt_version:
        problems.append(f"TensorRT {built.get('trt_version')} (here {here.trt_version})")
    if built.get("compute_capability") != here.compute_capability or built.get("gpu_name") != here.gpu_name:
        problems.append(f"{built.get('gpu_name')} sm{built.get('compute_capability')} "
                        f"(here {here.gpu_name} sm{here.compute_capability})")
    if problems:
        raise ArtifactError(f"engine {path} was built for {' and '.join(problems)}; "
                            f"rebuild with `segdeploy export {Run.root_of(path)} --trt`")


sidecar = engine_sidecar  # the engine's metadata file: named by artifact.py


# ----------------------------------------------------------------------------- the backend


class TensorRTBackend(Backend):
    """A serialized TensorRT engine with its JSON sidecar (the ModelMeta and the profile): strongly typed, so its
    precision is the engine's. ArtifactError for a missing engine or sidecar, a stale engine, or one built for
    another GPU/TensorRT; BackendUnavailable without TensorRT or a GPU."""
    name = "tensorrt"
    precision = "fp16"
    device = "cuda"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        side = sidecar(self.path)
        if not self.path.is_file():
            raise ArtifactError(f"engine {self.path} not found; build one with `segdeploy export RUN_DIR --trt`")
        if not side.is_file():
            raise ArtifactError(f"engine {self.path} has no {side.name} metadata; rebuild it with `segdeploy export --trt`")
        try:
            self.engine_meta = json.loads(side.read_text())
        except json.JSONDecodeError:
            raise ArtifactError(f"{side} is corrupt; rebuild with `segdeploy export --trt`") from None
        self.meta = ModelMeta.from_dict(self.engine_meta["model_meta"], str(side))
        self.precision = "int8" if str(self.engine_meta.get("precision", "")).startswith("int8") else "fp16"
        check_source(self.path, self.meta, read_onnx_meta)
        trt = import_tensorrt()
        check_engine_compat(self.engine_meta, current_device(), self.path)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"engine {self.path} is corrupt or truncated; rebuild with `segdeploy export --trt`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        prof = self.engine_meta["profiles"][0]
        self._min, self._max = tuple(prof["min"]), tuple(prof["max"])
        self.stream = torch.cuda.Stream()

    @classmethod
    def available(cls, precision: str = "fp16") -> str:
        """'' when TensorRT imports and a CUDA GPU is visible, else why not."""
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "TensorRT not installed (pip install 'segdeploy[trt]', NVIDIA GPU)"
        return "" if torch.cuda.is_available() else "TensorRT needs a CUDA GPU"

    @classmethod
    def needs_gpu(cls, options: dict) -> bool:
        """Always: an engine runs only on the GPU it was built for."""
        return True

    @classmethod
    def load(cls, path: Path, options: LoadOptions | None = None) -> TensorRTBackend:
        """The engine at `path` (its precision and profile are built in: `options` do not apply)."""
        return cls(Path(path))

    @property
    def max_batch(self) -> int:
        """The largest batch of the engine's optimisation profile."""
        return int(self._max[0])

    @property
    def static_size(self) -> int | None:
        """The profile's one H = W when its min and max shapes agree (an engine built static)."""
        return int(self._max[2]) if self._min[2:] == self._max[2:] else None

    def prepare(self, batch: object) -> torch.Tensor:
        """The batch as a float32 CUDA tensor."""
        return torch.as_tensor(batch, dtype=torch.float32).to("cuda", non_blocking=True)

    def to_host(self, logits: torch.Tensor) -> object:
        """The logits (a CUDA tensor) as a numpy array on the host."""
        return logits.cpu().numpy()

    def synchronize(self) -> None:
        """Wait for the GPU (CUDA's synchronize)."""
        torch.cuda.synchronize()

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        """float32 N×C×H×W logits (a CUDA tensor) for an N×B×H×W batch; ArtifactError for a shape outside the engine's
        profile, naming the export flags that rebuild it."""
        n, _, h, w = batch.shape
        if n > self._max[0] or h > self._max[2] or w > self._max[3] or h < self._min[2] or w < self._min[3]:
            raise ArtifactError(f"batch {tuple(batch.shape)} is outside the engine's profile {self._min}..{self._max}; "
                                "rebuild with a matching `segdeploy export --trt --tile/--batch`")
        x = batch.to("cuda", torch.float32, non_blocking=True).contiguous()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), device="cuda", dtype=torch.float32)
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ArtifactError(f"TensorRT execution failed for {self.path}")
        torch.cuda.current_stream().wait_stream(self.stream)
        return out
