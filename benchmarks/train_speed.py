"""segdeploy train images/s vs a minimal hand-written smp training loop (issue: ≥ 0.9×).

Same model (U-Net ResNet-18, random init), same synthetic data (160 train images, 128 px), same
batch size (16), same loss (CE + 0.5·Dice), same optimizer, same thread count. The hand loop
is the strictest baseline we could write: all images pre-decoded into one tensor, no
augmentation, no validation, no progress bar. segdeploy's number is its own
`train_images_per_s` (training steps only; validation excluded), with its augmentation on.

    python benchmarks/train_speed.py --epochs 3 --out benchmarks/results/train_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def hand_loop(data_dir: Path, epochs: int, batch: int) -> float:
    import segmentation_models_pytorch as smp
    from PIL import Image

    from segdeploy.data.io import decode_mask
    from segdeploy.data.synth import PALETTE

    files = sorted((data_dir / "train").glob("*_sat.png"))
    xs = torch.stack([torch.from_numpy(np.asarray(Image.open(f))).permute(2, 0, 1).float() / 255 for f in files])
    ys = torch.stack([torch.from_numpy(decode_mask(np.asarray(Image.open(str(f).replace("_sat", "_mask"))), f,
                                                   "palette", 5, 255, PALETTE)) for f in files])
    xs = (xs - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, classes=5)
    dice = smp.losses.DiceLoss("multiclass")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    model.train()
    timed, images = 0.0, 0
    for epoch in range(epochs + 1):  # epoch 0 is warm-up
        perm = torch.randperm(len(xs))
        t0 = time.perf_counter()
        for i in range(0, len(xs) - batch + 1, batch):
            idx = perm[i : i + batch]
            logits = model(xs[idx])
            loss = torch.nn.functional.cross_entropy(logits, ys[idx]) + 0.5 * dice(logits, ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if epoch:
                images += len(idx)
        if epoch:
            timed += time.perf_counter() - t0
    return images / timed


def segdeploy_loop(data_dir: Path, epochs: int, batch: int, out: Path) -> float:
    from segdeploy import recipe
    from segdeploy.train import fit

    rec = recipe.load(ROOT / "recipes/demo.yaml", [f"train.epochs={epochs + 1}", f"train.batch_size={batch}"], data_dir)
    fit(rec, out, overwrite=True, progress=False)
    hist = [json.loads(json.dumps(r)) for r in __import__("csv").DictReader((out / "history.csv").open())]
    rates = [float(r["images_per_s"]) for r in hist[1:]]  # epoch 1 is warm-up, as for the hand loop
    return float(np.mean(rates))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/train_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from segdeploy.data.synth import write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_dataset(data)
        hand = hand_loop(data, args.epochs, args.batch)
        ours = segdeploy_loop(data, args.epochs, args.batch, Path(tmp) / "run")
    result = {
        "benchmark": "train images/s, U-Net ResNet-18, 128 px, batch %d, %d timed epochs" % (args.batch, args.epochs),
        "hand_written_smp_loop_images_per_s": round(hand, 2),
        "segdeploy_train_images_per_s": round(ours, 2),
        "ratio": round(ours / hand, 3),
        "goal": ">= 0.9",
        "threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "command": f"python benchmarks/train_speed.py --epochs {args.epochs} --batch {args.batch}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
