"""`predict RUN` with `--backend auto` vs `--backend torch` (issue #21 part 4).

Goals on this CPU: auto (with an INT8 export in the run) ≥ 1.8× the MP/s of `--backend torch`,
≥ 99% label agreement between the two class rasters, peak RSS of the auto run ≤ 600 MB with no
torch import. Each predict is its own process (peak RSS = the process's, from wait4's ru_maxrss;
the modules it imported are recorded at exit); auto and torch alternate, `--repeats` rounds, and
the best and median MP/s of each are reported (MP/s = the summary's, pixels written / wall time of
the prediction, model loading excluded), plus the wall time of the whole process.

    python benchmarks/auto_backend.py RUN SCENE.tif [--repeats 3] [--out benchmarks/results/auto_backend.json]

RUN needs `segdeploy export RUN --int8` first (the benchmark refuses a run without it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the CLI in a child that records, at exit, whether torch was imported
PROBE = """
import atexit, json, sys
atexit.register(lambda: json.dump(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'), open({report!r}, 'w')))
from segdeploy.cli import main
sys.argv = ['segdeploy', *{args!r}]
main()
"""


def predict_once(run: Path, scene: Path, backend: str, work: Path) -> dict:
    out, summary, report = work / f"{backend}.tif", work / f"{backend}.json", work / f"{backend}.modules.json"
    args = ["predict", str(run), str(scene), "--out", str(out), "--backend", backend, "--no-progress", "--no-preview",
            "--overwrite", "--json", str(summary)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", PROBE.format(report=str(report), args=args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stderr = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"predict --backend {backend} failed:\n{stderr}")
    doc = json.loads(summary.read_text())
    return {"megapixels_per_s": doc["megapixels_per_s"], "process_seconds": round(wall, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "raster_peak_rss_mb": doc["results"][0]["peak_rss_mb"],
            "torch_imported": bool(json.loads(report.read_text())), "model": doc["model"],
            "choice_line": next((line for line in stderr.splitlines() if line.startswith("model: ")), "")}


def agreement(a: Path, b: Path) -> float:
    import numpy as np
    import rasterio

    with rasterio.open(a) as x, rasterio.open(b) as y:
        la, lb, nodata = x.read(1), y.read(1), x.nodata
    valid = la != nodata if nodata is not None else np.ones(la.shape, bool)
    return float((la[valid] == lb[valid]).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("scene", type=Path)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/auto_backend.json")
    a = p.parse_args()
    if not (a.run / "export/model.int8.cpu.onnx").is_file():
        raise SystemExit(f"{a.run} has no INT8 export; run `segdeploy export {a.run} --int8` first")
    runs: dict[str, list[dict]] = {"auto": [], "torch": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):  # interleaved: auto, torch, auto, torch, ...
            for backend in runs:
                runs[backend].append(predict_once(a.run, a.scene, backend, Path(tmp)))
                print(f"round {i + 1} {backend}: {runs[backend][-1]['megapixels_per_s']:.3f} MP/s, "
                      f"peak RSS {runs[backend][-1]['peak_rss_mb']:.0f} MB", flush=True)
        agree = agreement(Path(tmp) / "auto.tif", Path(tmp) / "torch.tif")
    mps = {k: [r["megapixels_per_s"] for r in v] for k, v in runs.items()}
    result = {
        "command": f"python benchmarks/auto_backend.py {a.run} {a.scene} --repeats {a.repeats}",
        "machine": machine(), "scene": str(a.scene), "auto_choice": runs["auto"][0]["model"],
        "auto_choice_line": runs["auto"][0]["choice_line"],
        "megapixels_per_s": {k: {"best": max(v), "median": statistics.median(v), "all": v} for k, v in mps.items()},
        "speedup_best": round(max(mps["auto"]) / max(mps["torch"]), 3),
        "speedup_median": round(statistics.median(mps["auto"]) / statistics.median(mps["torch"]), 3),
        "label_agreement": round(agree, 6),
        "auto_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["auto"]),
        "torch_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["torch"]),
        "auto_imported_torch": any(r["torch_imported"] for r in runs["auto"]),
        "goals": {"speedup": 1.8, "label_agreement": 0.99, "auto_peak_rss_mb": 600},
        "runs": runs,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("speedup_best", "speedup_median", "label_agreement", "auto_peak_rss_mb",
                                             "torch_peak_rss_mb", "auto_imported_torch")}, indent=2))


def machine() -> dict:
    sys.path.insert(0, str(ROOT))
    from segdeploy.runtime.choose import int8_fast, machine_fingerprint

    import onnxruntime

    return {**machine_fingerprint(), "int8_fast_by": int8_fast(), "onnxruntime": onnxruntime.__version__,
            "python": sys.version.split()[0], "load_average_1_5_15_min_at_end": os.getloadavg()}


if __name__ == "__main__":
    main()
