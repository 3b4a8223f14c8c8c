"""The training loop: recipe in, finished run directory out.

A run directory is "complete" only when ``meta.json`` says so; it is written last. Until then
every later verb refuses it, and ``--resume`` continues from ``last.ckpt`` (tensors and plain
values only, so it loads with ``weights_only=True``).
"""

from __future__ import annotations

import csv
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch.utils.data import DataLoader

from segdeploy import artifact as art
from segdeploy.data.dataset import (
    SegmentationDataset,
    band_stats,
    class_pixel_counts,
    discover,
    suggested_class_weights,
)
from segdeploy.errors import ArtifactError
from segdeploy.losses import build_loss
from segdeploy.metrics import ConfusionMatrix, level_mious
from segdeploy.models import build_model, check_model_names, freeze_encoder, input_divisor, static_size
from segdeploy.recipe import Recipe
from segdeploy.tiling import pad_to_multiple
from segdeploy.utils import atomic_path, pick_device, versions, write_json

HISTORY_FIELDS = ["epoch", "train_loss", "val_loss", "val_miou", "val_mdice", "lr", "seconds", "images_per_s"]


@dataclass
class TrainResult:
    run_dir: Path
    best_miou: float
    best_epoch: int
    epochs_run: int
    seconds: float
    train_images_per_s: float
    stopped_early: str | None = None


def pad_collate(divisor: int, ignore_index: int):  # noqa: ANN201
    """Batch samples of different sizes by padding to a common multiple of `divisor`."""

    def collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        h = max(x.shape[-2] for x, _ in items)
        w = max(x.shape[-1] for x, _ in items)
        h, w = math.ceil(h / divisor) * divisor, math.ceil(w / divisor) * divisor
        if all(x.shape[-2:] == (h, w) for x, _ in items):
            return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])
        xs = torch.zeros(len(items), items[0][0].shape[0], h, w)
        ys = torch.full((len(items), h, w), ignore_index, dtype=torch.long)
        for i, (x, y) in enumerate(items):
            xs[i, :, : x.shape[-2], : x.shape[-1]] = x
            ys[i, : y.shape[-2], : y.shape[-1]] = y
        return xs, ys

    return collate


