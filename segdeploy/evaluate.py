"""Metrics of any artifact (run dir, .onnx, .engine) over a dataset split, with plots."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from segdeploy import recipe as recipe_mod
from segdeploy.artifact import EVAL_DIR, Run
from segdeploy.data.dataset import SampleReader, discover, eval_split
from segdeploy.errors import ArtifactError
from segdeploy.metrics import ConfusionMatrix, SegMetrics, level_mious
from segdeploy.recipe import Recipe
from segdeploy.runtime import load_backend
from segdeploy.runtime.base import Backend
from segdeploy.runtime.finite import FiniteLogits
from segdeploy.scoring import default_plan, score_split
from segdeploy.utils import atomic_path, check_replaceable, staged_dir, writable_location, write_json
from segdeploy.viz import overlay_figure, save_figure

METRICS_FILE = "metrics.json"  # what marks a directory as an evaluation's (replaceable with --overwrite)


@dataclass
class EvalReport:
    model: str
    backend: str
    split: str
    images: int
    metrics: SegMetrics
    seconds: float
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    split_reason: str = ""  # why this split, when the caller did not name one
    # tiles whose logits were not finite at the model's precision, recomputed at FP32
    recomputed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"model": self.model, "backend": self.backend, "split": self.split, "split_reason": self.split_reason,
                "images": self.images,
                "seconds": round(self.seconds, 3), **self.metrics.to_dict(),
                "recomputed_at_fp32": self.recomputed, "notes": self.notes,
                "files": [str(p) for p in self.files]}


def recipe_for(model_path: Path, recipe_path: Path | None = None, data_root: Path | None = None) -> Recipe:
    """The recipe to evaluate with: --recipe, else the one of the run the artifact belongs to."""
    if recipe_path is not None:
        return recipe_mod.load(recipe_path, data_root=data_root)
    run = Run.find(model_path)
    if run is None:
        raise ArtifactError(f"cannot find the recipe for {model_path}; pass --recipe RECIPE.yaml")
    return run.recipe if data_root is None else recipe_mod.load(run.recipe_path, data_root=data_root)


def evaluate(
    model_path: Path,
    split: str | None = None,
    *,
    recipe_path: Path | None = None,
    data_root: Path | None = None,
    out_dir: Path | None = None,
    backend: Backend | None = None,
    batch_size: int = 8,
    overlays: int | None = None,
    plots: bool = True,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Metrics of `model_path` over a split, scored tiled exactly as training validation scores it
    (`scoring.score_split`: predict's default windows, padding and blending; memory bounded by the
    tile), written with the plots to `out_dir` (default: the run's eval/SPLIT, or eval/NAME-SPLIT
    beside an exported file: the model's own record of that split, which the next evaluation
    replaces). `split` None: the layout's test split, else val (the report says which and why). An
    earlier evaluation in a directory the caller names is replaced only with `overwrite`; either way
    the new one is written beside it and swapped in when complete.
    `progress(images done, images in all)` is called after each image. Raises UserError subclasses
    (ArtifactError for a model that does not fit the recipe, DataError for a split the layout does
    not define, OutputError for an unwritable output)."""
    model_path = Path(model_path)
    backend = backend or load_backend(model_path)
    rec = recipe_for(model_path, recipe_path, data_root)
    meta = backend.meta
    if meta.num_classes != rec.classes.num_classes:
        raise ArtifactError(f"{model_path} predicts {meta.num_classes} classes but the recipe has "
                            f"{rec.classes.num_classes}; evaluate with the recipe it was trained on")
    if meta.bands != rec.data.bands:
        raise ArtifactError(f"{model_path} expects {meta.bands} bands but the data has {rec.data.bands}")
    split, why = eval_split(rec.data, split)
    if out_dir is None:  # the model's own record of this split: the next evaluation replaces it
        out_dir = (Run(model_path).eval_dir(split) if model_path.is_dir()
                   else model_path.parent / EVAL_DIR / f"{model_path.name}-{split}")
        overwrite = True
    out_dir = Path(out_dir)
    check_replaceable(out_dir, overwrite, METRICS_FILE, "evaluation")  # before the work, not after it
    writable_location(out_dir)  # an unwritable output fails before the evaluation, not after
    # each image is read once: no cache (a split of 2448² images would be held whole)
    ds = SampleReader(discover(rec.data, split), rec.data, rec.classes, meta.mean, meta.std)
    n_overlays = rec.eval.overlays if overlays is None else overlays
    keep: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    done = 0

    def overlay(i: int, truth: np.ndarray, pred: np.ndarray) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, len(ds))
        if len(keep) < n_overlays:
            ignored = pred < 0  # invalid input: neither predicted nor scored
            keep.append((_display_image(ds, i), np.where(ignored, meta.ignore_index, truth),
                         np.where(ignored, meta.ignore_index, pred)))

    finite = FiniteLogits(backend)  # a tile whose logits are not finite: recomputed at FP32, or named

    def infer(x: np.ndarray, tiles: list) -> np.ndarray:
        return finite.check(x, backend(x), lambda j: f"tile {tiles[j][1].row},{tiles[j][1].col} of image "
                                                     f"{ds.samples[tiles[j][0]].image}")

    plan = default_plan(meta, min(batch_size, backend.max_batch or batch_size))
    if getattr(backend, "output", "logits") == "labels":  # an argmax head: labels are not blended (predict.check_head)
        plan = replace(plan, blend="crop")
    t0 = time.perf_counter()
    cm = score_split(backend, ds, plan, observe_images=overlay, infer=infer)
    seconds = time.perf_counter() - t0
    mets = cm.compute(rec.classes.names, rec.eval.exclude_background)
    if meta.hierarchy:
        mets.levels = level_mious(cm.matrix, rec.classes.names, meta.hierarchy, rec.eval.exclude_background)
    report = EvalReport(str(model_path), backend.describe(), split, len(ds), mets, seconds, Path(out_dir), split_reason=why,
                        recomputed=finite.recomputed, notes=[finite.summary()] if finite.recomputed else [])
    with staged_dir(out_dir, overwrite, METRICS_FILE, "evaluation") as work:
        names = _write_outputs(work, report, keep if plots else None, rec, meta)
    report.files = [out_dir / name for name in names]
    return report


