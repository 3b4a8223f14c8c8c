"""Where `segdeploy predict`'s CPU goes besides the backend (issue #12's end-to-end goal).

One predict run with each pipeline stage wrapped from outside (no hooks in the product): wall
time and this thread's CPU time (`time.thread_time`) of the backend's forward, the main thread's
own work around it (stacking and normalising), the reader thread (decoding tiles and their
validity), the writer thread (softmax, blending, class maps, compression) and the finishing
step (last rows, preview). On a machine whose cores the backend already fills, every CPU second
outside the backend is taken from inference, which is why end to end cannot reach the bare
backend there.

    python benchmarks/predict_profile.py --model quickstart/run/export/model.onnx \
        --scene scene_4096.tif --out benchmarks/results/predict_profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


def timed(obj: object, name: str, totals: dict[str, list[float]], label: str) -> None:
    """Wrap obj.name so each call adds its wall and thread-CPU seconds to totals[label]."""
    inner = getattr(obj, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return inner(*args, **kwargs)
        finally:
            entry = totals.setdefault(label, [0.0, 0.0])
            entry[0] += time.perf_counter() - wall
            entry[1] += time.thread_time() - cpu

    setattr(obj, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--scene", type=Path, required=True)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", type=Path, default=Path("/tmp/segdeploy-profile.tif"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/predict_profile.json"))
    args = ap.parse_args()

    import segdeploy.predict as predict
    from segdeploy.runtime import load_backend

    backend = load_backend(args.model, threads=args.threads)
    totals: dict[str, list[float]] = {}
    timed(backend, "run", totals, "backend forward (main thread)")
    timed(predict.TilePipeline, "infer", totals, "inference step (main thread, forward included)")
    timed(predict.TilePipeline, "read_loop", totals, "reader thread")
    timed(predict.TilePipeline, "write_loop", totals, "writer thread")
    timed(predict.StripAccumulator, "add_logits", totals, "  of which softmax + blend")
    timed(predict.RowSink, "add", totals, "  of which class rows + compression")
    timed(predict.RowSink, "finish", totals, "finishing (last rows, preview)")
    cpu0 = time.process_time()
    result = predict.predict_file(backend, args.scene, args.output,
                                  predict.PredictOptions(tile=args.tile, overlap=args.overlap, batch=args.batch))
    process_cpu = time.process_time() - cpu0
    computed = result.tiles - result.skipped_tiles
    infer = totals["inference step (main thread, forward included)"]
    forward = totals["backend forward (main thread)"]
    totals["main thread around the forward"] = [infer[0] - forward[0], infer[1] - forward[1]]
    outside = sum(totals[k][1] for k in ("main thread around the forward", "reader thread", "writer thread",
                                         "finishing (last rows, preview)"))
    report = {
        "scene": str(args.scene), "model": str(args.model), "tile": args.tile, "overlap": args.overlap,
        "batch": args.batch, "threads": args.threads, "tiles_computed": computed,
        "seconds": result.seconds, "process_cpu_seconds": round(process_cpu, 2),
        "stages": {k: {"wall_s": round(v[0], 3), "thread_cpu_s": round(v[1], 3),
                       "thread_cpu_ms_per_tile": round(1000 * v[1] / computed, 2)} for k, v in totals.items()},
        "cpu_outside_backend_ms_per_tile": round(1000 * outside / computed, 1),
        "backend_wall_ms_per_tile": round(1000 * forward[0] / computed, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join(["python benchmarks/predict_profile.py", *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
