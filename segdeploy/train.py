"""The training loop: recipe in, finished run directory out.

A run directory is "complete" only when ``meta.json`` says so; it is written last. Until then
every later verb refuses it, and ``--resume`` continues from ``last.ckpt`` (tensors and plain
values only, so it loads with ``weights_only=True``).
"""

from __future__ import annotations

import io
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch.utils.data import DataLoader, DistributedSampler

from segdeploy import artifact as art
from segdeploy.data.dataset import (
    PixelFormatCheck,
    SampleCache,
    SampleReader,
    class_pixel_counts,
    discover,
    images_in_several_splits,
    leak_message,
    split_defined,
    suggested_class_weights,
)
from segdeploy.data.torchdata import CropEpoch, EpochPlan, SeededSampler, SegmentationDataset, band_stats
from segdeploy.distributed import ShardSampler, World, all_sum, barrier, from_main, join, leave, sync_buffers
from segdeploy.errors import ArtifactError, DataError, Interrupted, NonFiniteError, RecipeError, UserError
from segdeploy.losses import build_loss
from segdeploy.metrics import ConfusionMatrix, level_mious
from segdeploy.models import (
    build_model,
    check_batch_of_one,
    check_model_names,
    check_tile_size,
    facts,
    freeze_encoder,
)
from segdeploy.progress import WorkProgress
from segdeploy.recipe import Recipe
from segdeploy.reproducible import deterministic_mode, epoch_seed, seed_everything
from segdeploy.scoring import default_plan, score_split
from segdeploy.tracking import Tracker, resolve_mlflow_uri
from segdeploy.utils import (
    pick_device,
    swap_in,
    versions,
    writable_location,
)

@dataclass
class TrainResult:
    """What a training run did: its directory, best validation mIoU and epoch, epochs run, wall seconds, training
    images/s, why it stopped early (None: it did not), the world size and whether this process is rank 0."""
    run_dir: Path
    best_miou: float
    best_epoch: int
    epochs_run: int
    seconds: float
    train_images_per_s: float
    stopped_early: str | None = None
    world_size: int = 1
    main: bool = True  # rank 0 (the one that wrote the run and reports it)


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
def validate(model: torch.nn.Module, val: SampleReader, loss_fn: torch.nn.Module, rec: Recipe, device: str,
             meta: art.ModelMeta, amp: bool, world: World = World()) -> tuple[float, ConfusionMatrix]:
    """Loss and confusion matrix over the validation images, scored exactly as `segdeploy eval`
    scores them (`scoring.score_split`: predict's tiles, padding and blending, through a torch
    Backend over the model in training). The loss is the mean over validation tiles (padding
    ignored). Under DDP each rank scores its shard and the sums are all-reduced, so the metrics equal
    one process's on the same weights."""
    from segdeploy.runtime.torch import TorchBackend

    backend = TorchBackend(model, meta, Path(), device=device, precision="fp16" if amp else "fp32",
                           channels_last=rec.train.channels_last)
    total, n = 0.0, 0

    def tile_loss(targets: np.ndarray, logits: np.ndarray) -> None:
        nonlocal total, n
        if not (targets != rec.classes.ignore_index).any():  # the mean loss over no labelled pixel is NaN
            return
        x, y = torch.from_numpy(logits).to(device), torch.from_numpy(targets).to(device)
        total += float(loss_fn(x, y)) * len(x)
        n += len(x)

    shard = ShardSampler(len(val), world) if world.active else None
    cm = score_split(backend, val, default_plan(meta, rec.train.batch_size), shard, observe_tiles=tile_loss)
    if world.active:
        sums = all_sum(torch.tensor([total, float(n)], dtype=torch.float64, device=device), world)
        total, n = float(sums[0]), int(sums[1])
        cm.matrix = all_sum(torch.from_numpy(cm.matrix).to(device), world).cpu().numpy()
    return total / max(n, 1), cm


@dataclass
class TrainingData:
    """Every split found and every file read once, before anything is written."""

    train: SegmentationDataset
    val: SegmentationDataset
    splits: dict[str, list[str]]
    mean: list[float]
    std: list[float]
    input_dtype: str
    class_counts: np.ndarray | None
    epoch: EpochPlan  # crops per training image per epoch (data.crops_per_image)


