"""Real-size images (issue #17.8): peak RSS of `segdeploy eval` on a split of 2448² images, and the
pixels one training epoch sees, before and after tiled scoring and data.crops_per_image.

1. eval: a tiny run (demo U-Net ResNet-18, 1 epoch on small synth tiles, data.tile_size = --tile)
   scores a val split of --images synth-like --size² PNG images (DeepGlobe-sized: 2448²), each in
   its own process, peak RSS from getrusage. Goal ≤ 2 GB. `--before-images N` also runs the code
   before this change (a git checkout given by --before, e.g. /work/main before the merge) on N
   images; it scored whole images batched, ~3.8 GB for one image: keep N small.
2. epoch: the training split of --images such images goes through prepare_data and one pass of the
   training loader's dataset (random crops, flips, rot90; no model), once with data.crops_per_image
   1 (what training did before: one crop per image) and once with "auto"; the pixels counted are
   the crop pixels inside their image (mask ≠ ignore_index), measured, not computed.

    python benchmarks/eval_memory.py --out benchmarks/results/eval_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_big_split(root: Path, split: str, count: int, size: int, seed: int) -> None:
    """`{split}/bigNN_sat.png` + `_mask.png` (palette), synth land cover at size² (synth_tile)."""
    from PIL import Image

    from segdeploy.data.synth import PALETTE, synth_tile
    from segdeploy.viz import colorize_classes

    (root / split).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        if (root / split / f"big{i:02d}_mask.png").exists():
            continue
        img, mask = synth_tile(seed + i, size)
        Image.fromarray(img).save(root / split / f"big{i:02d}_sat.png")
        Image.fromarray(colorize_classes(mask, PALETTE, 255)).save(root / split / f"big{i:02d}_mask.png")


def tiny_run(work: Path, tile: int) -> Path:
    from segdeploy import recipe
    from segdeploy.data.synth import synth
    from segdeploy.train import fit

    run = work / "run"
    if (run / "model.safetensors").exists():
        return run
    synth(work / "small", tile=64, scene_size=64, sizes={"train": 8, "val": 4, "test": 0})
    rec = recipe.load(ROOT / "recipes/demo.yaml", ["train.epochs=1", f"data.tile_size={tile}", "train.batch_size=4"],
                      work / "small")
    fit(rec, run, progress=False)
    return run


def eval_child(args: argparse.Namespace) -> dict:
    from segdeploy.evaluate import evaluate
    from segdeploy.utils import peak_rss_mb

    t0 = time.perf_counter()
    report = evaluate(Path(args.run), "val", data_root=Path(args.data), plots=False, batch_size=args.batch)
    return {"images": report.images, "miou": round(report.metrics.miou, 6), "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def epoch_child(args: argparse.Namespace) -> dict:
    import numpy as np
    from rich.console import Console

    from segdeploy import recipe
    from segdeploy.data.torchdata import CropEpoch
    from segdeploy.train import prepare_data
    from segdeploy.utils import peak_rss_mb

    rec = recipe.load(ROOT / "recipes/demo.yaml", [f"data.tile_size={args.tile}", "augment.crop=true",
                                                   f"data.crops_per_image={args.crops}"], Path(args.data))
    data = prepare_data(rec, Console(file=open(os.devnull, "w")))  # noqa: SIM115
    epoch = CropEpoch(data.train, data.epoch)
    seen = 0
    for k in range(len(epoch)):
        seen += int((epoch[k][1] != rec.classes.ignore_index).sum())
    return {"crops_per_image": args.crops, "samples": len(epoch), "pixels_seen": seen,
            "split_pixels": data.epoch.split_pixels, "share": round(seen / data.epoch.split_pixels, 4),
            "planned_pixels": data.epoch.pixels, "peak_rss_mb": round(peak_rss_mb(), 1)}


def first_images(big: Path, few: Path, count: int) -> Path:
    """A val split of the first `count` big images (hard links)."""
    if not few.exists():
        (few / "val").mkdir(parents=True)
        for f in sorted((big / "val").iterdir())[: 2 * count]:
            os.link(f, few / "val" / f.name)
    return few


def run_for_old_code(run: Path) -> Path:
    """A copy of the run whose recipe.yaml lacks the keys the old schema did not know."""
    import shutil

    old = run.with_name("run_old_schema")
    if not old.exists():
        shutil.copytree(run, old)
        text = (old / "recipe.yaml").read_text().splitlines()
        (old / "recipe.yaml").write_text("\n".join(line for line in text if "crops_per_image" not in line) + "\n")
    return old


def run_child(mode: str, pythonpath: Path = ROOT, **kw: object) -> dict:
    cmd = [sys.executable, __file__, "--child", mode] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(pythonpath)})
    if out.returncode:
        raise SystemExit(f"child {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", choices=["eval", "epoch"])
    ap.add_argument("--run", default="")
    ap.add_argument("--data", default="")
    ap.add_argument("--crops", default="auto")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, default=2448)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--before", type=Path, default=None, help="a checkout of the code before tiled eval")
    ap.add_argument("--before-images", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/segdeploy-eval-memory"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/eval_memory.json")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(eval_child(args) if args.child == "eval" else epoch_child(args)))
        return
    work = args.workdir
    big = work / f"big{args.size}"
    write_big_split(big, "val", args.images, args.size, seed=500)
    write_big_split(big, "train", args.images, args.size, seed=900)
    run = tiny_run(work, args.tile)
    from segdeploy.utils import versions

    result: dict = {"versions": versions(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": platform.processor() or
                    platform.machine(), "cpus": os.cpu_count(), "images": args.images, "size": args.size,
                    "tile": args.tile, "model": "demo U-Net ResNet-18 (random init + 1 epoch), torch on CPU"}
    result["eval_after"] = run_child("eval", run=run, data=big, batch=args.batch)
    if args.before:
        commit = subprocess.run(["git", "-C", str(args.before), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        result["eval_before"] = {**run_child("eval", args.before, run=run_for_old_code(run), batch=args.batch,
                                             data=first_images(big, work / "few", args.before_images)),
                                 "code": f"{args.before} at {commit}"}
    result["epoch_before"] = run_child("epoch", data=big, crops=1)
    result["epoch_after"] = run_child("epoch", data=big, crops="auto")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
