"""onnxruntime CPU FP32 vs PyTorch eager CPU (issue goal: ≥ 1.4× faster).

smp U-Net ResNet-34 (random init), 512×512, batch 1, the same thread count for both, exported
through segdeploy's own export path (preflight, torch.export, onnxslim). Reports median and p90
latency over `--iters` timed runs after `--warmup` runs. FP16 ONNX on CPU is measured too, for
the record (onnxruntime has few FP16 CPU kernels, so it is expected to be slower).

    python benchmarks/onnx_vs_torch_cpu.py --threads 2 --out benchmarks/results/onnx_vs_torch_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def timeit(fn, warmup: int, iters: int) -> dict:  # noqa: ANN001
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    a = np.asarray(times)
    return {"p50_ms": round(float(np.median(a)), 2), "p90_ms": round(float(np.percentile(a, 90)), 2),
            "std_ms": round(float(a.std()), 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/onnx_vs_torch_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import onnx

    from segdeploy.artifact import ModelMeta
    from segdeploy.export import fp16
    from segdeploy.export.onnx import export_onnx, preflight
    from segdeploy.models import build_model
    from segdeploy.recipe import ModelConfig
    from segdeploy.runtime.onnxruntime import OrtBackend

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="unet", encoder="resnet34"), 3, 6).eval()
    meta = ModelMeta(classes=[f"c{i}" for i in range(6)], palette=[[i, i, i] for i in range(6)], mean=[0.5] * 3,
                     std=[0.25] * 3, max_pixel_value=255, bands=3, input_divisor=32, tile_size=args.size)
    x = torch.randn(1, 3, args.size, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(copy.deepcopy(model), meta, path, preflight(copy.deepcopy(model), meta, args.size))
        fp16.save(fp16.convert(onnx.load(str(path)), []), Path(tmp) / "model.fp16.onnx")
        ort32 = OrtBackend(path, threads=args.threads)
        ort16 = OrtBackend(Path(tmp) / "model.fp16.onnx", threads=args.threads)
        with torch.inference_mode():
            t_torch = timeit(lambda: model(x), args.warmup, args.iters)
            ref = model(x)
        t_ort = timeit(lambda: ort32(x), args.warmup, args.iters)
        t_ort16 = timeit(lambda: ort16(x), 1, max(3, args.iters // 4))
        err = float((ort32(x) - ref).abs().max())
    result = {
        "benchmark": f"smp Unet-ResNet34, {args.size}x{args.size}, batch 1, {args.threads} threads, CPU",
        "torch_eager_fp32": t_torch,
        "onnxruntime_fp32": t_ort,
        "onnxruntime_fp16": t_ort16,
        "speedup_onnxruntime_fp32_vs_torch": round(t_torch["p50_ms"] / t_ort["p50_ms"], 3),
        "goal": ">= 1.4",
        "max_abs_logit_diff_fp32": err,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "versions": {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__},
        "command": f"python benchmarks/onnx_vs_torch_cpu.py --threads {args.threads} --size {args.size} --iters {args.iters}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