def prepare_data(rec: Recipe, console: Console) -> TrainingData:
    """Pairing, decoding, mask values and one pixel format that fits ``data.max_pixel_value``,
    checked for every file of every split: a bad file fails here, not after an epoch."""
    cls, bands = rec.classes, rec.data.bands
    samples = {split: discover(rec.data, split) for split in ("train", "val")}
    if split_defined(rec.data, "test"):
        try:
            samples["test"] = discover(rec.data, "test")
        except DataError as exc:
            if "is empty" not in str(exc):
                raise
            console.print(f"[yellow]warning:[/] {exc}")
    shared = images_in_several_splits(samples)
    if shared:
        raise DataError(leak_message(shared))
    zeros, ones = [0.0] * bands, [1.0] * bands
    cache = SampleCache(rec.data.cache_bytes) if rec.data.cache_bytes else None  # shared by train and val
    train_ds = SegmentationDataset(samples["train"], rec.data, cls, zeros, ones, augment=rec.augment, cache=cache)
    val_ds = SegmentationDataset(samples["val"], rec.data, cls, zeros, ones, cache=cache)
    checked = [train_ds, val_ds]
    if "test" in samples:  # read to be checked, not kept
        checked.append(SegmentationDataset(samples["test"], rec.data, cls, zeros, ones))
    sizes, dtype, nonfinite = _read_every_file(rec, checked)
    _warn_nonfinite(nonfinite, console)
    mean, std = rec.data.mean, rec.data.std
    if mean == "auto" or std == "auto":
        auto_mean, auto_std = band_stats(train_ds)
        mean = auto_mean if mean == "auto" else mean
        std = auto_std if std == "auto" else std
    needs_counts = cache is not None or any(t.class_weights == "auto" for t in rec.loss)
    counts = class_pixel_counts(train_ds) if needs_counts else None
    train_ds.set_normalization(mean, std)
    val_ds.set_normalization(mean, std)
    splits = {name: [s.key for s in items] for name, items in samples.items()}
    epoch = EpochPlan.of(sizes, rec.data.tile_size, rec.data.crops_per_image, rec.augment.crop)
    console.print(epoch.describe() + (f"; {cache.describe()}" if cache else ""), highlight=False)
    return TrainingData(train_ds, val_ds, splits, list(mean), list(std), dtype, counts, epoch)


def _read_every_file(rec: Recipe, readers: list[SegmentationDataset]) -> tuple[list[tuple[int, int]], str, list[str]]:
    """Decode every image and mask of every split once (a bad file fails here, not after an epoch),
    checking one pixel format that fits data.max_pixel_value over the valid pixels: the (H, W) of
    each training image, that pixel type, and the images with undeclared NaN/Inf pixels."""
    pixel_format = PixelFormatCheck(rec.data)
    sizes, nonfinite = [], []
    for k, ds in enumerate(readers):
        for i, sample in enumerate(ds.samples):
            loaded = ds.sample(i)
            problem = pixel_format.problem(sample.image, loaded.image, loaded.valid)
            if problem:
                raise DataError(problem)
            if loaded.nonfinite:
                nonfinite.append(f"{sample.image} ({loaded.nonfinite} px)")
            if k == 0:
                sizes.append(loaded.image.shape[:2])
    return sizes, pixel_format.dtype or "uint8", nonfinite


def _warn_nonfinite(files: list[str], console: Console) -> None:
    """Name every image with NaN/Inf pixels no nodata value declares: they are trained as invalid
    (ignore_index, filled with the mean), as predict outputs them as nodata, but are worth knowing."""
    if not files:
        return
    console.print(f"[yellow]warning:[/] {len(files)} image(s) have NaN/Inf pixels that no nodata value declares; "
                  "they are ignored in training and validation (`segdeploy data inspect` says how to declare them):",
                  highlight=False, soft_wrap=True)
    for f in files:
        console.print(f"  {f}", highlight=False, soft_wrap=True)


def _report_class_balance(names: list[str], counts: np.ndarray, console: Console) -> None:
    frac = counts / max(counts.sum(), 1)
    console.print("train class pixels: " + ", ".join(f"{n} {f:.1%}" for n, f in zip(names, frac, strict=True)),
                  highlight=False, soft_wrap=True)
    absent = [n for n, c in zip(names, counts, strict=True) if c == 0]
    if absent:
        console.print(f"[yellow]warning:[/] classes {absent} have no pixels in the training split; "
                      "their IoU cannot be learnt (check the masks or the split)")


