"""The accuracy gate: an exported model against a fresh reference run (PyTorch FP32), on real tiles.

Two-sided and per class: agreement with the reference's argmax, and each class's IoU against
ground truth may not drop by more than a set number of points; a reduced-precision candidate
must also run a least share of its FLOPs in that precision. `measure` takes the numbers,
`judge` alone decides pass/fail and returns the typed verdict (`ParityReport`: thresholds used,
per-class drops, what ran at which precision, the split the tiles came from). Export acts on
the verdict; bench shows it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from segdeploy.artifact import ModelMeta
from segdeploy.data.dataset import SampleReader, discover
from segdeploy.errors import DataError, NonFiniteError, ParityError
from segdeploy.metrics import ConfusionMatrix
from segdeploy.recipe import DataConfig, GateThresholds, Recipe
from segdeploy.runtime.base import Backend
from segdeploy.tiling import TilePlan

DROP_RESOLUTION = 0.005  # IoU points: reports print two decimals; smaller "drops" are noise
SPLIT_WORDS = {"val": "validation", "train": "training", "test": "test"}


@dataclass(frozen=True)
class PrecisionUse:
    """How much of a reduced-precision candidate runs in that precision: nodes counted (compute
    nodes for INT8, every node for FP16), the share of the model's FLOPs (0..1), and the nodes
    kept in FP32 by their ONNX names."""

    reduced_nodes: int
    total_nodes: int
    reduced_flops_share: float
    fp32_nodes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Measurement:
    """What `measure` finds, with no judgement: logit errors (absolute), cosine similarity (the
    smallest per tile), argmax agreement over valid pixels (0..1), and per class the IoU/Dice of
    reference and candidate against ground truth and of the candidate against the reference."""

    tiles: int
    tile: int
    max_abs: float
    median_abs: float
    p99_abs: float
    cosine: float
    agreement: float
    per_class: list[dict]
    nonfinite_tiles: int = 0  # candidate tiles with any NaN/Inf logit


@dataclass
class ParityReport:
    """The gate's verdict on one candidate, made only by `judge`: what was measured, the thresholds
    it was judged with, the split its tiles came from, what ran in reduced precision, and every
    failure (none: passed)."""

    backend: str
    precision: str
    split: str
    tiles: int
    tile: int
    max_abs: float
    median_abs: float
    p99_abs: float
    cosine: float
    agreement: float
    per_class: list[dict]
    thresholds: GateThresholds
    failures: list[str] = field(default_factory=list)
    usage: PrecisionUse | None = None

    @property
    def passed(self) -> bool:
        """True when no threshold failed (`failures` is empty)."""
        return not self.failures

    @property
    def min_agreement(self) -> float:
        """The pixel agreement (0..1) the gate required."""
        return self.thresholds.min_agreement

    @property
    def max_class_iou_drop(self) -> float:
        """The largest per-class IoU drop (percentage points) the gate allowed."""
        return self.thresholds.max_class_iou_drop

    @property
    def reduced_flops_share(self) -> float | None:
        """The share (0..1) of FLOPs in reduced precision, or None when not measured (an FP32 form)."""
        return None if self.usage is None else self.usage.reduced_flops_share

    @property
    def fp32_nodes(self) -> list[str]:
        """The nodes kept in FP32 in a reduced-precision form ([] when none or not measured)."""
        return [] if self.usage is None else list(self.usage.fp32_nodes)

    @property
    def worst_drop(self) -> float:
        """The largest per-class IoU drop (percentage points) measured; 0.0 when no class could be measured."""
        drops = [c["iou_drop_points"] for c in self.per_class if c["iou_drop_points"] is not None]
        return max(drops, default=0.0)

    def worst_classes(self, n: int = 3) -> list[dict]:
        """Classes that really lost IoU against ground truth (at least the report's 0.005 pt
        resolution), worst first: every class over the threshold, then others up to `n` in all."""
        rows = sorted((c for c in self.per_class if c["iou_drop_points"] is not None
                       and c["iou_drop_points"] >= DROP_RESOLUTION), key=lambda c: -c["iou_drop_points"])
        over = sum(1 for c in rows if c["iou_drop_points"] > self.thresholds.max_class_iou_drop)
        return rows[: max(n, over)]

    def most_disagreeing(self, n: int = 3) -> list[dict]:
        """Classes whose pixels the candidate and the reference label least alike (lowest IoU of the
        candidate against the reference, below 1), worst first."""
        rows = [c for c in self.per_class if c["iou_vs_reference"] is not None and c["iou_vs_reference"] < 1.0]
        return sorted(rows, key=lambda c: c["iou_vs_reference"])[:n]

    def classes_line(self) -> str:
        """The classes a reader should look at: those losing IoU, or else where the disagreement is."""
        worst = self.worst_classes()
        if worst:
            return "worst classes by IoU drop: " + ", ".join(f"{c['class']} {c['iou_drop_points']:.2f} pt" for c in worst)
        dis = self.most_disagreeing()
        if dis:
            return ("no class lost IoU against ground truth; most disagreement with the reference: "
                    + ", ".join(f"{c['class']} (IoU vs reference {c['iou_vs_reference']:.2%})" for c in dis))
        return "no class lost IoU and every class agrees with the reference"

    def precision_share(self) -> str:
        """'FP16 on 120/130 nodes, 97.1% of FLOPs', or '' when precision use was not measured."""
        if self.usage is None:
            return ""
        return (f"{self.precision.upper()} on {self.usage.reduced_nodes}/{self.usage.total_nodes} nodes, "
                f"{self.usage.reduced_flops_share:.1%} of FLOPs")

    def explain(self) -> str:
        """One line: the candidate, its failures and the classes to look at."""
        return f"{self.backend} {self.precision}: {'; '.join(self.failures) or 'passed'} ({self.classes_line()})"

    def to_dict(self) -> dict:
        """The verdict as JSON types (parity.json's record), with thresholds, worst classes and precision use."""
        d = asdict(self)
        d.pop("usage")
        d["thresholds"] = self.thresholds.to_dict()
        d.update({"passed": self.passed, "worst_classes": [c["class"] for c in self.worst_classes()],
                  "reduced_nodes": None, "total_nodes": None, "reduced_flops_share": None, "fp32_nodes": []})
        if self.usage is not None:
            d.update(asdict(self.usage))
            d["fp32_nodes"] = list(self.usage.fp32_nodes)
        return d

    def summary(self) -> str:
        """One line: agreement, worst class IoU drop, logit error, precision use, tiles and split, and PASS or FAIL."""
        share = f", {self.precision_share()}" if self.usage is not None else ""
        return (f"{self.backend} {self.precision}: agreement {self.agreement:.4%} (≥ {percent(self.min_agreement)}), "
                f"worst class IoU drop {max(self.worst_drop, 0.0):.2f} pt (≤ {self.max_class_iou_drop}; "
                f"{self.classes_line()}), max |Δlogit| {self.max_abs:.3g}, cosine {self.cosine:.6f}{share}, "
                f"{self.tiles} tiles from the {SPLIT_WORDS.get(self.split, self.split)} split — "
                f"{'PASS' if self.passed else 'FAIL'}")


def percent(share: float) -> str:
    """0.5 -> "50%", 0.999 -> "99.9%": a threshold as the user set it, never rounded across it."""
    return f"{share * 100:g}%"


def gate_split(data: DataConfig) -> tuple[str, str]:
    """The split the gate's tiles come from: ("val", "") when the dataset has a validation split,
    else ("train", why) — the gate then measures on images the model trained on, and says so."""
    try:
        discover(data, "val")
        return "val", ""
    except DataError as exc:
        return "train", (f"no validation split ({exc}); the gate uses training tiles, which the model has seen")


def parity_tiles(rec: Recipe, meta: ModelMeta, tile: int, samples: int, split: str = "val",
                 keys: list[str] | None = None, tile_keys: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `samples` normalised float32 N×B×tile×tile tiles from real images and their int64
    N×tile×tile labels, cut the way predict cuts a scene: each image's `tiling.TilePlan` windows
    (here without overlap, so every pixel is compared once), the last ones running past the edge and
    padded exactly as predict pads them, their labels padded with ignore_index (never compared);
    invalid pixels are 0 (the mean) and ignore_index. The keys of the images used are appended to
    `keys`, and each tile's image key to `tile_keys`, when given. Raises DataError when `split` has
    no images."""
    items = discover(rec.data, split)  # the caller chose the split (`gate_split`): no silent substitute
    ds = SampleReader(items, rec.data, rec.classes, meta.mean, meta.std)
    xs, ys = [], []
    for i in range(len(ds)):
        x, y = ds.item(i)
        if keys is not None:
            keys.append(ds.samples[i].key)
        plan = TilePlan(x.shape[-2], x.shape[-1], tile)
        for window in plan.windows():
            xs.append(torch.from_numpy(np.ascontiguousarray(plan.cut(x, window))))
            label = np.full((tile, tile), meta.ignore_index, np.int64)
            label[: window.height, : window.width] = y[window.slices]
            ys.append(torch.from_numpy(label))
            if tile_keys is not None:
                tile_keys.append(ds.samples[i].key)
            if len(xs) >= samples:
                return torch.stack(xs), torch.stack(ys)
    return torch.stack(xs), torch.stack(ys)


class ParityReference:
    """The one parity reference: a reference backend's logits (the run's `runtime.reference_backend`:
    a fresh PyTorch FP32 run of the model, or an imported ONNX model's own FP32 ONNX) on real tiles
    of the gate's split (`gate_split`, or `split`). export's gate and bench's accuracy columns both
    compare candidates with it."""

    def __init__(self, reference: Backend, rec: Recipe, meta: ModelMeta, tile: int, split: str | None = None) -> None:
        self.rec, self.meta = rec, meta
        self.split, self.split_note = (split, "") if split else gate_split(rec.data)
        tile_keys: list[str] = []
        self.x, self.y = parity_tiles(rec, meta, tile, rec.parity.samples, self.split, tile_keys=tile_keys)
        self.logits = run_batched(reference, self.x)
        bad = (~torch.isfinite(self.logits)).flatten(1).any(1).nonzero().flatten().tolist()
        if bad:  # the yardstick itself: nothing finite to fall back to
            raise NonFiniteError(f"the reference ({reference.describe()}) gives non-finite logits on parity tile {bad[0]} "
                                 f"of image {tile_keys[bad[0]]!r} ({len(bad)} of {len(self.x)} tiles); "
                                 "the weights or that image are broken: check it with `segdeploy data inspect`")

    def describe(self) -> str:
        """"16 × 64² tiles from the validation split" (and why, when it is not the validation split)."""
        words = f"{len(self.x)} × {self.x.shape[-1]}² tiles from the {SPLIT_WORDS.get(self.split, self.split)} split"
        return f"{words} ({self.split_note})" if self.split_note else words

    def logits_of(self, backend: Backend) -> torch.Tensor:
        """`backend`'s float32 N×C×H×W logits on the reference's tiles (as a torch tensor)."""
        return run_batched(backend, self.x)

    def compare(self, logits: torch.Tensor, meta: ModelMeta, backend: str, precision: str,
                thresholds: GateThresholds | None = None, usage: PrecisionUse | None = None,
                output: str = "logits") -> ParityReport:
        """The verdict (`compare`) on a candidate's float N×C×H×W `logits` on this reference's tiles,
        with `thresholds` (default: the recipe's ``parity.*`` for `precision`); `meta` gives the
        classes and ignore_index. A head's scores (`output` "probabilities" or "labels", as the
        runtime returns them) are compared with the reference's turned into the same (`as_output`):
        agreement and per-class IoU are then those of its probabilities' argmax / its class map.
        ParityError when the shapes differ."""
        thresholds = thresholds or self.rec.parity.thresholds(precision)
        return compare(as_output(self.logits, output), logits, self.y, meta, thresholds, backend, precision, self.split,
                       usage)


def as_output(logits: torch.Tensor, output: str) -> torch.Tensor:
    """Reference logits (N×C×H×W) as a head's scores read by the runtime
    (`runtime.onnxruntime.OrtBackend.to_host`): "logits" unchanged, "probabilities" the log of the
    softmax (floored at 1e-30, as there), "labels" one-hot scores of the argmax (0 / -100)."""
    if output == "probabilities":
        return torch.log(torch.softmax(logits, 1).clamp_min(1e-30))
    if output == "labels":
        from segdeploy.runtime.base import OFF_CLASS_SCORE

        scores = torch.full_like(logits, OFF_CLASS_SCORE)
        return scores.scatter_(1, logits.argmax(1, keepdim=True), 0.0)
    return logits


def run_batched(backend: Backend, x: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """`backend`'s logits (torch float32 N×C×H×W) for the N×B×H×W tensor `x`, fed in batches of at most `batch` (and
    the backend's max_batch)."""
    limit = min(batch, backend.max_batch or batch)
    return torch.cat([torch.from_numpy(backend(x[i : i + limit].numpy())) for i in range(0, len(x), limit)])


def measure(ref: torch.Tensor, cand: torch.Tensor, target: torch.Tensor, meta: ModelMeta) -> Measurement:
    """Reference and candidate logits (N×C×H×W float) on the same tiles, and their labels (N×H×W,
    `meta.ignore_index` on padding), compared: see `Measurement`. IoU drops are in points (0..100),
    reference minus candidate (positive: the candidate is worse). Raises ParityError when the
    shapes differ."""
    if ref.shape != cand.shape:
        raise ParityError(f"candidate output shape {tuple(cand.shape)} differs from the reference's "
                          f"{tuple(ref.shape)}; re-export the model")
    diff = (ref - cand).abs().flatten()
    q = torch.quantile(diff[:: max(1, len(diff) // 1_000_000)], torch.tensor([0.5, 0.99]))
    cos = torch.nn.functional.cosine_similarity(ref.flatten(1).double(), cand.flatten(1).double(), dim=1).min()
    pr, pc = ref.argmax(1), cand.argmax(1)
    valid = target != meta.ignore_index  # padded borders do not count
    agreement = float((pr[valid] == pc[valid]).float().mean()) if valid.any() else 1.0
    cm_ref, cm_cand, cm_vs = (ConfusionMatrix(meta.num_classes, meta.ignore_index) for _ in range(3))
    cm_ref.update(pr, target)
    cm_cand.update(pc, target)
    cm_vs.update(pc, torch.where(valid, pr, torch.full_like(pr, meta.ignore_index)))
    m_ref, m_cand, m_vs = cm_ref.compute(meta.classes), cm_cand.compute(meta.classes), cm_vs.compute(meta.classes)
    f = lambda v: None if math.isnan(v) else round(float(v), 6)  # noqa: E731
    per_class = []
    for i, name in enumerate(meta.classes):
        drop = (m_ref.iou[i] - m_cand.iou[i]) * 100 if not math.isnan(m_ref.iou[i]) else float("nan")
        per_class.append({"class": name, "iou_gt_reference": f(m_ref.iou[i]), "iou_gt": f(m_cand.iou[i]),
                          "dice_gt": f(m_cand.dice[i]), "iou_drop_points": f(drop),
                          "iou_vs_reference": f(m_vs.iou[i]), "dice_vs_reference": f(m_vs.dice[i])})
    nonfinite = int((~torch.isfinite(cand)).flatten(1).any(1).sum())
    return Measurement(len(ref), int(ref.shape[-1]), float(diff.max()), float(q[0]), float(q[1]), float(cos),
                       agreement, per_class, nonfinite)


def judge(m: Measurement, thresholds: GateThresholds, backend: str, precision: str, split: str,
          usage: PrecisionUse | None = None) -> ParityReport:
    """The one place pass/fail is decided: finite logits on every tile, agreement ≥ min_agreement, no
    class's IoU drop above max_class_iou_drop, and (reduced precision) at least min_reduced_share of
    the FLOPs reduced.
    Returns the verdict; raises nothing."""
    a_key, drop_key, share_key = thresholds.keys
    failures = []
    if m.nonfinite_tiles:  # never a class: a candidate that overflows on the gate's tiles does not ship
        failures.append(f"{m.nonfinite_tiles} of {m.tiles} tiles give non-finite logits (NaN/Inf)")
    if m.agreement < thresholds.min_agreement:
        failures.append(f"argmax agreement {m.agreement:.4%} < {percent(thresholds.min_agreement)} ({a_key})")
    drops = sorted((c for c in m.per_class if c["iou_drop_points"] is not None
                    and c["iou_drop_points"] > thresholds.max_class_iou_drop), key=lambda c: -c["iou_drop_points"])
    failures += [f"class {c['class']!r} IoU drops {c['iou_drop_points']:.2f} pt (> {thresholds.max_class_iou_drop} pt, "
                 f"{drop_key})" for c in drops]
    if usage is not None and thresholds.min_reduced_share is not None \
            and usage.reduced_flops_share < thresholds.min_reduced_share:
        p = precision.upper()
        failures.append(f"only {usage.reduced_flops_share:.1%} of the FLOPs run in {p} (< {share_key} "
                        f"{percent(thresholds.min_reduced_share)}): a mostly-FP32 model is not an {p} export; ship the "
                        f"FP32 model or lower {share_key}")
    return ParityReport(backend, precision, split, m.tiles, m.tile, m.max_abs, m.median_abs, m.p99_abs, m.cosine,
                        m.agreement, m.per_class, thresholds, failures, usage)


def compare(ref: torch.Tensor, cand: torch.Tensor, target: torch.Tensor, meta: ModelMeta, thresholds: GateThresholds,
            backend: str, precision: str, split: str = "val", usage: PrecisionUse | None = None) -> ParityReport:
    """`measure` then `judge`: the verdict on a candidate's logits against the reference's.

    ref, cand: float N×C×H×W logits on the same tiles; target: int64 N×H×W labels
    (`meta.ignore_index` on padding and invalid pixels); thresholds: the recipe's ``parity.*`` for
    this precision (`ParityConfig.thresholds`); split: where the tiles came from ("val" or
    "train"), reported. Returns the typed verdict `ParityReport`; raises ParityError when the two
    outputs' shapes differ (the only error: a failing candidate is a verdict, not an exception)."""
    return judge(measure(ref, cand, target, meta), thresholds, backend, precision, split, usage)


def as_numpy_batches(x: torch.Tensor, batch: int = 8) -> list[np.ndarray]:
    """`x` (N×B×H×W) as a list of numpy batches of at most `batch` items (views, no copy)."""
    return [x[i : i + batch].numpy() for i in range(0, len(x), batch)]
