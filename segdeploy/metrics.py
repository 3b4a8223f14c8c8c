"""Streaming confusion matrix and the segmentation metrics derived from it.

Everything is computed from one C×C integer matrix (rows: truth, columns: prediction), so
metrics over a whole split never hold more than that in memory, and coarser levels of a class
hierarchy are the same matrix with rows and columns summed by ancestor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from segdeploy.classes import hierarchy_levels


class ConfusionMatrix:
    """A streaming confusion matrix: `matrix[t, p]` counts pixels of true class t predicted p (int64, num_classes²);
    pixels whose target is `ignore_index` (or outside 0..num_classes-1) are not counted."""
    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred, target) -> None:  # noqa: ANN001 - numpy arrays or torch tensors
        """Add a batch of predicted and true class-index maps of equal shape: counted with numpy,
        or on the tensors' own device when given torch tensors (training on a GPU)."""
        if not hasattr(pred, "detach"):
            self._update_numpy(np.asarray(pred), np.asarray(target))
            return
        import torch

        pred_t = torch.as_tensor(pred).reshape(-1).long()
        target_t = torch.as_tensor(target).reshape(-1).long().to(pred_t.device)
        if pred_t.shape != target_t.shape:
            raise ValueError(f"prediction has {pred_t.numel()} pixels, target {target_t.numel()}")
        keep = (target_t >= 0) & (target_t < self.num_classes)
        if self.ignore_index is not None:
            keep &= target_t != self.ignore_index
        idx = target_t[keep] * self.num_classes + pred_t[keep].clamp_(0, self.num_classes - 1)
        counts = torch.bincount(idx, minlength=self.num_classes**2)
        self.matrix += counts.cpu().numpy().reshape(self.num_classes, self.num_classes)

    def _update_numpy(self, pred: np.ndarray, target: np.ndarray) -> None:
        pred, target = pred.reshape(-1).astype(np.int64), target.reshape(-1).astype(np.int64)
        if pred.shape != target.shape:
            raise ValueError(f"prediction has {pred.size} pixels, target {target.size}")
        keep = (target >= 0) & (target < self.num_classes)
        if self.ignore_index is not None:
            keep &= target != self.ignore_index
        idx = target[keep] * self.num_classes + np.clip(pred[keep], 0, self.num_classes - 1)
        self.matrix += np.bincount(idx, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)

    def compute(self, names: list[str] | None = None, exclude_background: bool = False) -> SegMetrics:
        """Every metric of the counts so far (`metrics_from_matrix`)."""
        return metrics_from_matrix(self.matrix, names, exclude_background)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.maximum(b, 1), np.nan)


@dataclass
class SegMetrics:
    """Per-class arrays hold NaN for a class absent from both truth and prediction."""

    names: list[str]
    iou: np.ndarray
    dice: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    support: np.ndarray
    pixel_accuracy: float
    miou: float
    mdice: float
    matrix: np.ndarray
    levels: dict[str, float] = field(default_factory=dict)

    def per_class(self) -> list[dict[str, float | str | int]]:
        """One dict per class: name, IoU, Dice, precision, recall, F1 (None where undefined: no pixels) and support
        (true pixels)."""
        def f(x: float) -> float | None:
            return None if np.isnan(x) else round(float(x), 6)

        return [
            {
                "class": n,
                "iou": f(self.iou[i]),
                "dice": f(self.dice[i]),
                "precision": f(self.precision[i]),
                "recall": f(self.recall[i]),
                "f1": f(self.dice[i]),
                "support": int(self.support[i]),
            }
            for i, n in enumerate(self.names)
        ]

    def present(self) -> list[int]:
        """Indexes of the classes that occur in the ground truth."""
        return [i for i, n in enumerate(self.support) if n > 0]

    def mean_over(self, values: np.ndarray, classes: list[int]) -> float:
        """Mean of per-class `values` over exactly `classes` (a class with no value counts as 0:
        it was predicted where it does not exist)."""
        if not classes:
            return float("nan")
        return float(np.mean([0.0 if np.isnan(values[i]) else values[i] for i in classes]))

    def to_dict(self) -> dict:
        """The metrics as JSON types (6 decimals), per class and the confusion matrix included."""
        return {
            "miou": round(self.miou, 6),
            "mdice": round(self.mdice, 6),
            "pixel_accuracy": round(self.pixel_accuracy, 6),
            "per_class": self.per_class(),
            "levels": {k: round(v, 6) for k, v in self.levels.items()},
            "confusion_matrix": self.matrix.tolist(),
        }


def metrics_from_matrix(
    matrix: np.ndarray, names: list[str] | None = None, exclude_background: bool = False
) -> SegMetrics:
    """Per-class IoU = TP/(TP+FP+FN), Dice = 2TP/(2TP+FP+FN) (= F1), precision and recall from a C×C confusion matrix
    (rows true, columns predicted), pixel accuracy, and their means over the classes where they are defined (NaN
    for a class with no pixels in truth or prediction is left out of the mean, as torchmetrics' `ignore_index`-free
    macro average does); `exclude_background` leaves class 0 out of the means."""
    m = matrix.astype(np.float64)
    tp = np.diag(m)
    fp = m.sum(0) - tp
    fn = m.sum(1) - tp
    iou = _safe_div(tp, tp + fp + fn)
    dice = _safe_div(2 * tp, 2 * tp + fp + fn)  # = F1
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, tp + fn)
    counted = slice(1, None) if exclude_background else slice(None)
    total = m.sum()
    nan_mean = lambda a: float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")  # noqa: E731
    return SegMetrics(
        names=names or [str(i) for i in range(len(m))],
        iou=iou,
        dice=dice,
        precision=precision,
        recall=recall,
        support=m.sum(1).astype(np.int64),
        pixel_accuracy=float(tp.sum() / total) if total else float("nan"),
        miou=nan_mean(iou[counted]),
        mdice=nan_mean(dice[counted]),
        matrix=matrix.copy(),
    )


def level_mious(
    matrix: np.ndarray, names: list[str], tree: dict[str, list[str]], exclude_background: bool = False
) -> dict[str, float]:
    """mIoU at each depth of the hierarchy, from the leaf confusion matrix."""
    out: dict[str, float] = {}
    for d, groups in enumerate(hierarchy_levels(names, tree)):
        labels = list(dict.fromkeys(groups))
        onehot = np.zeros((len(names), len(labels)), dtype=np.int64)
        for i, g in enumerate(groups):
            onehot[i, labels.index(g)] = 1
        merged = onehot.T @ matrix @ onehot
        mets = metrics_from_matrix(merged, labels, exclude_background)
        out[f"level{d} ({len(labels)} classes)"] = mets.miou
    return out