def plan_output(out: Path, resume: bool, overwrite: bool) -> str:
    """What training does with `out`: 'new', 'resume' or 'replace'. Refuses, with the one flag
    that fits, anything that would lose or mix up earlier work; nothing is written here. A run
    that stopped before its first epoch ended holds nothing to lose: a plain retry replaces it."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one of them")
    state = art.run_state(out)
    if state == "foreign":
        raise ArtifactError(f"{out} exists and is not a segdeploy run directory; choose another --out "
                            "(segdeploy never deletes files it did not write)")
    if state in ("absent", "empty"):
        if resume:
            raise ArtifactError(f"nothing to resume in {out} (no run there); drop --resume to start it")
        return "new"
    if resume:
        if state == "unstarted":
            raise ArtifactError(f"{out} stopped before its first epoch ended, so there is nothing to resume; "
                                "start it again without --resume")
        return "resume"
    if overwrite or state == "unstarted":
        return "replace"
    if state == "complete":
        raise ArtifactError(f"{out} already holds a finished run; pass --overwrite to replace it (the old run is "
                            "kept until the new one completes), --resume to train it further, or another --out")
    raise ArtifactError(f"run directory {out} already exists and is unfinished; continue it with --resume, "
                        "or replace it with --overwrite")


# recipe keys --resume may change with --set (applied and stated); anything else would make the
# resumed run a different run than the one its checkpoint belongs to
RESUMABLE_KEYS = ("train.epochs", "train.early_stopping", "train.max_minutes", "train.num_workers", "train.device",
                  "train.deterministic", "train.grad_clip", "optimizer.lr", "data.root", "data.cache")
IGNORED_KEYS = ("name", "description")  # labels, not behaviour


def resume_recipe(out: Path, recipe_path: Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                  data_root: Path | None = None) -> tuple[Recipe, list[str]]:
    """The recipe `--resume` continues with: the run's own RUN/recipe.yaml, changed only where
    `--set`/`--data` say so and only in RESUMABLE_KEYS. A recipe file may be given again, but then
    it (with the --set overrides) must resolve to the run's recipe: a value that differs there is
    refused, also for a resumable key (the file would change the run silently; --set says so).
    Returns the recipe and one line per change; raises ArtifactError (no run) or RecipeError
    naming each key that differs and the command that fits."""
    from segdeploy import recipe as recipe_mod

    run = art.Run(out)
    if art.run_state(out) in ("absent", "empty", "foreign"):
        raise ArtifactError(f"nothing to resume in {out} (no run there); drop --resume to start it")
    saved = recipe_mod.load(run.recipe_path)
    root = data_root if data_root is not None or recipe_path is None else saved.data.root
    rec = recipe_mod.load(recipe_path or run.recipe_path, overrides, root)
    explicit = {a.split("=", 1)[0].strip() for a in overrides} | ({"data.root"} if data_root is not None else set())
    changed = _differences(saved, rec, skip=IGNORED_KEYS)
    from_file = {k: v for k, v in changed.items()
                 if not any(k == e or k.startswith(e + ".") or e.startswith(k + ".") for e in explicit)}
    if from_file:
        raise RecipeError(f"{recipe_path} gives {_listed(from_file)}: --resume continues "
                          f"the run as recorded in {run.recipe_path}; drop the recipe argument (`segdeploy train "
                          f"--resume --out {out}`) and change a resumable key with --set, or start a new run with "
                          "another --out")
    fixed = {k: v for k, v in changed.items() if k not in RESUMABLE_KEYS}
    if fixed:
        raise RecipeError(f"--resume cannot change {_listed(fixed)}: the checkpoint in {out} was trained with the "
                          f"recorded values; only {', '.join(RESUMABLE_KEYS)} may change on resume (start a new run "
                          "with another --out for the rest)")
    done = int(run.info.get("epochs_done", run.info.get("epochs_run", 0)) or 0)
    if rec.train.epochs <= done:
        raise RecipeError(f"{out} has run {done} of its {rec.train.epochs} epochs already; to train it further pass "
                          f"--set train.epochs=N with N > {done} (`segdeploy train --resume --out {out} --set "
                          f"train.epochs={done + max(done // 2, 1)}`)")
    return rec, [f"{k}: {a} → {b} (applied to the resumed run)" for k, (a, b) in changed.items()]


def _differences(a: Recipe, b: Recipe, skip: tuple[str, ...] = ()) -> dict[str, tuple[object, object]]:
    """Dotted keys whose values differ between two recipes: {key: (value in a, value in b)}."""
    def flat(d: object, prefix: str = "") -> dict[str, object]:
        if isinstance(d, dict):
            return {k: v for key, val in d.items() for k, v in flat(val, f"{prefix}{key}.").items()}
        return {prefix[:-1]: d}

    fa, fb = flat(a.model_dump(mode="json")), flat(b.model_dump(mode="json"))
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb))
            if fa.get(k) != fb.get(k) and k not in skip}


def _listed(diff: dict[str, tuple[object, object]], most: int = 4) -> str:
    shown = [f"{k} {b!r} where the run has {a!r}" for k, (a, b) in list(diff.items())[:most]]
    more = f" and {len(diff) - most} more" if len(diff) > most else ""
    return "; ".join(shown) + more


def fit(rec: Recipe, out: Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
        console: Console | None = None, mlflow: str | None = None) -> TrainResult:
    """Train `rec` into `out`. Everything is validated before anything is written; an overwrite
    trains into a hidden sibling and replaces `out` only once the new run is complete. Seeded once
    before the model is built (see `segdeploy.reproducible`); a Ctrl-C becomes `Interrupted`
    naming the command that continues."""
    console = console or Console(stderr=True)
    out = Path(out)
    mode = plan_output(out, resume, overwrite)
    writable_location(out.parent if mode == "replace" else out)
    device = pick_device(rec.train.device)
    check_model_names(rec.model)  # a typo in model.* fails before any data is read
    world = join(device)
    if not world.main:  # rank 0 alone talks
        console, progress = Console(file=io.StringIO()), False
    seed_everything(rec.train.seed)  # before the model is built: its initial weights repeat
    # built before the data is read: unavailable weights (offline `imagenet`) fail in seconds
    model = build_model(rec.model, rec.data.bands, rec.classes.num_classes,
                        log=lambda note: console.print(note, highlight=False)).to(device)  # what model.weights loaded
    # so does a tile size the model cannot train at (one forward+backward; buffers and RNG untouched)
    check_tile_size(rec.model, model, rec.data.tile_size, rec.data.bands)
    data = prepare_data(rec, console)
    if mode == "resume":
        check_same_splits(art.Run(out), data.splits)
    kw = {"progress": progress, "console": console, "mlflow_uri": resolve_mlflow_uri(mlflow), "world": world,
          "model": model}
    try:
        with deterministic_mode(rec.train.deterministic) as determinism:
            result = _fit_mode(rec, out, mode, data, device, kw)
    except KeyboardInterrupt:
        raise Interrupted(interrupted_hint(out, mode, world.size)) from None
    except NonFiniteError as exc:
        raise NonFiniteError(f"{exc}; {_nonfinite_fix(rec, out, mode)}") from None
    _report_determinism(determinism, result, console)
    return result


def _nonfinite_fix(rec: Recipe, out: Path, mode: str) -> str:
    """What to do after a non-finite loss: the run is "failed" (never "complete"); the command that
    continues it from its last good epoch at a tenth of the learning rate that epoch was trained
    with (or of the recipe's, if lower)."""
    run = art.Run(out)
    resumable = mode != "replace" and run.last_checkpoint.is_file()
    good = _base_lr(run.load_checkpoint()["optimizer"]["param_groups"][0]) if resumable else rec.optimizer.lr
    lower = f"--set optimizer.lr={float(f'{min(good, rec.optimizer.lr) / 10:.3g}')!r}"
    if mode == "replace":
        return f"{out} is unchanged; retry with a lower learning rate ({lower}) or --set train.grad_clip=1"
    if resumable:
        return (f"{out} is marked failed and resumes from its last good epoch with a lower learning rate: "
                f"`segdeploy train --resume --out {out} {lower}` (or --set train.grad_clip=1)")
    return (f"{out} is marked failed before its first epoch ended; retry with a lower learning rate: "
            f"`segdeploy train {run.recipe_path} --out {out} {lower}` (or --set train.grad_clip=1)")


def _fit_mode(rec: Recipe, out: Path, mode: str, data: TrainingData, device: str, kw: dict) -> TrainResult:
    """Train in place (new, resume) or into a hidden sibling swapped in when complete (replace)."""
    world = kw["world"]
    if mode != "replace":
        result = _train(rec, out, data, device, resume=mode == "resume", **kw)
        leave(world)
        return result
    work = None
    if world.main:
        for stale in out.parent.glob(f".{out.name}.new-*"):  # left by a killed earlier overwrite
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    work = from_main(work, world)
    try:
        result = _train(rec, work, data, device, resume=False, **kw)
        if world.main:
            swap_in(work, out)
    finally:
        if world.main:
            shutil.rmtree(work, ignore_errors=True)
    leave(world)
    return replace(result, run_dir=out)


def interrupted_hint(out: Path, mode: str, world_size: int = 1) -> str:
    """What a Ctrl-C kept, and the exact command that goes on from there."""
    prefix = f"torchrun --nproc-per-node {world_size} -m segdeploy" if world_size > 1 else "segdeploy"
    if mode == "replace" and art.run_state(out) == "complete":
        return (f"{out} is unchanged (its replacement was training in a hidden directory, now removed); "
                f"start the replacement again with --overwrite")
    state = art.run_state(out)
    if state == "unfinished":
        done = art.Run(out).info.get("epochs_done", "?")
        return f"{out} keeps {done} finished epoch(s); continue with `{prefix} train --resume --out {out}`"
    return (f"{out} had not finished its first epoch, so there is nothing to resume; start it again with the same "
            "command (a run that never finished an epoch is replaced by a plain retry)")


def _report_determinism(determinism, result: TrainResult, console: Console) -> None:  # noqa: ANN001
    """Name the ops that ran without a deterministic implementation under train.deterministic."""
    ops = determinism.nondeterministic_ops
    if not ops or not result.main:
        return
    console.print(f"[yellow]warning:[/] train.deterministic is set, but {len(ops)} op(s) have no deterministic "
                  f"implementation on this device and ran anyway: {', '.join(ops)}; repeats of this run may differ "
                  "(recorded in meta.json as nondeterministic_ops)", soft_wrap=True)
    run = art.Run(result.run_dir)
    info = {k: v for k, v in run.info.items() if k not in ("status", "model_meta")}
    run.write_status(run.info["status"], **info, nondeterministic_ops=ops)


def check_same_splits(run: art.Run, splits: dict[str, list[str]]) -> None:
    """On --resume the data must split as it did (a moved dataset with --data is fine)."""
    saved = run.split_keys()
    if not saved:
        return  # an older run without splits.json: nothing to compare
    for name in ("train", "val"):
        if sorted(saved.get(name, [])) != sorted(splits.get(name, [])):
            raise DataError(f"the data now gives the {name} split {len(splits.get(name, []))} images where "
                            f"{run.splits_path} records {len(saved.get(name, []))}: --resume needs the same data; "
                            "point --data at the run's dataset, or start a new run with another --out")


@dataclass
class _Setup:
    model: torch.nn.Module
    divisor: int
    frozen_bn: list[torch.nn.Module]
    loss_fn: torch.nn.Module
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    train_loader: DataLoader
    val: SampleReader
    amp: bool
    scaler: torch.amp.GradScaler
    meta: art.ModelMeta
    net: torch.nn.Module  # the model itself (`model` may be its DDP wrapper)
    world: World
    epoch_record: dict  # what an epoch sees (EpochPlan.record), kept in meta.json


def _setup(rec: Recipe, data: TrainingData, device: str, console: Console, world: World,
           model: torch.nn.Module) -> _Setup:
    cls = rec.classes
    if data.class_counts is not None:
        _report_class_balance(cls.names, data.class_counts, console)
    auto_weights = None
    if any(t.class_weights == "auto" for t in rec.loss):
        auto_weights = suggested_class_weights(data.class_counts)
        console.print(f"class weights (auto, median frequency): {auto_weights}", highlight=False)
    if rec.model.trainable_encoder_stages is not None and rec.model.weights is None:
        console.print(f"[yellow]warning:[/] model.trainable_encoder_stages={rec.model.trainable_encoder_stages} "
                      "freezes a randomly initialised encoder, whose frozen stages will stay random; set model.weights "
                      "(imagenet or a local file) or model.trainable_encoder_stages: null")
    arch = facts(rec.model, model)
    divisor = arch.input_divisor
    frozen_bn = freeze_encoder(model, rec.model.trainable_encoder_stages)
    model.to(device)
    cuda = device == "cuda"
    if cuda and rec.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(rec.loss, cls.num_classes, cls.ignore_index, auto_weights).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(params, rec)
    workers = _num_workers(rec.train.num_workers, device)
    collate = pad_collate(divisor, cls.ignore_index)
    # train.batch_size is per process: the global batch is world size × batch_size
    epoch = CropEpoch(data.train, data.epoch)  # data.crops_per_image random crops of every training image
    # order and augmentation: functions of (seed, epoch), whatever the workers (segdeploy.reproducible)
    sampler = SeededSampler(len(epoch), rec.train.seed, DistributedSampler(
        epoch, world.size, world.rank, shuffle=True, seed=rec.train.seed) if world.active else None)
    per_rank = len(epoch) // world.size
    if min(per_rank, rec.train.batch_size) < 2:  # drop_last below keeps every other batch full
        check_batch_of_one(rec.model, model.to(device), rec.data.tile_size, rec.data.bands)
    train_loader = DataLoader(epoch, rec.train.batch_size, sampler=sampler,
                              drop_last=per_rank > rec.train.batch_size, num_workers=workers,
                              collate_fn=collate, pin_memory=cuda, persistent_workers=workers > 0,
                              generator=torch.Generator().manual_seed(rec.train.seed))
    net = model
    if world.active:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[world.local_rank] if cuda else None)
    meta = art.ModelMeta(
        classes=cls.names, palette=[list(c) for c in cls.display_palette()], mean=data.mean, std=data.std,
        max_pixel_value=rec.data.max_pixel_value, bands=rec.data.bands, input_divisor=divisor,
        tile_size=rec.data.tile_size, ignore_index=cls.ignore_index, static_size=arch.static_size,
        min_tile_size=arch.min_tile,
        hierarchy=cls.hierarchy, arch=rec.model.arch, encoder=rec.model.encoder, recipe_digest=rec.digest(),
        input_dtype=data.input_dtype, versions=versions(), background=cls.background_index(),
    )
    amp = cuda and rec.train.amp
    return _Setup(model, divisor, frozen_bn, loss_fn, params, opt, _scheduler(opt, rec, len(train_loader)),
                  train_loader, data.val, amp, torch.amp.GradScaler("cuda", enabled=amp), meta, net, world,
                  data.epoch.record())


