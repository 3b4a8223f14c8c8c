"""Metrics of any artifact (run dir, .onnx, .engine) over a dataset split, with plots."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from segdeploy import recipe as recipe_mod
from segdeploy.artifact import CONFUSION_FILE, EVAL_DIR, EVAL_METRICS_FILE, OVERLAY_FILE, THRESHOLD_PLOT, Run
from segdeploy.data.dataset import SampleReader, discover, eval_split
from segdeploy.decision import Decision, decide, resolve
from segdeploy.errors import ArtifactError, UserError
from segdeploy.metrics import ConfusionMatrix, SegMetrics, level_mious
from segdeploy.recipe import Recipe
from segdeploy.runtime import load_backend
from segdeploy.runtime.base import Backend
from segdeploy.runtime.finite import FiniteLogits
from segdeploy.scoring import default_plan, score_split
from segdeploy.utils import check_replaceable, staged_dir, writable_location, write_json
from segdeploy.viz import new_figure, overlay_figure, save_figure



@dataclass
class EvalReport:
    """One evaluation: the model and backend, the split scored (and why, when it was chosen), image count, metrics,
    wall seconds, where its files are, the images whose logits were recomputed at FP32, notes, the decision rule
    the classes were chosen with, and the optional TTA comparison and threshold sweep."""

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
    decision: dict = field(default_factory=dict)  # the thresholds the classes were chosen with, and their source
    tta: TtaComparison | None = None  # --tta: the same split scored with test-time augmentation
    sweep: ThresholdSweep | None = None  # --thresholds

    def to_dict(self) -> dict:
        """The report as JSON types (metrics.json, `eval --json`)."""
        return {"model": self.model, "backend": self.backend, "split": self.split, "split_reason": self.split_reason,
                "images": self.images,
                "seconds": round(self.seconds, 3), **self.metrics.to_dict(),
                "decision": self.decision, "tta": self.tta.to_dict() if self.tta else None,
                "thresholds": self.sweep.to_dict() if self.sweep else None,
                "recomputed_at_fp32": self.recomputed, "notes": self.notes,
                "files": [str(p) for p in self.files]}


@dataclass
class TtaComparison:
    """The split scored again with test-time augmentation (`tiling.TTA_MODES`): its metrics and time."""

    mode: str
    metrics: SegMetrics
    seconds: float

    def to_dict(self) -> dict:
        """Mode, seconds (wall) and the metrics as JSON types."""
        return {"mode": self.mode, "seconds": round(self.seconds, 3), **self.metrics.to_dict()}


class ThresholdSweep:
    """Confusion matrices of a two-class model at each threshold T on the class-1 probability, every
    pixel decided by `decision.decide` (the rule predict applies), from one pass's blended
    probabilities. The best T maximises class 1's IoU (the lowest T among equals)."""

    def __init__(self, thresholds: list[float], names: list[str], ignore_index: int) -> None:
        self.thresholds, self.names = thresholds, names
        self.matrices = [ConfusionMatrix(2, ignore_index) for _ in thresholds]
        self.recorded: str = ""  # where the best was recorded ('' when it was not)
        self.plot: Path | None = None

    def observe(self, truth: np.ndarray, probs: np.ndarray) -> None:
        """Count one image: H×W int truth (ignore_index where unscored), 2×H×W float32 blended probabilities."""
        for t, cm in zip(self.thresholds, self.matrices, strict=True):
            cm.update(decide(probs, Decision(threshold=t))[0], truth)

    def rows(self) -> list[dict]:
        """Per threshold: class 1's IoU and Dice and the mIoU (None where undefined: no such pixels)."""
        out = []
        for t, cm in zip(self.thresholds, self.matrices, strict=True):
            m = cm.compute(self.names)
            out.append({"threshold": t, "iou": _num(m.iou[1]), "dice": _num(m.dice[1]), "miou": _num(m.miou)})
        return out

    def best(self) -> dict:
        """The row with the highest class-1 IoU (the lowest threshold among equals)."""
        return max(self.rows(), key=lambda r: (r["iou"] if r["iou"] is not None else -1.0, -r["threshold"]))

    def to_dict(self) -> dict:
        """The sweep as JSON types: class name, rows, best row, where it was recorded, the plot."""
        return {"class": self.names[1], "rows": self.rows(), "best": self.best(), "recorded": self.recorded,
                "plot": str(self.plot) if self.plot else None}


