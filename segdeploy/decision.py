"""From blended class probabilities to a class map: the one decision rule of predict and eval.

`decide` turns per-class scores (probabilities, or any positive per-pixel multiple of them such as
the blend's weighted sums) into classes: argmax by default; for a two-class model a threshold T on
the foreground (class 1) probability; for any model a minimum winning probability below which a
pixel is withheld. predict's `StripAccumulator` and eval's threshold sweep both call it, so a
threshold means the same in both. Also the 8-bit quantisation of probabilities predict writes.
numpy only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from segdeploy.errors import UserError

WITHHELD = -2  # label of a pixel whose winning probability is below --min-confidence (written as nodata)
PROBS_DTYPES = ("uint8", "float32")


@dataclass(frozen=True)
class Decision:
    """How classes are chosen from probabilities.

    threshold: two-class models only; class 1 where its probability p1 > T (strictly: a pixel at
    exactly T is class 0). None or 0.5 is exactly the argmax (a tie p0 = p1 = 0.5 goes to class 0,
    as argmax gives ties to the first class). min_confidence: pixels whose winning probability is
    below P are withheld (`WITHHELD`, written as nodata); None: none withheld."""

    threshold: float | None = None
    min_confidence: float | None = None

    def check(self, classes: int, where: str = "") -> None:
        """Raise UserError for a threshold on a model with more than two classes, or a value outside [0, 1]."""
        for flag, value in (("--threshold", self.threshold), ("--min-confidence", self.min_confidence)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise UserError(f"{flag} {value:g} must be a probability between 0 and 1")
        if self.threshold is not None and classes != 2:
            raise UserError(f"--threshold is for two-class models, and {where or 'the model'} has {classes} classes; "
                            "use --min-confidence P to withhold uncertain pixels instead")

    @property
    def is_argmax(self) -> bool:
        """True when this decision is the plain argmax (no threshold other than 0.5, no minimum confidence)."""
        return self.threshold in (None, 0.5) and not self.min_confidence

    def to_dict(self) -> dict:
        """The decision as JSON types (`threshold`, `min_confidence`, ...), as the summaries record it."""
        return asdict(self)


def class_argmax(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int16 index of the largest score, the largest score) over the class axis of C×H×W, the
    first class winning ties, as `argmax(0)`. A running maximum over class planes: numpy's
    argmax over a leading axis walks the array across its strides, 10× slower for few classes."""
    best = scores[0].copy()
    labels = np.zeros(best.shape, np.int16)
    hit = np.empty(best.shape, bool)
    step = np.empty(best.shape, np.int16)
    for k in range(1, scores.shape[0]):
        np.greater(scores[k], best, out=hit)
        np.maximum(best, scores[k], out=best)
        np.multiply(hit, np.int16(k), out=step)
        np.maximum(labels, step, out=labels)  # k beats every earlier index: a hit always wins
    return labels, best


ARGMAX = Decision()  # the default: classes by argmax, nothing withheld


def decide(scores: np.ndarray, decision: Decision = ARGMAX,
           total: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(int16 classes, float32 winning score) of C×H×W `scores` under `decision`.

    scores: per-class probabilities or any positive per-pixel multiple of them (the blend's
    weighted sums: the rule depends only on ratios). total: H×W sum of the probabilities' multiple
    (the blend weight sum), needed only for `min_confidence`; None: the class-axis sum of `scores`.
    Argmax gives ties to the first class (`class_argmax`). A binary threshold T picks class 1
    where s1·(1 − T) > s0·T, i.e. p1 > T with p1 = s1 / (s0 + s1), without dividing: at T = 0.5 it is
    s1 > s0, exactly the argmax. Withheld pixels are `WITHHELD`; the winning score is the
    chosen class's score (not divided by `total`)."""
    if decision.threshold is not None and decision.threshold != 0.5 and scores.shape[0] == 2:
        t = np.float32(decision.threshold)
        fg = scores[1] * (np.float32(1) - t) > scores[0] * t
        labels = fg.astype(np.int16)
        best = np.where(fg, scores[1], scores[0])
    else:
        labels, best = class_argmax(scores)
    if decision.min_confidence:
        norm = scores.sum(axis=0) if total is None else total
        labels[best < np.float32(decision.min_confidence) * norm] = WITHHELD
    return labels, best


def quantize_probs(probs: np.ndarray) -> np.ndarray:
    """uint8 round(p · 255) of probabilities in [0, 1] (clipped): 0 ↔ 0.0, 255 ↔ 1.0, steps of 1/255.
    The argmax of quantised bands can differ from the unquantised one only where two classes'
    probabilities round to the same step (|p_i − p_j| < 1/255)."""
    return np.clip(np.rint(probs * np.float32(255)), 0, 255).astype(np.uint8)


def parse_thresholds(spec: str) -> list[float]:
    """`START:STOP:STEP` (STOP included when a step lands on it, to 1e-9) or a comma list
    (`0.3,0.5,0.7`) → sorted distinct thresholds in (0, 1). Raises UserError naming the spec."""
    try:
        if ":" in spec:
            start, stop, step = (float(p) for p in spec.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            n = int(np.floor((stop - start) / step + 1e-9)) + 1
            values = [round(start + k * step, 10) for k in range(n)]
        else:
            values = [float(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"--thresholds {spec!r} must be START:STOP:STEP (0.1:0.9:0.05) or a list (0.3,0.5,0.7)") from None
    bad = [v for v in values if not 0.0 < v < 1.0]
    if not values or bad:
        raise UserError(f"--thresholds {spec!r}: every threshold must be strictly between 0 and 1 "
                        f"(got {', '.join(f'{v:g}' for v in bad) or 'none'}); e.g. 0.1:0.9:0.05")
    return sorted(set(values))


def resolve(model: Path, threshold: float | None, min_confidence: float | None) -> tuple[Decision, str]:
    """The class decision predict and eval apply to `model` (run directory, or an export inside one) and a
    line saying where its threshold came from ('' for today's argmax): `threshold` when given, else
    for a two-class model the one `eval --thresholds` recorded in the run (`Run.recorded_threshold`).
    Raises UserError (`Decision.check`) for --threshold on a model with more than two classes."""
    from segdeploy.artifact import Run, artifact_meta  # a run directory or an artifact: no runtime

    model = Path(model)
    run = Run.find(model)
    if run is None and threshold is None and min_confidence is None:
        return Decision(), ""  # nothing to apply, nothing recorded: the model is read by its backend
    meta = run.meta if model.is_dir() and run is not None else artifact_meta(model)
    decision = Decision(threshold, min_confidence)
    decision.check(meta.num_classes, str(model))
    note = f"threshold {threshold:g} on the probability of {meta.classes[1]!r} (--threshold)" if threshold is not None else ""
    record = run.recorded_threshold() if run is not None and meta.num_classes == 2 else None
    if threshold is None and record is not None:
        decision = Decision(float(record["threshold"]), min_confidence)
        score = record.get("score")
        note = (f"threshold {decision.threshold:g} on the probability of {meta.classes[1]!r}, recorded by "
                f"`segdeploy eval --thresholds` on the {record.get('split', '?')} split ({record.get('metric', 'IoU')} "
                f"{f'{score:.4f}' if isinstance(score, (int, float)) else '?'}) in {run.threshold_path}; "
                "--threshold overrides it")
    if min_confidence:
        note += ("; " if note else "") + f"pixels whose winning probability is below {min_confidence:g} written as nodata"
    return decision, note