def _restore(run: art.Run, rec: Recipe, st: _Setup, console: Console) -> tuple[int, float, int, list[dict]]:
    """Load the resume checkpoint into the model/optimizer/schedule: (next epoch, best mIoU, best
    epoch, history)."""
    out = run.root
    ckpt = run.load_checkpoint()
    if ckpt["recipe_digest"] != rec.digest():
        raise ArtifactError(f"{out} was trained with a different recipe (data/classes/model differ); "
                            "resume with the same recipe or start a new --out")
    st.net.load_state_dict(ckpt["model"])
    planned = [{k: g[k] for k in LR_KEYS if k in g} for g in st.opt.param_groups]  # the recipe's schedule
    st.opt.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        st.scaler.load_state_dict(ckpt["scaler"])
    old_lr = _base_lr(st.opt.param_groups[0])
    lr_changed = not math.isclose(old_lr, rec.optimizer.lr, rel_tol=1e-9)
    if lr_changed:  # e.g. lowered after a non-finite loss: the optimizer's moments are kept, the rates are the recipe's
        for group, rates in zip(st.opt.param_groups, planned, strict=True):
            group.update(rates)
        console.print(f"learning rate {old_lr:g} -> {rec.optimizer.lr:g} (optimizer.lr changed)")
    if st.scheduler is not None and ckpt.get("scheduler"):
        if int(ckpt.get("epochs", rec.train.epochs)) == rec.train.epochs and not lr_changed:
            st.scheduler.load_state_dict(ckpt["scheduler"])
        else:  # train.epochs or optimizer.lr changed: re-plan the schedule, then fast-forward
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(int(ckpt["epoch"]) * len(st.train_loader)):
                    st.scheduler.step()
            console.print(f"schedule re-planned for {rec.train.epochs} epochs at optimizer.lr {rec.optimizer.lr:g}")
    console.print(f"resuming {out} at epoch {int(ckpt['epoch']) + 1}")
    return int(ckpt["epoch"]) + 1, float(ckpt["best_miou"]), int(ckpt["best_epoch"]), run.read_history()


LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")  # what torch's schedulers keep in a param group


def _base_lr(group: dict) -> float:
    """The learning rate a param group was planned with (OneCycle's peak, other schedules' start)."""
    return float(group.get("max_lr", group.get("initial_lr", group["lr"])))


def _train_epoch(rec: Recipe, st: _Setup, device: str, on_batch: Callable[[float], None],
                 epoch: int = 0) -> tuple[float, int, float]:
    """One pass over the training split: (mean loss, images, seconds). Stops at the first
    non-finite loss (NonFiniteError naming the epoch and step) before it reaches the weights."""
    cuda = device == "cuda"
    st.model.train()
    for m in st.frozen_bn:
        m.eval()
    scaler = st.scaler
    e0, running, seen = time.perf_counter(), 0.0, 0
    for step, (x, y) in enumerate(st.train_loader, 1):
        labelled = bool((y != rec.classes.ignore_index).any())  # on the host copy: no device sync
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if cuda and rec.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", enabled=st.amp):
            logits = st.model(x)
            # a batch with no labelled pixel (all ignore or invalid) teaches nothing: a zero loss, not
            # the mean over no pixels (NaN); still a backward pass, so DDP ranks stay in step
            loss = st.loss_fn(logits, y) if labelled else logits.sum() * 0.0
        value = float(all_sum(loss.detach().float().reshape(1), st.world)[0]) if st.world.active else float(loss.detach())
        if not math.isfinite(value):  # every rank sees the same sum: all stop together
            raise NonFiniteError(f"training loss is {value} at epoch {epoch}, step {step} of {len(st.train_loader)}")
        st.opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if rec.train.grad_clip:
            scaler.unscale_(st.opt)
            torch.nn.utils.clip_grad_norm_(st.params, rec.train.grad_clip)
        scaler.step(st.opt)
        scaler.update()
        if st.scheduler is not None:
            st.scheduler.step()
        running += float(loss.detach()) * len(x)
        seen += len(x)
        on_batch(running / seen)
    return running / max(seen, 1), seen, time.perf_counter() - e0