def _num(v: float) -> float | None:
    return None if v != v else round(float(v), 6)


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
    tta: str = "none",
    thresholds: list[float] | None = None,
) -> EvalReport:
    """Metrics of `model_path` over a split, scored tiled exactly as training validation scores it
    (`scoring.score_split`: predict's default windows, padding and blending; memory bounded by the
    tile), written with the plots to `out_dir` (default: the run's eval/SPLIT, or eval/NAME-SPLIT
    beside an exported file: the model's own record of that split, which the next evaluation
    replaces). `split` None: the layout's test split, else val (the report says which and why). An
    earlier evaluation in a directory the caller names is replaced only with `overwrite`; either way
    the new one is written beside it and swapped in when complete. Classes are chosen as predict
    chooses them (`decision.resolve`: a two-class run's recorded threshold applies). `tta` ("flips",
    "d4"): the split is scored again with test-time augmentation, both timed (`report.tta`).
    `thresholds` (two-class models): each T's IoU/Dice of class 1 from the same pass's probabilities
    (`report.sweep`), a plot, and the best T recorded in the run (`Run.write_threshold`) for predict.
    `progress(images done, images in all)` is called after each image. Raises UserError subclasses
    (ArtifactError for a model that does not fit the recipe or thresholds on a model with more than
    two classes, DataError for a split the layout does not define, OutputError for an unwritable output)."""
    model_path = Path(model_path)
    backend = backend or load_backend(model_path)
    rec = recipe_for(model_path, recipe_path, data_root)
    meta = backend.meta
    _check_fits(model_path, meta, rec, thresholds)
    split, why = eval_split(rec.data, split)
    if out_dir is None:  # the model's own record of this split: the next evaluation replaces it
        out_dir = (Run(model_path).eval_dir(split) if model_path.is_dir()
                   else model_path.parent / EVAL_DIR / f"{model_path.name}-{split}")
        overwrite = True
    out_dir = Path(out_dir)
    check_replaceable(out_dir, overwrite, EVAL_METRICS_FILE, "evaluation")  # before the work, not after it
    writable_location(out_dir)  # an unwritable output fails before the evaluation, not after
    # each image is read once: no cache (a split of 2448² images would be held whole)
    ds = SampleReader(discover(rec.data, split), rec.data, rec.classes, meta.mean, meta.std)
    decision, decision_note = resolve(model_path, None, None)
    sweep = ThresholdSweep(thresholds, rec.classes.names, meta.ignore_index) if thresholds else None
    scorer = _Scorer(backend, ds, rec.eval.overlays if overlays is None else overlays, progress,
                     2 if tta != "none" else 1)
    plan = default_plan(meta, min(batch_size, backend.max_batch or batch_size))
    if getattr(backend, "output", "logits") == "labels":  # an argmax head: labels are not blended (predict.check_head)
        plan = replace(plan, blend="crop")
    cm, seconds = scorer.score(plan, decision, sweep if tta == "none" else None, keep=True)
    mets = _metrics(cm, rec, meta)
    compared = None
    if tta != "none":
        tta_cm, tta_seconds = scorer.score(replace(plan, tta=tta), decision, sweep, keep=False)
        compared = TtaComparison(tta, _metrics(tta_cm, rec, meta), tta_seconds)
    notes = [n for n in (scorer.finite.summary(), decision_note) if n]
    report = EvalReport(str(model_path), backend.describe(), split, len(ds), mets, seconds, Path(out_dir), split_reason=why,
                        recomputed=scorer.finite.recomputed, notes=notes,
                        decision={**decision.to_dict(), "source": decision_note}, tta=compared, sweep=sweep)
    with staged_dir(out_dir, overwrite, EVAL_METRICS_FILE, "evaluation") as work:
        names = _write_outputs(work, report, scorer.keep if plots else None, rec, meta)
    report.files = [out_dir / name for name in names]
    if sweep is not None:
        _record_threshold(model_path, report)
    return report


def _check_fits(model_path: Path, meta, rec: Recipe, thresholds: list[float] | None) -> None:  # noqa: ANN001
    if meta.num_classes != rec.classes.num_classes:
        raise ArtifactError(f"{model_path} predicts {meta.num_classes} classes but the recipe has "
                            f"{rec.classes.num_classes}; evaluate with the recipe it was trained on")
    if meta.bands != rec.data.bands:
        raise ArtifactError(f"{model_path} expects {meta.bands} bands but the data has {rec.data.bands}")
    if thresholds and meta.num_classes != 2:
        raise UserError(f"--thresholds is for two-class models, and {model_path} has {meta.num_classes} classes; "
                        "drop it (predict --min-confidence P withholds uncertain pixels of any model)")


def _metrics(cm: ConfusionMatrix, rec: Recipe, meta) -> SegMetrics:  # noqa: ANN001
    mets = cm.compute(rec.classes.names, rec.eval.exclude_background)
    if meta.hierarchy:
        mets.levels = level_mious(cm.matrix, rec.classes.names, meta.hierarchy, rec.eval.exclude_background)
    return mets


