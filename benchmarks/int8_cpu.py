"""INT8 vs FP32 on onnxruntime CPU, after the gate's fallback (issue #9 goal for the CPU form:
≥ 2.5× FP32 at batch 1 and 8, mean IoU drop ≤ 0.5 pt, no class drop > 1 pt).

For each trained run: `segdeploy export RUN --fp16 --int8` (gate and fallback included), then the
forward latency of FP32, FP16, INT8-CPU (U8S8) and INT8-TensorRT-form (S8S8) ONNX at
`--size`² and each batch, the same seeded input and thread count for all (segdeploy's own timing
harness), and the per-class IoU of each against ground truth next to PyTorch FP32's, from the
export's parity report (validation tiles). The CPU model and its flags are recorded.

    python benchmarks/int8_cpu.py RUN [RUN ...] --size 512 --batches 1,8 --threads 2 \\
        --out benchmarks/results/int8_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8_cpu": "model.int8.cpu.onnx",
         "int8_trt_form": "model.int8.onnx"}
REPORTS = {"fp32": "fp32", "fp16": "fp16", "int8_cpu": "int8_cpu", "int8_trt_form": "int8"}  # export form keys


def cpu_facts() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return {"model": model or platform.processor(), "int8_flags": wanted}


def measure(run: Path, args: argparse.Namespace) -> dict:
    from segdeploy.bench import BenchOptions, time_backend
    from segdeploy.export.pipeline import ExportOptions, export_run
    from segdeploy.runtime import load_backend

    report = export_run(run, ExportOptions(fp16=True, int8=True, calib_images=args.calib_images,
                                           calib_method=args.calib_method), log=print)
    opts = BenchOptions(min_iters=args.iters, min_seconds=args.seconds)
    from segdeploy.artifact import read_onnx_meta

    meta = read_onnx_meta(run / "export/model.onnx")
    out: dict = {"run": str(run), "model": f"{meta.arch} {meta.encoder}", "latency_ms": {}, "accuracy": {}}
    for name, file in FILES.items():
        backend = load_backend(run / "export" / file, threads=args.threads)
        for batch in args.batches:
            x = torch.randn(batch, backend.meta.bands, args.size, args.size, generator=torch.Generator().manual_seed(0))
            out["latency_ms"].setdefault(name, {})[batch] = round(time_backend(backend, x, opts)["p50_ms"], 2)
        rep = report.parity[REPORTS[name]]
        drops = [c["iou_drop_points"] for c in rep.per_class if c["iou_drop_points"] is not None]
        out["accuracy"][name] = {
            "agreement_vs_pytorch": rep.agreement, "mean_iou_drop_pt": round(sum(drops) / len(drops), 3),
            "worst_class_drop_pt": round(max(drops), 3), "reduced_flops_share": rep.reduced_flops_share,
            "kept_fp32_nodes": len(rep.fp32_nodes),
            "fallback_rounds": len(report.results[REPORTS[name]].rounds) - 1,
            "per_class": {c["class"]: {"iou_pytorch": c["iou_gt_reference"], "iou": c["iou_gt"]} for c in rep.per_class},
        }
    out["speedup_vs_fp32"] = {name: {b: round(out["latency_ms"]["fp32"][b] / v, 2) for b, v in lat.items()}
                              for name, lat in out["latency_ms"].items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--calib-images", type=int, default=32)
    ap.add_argument("--calib-method", default="minmax")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/int8_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime

    result = {"command": "python benchmarks/int8_cpu.py " + " ".join(map(str, args.runs))
              + f" --size {args.size} --batches {','.join(map(str, args.batches))} --threads {args.threads}",
              "cpu": cpu_facts(), "threads": args.threads, "size": args.size,
              "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                           "python": platform.python_version()},
              "runs": [measure(run, args) for run in args.runs]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
