"""`segdeploy data inspect`: integrity and class-distribution report, before any training.

Unlike training, inspection never stops at the first bad file: it lists every problem found.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segdeploy import recipe as recipe_mod
from segdeploy.data.dataset import (
    SPLITS,
    PixelFormatCheck,
    LoadedSample,
    SampleReader,
    _pairs,
    data_root,
    discover,
    images_in_several_splits,
    masks_without_images,
    split_defined,
    suggested_class_weights,
)
from segdeploy.errors import DataError, RecipeError
from segdeploy.recipe import Recipe


@dataclass
class InspectReport:
    """What `data inspect` found: the data root, the classes, images per split, the problems (each a dict naming the
    file and what is wrong), per-split class pixel counts, image sizes ("H×W" -> count) and class weights suggested
    from the training split's pixel counts."""
    root: str
    classes: list[str]
    splits: dict[str, int] = field(default_factory=dict)
    problems: list[dict[str, str]] = field(default_factory=list)
    pixel_counts: dict[str, list[int]] = field(default_factory=dict)
    image_sizes: dict[str, int] = field(default_factory=dict)
    suggested_class_weights: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found (the CLI exits 0)."""
        return not self.problems

    def fractions(self, split: str) -> list[float]:
        """The share (0..1, 6 decimals) of the split's labelled pixels in each class."""
        counts = np.asarray(self.pixel_counts[split], dtype=np.float64)
        return (counts / max(counts.sum(), 1)).round(6).tolist()

    def to_dict(self) -> dict:
        """The report as JSON types (`data inspect --json`), with the pixel fractions added."""
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
    """Every problem that training would stop at, or that would make a score mean nothing,
    in any layout: unpaired files, empty splits, an image in two splits (by content), unreadable
    files, bad mask values, mixed pixel types. Splits the layout does not define are left out."""
    root = data_root(rec.data)
    report = InspectReport(str(root), rec.classes.names)
    report.problems += _layout_problems(rec, root, splits)
    found: dict[str, list] = {}
    for split in splits:
        if split != "train" and not split_defined(rec.data, split):
            continue
        try:
            found[split] = discover(rec.data, split, strict=False)
        except DataError as exc:
            report.problems.append({"split": split, "file": "", "problem": str(exc)})
    for shared in images_in_several_splits(found):
        report.problems.append({"split": ",".join(shared.splits), "file": str(shared.paths[1]),
                                "problem": shared.describe()})
    sizes: Counter[str] = Counter()
    pixel_format = PixelFormatCheck(rec.data)
    all_counts = np.zeros(rec.classes.num_classes, dtype=np.int64)
    for split, samples in found.items():
        counts = _read_split(rec, split, samples, pixel_format, sizes, report)
        report.splits[split] = len(samples)
        report.pixel_counts[split] = counts.tolist()
        all_counts += counts
    report.image_sizes = dict(sizes.most_common())
    train_counts = np.asarray(report.pixel_counts.get("train", all_counts))
    report.suggested_class_weights = suggested_class_weights(train_counts)
    return report


def _layout_problems(rec: Recipe, root: Path, splits: tuple[str, ...]) -> list[dict[str, str]]:
    """Images without masks and masks without images (per split folder, or in the shared folder
    of list and ratio layouts), and one list file used for two splits."""
    cfg, problems = rec.data, []
    dirs = {s: s for s in splits} if cfg.split.mode == "folders" else {"all": ""}
    for split, split_dir in dirs.items():
        for img in _pairs(root, cfg, split_dir)[1]:
            problems.append({"split": split, "file": str(img), "problem": f"image {img} has no mask"})
        for mask in masks_without_images(root, cfg, split_dir):
            problems.append({"split": split, "file": str(mask), "problem": f"mask {mask} has no image"})
    if cfg.split.mode == "lists":
        by_file: dict[str, list[str]] = {}
        for split, file in cfg.split.lists.items():
            by_file.setdefault(str((root / file).resolve()), []).append(split)
        for file, users in by_file.items():
            if len(users) > 1:
                problems.append({"split": ",".join(users), "file": file,
                                 "problem": f"list {file} is used for the {' and '.join(users)} splits"})
    return problems


def _read_split(rec: Recipe, split: str, samples: list, pixel_format: PixelFormatCheck, sizes: Counter[str],
                report: InspectReport) -> np.ndarray:
    """Decode every pair once; count class pixels; record each unreadable or odd file."""
    n = rec.classes.num_classes
    ds = SampleReader(samples, rec.data, rec.classes, [0.0] * rec.data.bands, [1.0] * rec.data.bands)
    counts = np.zeros(n, dtype=np.int64)
    for i, s in enumerate(samples):
        try:
            loaded = ds.sample(i)
        except DataError as exc:
            report.problems.append({"split": split, "file": str(s.image), "problem": str(exc)})
            continue
        image, mask = loaded.image, loaded.mask
        for problem in (pixel_format.problem(s.image, image, loaded.valid), nonfinite_problem(s.image, loaded)):
            if problem:
                report.problems.append({"split": split, "file": str(s.image), "problem": problem})
        sizes[f"{image.shape[1]}x{image.shape[0]}"] += 1
        valid = mask[mask < n]
        counts += np.bincount(valid.ravel(), minlength=n)[:n]
    return counts


def nonfinite_problem(path: Path, loaded: LoadedSample) -> str | None:
    """NaN/±Inf pixels that no nodata value declares: invalid all the same (ignored in training and
    eval, nodata in predict), but likely a processing fault the user should know of."""
    if not loaded.nonfinite:
        return None
    what = (f"image {path} has {loaded.nonfinite} NaN/Inf pixels that no nodata value declares; they are treated as "
            "invalid (ignored in training and eval, nodata in predict)")
    if path.suffix.lower() == ".npy":
        return f"{what}; store NaN there (NaN marks invalid pixels of a .npy image)"
    nodata = _nodata_of(path)
    if nodata is None:
        import shlex

        return f"{what}; declare them with `rio edit-info --nodata nan {shlex.quote(str(path))}`"
    return f"{what}; the file declares nodata {nodata:g}: write that value there instead"


def _nodata_of(path: Path) -> float | None:
    import warnings

    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path) as src:
            return src.nodata


def plot_distribution(report: InspectReport, path: Path) -> Path:
    """Grouped bars: pixel fraction of every class in each split (log scale when imbalanced)."""
    from segdeploy.viz import new_figure, save_figure

    n = len(report.classes)
    splits = list(report.pixel_counts)
    fig = new_figure(figsize=(max(6, 0.8 * n + 2), 4), dpi=100)
    ax = fig.subplots()
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
    return save_figure(fig, path)