class _Scorer:
    """One backend over one split, possibly several times (plain, then with TTA): the overlays of
    the first pass, progress over all passes, non-finite tiles recomputed at FP32 or named."""

    def __init__(self, backend: Backend, ds: SampleReader, overlays: int,
                 progress: Callable[[int, int], None] | None, passes: int) -> None:
        self.backend, self.ds, self.overlays, self.progress, self.passes = backend, ds, overlays, progress, passes
        self.keep: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.done = 0
        self.finite = FiniteLogits(backend)  # a tile whose logits are not finite: recomputed at FP32, or named

    def infer(self, x: np.ndarray, tiles: list) -> np.ndarray:
        return self.finite.check(x, self.backend(x), lambda j: f"tile {tiles[j][1].row},{tiles[j][1].col} of image "
                                                               f"{self.ds.samples[tiles[j][0]].image}")

    def score(self, plan, decision: Decision, sweep: ThresholdSweep | None,  # noqa: ANN001 - a TilePlan
              keep: bool) -> tuple[ConfusionMatrix, float]:
        ignore = self.backend.meta.ignore_index

        def image(i: int, truth: np.ndarray, pred: np.ndarray) -> None:
            self.done += 1
            if self.progress is not None:
                self.progress(self.done, len(self.ds) * self.passes)
            if keep and len(self.keep) < self.overlays:
                shown = pred < 0  # invalid input (or withheld): neither predicted nor scored
                self.keep.append((_display_image(self.ds, i), np.where(shown, ignore, truth), np.where(shown, ignore, pred)))

        t0 = time.perf_counter()
        cm = score_split(self.backend, self.ds, plan, observe_images=image, infer=self.infer, decision=decision,
                         observe_probs=sweep.observe if sweep is not None else None)
        return cm, time.perf_counter() - t0


def _record_threshold(model_path: Path, report: EvalReport) -> None:
    """The sweep's best threshold into the run (predict applies it), or a note why not."""
    sweep = report.sweep
    run = Run.find(model_path)
    if run is None:
        report.notes.append(f"the best threshold is not recorded: {model_path} is not inside a run directory; "
                            f"pass predict --threshold {sweep.best()['threshold']:g}")
        return
    best = sweep.best()
    record = {"threshold": best["threshold"], "metric": f"IoU of {sweep.names[1]}", "score": best["iou"],
              "dice": best["dice"], "split": report.split, "model": report.model, "backend": report.backend,
              "tta": report.tta.mode if report.tta else "none", "sweep": sweep.rows()}
    sweep.recorded = str(run.write_threshold(record))


def _write_outputs(work: Path, report: EvalReport, keep: list | None, rec: Recipe, meta) -> list[str]:  # noqa: ANN001
    """metrics.json, the confusion matrix and the overlays into `work`; their file names."""
    names = [EVAL_METRICS_FILE]
    if report.sweep is not None:
        report.sweep.plot = report.out_dir / plot_thresholds(report.sweep, work / THRESHOLD_PLOT).name
        names.append(THRESHOLD_PLOT)
    if keep is not None:
        names.append(plot_confusion(report.metrics, work / CONFUSION_FILE).name)
        palette = [tuple(c) for c in meta.palette]
        for k, (img, truth, pred) in enumerate(keep):
            fig = overlay_figure(img, truth, pred, rec.classes.names, palette, meta.max_pixel_value, meta.ignore_index,
                                 background=rec.classes.background)
            names.append(save_figure(fig, work / OVERLAY_FILE.format(k)).name)
    report.files = [report.out_dir / name for name in names]
    write_json(work / EVAL_METRICS_FILE, report.to_dict())
    return names


def _display_image(ds: SampleReader, i: int) -> np.ndarray:
    """The image for an overlay, invalid pixels black (a NaN or nodata value would wreck the stretch)."""
    s = ds.sample(i)
    return s.image if s.valid is None else np.where(s.valid[..., None], s.image, 0).astype(s.image.dtype)


def plot_confusion(mets: SegMetrics, path: Path) -> Path:
    """Row-normalised confusion matrix (recall on the diagonal) with pixel counts."""
    m = mets.matrix.astype(np.float64)
    rows = m.sum(1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    n = len(mets.names)
    size = max(4.0, 0.6 * n + 2)
    fig = new_figure(figsize=(size + 1, size), dpi=100)
    ax = fig.subplots()
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
    return save_figure(fig, path)


def plot_thresholds(sweep: ThresholdSweep, path: Path) -> Path:
    """IoU and Dice of class 1 against the threshold, the best marked."""
    rows = sweep.rows()
    t = [r["threshold"] for r in rows]
    fig = new_figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    for key, label in (("iou", "IoU"), ("dice", "Dice")):
        ax.plot(t, [np.nan if r[key] is None else r[key] for r in rows], marker="o", label=f"{label} of {sweep.names[1]}")
    best = sweep.best()
    ax.axvline(best["threshold"], color="grey", linestyle="--", label=f"best T = {best['threshold']:g}")
    ax.set_xlabel(f"threshold on p({sweep.names[1]})")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
