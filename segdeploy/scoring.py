"""Scoring a backend on a split: the one code path `segdeploy eval` and in-training validation
share, so they report the same number on the same weights.

Every image goes through `tiling.predict_arrays`: the windows, padding and blending `predict` uses
by default for the model (`default_plan`), so memory is bounded by the tile, not the image, and a
score means what a deployment will see. numpy only (the backend may be torch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from segdeploy.artifact import ModelMeta
from segdeploy.data.dataset import SampleReader
from segdeploy.decision import ARGMAX, Decision
from segdeploy.metrics import ConfusionMatrix
from segdeploy.tiling import TilePlan, Window, default_overlap, predict_arrays

# (targets: int64 N×tile×tile, the masks under each window, ignore_index past the image;
#  logits: float32 N×C×tile×tile, before blending)
TileObserver = Callable[[np.ndarray, np.ndarray], None]
# (index in the reader, H×W truth, H×W predicted classes with -1 where the input is invalid)
ImageObserver = Callable[[int, np.ndarray, np.ndarray], None]
# (H×W truth, ignore_index where the input is invalid; C×H×W float32 blended probabilities)
ProbsObserver = Callable[[np.ndarray, np.ndarray], None]
# (normalised N×B×tile×tile batch, (index in the reader, window) per tile) -> N×C×tile×tile logits
TileInfer = Callable[[np.ndarray, list[tuple[int, Window]]], np.ndarray]


def default_plan(meta: ModelMeta, batch: int) -> TilePlan:
    """What `segdeploy predict` does by default with this model: tiles of its static size or of
    data.tile_size, an eighth of a tile of overlap, gaussian blending, reflect padding. Height and
    width are 0: `predict_arrays` sizes the plan to each image."""
    tile = meta.static_size or meta.tile_size
    return TilePlan(0, 0, tile, default_overlap(tile), "gaussian", "reflect", max(1, batch))


def score_split(backend, reader: SampleReader, plan: TilePlan, indices: Iterable[int] | None = None,  # noqa: ANN001
                observe_tiles: TileObserver | None = None, observe_images: ImageObserver | None = None,
                infer: TileInfer | None = None, decision: Decision = ARGMAX,
                observe_probs: ProbsObserver | None = None) -> ConfusionMatrix:
    """Confusion matrix (rows: truth) of `backend` over the reader's images `indices` (default:
    all), each predicted tiled by `plan`. Pixels the input marks invalid are not counted.
    `observe_tiles` sees each batch's targets and logits (validation loss); `observe_images` each
    image's truth and prediction (overlays); `infer`, when given, computes each batch's logits
    instead of the backend (eval checks them for non-finite values, naming the tile). Classes are
    chosen by `decision` (`decision.decide`: argmax, a two-class threshold, withheld pixels not
    counted); `observe_probs` sees each image's truth and blended probabilities (threshold sweeps).
    With `plan.tta`, every tile is test-time augmented as predict does it."""
    meta = backend.meta
    cm = ConfusionMatrix(meta.num_classes, meta.ignore_index)
    order = list(range(len(reader))) if indices is None else list(indices)
    in_flight: dict[int, tuple[int, np.ndarray]] = {}  # position in `order` -> (reader index, mask)

    def images() -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        for position, i in enumerate(order):
            loaded = reader.sample(i)  # the mask is ignore_index wherever the image is invalid
            in_flight[position] = (i, loaded.mask)
            yield loaded.image, loaded.valid

    def tiles(windows: list[tuple[int, Window]], logits: np.ndarray) -> None:
        targets = np.full((len(windows), plan.tile, plan.tile), meta.ignore_index, np.int64)
        for k, (position, window) in enumerate(windows):
            targets[k, : window.height, : window.width] = in_flight[position][1][window.slices]
        observe_tiles(targets, logits)

    def logits(x: np.ndarray, windows: list[tuple[int, Window]]) -> np.ndarray:
        return infer(x, [(in_flight[position][0], window) for position, window in windows])

    labels_of = predict_arrays(backend, images(), plan, reader.data.max_pixel_value, tiles if observe_tiles else None,
                               logits if infer else None, decision, with_probs=observe_probs is not None)
    for position, out in enumerate(labels_of):
        labels, probs = out if observe_probs is not None else (out, None)
        i, mask = in_flight.pop(position)
        cm.update(np.maximum(labels, 0), np.where(labels < 0, meta.ignore_index, mask))
        if observe_probs is not None:
            observe_probs(np.where(labels == -1, meta.ignore_index, mask), probs)
        if observe_images is not None:
            observe_images(i, mask, labels)
    return cm
