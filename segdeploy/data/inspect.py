"""`segdeploy data inspect`: integrity and class-distribution report, before any training.

Unlike training, inspection never stops at the first bad file: it lists every problem found.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segdeploy import recipe as recipe_mod
from segdeploy.data.dataset import SPLITS, SegmentationDataset, _pairs, data_root, discover, suggested_class_weights
from segdeploy.errors import DataError, RecipeError
from segdeploy.recipe import Recipe
from segdeploy.utils import atomic_path


@dataclass
class InspectReport:
    root: str
    classes: list[str]
    splits: dict[str, int] = field(default_factory=dict)
    problems: list[dict[str, str]] = field(default_factory=list)
    pixel_counts: dict[str, list[int]] = field(default_factory=dict)
    image_sizes: dict[str, int] = field(default_factory=dict)
    suggested_class_weights: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def fractions(self, split: str) -> list[float]:
        counts = np.asarray(self.pixel_counts[split], dtype=np.float64)
        return (counts / max(counts.sum(), 1)).round(6).tolist()

    def to_dict(self) -> dict:
        return {"root": self.root, "classes": self.classes, "ok": self.ok, "splits": self.splits,
                "problems": self.problems, "pixel_counts": self.pixel_counts,
                "pixel_fractions": {s: self.fractions(s) for s in self.pixel_counts},
                "image_sizes": self.image_sizes, "suggested_class_weights": self.suggested_class_weights}


def recipe_for_data(target: Path, data_root_override: Path | None = None) -> Recipe:
    """DATA is a recipe YAML, or a directory holding a dataset.yaml (as `data synth` writes)."""
    if target.is_dir():
        desc = target / "dataset.yaml"
        if not desc.is_file():
            raise RecipeError(f"{target} has no dataset.yaml; pass a recipe instead: segdeploy data inspect RECIPE.yaml")
        raw = recipe_mod.read_yaml(desc)
        raw.setdefault("data", {})["root"] = str(data_root_override or target)
        return recipe_mod.validate(raw, str(desc))
    return recipe_mod.load(target, data_root=data_root_override)


def inspect(rec: Recipe, splits: tuple[str, ...] = SPLITS) -> InspectReport:
    root = data_root(rec.data)
    report = InspectReport(str(root), rec.classes.names)
    sizes: Counter[str] = Counter()
    all_counts = np.zeros(rec.classes.num_classes, dtype=np.int64)
    for split in splits:
        try:
            samples = discover(rec.data, split, strict=False)
        except DataError as exc:
            if split == "train" or "empty" not in str(exc):
                report.problems.append({"split": split, "file": "", "problem": str(exc)})
            continue
        if rec.data.split.mode == "folders":
            for img in _pairs(root, rec.data, split)[1]:
                report.problems.append({"split": split, "file": str(img), "problem": "image has no mask"})
        ds = SegmentationDataset(samples, rec.data.model_copy(update={"cache": False}), rec.classes,
                                 [0.0] * rec.data.bands, [1.0] * rec.data.bands)
        counts = np.zeros(rec.classes.num_classes, dtype=np.int64)
        for i, s in enumerate(samples):
            try:
                image, mask = ds.load(i)
            except DataError as exc:
                report.problems.append({"split": split, "file": str(s.image), "problem": str(exc)})
                continue
            sizes[f"{image.shape[1]}x{image.shape[0]}"] += 1
            valid = mask[mask < rec.classes.num_classes]
            counts += np.bincount(valid.ravel(), minlength=rec.classes.num_classes)[: rec.classes.num_classes]
        report.splits[split] = len(samples)
        report.pixel_counts[split] = counts.tolist()
        all_counts += counts
    report.image_sizes = dict(sizes.most_common())
    train_counts = np.asarray(report.pixel_counts.get("train", all_counts))
    report.suggested_class_weights = suggested_class_weights(train_counts)
    return report


def plot_distribution(report: InspectReport, path: Path) -> Path:
    """Grouped bars: pixel fraction of every class in each split (log scale when imbalanced)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(report.classes)
    splits = list(report.pixel_counts)
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * n + 2), 4), dpi=100)
    width = 0.8 / max(len(splits), 1)
    fr = {s: report.fractions(s) for s in splits}
    for k, s in enumerate(splits):
        ax.bar(np.arange(n) + k * width - 0.4 + width / 2, fr[s], width, label=f"{s} ({report.splits[s]} images)")
    values = [v for s in splits for v in fr[s] if v > 0]
    if values and max(values) / min(values) > 50:
        ax.set_yscale("log")
    ax.set_xticks(range(n), report.classes, rotation=30, ha="right")
    ax.set_ylabel("pixel fraction")
    ax.set_title("class distribution")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
