"""The accuracy gate: an exported model against a fresh PyTorch FP32 run, on real tiles.

Two-sided and per class: agreement with the reference's argmax, and each class's IoU against
ground truth may not drop by more than a set number of points. A failure is a typed error with
the numbers, never a warning.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from segdeploy.artifact import ModelMeta
from segdeploy.data.dataset import SampleReader, discover
from segdeploy.errors import DataError, ParityError
from segdeploy.metrics import ConfusionMatrix
from segdeploy.recipe import ParityConfig, Recipe
from segdeploy.runtime.base import Backend
from segdeploy.tiling import pad_to


DROP_RESOLUTION = 0.005  # IoU points: reports print two decimals; smaller "drops" are noise


@dataclass
class ParityReport:
    backend: str
    precision: str
    tiles: int
    tile: int
    max_abs: float
    median_abs: float
    p99_abs: float
    cosine: float
    agreement: float
    min_agreement: float
    max_class_iou_drop: float
    per_class: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    fp32_nodes: list[str] = field(default_factory=list)
    fallback_rounds: int = 0
    # how much of the model runs in reduced precision (None for an FP32 candidate)
    reduced_nodes: int | None = None
    total_nodes: int | None = None
    reduced_flops_share: float | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def worst_drop(self) -> float:
        drops = [c["iou_drop_points"] for c in self.per_class if c["iou_drop_points"] is not None]
        return max(drops, default=0.0)

    def worst_classes(self, n: int = 3) -> list[dict]:
        """Classes that really lost IoU (more than the report's 0.01 pt resolution), worst first."""
        rows = [c for c in self.per_class if c["iou_drop_points"] is not None and c["iou_drop_points"] >= DROP_RESOLUTION]
        return sorted(rows, key=lambda c: -c["iou_drop_points"])[:n]

    def precision_share(self) -> str:
        if self.reduced_flops_share is None:
            return ""
        return (f"{self.precision.upper()} on {self.reduced_nodes}/{self.total_nodes} nodes, "
                f"{self.reduced_flops_share:.1%} of FLOPs")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def summary(self) -> str:
        worst = ", ".join(f"{c['class']} {c['iou_drop_points']:.2f}" for c in self.worst_classes()) or "none"
        share = f", {self.precision_share()}" if self.reduced_flops_share is not None else ""
        return (f"{self.backend} {self.precision}: agreement {self.agreement:.4%} (≥ {self.min_agreement:.2%}), "
                f"worst class IoU drop {max(self.worst_drop, 0.0):.2f} pt (≤ {self.max_class_iou_drop}; classes "
                f"losing IoU: {worst}), max |Δlogit| {self.max_abs:.3g}, cosine {self.cosine:.6f}{share} — "
                f"{'PASS' if self.passed else 'FAIL'}")


def parity_tiles(rec: Recipe, meta: ModelMeta, tile: int, samples: int, split: str = "val",
                 keys: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised tiles of `tile`² from real images, the way predict will feed them: windows that
    run past the image edge are padded (reflect), their labels padded with ignore_index. The keys
    of the images used are appended to `keys` when given."""
    try:
        items = discover(rec.data, split)
    except DataError:
        items = discover(rec.data, "train")
    ds = SampleReader(items, rec.data, rec.classes, meta.mean, meta.std)
    xs, ys = [], []
    for i in range(len(ds)):
        x, y = (torch.from_numpy(a) for a in ds.item(i))
        if keys is not None:
            keys.append(ds.samples[i].key)
        h, w = x.shape[-2:]
        for top in range(0, max(h - tile, 0) + 1, tile) if h >= tile else [0]:
            for left in range(0, max(w - tile, 0) + 1, tile) if w >= tile else [0]:
                xt, yt = x[:, top : top + tile, left : left + tile], y[top : top + tile, left : left + tile]
                ph, pw = tile - xt.shape[-2], tile - xt.shape[-1]
                if ph or pw:
                    xt = torch.from_numpy(pad_to(xt.numpy(), tile, tile))
                    yt = torch.nn.functional.pad(yt, (0, pw, 0, ph), value=meta.ignore_index)
                xs.append(xt)
                ys.append(yt)
                if len(xs) >= samples:
                    return torch.stack(xs), torch.stack(ys)
    return torch.stack(xs), torch.stack(ys)


class ParityReference:
    """The one parity reference: a fresh PyTorch FP32 run of the model on real validation tiles.
    export's gate and bench's accuracy columns both compare candidates with it."""

    def __init__(self, reference: Backend, rec: Recipe, meta: ModelMeta, tile: int) -> None:
        self.rec, self.meta = rec, meta
        self.x, self.y = parity_tiles(rec, meta, tile, rec.parity.samples, "val")
        self.logits = run_batched(reference, self.x)

    def logits_of(self, backend: Backend) -> torch.Tensor:
        return run_batched(backend, self.x)

    def compare(self, logits: torch.Tensor, meta: ModelMeta, backend: str, precision: str) -> ParityReport:
        return compare(self.logits, logits, self.y, meta, self.rec.parity, backend, precision)


def run_batched(backend: Backend, x: torch.Tensor, batch: int = 8) -> torch.Tensor:
    limit = min(batch, backend.max_batch or batch)
    return torch.cat([torch.from_numpy(backend(x[i : i + limit].numpy())) for i in range(0, len(x), limit)])


def compare(ref: torch.Tensor, cand: torch.Tensor, target: torch.Tensor, meta: ModelMeta, cfg: ParityConfig,
            backend: str, precision: str) -> ParityReport:
    if ref.shape != cand.shape:
        raise ParityError(f"{backend} {precision} output shape {tuple(cand.shape)} differs from PyTorch's "
                          f"{tuple(ref.shape)}; re-export the model")
    diff = (ref - cand).abs().flatten()
    q = torch.quantile(diff[:: max(1, len(diff) // 1_000_000)], torch.tensor([0.5, 0.99]))
    cos = torch.nn.functional.cosine_similarity(ref.flatten(1).double(), cand.flatten(1).double(), dim=1).min()
    pr, pc = ref.argmax(1), cand.argmax(1)
    valid = target != meta.ignore_index  # padded borders do not count
    agreement = float((pr[valid] == pc[valid]).float().mean()) if valid.any() else 1.0
    c = meta.num_classes
    cm_ref, cm_cand, cm_vs = (ConfusionMatrix(c, meta.ignore_index) for _ in range(3))
    cm_ref.update(pr, target)
    cm_cand.update(pc, target)
    cm_vs.update(pc, torch.where(valid, pr, torch.full_like(pr, meta.ignore_index)))
    m_ref, m_cand, m_vs = cm_ref.compute(meta.classes), cm_cand.compute(meta.classes), cm_vs.compute(meta.classes)
    min_agree, max_drop = cfg.thresholds(precision)
    per_class = []
    for i, name in enumerate(meta.classes):
        drop = (m_ref.iou[i] - m_cand.iou[i]) * 100 if not math.isnan(m_ref.iou[i]) else float("nan")
        f = lambda v: None if math.isnan(v) else round(float(v), 6)  # noqa: E731
        per_class.append({"class": name, "iou_gt_reference": f(m_ref.iou[i]), "iou_gt": f(m_cand.iou[i]),
                          "dice_gt": f(m_cand.dice[i]), "iou_drop_points": f(drop),
                          "iou_vs_reference": f(m_vs.iou[i]), "dice_vs_reference": f(m_vs.dice[i])})
    report = ParityReport(
        backend=backend, precision=precision, tiles=len(ref), tile=int(ref.shape[-1]), max_abs=float(diff.max()),
        median_abs=float(q[0]), p99_abs=float(q[1]), cosine=float(cos), agreement=agreement,
        min_agreement=min_agree, max_class_iou_drop=max_drop, per_class=per_class)
    if agreement < min_agree:
        report.failures.append(f"argmax agreement {agreement:.4%} < {min_agree:.2%}")
    for row in report.worst_classes(c):
        if row["iou_drop_points"] > max_drop:
            report.failures.append(f"class {row['class']!r} IoU drops {row['iou_drop_points']:.2f} pt (> {max_drop})")
    return report


def gate(report: ParityReport) -> None:
    """Raise ParityError naming the worst classes when the report failed."""
    if report.passed:
        return
    worst = ", ".join(f"{c['class']} {c['iou_drop_points']:.2f} pt" for c in report.worst_classes()) or "none"
    raise ParityError(f"parity gate failed for {report.backend} {report.precision}: {'; '.join(report.failures)} "
                      f"(worst classes by IoU drop: {worst}); see parity.json", report)


def as_numpy_batches(x: torch.Tensor, batch: int = 8) -> list[np.ndarray]:
    return [x[i : i + batch].numpy() for i in range(0, len(x), batch)]