def _num_workers(setting: int | str, device: str) -> int:
    if setting != "auto":
        return int(setting)
    import os

    cores = os.cpu_count() or 1
    # on a small CPU box, loader workers steal the cores the model needs
    return 0 if device == "cpu" and cores <= 4 else min(8, max(cores // 2, 1))


def _scheduler(opt: torch.optim.Optimizer, rec: Recipe, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    s, total = rec.schedule, rec.train.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler
    if s.name == "cosine":
        return sched.CosineAnnealingLR(opt, T_max=total, eta_min=s.min_lr)
    if s.name == "cosine_restarts":
        return sched.CosineAnnealingWarmRestarts(opt, T_0=s.restart_epochs * steps_per_epoch, T_mult=s.restart_mult,
                                                 eta_min=s.min_lr)
    if s.name == "poly":
        return sched.PolynomialLR(opt, total_iters=total, power=s.power)
    if s.name == "onecycle":
        return sched.OneCycleLR(opt, max_lr=rec.optimizer.lr, total_steps=total)
    return None


def _optimizer(params: list[torch.nn.Parameter], rec: Recipe) -> torch.optim.Optimizer:
    o = rec.optimizer
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=True)


@torch.inference_mode()
def validate(model: torch.nn.Module, loader: DataLoader, loss_fn: torch.nn.Module, rec: Recipe, device: str,
             divisor: int, amp: bool) -> tuple[float, ConfusionMatrix]:
    model.eval()
    cm = ConfusionMatrix(rec.classes.num_classes, rec.classes.ignore_index)
    total, n = 0.0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        xp, (h, w) = pad_to_multiple(x, divisor)
        with torch.autocast("cuda", enabled=amp):
            logits = model(xp)[..., :h, :w].float()
        total += float(loss_fn(logits, y)) * len(x)
        n += len(x)
        cm.update(logits.argmax(1), y)
    return total / max(n, 1), cm


def fit(rec: Recipe, out: Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
        console: Console | None = None) -> TrainResult:
    console = console or Console(stderr=True)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise ArtifactError(f"run directory {out} already exists; pass --resume to continue it, "
                                "--overwrite to replace it, or another --out")
        shutil.rmtree(out)
    if resume and not (out / art.LAST_CKPT).is_file():
        raise ArtifactError(f"nothing to resume in {out} (no {art.LAST_CKPT}); drop --resume to start fresh")

    device = pick_device(rec.train.device)
    check_model_names(rec.model)  # a typo in model.* fails before any data is read
    torch.manual_seed(rec.train.seed)
    cls = rec.classes

    # ---- data (validated before anything is written)
    train_samples = discover(rec.data, "train")
    val_samples = discover(rec.data, "val")
    probe = SegmentationDataset(train_samples, rec.data, cls, [0.0] * rec.data.bands, [1.0] * rec.data.bands)
    mean, std = rec.data.mean, rec.data.std
    if mean == "auto" or std == "auto":
        auto_mean, auto_std = band_stats(probe)
        mean = auto_mean if mean == "auto" else mean
        std = auto_std if std == "auto" else std
    auto_weights = None
    counts = class_pixel_counts(probe) if rec.data.cache else None  # decoded once; training reuses the cache
    if counts is not None:
        frac = counts / max(counts.sum(), 1)
        console.print("train class pixels: " + ", ".join(f"{n} {f:.1%}" for n, f in zip(cls.names, frac, strict=True)),
                      highlight=False, soft_wrap=True)
        absent = [n for n, c in zip(cls.names, counts, strict=True) if c == 0]
        if absent:
            console.print(f"[yellow]warning:[/] classes {absent} have no pixels in the training split; "
                          "their IoU cannot be learnt (check the masks or the split)")
    if any(t.class_weights == "auto" for t in rec.loss):
        auto_weights = suggested_class_weights(counts if counts is not None else class_pixel_counts(probe))
    train_ds = SegmentationDataset(train_samples, rec.data, cls, mean, std, augment=rec.augment)
    val_ds = SegmentationDataset(val_samples, rec.data, cls, mean, std)
    if rec.data.cache:  # share decoded arrays between the probe and the real datasets
        train_ds._cache = probe._cache

    # ---- model
    model = build_model(rec.model, rec.data.bands, cls.num_classes)
    divisor = input_divisor(model)
    frozen_bn = freeze_encoder(model, rec.model.trainable_encoder_stages)
    model.to(device)
    cuda = device == "cuda"
    if cuda and rec.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp = cuda and rec.train.amp
    loss_fn = build_loss(rec.loss, cls.num_classes, cls.ignore_index, auto_weights).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(params, rec)
    workers = _num_workers(rec.train.num_workers, device)
    collate = pad_collate(divisor, cls.ignore_index)
    train_loader = DataLoader(train_ds, rec.train.batch_size, shuffle=True, drop_last=len(train_ds) > rec.train.batch_size,
                              num_workers=workers, collate_fn=collate, pin_memory=cuda, persistent_workers=workers > 0)
    val_loader = DataLoader(val_ds, rec.train.batch_size, num_workers=workers, collate_fn=collate, pin_memory=cuda)
    steps = len(train_loader)
    scheduler = _scheduler(opt, rec, steps)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    meta = art.ModelMeta(
        classes=cls.names, palette=[list(c) for c in cls.display_palette()], mean=list(mean), std=list(std),
        max_pixel_value=rec.data.max_pixel_value, bands=rec.data.bands, input_divisor=divisor,
        tile_size=rec.data.tile_size, ignore_index=cls.ignore_index, static_size=static_size(model),
        hierarchy=cls.hierarchy, arch=rec.model.arch, encoder=rec.model.encoder, recipe_digest=rec.digest(),
        versions=versions(),
    )

    start_epoch, best_miou, best_epoch, history = 1, -1.0, 0, []
    if resume:
        ckpt = torch.load(out / art.LAST_CKPT, map_location="cpu", weights_only=True)
        if ckpt["recipe_digest"] != rec.digest():
            raise ArtifactError(f"{out} was trained with a different recipe (data/classes/model differ); "
                                "resume with the same recipe or start a new --out")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if scheduler is not None and ckpt.get("scheduler"):
            if int(ckpt.get("epochs", rec.train.epochs)) == rec.train.epochs:
                scheduler.load_state_dict(ckpt["scheduler"])
            else:  # train.epochs changed: re-plan the schedule for the new length, then fast-forward
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for _ in range(int(ckpt["epoch"]) * steps):
                        scheduler.step()
                console.print(f"schedule re-planned for {rec.train.epochs} epochs")
        start_epoch, best_miou, best_epoch = int(ckpt["epoch"]) + 1, float(ckpt["best_miou"]), int(ckpt["best_epoch"])
        history = _read_history(out / "history.csv")
        console.print(f"resuming {out} at epoch {start_epoch}")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / art.RECIPE_FILE) as tmp:
        tmp.write_text(rec.to_yaml())
    write_json(out / art.META_FILE, {"status": "training", "model_meta": meta.to_dict()})

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    t0 = time.perf_counter()
    train_time, train_images = 0.0, 0
    stopped = None
    epoch = start_epoch - 1
    columns = [TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}  val mIoU {task.fields[miou]}"), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task("train", total=(rec.train.epochs - start_epoch + 1) * steps, epoch=start_epoch,
                            epochs=rec.train.epochs, loss=float("nan"),
                            miou=f"{best_miou:.3f}" if best_miou >= 0 else "-")
        for epoch in range(start_epoch, rec.train.epochs + 1):
            torch.manual_seed(rec.train.seed + epoch)  # resumable: each epoch's shuffling/augmentation is fixed
            model.train()
            for m in frozen_bn:
                m.eval()
            e0, running, seen = time.perf_counter(), 0.0, 0
            for x, y in train_loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if cuda and rec.train.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", enabled=amp):
                    loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if rec.train.grad_clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, rec.train.grad_clip)
                scaler.step(opt)
                scaler.update()
                if scheduler is not None:
                    scheduler.step()
                running += float(loss.detach()) * len(x)
                seen += len(x)
                bar.update(task, advance=1, loss=running / seen, epoch=epoch)
            epoch_train = time.perf_counter() - e0
            train_time += epoch_train
            train_images += seen
            val_loss, cm = validate(model, val_loader, loss_fn, rec, device, divisor, amp)
            mets = cm.compute(cls.names, rec.eval.exclude_background)
            row = {"epoch": epoch, "train_loss": running / max(seen, 1), "val_loss": val_loss, "val_miou": mets.miou,
                   "val_mdice": mets.mdice, "lr": opt.param_groups[0]["lr"], "seconds": round(time.perf_counter() - e0, 2),
                   "images_per_s": round(seen / epoch_train, 2) if epoch_train else 0.0}
            history.append(row)
            improved = mets.miou > best_miou
            if improved:
                best_miou, best_epoch = mets.miou, epoch
                _save_weights(model, out / art.WEIGHTS_FILE)
            bar.update(task, miou=f"{mets.miou:.3f}")
            console.print(f"epoch {epoch:>3}  loss {row['train_loss']:.4f}  val loss {val_loss:.4f}  "
                          f"val mIoU {mets.miou:.4f}  mDice {mets.mdice:.4f}{'  *best' if improved else ''}")
            _write_history(out / "history.csv", history)
            _save_last(out / art.LAST_CKPT, model, opt, scheduler, epoch, rec.train.epochs, best_miou, best_epoch,
                       rec.digest())
            if rec.train.early_stopping and epoch - best_epoch >= rec.train.early_stopping:
                stopped = f"no val mIoU gain for {rec.train.early_stopping} epochs"
                break
            if rec.train.max_minutes and (time.perf_counter() - t0) / 60 > rec.train.max_minutes:
                stopped = f"train.max_minutes={rec.train.max_minutes} reached"
                break

    if stopped:
        console.print(f"stopped early after epoch {epoch}: {stopped}")
    plot_history(history, out / "plots")
    final = {"status": "complete", "model_meta": meta.to_dict(), "best_epoch": best_epoch, "best_val_miou": best_miou,
             "epochs_run": epoch, "stopped_early": stopped, "train_images_per_s": round(train_images / max(train_time, 1e-9), 2)}
    if cls.hierarchy:
        # per-level mIoU of the best weights
        _load_weights(model, out / art.WEIGHTS_FILE)
        _, cm = validate(model, val_loader, loss_fn, rec, device, divisor, amp)
        final["best_val_levels"] = level_mious(cm.matrix, cls.names, cls.hierarchy, rec.eval.exclude_background)
    write_json(out / art.META_FILE, final)
    return TrainResult(out, best_miou, best_epoch, epoch, time.perf_counter() - t0, final["train_images_per_s"], stopped)


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))


def _save_last(path: Path, model, opt, scheduler, epoch: int, epochs: int, best_miou: float, best_epoch: int,  # noqa: ANN001
               digest: str) -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "epoch": epoch, "epochs": epochs, "best_miou": best_miou, "best_epoch": best_epoch,
             "recipe_digest": digest}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _write_history(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, HISTORY_FIELDS)
        w.writeheader()
        w.writerows(rows)


def _read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return [{k: (float(v) if k != "epoch" else int(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_history(history: list[dict], out_dir: Path) -> list[Path]:
    """loss.png (train/val loss) and miou.png (val mIoU/mDice) per epoch."""
    if not history:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    ep = [r["epoch"] for r in history]
    paths = []
    for name, keys, ylabel in (("loss", ("train_loss", "val_loss"), "loss"),
                               ("miou", ("val_miou", "val_mdice"), "score")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for k in keys:
            ax.plot(ep, [r[k] for r in history], marker="o", ms=3, label=k.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        paths.append(path)
    return paths