def _train(rec: Recipe, out: Path, data: TrainingData, device: str, *, resume: bool, progress: bool,
           console: Console, model: torch.nn.Module, mlflow_uri: str | None = None,
           world: World = World()) -> TrainResult:
    st = _setup(rec, data, device, console, world, model)
    run = art.Run(out)
    start_epoch, best_miou, best_epoch, history = 1, -1.0, 0, []
    if resume:
        start_epoch, best_miou, best_epoch, history = _restore(run, rec, st, console)
    tracker = None
    if world.main:
        art.Run.create(out, rec.to_yaml(), data.splits, st.meta, world.size, epochs_done=start_epoch - 1)
        tracker = Tracker(run.tensorboard_dir, rec.model_dump(mode="json"), mlflow_uri, run.root.name)
        for note in tracker.notes:
            console.print(note, highlight=False)
        if world.active:
            console.print(f"DDP: {world.size} processes × batch {rec.train.batch_size} = global batch "
                          f"{world.size * rec.train.batch_size}", highlight=False)
    try:
        return _epochs(rec, run, st, device, (start_epoch, best_miou, best_epoch, history), tracker, progress, console)
    except BaseException as exc:
        if tracker is not None:
            tracker.abort()
        if world.main and not isinstance(exc, KeyboardInterrupt):
            # an interrupt leaves "training" (continue with --resume); any other failure is recorded
            run.write_status("failed", error=_one_line(exc), epochs_done=len(history), world_size=world.size)
        raise


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300] if not isinstance(exc, UserError) else text[:300]


