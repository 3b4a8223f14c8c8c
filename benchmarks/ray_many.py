"""Many-raster throughput: serial `segdeploy predict` against `--ray` with 1 and 2 workers (#11).

Makes N copies of a synthetic scene (shifted so no two are equal), predicts them with the same
ONNX model, tile, overlap and batch in each mode, checks that every mode's class maps equal the
serial ones byte for byte, and records wall time, throughput with and without the local
cluster's start-up, and the machine's core count.

    python benchmarks/ray_many.py RUN/export/model.onnx --rasters 8 --size 1024 \\
        --out benchmarks/results/ray_many.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "segdeploy"]


def make_scenes(folder: Path, n: int, size: int) -> list[Path]:
    """N shifted copies of `segdeploy data synth`'s scene at size² (3-band uint8, georeferenced)."""
    synth = folder / "synth"
    subprocess.run([*CLI, "data", "synth", str(synth), "--tile", "64", "--scene-size", str(size)], check=True,
                   capture_output=True)
    with rasterio.open(synth / "scene/scene.tif") as src:
        pixels, profile = src.read(), src.profile
    paths = []
    for i in range(n):
        path = folder / "in" / f"scene{i:02d}.tif"
        path.parent.mkdir(exist_ok=True)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(np.roll(pixels, 97 * i, axis=(1, 2)))
        paths.append(path)
    return paths


def run(model: Path, inputs: Path, out: Path, extra: list[str]) -> dict:
    report = out.with_suffix(".json")
    t0 = time.perf_counter()
    subprocess.run([*CLI, "predict", str(model), str(inputs), "--out", str(out), "--no-progress", "--no-preview",
                    "--batch", "2", "--json", str(report), *extra], check=True, capture_output=True)
    wall = time.perf_counter() - t0
    summary = json.loads(report.read_text())
    pixels = sum(r["width"] * r["height"] for r in summary["results"])
    connect = (summary.get("ray") or {}).get("connect_seconds", 0.0)
    return {"args": extra, "wall_s": round(wall, 2), "predict_s": summary["seconds"], "ray_connect_s": connect,
            "megapixels": round(pixels / 1e6, 2), "mps_wall": round(pixels / 1e6 / wall, 3),
            "mps_after_start": round(pixels / 1e6 / max(summary["seconds"] - connect, 1e-9), 3),
            "ray": summary.get("ray"), "peak_rss_mb_per_process": max(r["peak_rss_mb"] for r in summary["results"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--rasters", type=int, default=8)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ray_many.json")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_scenes(folder, args.rasters, args.size)
        modes = {"serial": ["--threads", str(cores)], "ray_1_worker": ["--ray", "--workers", "1"],
                 "ray_2_workers": ["--ray", "--workers", "2"]}
        results = {name: run(args.model, folder / "in", folder / name, extra) for name, extra in modes.items()}
        for name in modes:
            for ref in sorted((folder / "serial").glob("*.tif")):
                if (folder / name / ref.name).read_bytes() != ref.read_bytes():
                    raise SystemExit(f"{name}: {ref.name} differs from the serial output")
    record = {"command": " ".join(["python", "benchmarks/ray_many.py", *sys.argv[1:]]), "cores": cores,
              "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
              "rasters": args.rasters, "size": args.size, "identical_to_serial": True, "modes": results}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
