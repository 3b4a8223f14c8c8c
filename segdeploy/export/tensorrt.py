"""Mixed-precision ONNX -> strongly typed TensorRT engine.

TensorRT 11 removed `BuilderFlag.FP16` and weak typing: the precision is whatever the ONNX
graph says (our FP16 ONNX from export/fp16.py). TensorRT 10.12+ builds the same way when the
network is created with the STRONGLY_TYPED flag; 11.x accepts and ignores that flag.

Everything here except `build_engine` and `current_device` is plain Python and tested on CPU.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from segdeploy.errors import ArtifactError, UserError
from segdeploy.runtime.tensorrt import (  # noqa: F401 - the runtime owns them; export builds with them
    MIN_TRT,
    DeviceInfo,
    check_engine_compat,
    current_device,
    import_tensorrt,
    parse_version,
    sidecar,
)
from segdeploy.utils import atomic_path, file_sha256, write_json


def network_flags(trt_version: str, strongly_typed_flag: int) -> int:
    """TensorRT 10.x must be asked for a strongly typed network; 11.x always is (flag ignored)."""
    return 0 if parse_version(trt_version)[0] >= 11 else 1 << strongly_typed_flag


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: N×B×H×W shapes for min / opt / max."""

    min: tuple[int, int, int, int]
    opt: tuple[int, int, int, int]
    max: tuple[int, int, int, int]


def parse_batch(spec: str) -> tuple[int, int, int]:
    """'1:4:8' -> (1, 4, 8); '8' -> (1, 8, 8)."""
    try:
        parts = [int(p) for p in spec.split(":")]
    except ValueError:
        raise UserError(f"--batch {spec!r} must be MIN:OPT:MAX (e.g. 1:4:8) or one number") from None
    if len(parts) == 1:
        parts = [1, parts[0], parts[0]]
    if len(parts) != 3 or not (1 <= parts[0] <= parts[1] <= parts[2]):
        raise UserError(f"--batch {spec!r} must be MIN:OPT:MAX with 1 ≤ MIN ≤ OPT ≤ MAX")
    return parts[0], parts[1], parts[2]


def derive_profile(batch: tuple[int, int, int], tile: int, bands: int, divisor: int, dynamic: bool) -> Profile:
    """The profile predict/bench will use: batches of tiles of `tile`², and for dynamic models also
    smaller images down to one divisor block (a whole small image is sent untiled)."""
    if tile % divisor:
        raise UserError(f"tile {tile} is not a multiple of the model's input divisor {divisor}")
    b0, b1, b2 = batch
    smallest = divisor if dynamic else tile
    return Profile(min=(b0, bands, smallest, smallest), opt=(b1, bands, tile, tile), max=(b2, bands, tile, tile))


def timing_cache_path(cache_dir: Path, gpu_name: str, compute_capability: str, trt_version: str) -> Path:
    """One timing cache per GPU model, compute capability and TensorRT version (caches do not transfer)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower()
    return cache_dir / f"timing-{slug}-sm{compute_capability.replace('.', '')}-trt{trt_version}.cache"


def build_engine(onnx_path: Path, engine_path: Path, profile: Profile, model_meta: dict, *, precision: str = "fp16",
                 workspace_gib: float = 4.0, cache_dir: Path | None = None, log=print) -> dict:  # noqa: ANN001
    """Build a strongly typed engine from the mixed-precision (FP16) or QDQ (INT8) ONNX: the
    precision lives in the graph, so no builder precision flag is set; write engine + sidecar atomically."""
    trt = import_tensorrt()
    device = current_device()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt.__version__, int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"TensorRT cannot parse {onnx_path}: {errors[:400]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(network.get_input(0).name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(opt_profile)

    cache_file = timing_cache_path(cache_dir or engine_path.parent, device.gpu_name, device.compute_capability,
                                   device.trt_version)
    blob = cache_file.read_bytes() if cache_file.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    config.progress_monitor = _progress_monitor(trt, log)

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ArtifactError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    build_s = time.perf_counter() - t0
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(plan))
    with atomic_path(cache_file) as tmp:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    meta = {
        "model_meta": model_meta,
        "device": asdict(device),
        "profiles": [asdict(profile)],
        "precision": precision,
        "precision_source": "strongly typed network; types from the ONNX graph (mixed FP16, or INT8 Q/DQ)",
        "onnx": str(onnx_path.name),
        "onnx_sha256": file_sha256(onnx_path),
        "build_seconds": round(build_s, 2),
        "engine_bytes": engine_path.stat().st_size,
        "timing_cache": str(cache_file),
    }
    write_json(sidecar(engine_path), meta)
    return meta


def _progress_monitor(trt, log):  # noqa: ANN001, ANN202
    """TensorRT's IProgressMonitor printing phase starts/ends (the builder can take minutes)."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                log(f"TensorRT: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            pass

    return Monitor()