def _epochs(rec: Recipe, run: art.Run, st: _Setup, device: str, state: tuple[int, float, int, list[dict]],
            tracker: Tracker | None, progress: bool, console: Console) -> TrainResult:
    start_epoch, best_miou, best_epoch, history = state
    best_per_class: list[dict] = []
    t0 = time.perf_counter()
    train_time, train_images, stopped, epoch = 0.0, 0, None, start_epoch - 1
    steps, main = len(st.train_loader), st.world.main
    epochs = rec.train.epochs
    with WorkProgress(console, f"train epoch {start_epoch}/{epochs}", (epochs - start_epoch + 1) * steps, "steps",
                      enabled=progress, rate_unit="images", per_step=rec.train.batch_size * st.world.size) as bar:
        bar.update(0, loss="…", val_mIoU=f"{best_miou:.3f}" if best_miou >= 0 else "-")
        for epoch in range(start_epoch, rec.train.epochs + 1):
            seed_everything(epoch_seed(rec.train.seed, epoch))  # the step's own randomness (dropout, …)
            st.train_loader.sampler.set_epoch(epoch)  # order and augmentation of this epoch
            loss, seen, seconds = _train_epoch(
                rec, st, device, lambda running: bar.update(1, description=f"train epoch {epoch}/{epochs}",
                                                            loss=f"{running:.4f}"), epoch)
            train_time, train_images = train_time + seconds, train_images + seen * st.world.size
            sync_buffers(st.net, st.world)
            val_loss, cm = validate(st.net, st.val, st.loss_fn, rec, device, st.meta, st.amp, st.world)
            if not math.isfinite(val_loss):  # non-finite logits: their argmax is no class and no mIoU
                raise NonFiniteError(f"validation loss is {val_loss} after epoch {epoch} (train loss {loss:.4g})")
            mets = cm.compute(rec.classes.names, rec.eval.exclude_background)
            history.append({"epoch": epoch, "train_loss": loss, "val_loss": val_loss, "val_miou": mets.miou,
                            "val_mdice": mets.mdice, "lr": st.opt.param_groups[0]["lr"],
                            "seconds": round(seconds, 2), "images_per_s": round(seen / seconds, 2) if seconds else 0.0})
            improved = mets.miou > best_miou  # all-reduced metrics: every rank decides the same
            if improved:
                best_miou, best_epoch, best_per_class = mets.miou, epoch, mets.per_class()
            if main:
                _record_epoch(run, rec, st, history, improved, best_miou, best_epoch, tracker)
            bar.update(0, val_mIoU=f"{mets.miou:.3f}")
            console.print(f"epoch {epoch:>3}  loss {loss:.4f}  val loss {val_loss:.4f}  "
                          f"val mIoU {mets.miou:.4f}  mDice {mets.mdice:.4f}{'  *best' if improved else ''}")
            stopped = from_main(_stop_reason(rec, epoch, best_epoch, t0), st.world)  # clocks differ per rank
            if stopped:
                break
    if stopped:
        console.print(f"stopped early after epoch {epoch}: {stopped}")
    final = {"status": "complete", "model_meta": st.meta, "best_epoch": best_epoch,
             "best_val_miou": best_miou, "epochs_run": epoch, "stopped_early": stopped, "world_size": st.world.size,
             "train_images_per_s": round(train_images / max(train_time, 1e-9), 2), **st.epoch_record}
    if rec.classes.hierarchy:  # per-level mIoU of the best weights
        barrier(st.world)  # rank 0 wrote them
        st.net.load_state_dict(run.load_weights())
        _, cm = validate(st.net, st.val, st.loss_fn, rec, device, st.meta, st.amp, st.world)
        final["best_val_levels"] = level_mious(cm.matrix, rec.classes.names, rec.classes.hierarchy,
                                               rec.eval.exclude_background)
    if main:
        plot_history(history, run.plots_dir)
        if tracker is not None and tracker.mlflow_run:
            final["mlflow"] = tracker.mlflow_run
        run.write_status(final.pop("status"), final.pop("model_meta"), **final)
        if tracker is not None:
            tracker.finish(run.root, final, best_per_class)
    return TrainResult(run.root, best_miou, best_epoch, epoch, time.perf_counter() - t0, final["train_images_per_s"], stopped,
                       st.world.size, main)


