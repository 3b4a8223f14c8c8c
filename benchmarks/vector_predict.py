"""`segdeploy predict --vector`: what polygons made while predicting cost (issue #22).

Three variants on one synthetic scene (`segdeploy.data.synth.write_scene`), each in its own
process so each peak RSS is that run's alone, interleaved over `--repeats` rounds (the order
rotates each round; other work on the machine only ever slows a run down):

1. raster: `segdeploy predict MODEL SCENE --out R.tif` (the class raster only);
2. vector: the same with `--vector V.gpkg` (polygons made from each finished row band);
3. two-step, the way a user does it today: the raster of (1), then a second process that reads the
   finished class raster whole, polygonises it with `rasterio.features.shapes` and writes the
   polygons with GDAL (pyogrio, the same attributes: class id and name, area, pixel count).

Goals: the vector run's peak RSS within 1.3× the raster run's; its total time ≤ raster + two-step
polygonising. The vector run's polygons are checked against the two-step's: the same count, pixels
and area per class (and, with --verify, the same polygons, vertex for vertex).

    python benchmarks/vector_predict.py --model M.onnx --size 4096 --repeats 2 \\
        --work /tmp/vbench --out benchmarks/results/vector_predict_4096.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def two_step(raster: Path, out: Path, names: list[str], batch: int = 65536) -> dict:
    """Polygonise a finished class raster whole and write it with GDAL: the reference workflow."""
    import numpy as np
    import pyogrio.raw
    import rasterio
    import shapely
    from rasterio.features import shapes

    t0 = time.perf_counter()
    with rasterio.open(raster) as src:
        labels, transform, crs, nodata = src.read(1), src.transform, src.crs, src.nodata
    geoms, values = [], []
    for geojson, value in shapes(labels, mask=labels != nodata, connectivity=4, transform=transform):
        geoms.append(shapely.geometry.shape(geojson))
        values.append(int(value))
    del labels
    geoms_a, values_a = np.array(geoms, dtype=object), np.array(values, np.int32)
    del geoms
    area = shapely.area(geoms_a)
    pixels = np.rint(area / abs(transform.determinant)).astype(np.int64)
    class_names = np.array([names[v] for v in values_a], dtype=object)
    out.unlink(missing_ok=True)
    for i in range(0, len(geoms_a), batch):  # the same batched writes as segdeploy's
        s = slice(i, i + batch)
        pyogrio.raw.write(str(out), shapely.to_wkb(geoms_a[s]), [values_a[s], class_names[s], area[s], pixels[s]],
                          ["class_id", "class_name", "area", "pixels"], layer=out.stem, driver="GPKG",
                          geometry_type="Polygon", crs=crs.to_wkt() if crs else None, append=i > 0)
    return {"seconds": round(time.perf_counter() - t0, 3), "features": int(len(geoms_a)),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run_predict(args: argparse.Namespace, scene: Path, out: Path, vector: Path | None) -> dict:
    cmd = [PYTHON, "-m", "segdeploy", "predict", str(args.model), str(scene), "--out", str(out), "--tile",
           str(args.tile), "--overlap", str(args.overlap), "--batch", str(args.batch), "--no-preview", "--no-progress",
           "--overwrite", "--json", str(out.with_suffix(".json"))]  # each round replaces the last one's files
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if vector is not None:
        cmd += ["--vector", str(vector)]
    proc, wall, cpu, process_peak = timed(cmd)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    res = json.loads(out.with_suffix(".json").read_text())["results"][0]
    return {"wall_s": wall, "cpu_s": cpu, "predict_s": res["seconds"], "peak_rss_mb": res["peak_rss_mb"],
            "process_peak_rss_mb": process_peak, "tiles": res["tiles"]}


def timed(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float, float, float | None]:
    """Run a child; its wall time, its CPU time (user + system, all its threads) and its own peak
    resident memory in MiB from /usr/bin/time (the kernel's maxrss of that process; None without it)."""
    import shutil
    import tempfile

    gnu_time = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    with tempfile.NamedTemporaryFile(suffix=".rss") as rss_file:
        full = [gnu_time, "-f", "%M", "-o", rss_file.name, *cmd] if gnu_time else cmd
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(full, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        text = Path(rss_file.name).read_text().strip().splitlines()
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    peak = round(int(text[-1]) / 1024, 1) if text and text[-1].isdigit() else None
    return proc, round(wall, 3), round(cpu, 3), peak


def run_two_step(raster: Path, out: Path, names: list[str]) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import vector_predict as v; "
            f"from pathlib import Path; print(json.dumps(v.two_step(Path({str(raster)!r}), Path({str(out)!r}), "
            f"{names!r})))")
    proc, wall, cpu, process_peak = timed([PYTHON, "-c", code])
    if proc.returncode:
        raise SystemExit(f"two-step polygonising failed:\n{proc.stderr}")
    return json.loads(proc.stdout.splitlines()[-1]) | {"wall_s": wall, "cpu_s": cpu,
                                                        "process_peak_rss_mb": process_peak}


def per_class(path: Path) -> dict:
    """Count, pixels and area per class id of a vector file (attributes only)."""
    import math

    import numpy as np
    import pyogrio.raw

    _, _, _, (cid, _, area, pixels) = pyogrio.raw.read(path, read_geometry=False,
                                                       columns=["class_id", "class_name", "area", "pixels"])
    return {int(c): {"polygons": int((cid == c).sum()), "pixels": int(pixels[cid == c].sum()),
                     "area": math.fsum(area[cid == c])} for c in np.unique(cid)}  # fsum: order-independent


def same_polygons(a: Path, b: Path) -> bool:
    import pyogrio.raw
    import shapely

    def norm(path: Path) -> list:
        _, _, wkb, (cid, *_) = pyogrio.raw.read(path, columns=["class_id"])
        return sorted(zip(cid.tolist(), shapely.to_wkb(shapely.normalize(shapely.from_wkb(wkb))).tolist()))

    return norm(a) == norm(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vector_bench"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--verify", action="store_true", help="compare every polygon, not only per-class totals")
    ap.add_argument("--note", default="", help="what the model is (recorded with the result)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    scene = args.work / f"scene_{args.size}.tif"
    if not scene.exists():
        from segdeploy.data.synth import write_scene

        write_scene(scene, None, size=args.size)
    from segdeploy.artifact import artifact_meta

    names = list(artifact_meta(args.model).classes)
    runs: list[dict] = []
    for r in range(args.repeats):  # interleaved; the two-step polygonises this round's raster
        for v in (["raster", "vector"] if r % 2 == 0 else ["vector", "raster"]) + ["two_step"]:
            name = f"{args.size}_{r}"
            raster, vec, two = (args.work / f"{kind}_{name}{ext}" for kind, ext in
                                (("raster", ".tif"), ("vector", ".gpkg"), ("two", ".gpkg")))
            if v == "raster":
                rec = run_predict(args, scene, raster, None)
            elif v == "vector":
                rec = run_predict(args, scene, args.work / f"withvec_{name}.tif", vec)
            else:
                rec = run_two_step(raster, two, names)
            runs.append({"round": r, "variant": v, **rec})
            print(json.dumps(runs[-1]), flush=True)
    report(args, scene, runs)


def report(args: argparse.Namespace, scene: Path, runs: list[dict]) -> None:
    def pick(variant: str, key: str) -> list[float]:
        return [x[key] for x in runs if x["variant"] == variant]

    raster_s, vector_s, two_s = pick("raster", "wall_s"), pick("vector", "wall_s"), pick("two_step", "wall_s")
    raster_cpu, vector_cpu, two_cpu = pick("raster", "cpu_s"), pick("vector", "cpu_s"), pick("two_step", "cpu_s")
    raster_mb, vector_mb, two_mb = pick("raster", "peak_rss_mb"), pick("vector", "peak_rss_mb"), pick("two_step",
                                                                                                       "peak_rss_mb")
    last = f"{args.size}_{args.repeats - 1}"
    vec_classes, two_classes = per_class(args.work / f"vector_{last}.gpkg"), per_class(args.work / f"two_{last}.gpkg")
    summary = {
        "raster_s": {"best": min(raster_s), "median": statistics.median(raster_s)},
        "vector_s": {"best": min(vector_s), "median": statistics.median(vector_s)},
        "two_step_polygonise_s": {"best": min(two_s), "median": statistics.median(two_s)},
        "vector_extra_s_best": round(min(vector_s) - min(raster_s), 2),
        "two_step_total_s_best": round(min(raster_s) + min(two_s), 2),
        "cpu_s_median": {"raster": statistics.median(raster_cpu), "vector": statistics.median(vector_cpu),
                         "two_step_polygonise": statistics.median(two_cpu)},
        "vector_extra_cpu_s_median": round(statistics.median(vector_cpu) - statistics.median(raster_cpu), 2),
        "peak_rss_mb": {"raster": max(raster_mb), "vector": max(vector_mb), "two_step_polygonise": max(two_mb)},
        "vector_rss_ratio": round(max(vector_mb) / max(raster_mb), 3),
        "process_peak_rss_mb": {v: max(x["process_peak_rss_mb"] or 0 for x in runs if x["variant"] == v)
                                for v in ("raster", "vector", "two_step")},
        "features": sum(c["polygons"] for c in vec_classes.values()),
        "same_per_class_totals_as_two_step": vec_classes == two_classes,
    }
    proc_peaks = summary["process_peak_rss_mb"]
    summary["vector_process_rss_ratio"] = round(proc_peaks["vector"] / max(proc_peaks["raster"], 1e-9), 3)
    summary["goal_rss_within_1.3x"] = summary["vector_rss_ratio"] <= 1.3 and summary["vector_process_rss_ratio"] <= 1.3
    summary["goal_time_le_two_step"] = min(vector_s) <= summary["two_step_total_s_best"]
    if args.verify:
        summary["same_polygons_as_two_step"] = same_polygons(args.work / f"vector_{last}.gpkg",
                                                             args.work / f"two_{last}.gpkg")
    result = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "scene": f"segdeploy.data.synth.write_scene(size={args.size})", "model": str(args.model),
              "model_note": args.note,
              "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores, "
                         f"load average at the end {__import__('os').getloadavg()}",
              "per_class": vec_classes, "summary": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
