"""Loss registry: name -> factory; a recipe's loss is a weighted sum of terms.

Every loss takes N×C×H×W logits and N×H×W class indices (ignore_index masked out), so binary
tasks are 2-class problems and BCE is one-vs-rest on each class channel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from segdeploy.errors import RecipeError
from segdeploy.recipe import LossTerm
from segdeploy.registry import Registry

LossFactory = Callable[[LossTerm, int, int, "list[float] | None"], nn.Module]
LOSSES: Registry[LossFactory] = Registry("loss")


class CrossEntropy(nn.Module):
    """`loss: ce`: cross-entropy over N×C×H×W logits and N×H×W int64 targets, ignore_index pixels left out, optional
    per-class weights and label_smoothing (params); RecipeError for another param."""
    def __init__(self, ignore_index: int, weights: list[float] | None, **params: float) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.register_buffer("weight", torch.tensor(weights, dtype=torch.float32) if weights else None)
        self.label_smoothing = float(params.pop("label_smoothing", 0.0))
        if params:
            raise RecipeError(f"loss ce does not take params {sorted(params)}")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy (a scalar tensor) of N×C×H×W logits against N×H×W class indices."""
        return F.cross_entropy(logits, target, weight=self.weight, ignore_index=self.ignore_index,
                               label_smoothing=self.label_smoothing)


class OneVsRestBCE(nn.Module):
    """BCE-with-logits on each class channel against the one-hot target, ignored pixels masked."""

    def __init__(self, ignore_index: int, weights: list[float] | None, **params: float) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.register_buffer("weight", torch.tensor(weights, dtype=torch.float32).view(1, -1, 1, 1) if weights else None)
        if params:
            raise RecipeError(f"loss bce does not take params {sorted(params)}")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mean BCE over valid pixels and classes (a scalar tensor) of N×C×H×W logits against N×H×W class indices."""
        valid = (target != self.ignore_index).unsqueeze(1)
        onehot = F.one_hot(target.clamp(0, logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
        loss = F.binary_cross_entropy_with_logits(logits, onehot, weight=self.weight, reduction="none")
        loss = loss * valid
        return loss.sum() / (valid.sum() * logits.shape[1]).clamp_min(1)


def _smp(cls_name: str, weights_kw: bool = True) -> LossFactory:
    def make(term: LossTerm, num_classes: int, ignore_index: int, weights: list[float] | None) -> nn.Module:
        import segmentation_models_pytorch.losses as L

        cls = getattr(L, cls_name)
        kw = dict(term.params)
        if weights is not None:
            if not weights_kw:
                raise RecipeError(f"loss {term.name} does not support class_weights")
            kw["class_weights"] = weights
        try:
            return cls(mode="multiclass", ignore_index=ignore_index, **kw)
        except TypeError as exc:
            raise RecipeError(f"loss {term.name}: bad params {term.params} ({exc})") from None

    return make


LOSSES.add("ce", lambda t, c, i, w: CrossEntropy(i, w, **t.params))
LOSSES.add("bce", lambda t, c, i, w: OneVsRestBCE(i, w, **t.params))
LOSSES.add("dice", _smp("DiceLoss"))
LOSSES.add("focal", _smp("FocalLoss"))
LOSSES.add("jaccard", _smp("JaccardLoss"))
LOSSES.add("lovasz", _smp("LovaszLoss", weights_kw=False))
LOSSES.add("tversky", _smp("TverskyLoss"))


class WeightedSum(nn.Module):
    """The recipe's loss terms as one module: Σ weight × term(logits, target)."""
    def __init__(self, terms: list[tuple[float, nn.Module]]) -> None:
        super().__init__()
        self.weights = [w for w, _ in terms]
        self.terms = nn.ModuleList(m for _, m in terms)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Σ weight × term(logits, target) over the terms (a scalar tensor)."""
        return sum(w * m(logits, target) for w, m in zip(self.weights, self.terms, strict=True))  # type: ignore[return-value]


def build_loss(
    terms: list[LossTerm], num_classes: int, ignore_index: int, auto_weights: list[float] | None = None
) -> nn.Module:
    """`auto_weights` are used where a term asks for ``class_weights: auto``."""
    built = []
    for i, term in enumerate(terms):
        factory = LOSSES.get(term.name, where=f"loss.{i}.name")
        weights = term.class_weights
        if weights == "auto":
            if auto_weights is None:
                raise RecipeError(f"loss.{i}.class_weights is 'auto' but no class distribution is available")
            weights = auto_weights
        if isinstance(weights, list) and len(weights) != num_classes:
            raise RecipeError(f"loss.{i}.class_weights has {len(weights)} values for {num_classes} classes")
        built.append((term.weight, factory(term, num_classes, ignore_index, weights)))
    return WeightedSum(built)