def _record_epoch(run: art.Run, rec: Recipe, st: _Setup, history: list[dict], improved: bool, best_miou: float,
                  best_epoch: int, tracker: Tracker | None) -> None:
    """What rank 0 writes after each epoch: best weights, history, resume state, status, tracking."""
    if tracker is not None:
        tracker.log_epoch(history[-1])
    if improved:
        run.save_weights(st.net.state_dict())
    run.write_history(history)
    epoch = int(history[-1]["epoch"])
    run.save_checkpoint({"model": st.net.state_dict(), "optimizer": st.opt.state_dict(),
                         "scheduler": st.scheduler.state_dict() if st.scheduler is not None else None,
                         "scaler": st.scaler.state_dict(),  # AMP's loss scale: resume goes on with it
                         "epoch": epoch, "epochs": rec.train.epochs, "best_miou": best_miou,
                         "best_epoch": best_epoch, "recipe_digest": rec.digest()})
    run.write_status("training", st.meta, epochs_done=epoch, world_size=st.world.size)


def _stop_reason(rec: Recipe, epoch: int, best_epoch: int, t0: float) -> str | None:
    if rec.train.early_stopping and epoch - best_epoch >= rec.train.early_stopping:
        return f"no val mIoU gain for {rec.train.early_stopping} epochs"
    if rec.train.max_minutes and (time.perf_counter() - t0) / 60 > rec.train.max_minutes:
        return f"train.max_minutes={rec.train.max_minutes} reached"
    return None


def plot_history(history: list[dict], out_dir: Path) -> list[Path]:
    """loss.png (train/val loss) and miou.png (val mIoU/mDice) per epoch."""
    if not history:
        return []
    from segdeploy.artifact import CURVE_FILES
    from segdeploy.viz import new_figure, save_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    ep = [r["epoch"] for r in history]
    paths = []
    for name, keys, ylabel in (("loss", ("train_loss", "val_loss"), "loss"),
                               ("miou", ("val_miou", "val_mdice"), "score")):
        fig = new_figure(figsize=(6, 4), dpi=100)
        ax = fig.subplots()
        for k in keys:
            ax.plot(ep, [r[k] for r in history], marker="o", ms=3, label=k.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        paths.append(save_figure(fig, out_dir / CURVE_FILES[name]))
    return paths