def _write_outputs(work: Path, report: EvalReport, keep: list | None, rec: Recipe, meta) -> list[str]:  # noqa: ANN001
    """metrics.json, the confusion matrix and the overlays into `work`; their file names."""
    names = [METRICS_FILE]
    if keep is not None:
        names.append(plot_confusion(report.metrics, work / "confusion_matrix.png").name)
        palette = [tuple(c) for c in meta.palette]
        for k, (img, truth, pred) in enumerate(keep):
            fig = overlay_figure(img, truth, pred, rec.classes.names, palette, meta.max_pixel_value, meta.ignore_index,
                                 background=rec.classes.background)
            names.append(save_figure(fig, work / f"overlay_{k:02d}.png").name)
    report.files = [report.out_dir / name for name in names]
    write_json(work / METRICS_FILE, report.to_dict())
    return names


def _display_image(ds: SampleReader, i: int) -> np.ndarray:
    """The image for an overlay, invalid pixels black (a NaN or nodata value would wreck the stretch)."""
    s = ds.sample(i)
    return s.image if s.valid is None else np.where(s.valid[..., None], s.image, 0).astype(s.image.dtype)


def plot_confusion(mets: SegMetrics, path: Path) -> Path:
    """Row-normalised confusion matrix (recall on the diagonal) with pixel counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = mets.matrix.astype(np.float64)
    rows = m.sum(1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    n = len(mets.names)
    size = max(4.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=100)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), mets.names, rotation=45, ha="right")
    ax.set_yticks(range(n), mets.names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for r in range(n):
            for c in range(n):
                ax.text(c, r, f"{norm[r, c]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if norm[r, c] > 0.5 else "black")
    ax.set_title(f"confusion (row-normalised), mIoU {mets.miou:.3f}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
