"""Tile geometry: padding to the model's divisor, the window grid (`TilePlan` of `Window`s), blend
weights, stitching (`StripAccumulator`), and `predict_arrays`, which runs in-memory images through
the same windows, padding and blending as predict (eval and in-training validation use it).
numpy only: predicting with an ONNX model never imports torch."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np

from segdeploy.decision import ARGMAX, Decision, class_argmax, decide, quantize_probs  # noqa: F401 - class_argmax re-exported

PAD_MODES = {"reflect": "reflect", "replicate": "edge", "constant": "constant"}


def pad_mode(h: int, w: int, ph: int, pw: int, mode: str = "reflect") -> str:
    """The padding actually used: reflection where the image is large enough to reflect, else
    edge replication (torch's name, 'replicate'; numpy's, 'edge')."""
    return "replicate" if mode == "reflect" and (ph >= h or pw >= w) else mode


def pad_to(x: np.ndarray, height: int, width: int, mode: str = "reflect") -> np.ndarray:
    """Pad the last two axes on the bottom/right to height × width: the one padding policy of
    every verb. Reflection falls back to edge replication where the image is too small to
    reflect (a pad as wide as the image)."""
    h, w = x.shape[-2:]
    ph, pw = height - h, width - w
    if ph == 0 and pw == 0:
        return x
    mode = pad_mode(h, w, ph, pw, mode)
    widths = [(0, 0)] * (x.ndim - 2) + [(0, ph), (0, pw)]
    return np.pad(x, widths, mode=PAD_MODES[mode])


def normalize(pixels: np.ndarray, max_pixel_value: float, mean: np.ndarray, std: np.ndarray,
              valid: np.ndarray | None = None) -> np.ndarray:
    """The model's input, the one definition every verb uses: pixels / full scale, minus the band
    mean, over the band std; float32, bands on axis -3 (B×H×W or N×B×H×W).

    Invalid pixels never reach the model: wherever `valid` (H×W or N×H×W bool, broadcast over
    the bands; None: all valid) is False, and wherever the result is not finite (NaN/±Inf input,
    with or without a nodata tag), every band is exactly 0.0 — the training mean, the neutral
    value. Callers mark those pixels nodata (predict) or ignore_index (eval, train). One
    ``isfinite`` pass per call, only for float input.
    """
    mean = np.asarray(mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(std, np.float32).reshape(-1, 1, 1)
    x = np.asarray(pixels, np.float32) / np.float32(max_pixel_value)
    x -= mean
    x /= std
    if valid is not None:
        np.copyto(x, np.float32(0), where=~np.expand_dims(np.asarray(valid, bool), -3))
    if np.asarray(pixels).dtype.kind == "f" and not np.isfinite(x).all():
        np.copyto(x, np.float32(0), where=~np.isfinite(x).all(axis=-3, keepdims=True))
    return x


def softmax(logits: np.ndarray) -> np.ndarray:
    """float32 softmax over the class axis (-3) of a new array (…×C×H×W float logits in, the same
    shape out), stable for large logits: `weighted_softmax` with weight 1. TTA averages its views'."""
    return weighted_softmax(np.array(logits, dtype=np.float32), np.float32(1))


def weighted_softmax(logits: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """softmax over the class axis (-3) times the blend weights (H×W): what one tile adds to the
    blend. Computed in place when `logits` is a writable float32 array (the backend's fresh
    output), folding the softmax's division into the weights: four passes over the tile, not eight."""
    z = logits if logits.dtype == np.float32 and logits.flags.writeable else logits.astype(np.float32)
    z -= z.max(axis=-3, keepdims=True)
    np.exp(z, out=z)
    scale = z.sum(axis=-3, keepdims=True)
    np.divide(weights, scale, out=scale)
    z *= scale
    return z


# --------------------------------------------------------------------------- window grid


def window_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of `tile` along an axis of `size`, stepping tile - overlap.

    The last window is not shifted inward: it runs past the edge and is padded, so every
    window keeps the same stride and no border pixel is counted twice by accident.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile={tile})")
    stride = tile - overlap
    n = 1 if size <= tile else 1 + math.ceil((size - tile) / stride)
    return [i * stride for i in range(n)]


def default_overlap(tile: int) -> int:
    """An eighth of the tile, in multiples of 8 px: enough context at tile edges for the blend, and
    a fixed 64 px would be half of a 128² tile (4× the compute) or more than half of a 96² one."""
    return (tile // 8) // 8 * 8


@dataclass(frozen=True)
class Window:
    """One tile's place in an image, in pixels (rasterio's ``Window(col_off, row_off, width,
    height)`` is the model), with its (row, col) index in the plan's grid. A window may run past the
    image's bottom/right edge; `height`/`width` are the part inside the image."""

    row: int
    col: int
    row_off: int
    col_off: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        """(rows, cols) of the part inside the image: ``array[..., *window.slices]``."""
        return slice(self.row_off, self.row_off + self.height), slice(self.col_off, self.col_off + self.width)


@dataclass(frozen=True)
class TilePlan:
    """The window grid over one height × width image (px) and how its tiles are cut and blended:
    tile × tile windows stepping tile − overlap (`window_starts`), the last ones running past the
    edge and padded by `pad` (reflect, or edge where the image is too small), blended with `blend`
    weights; `batch` windows go to the backend at once. predict, `StripAccumulator`, tiled eval and
    validation (`predict_arrays`) and the parity gate all draw their windows from a plan. With
    `tta` other than "none" each tile's output is the average softmax of its views (`tta_forward`).

    Raises ValueError for an overlap outside [0, tile), an unknown blend or TTA mode."""

    height: int
    width: int
    tile: int
    overlap: int = 0
    blend: str = "gaussian"
    pad: str = "reflect"
    batch: int = 1
    tta: str = "none"  # test-time augmentation of each tile (`TTA_MODES`): its views' softmax averaged

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"overlap {self.overlap} must be in [0, tile={self.tile})")
        if self.blend not in BLENDS:
            raise ValueError(f"unknown blend {self.blend!r}; choose one of {', '.join(BLENDS)}")
        if self.tta not in TTA_MODES:
            raise ValueError(f"unknown tta {self.tta!r}; choose one of {', '.join(TTA_MODES)}")

    @cached_property
    def rows(self) -> list[int]:
        """The windows' top rows (px), `window_starts` of the height."""
        return window_starts(self.height, self.tile, self.overlap)

    @cached_property
    def cols(self) -> list[int]:
        """The windows' left columns (px), `window_starts` of the width."""
        return window_starts(self.width, self.tile, self.overlap)

    @property
    def stride(self) -> int:
        """The step between windows (px): tile − overlap."""
        return self.tile - self.overlap

    @property
    def total(self) -> int:
        """The number of windows (rows × columns)."""
        return len(self.rows) * len(self.cols)

    def window(self, row: int, col: int) -> Window:
        """The window at grid position (`row`, `col`): its top-left pixel and its size inside the image."""
        y, x = self.rows[row], self.cols[col]
        return Window(row, col, y, x, min(self.tile, self.height - y), min(self.tile, self.width - x))

    def windows(self, start_row: int = 0) -> Iterator[Window]:
        """Every window from row of tiles `start_row` on, in row-major order (the order
        `StripAccumulator` needs)."""
        for r in range(start_row, len(self.rows)):
            for c in range(len(self.cols)):
                yield self.window(r, c)

    def weights(self) -> np.ndarray:
        """tile × tile float32 blend weights (`blend_weights`)."""
        return blend_weights(self.tile, self.blend, self.overlap)

    def fill(self, part: np.ndarray, mode: str | None = None) -> np.ndarray:
        """A window's inside part (…×h×w) padded on the bottom/right to tile × tile by the plan's
        padding (`pad_to`), or by `mode` ("constant": zeros/False, for validity)."""
        return pad_to(part, self.tile, self.tile, mode or self.pad)

    def cut(self, array: np.ndarray, window: Window, mode: str | None = None) -> np.ndarray:
        """The tile × tile tile of a …×H×W array under `window`, padded past the edge (`fill`)."""
        rows, cols = window.slices
        return self.fill(array[..., rows, cols], mode)


# --------------------------------------------------------------------------- test-time augmentation

# mode -> the views of a tile: (quarter turns counter-clockwise, then mirrored left-right). "flips":
# the tile and its mirror image; "d4": the dihedral group of the square, every rotation and mirror
# (ttach's `d4_transform`).
TTA_MODES: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    "flips": ((0, False), (0, True)),
    "d4": tuple((turns, mirror) for mirror in (False, True) for turns in range(4)),
}


def tta_views(x: np.ndarray, mode: str) -> np.ndarray:
    """The views of each tile of an N×B×T×T batch, view-major: a (V·N)×B×T×T batch whose item
    v·N + i is view v of tile i (tiles are square, so every rotation keeps the shape)."""
    return np.concatenate([_view(x, turns, mirror) for turns, mirror in TTA_MODES[mode]])


def _view(x: np.ndarray, turns: int, mirror: bool) -> np.ndarray:
    y = np.rot90(x, turns, axes=(-2, -1))
    return y[..., ::-1] if mirror else y


def _unview(y: np.ndarray, turns: int, mirror: bool) -> np.ndarray:
    return np.rot90(y[..., ::-1] if mirror else y, -turns, axes=(-2, -1))


def tta_merge(logits: np.ndarray, mode: str) -> np.ndarray:
    """N×C×T×T float32 probabilities: the softmax of each view's logits ((V·N)×C×T×T, view-major as
    `tta_views` made them) mapped back to the tile's orientation and averaged over the views."""
    views = TTA_MODES[mode]
    n = len(logits) // len(views)
    total = np.zeros((n, *logits.shape[1:]), np.float32)
    for v, (turns, mirror) in enumerate(views):
        total += _unview(softmax(logits[v * n : (v + 1) * n]), turns, mirror)
    total /= np.float32(len(views))
    return total


def tta_forward(call: Callable[[np.ndarray, list[int]], np.ndarray], x: np.ndarray, mode: str,
                max_batch: int | None = None) -> np.ndarray:
    """A normalised N×B×T×T batch through `call(batch, tiles)` (→ that batch's logits; `tiles`: the
    index in `x` of each item, for naming one): for mode "none" the logits themselves, else the
    views' averaged probabilities (`tta_merge`). The views go through `call` together, in chunks
    of `max_batch` items when the model takes no more."""
    if mode == "none":
        return call(x, list(range(len(x))))
    views = tta_views(x, mode)
    step = max_batch or len(views)
    logits = np.concatenate([call(np.ascontiguousarray(views[i : i + step]),
                                  [k % len(x) for k in range(i, min(i + step, len(views)))])
                             for i in range(0, len(views), step)])
    return tta_merge(logits, mode)


# --------------------------------------------------------------------------- blend weights

BLENDS = ("gaussian", "hann", "pyramid", "crop")
MIN_WEIGHT = 1e-3  # weights stay > 0: a border pixel covered by one tile's edge is still defined


def blend_weights(tile: int, kind: str = "gaussian", overlap: int = 0) -> np.ndarray:
    """tile×tile float32 weights in (0, 1], largest in the centre.

    Built as the outer product of a 1-D profile clamped to MIN_WEIGHT: always positive, and the
    ratio between two tiles that overlap along one axis depends only on that axis — so at the
    scene's edges, where only one axis overlaps, the better-placed tile still wins.
    """
    if kind not in BLENDS:
        raise ValueError(f"unknown blend {kind!r}; choose one of {', '.join(BLENDS)}")
    pos = np.arange(tile, dtype=np.float64) + 0.5
    if kind == "gaussian":  # sigma = tile/8, as MONAI's sliding-window default
        line = np.exp(-0.5 * ((pos - tile / 2) / (tile / 8)) ** 2)
    elif kind == "hann":
        line = np.sin(math.pi * pos / tile) ** 2
    elif kind == "pyramid":
        line = np.minimum(pos, tile - pos) / (tile / 2)
    else:  # crop: only the centre counts; the half-overlap margin is all but ignored
        margin = overlap // 2
        line = np.zeros(tile, dtype=np.float64)
        line[margin : tile - margin] = 1.0
    # crop wants its margins ignored as far as positivity allows
    line = np.maximum(line / line.max(), MIN_WEIGHT if kind != "crop" else MIN_WEIGHT**2)
    return (line[:, None] * line[None, :]).astype(np.float32)


# --------------------------------------------------------------------------- stitching


class FinishedRows(NamedTuple):
    """What `StripAccumulator` hands on for a finished row of tiles, rows × image width: int16
    classes (-1 nodata input, `decision.WITHHELD` below --min-confidence), float16 winning
    probability (0 rows unless kept), and C×rows×W probabilities of every class (None unless kept)."""

    labels: np.ndarray
    confidence: np.ndarray
    probs: np.ndarray | None


class StripAccumulator:
    """Blends tiles' softmax probabilities row of tiles by row of tiles, holding only what a later
    tile can still touch: the overlap band below the current row (C × overlap × width) and the
    current tile. Final pixels are handed on as soon as no later tile covers them.

    Feed tiles in the plan's row-major order with `add(row, col, probs)`, `add_logits`, or
    `add_output` (what `tta_forward` returned for the plan); each finished row of tiles returns the
    `FinishedRows` of its `stride` rows (all remaining rows for the last row of tiles), cropped to the
    image: classes chosen by `decision.decide` under `decision`, the winning probability, and with
    `keep_probs` ("uint8": `quantize_probs`, or "float32") every class's blended probability.
    """

    def __init__(self, plan: TilePlan, classes: int, keep_confidence: bool = True,
                 decision: Decision = ARGMAX, keep_probs: str | None = None) -> None:
        self.plan = plan
        self.h, self.w, self.c, self.tile, self.ov = plan.height, plan.width, classes, plan.tile, plan.overlap
        self.keep_confidence = keep_confidence
        self.decision, self.keep_probs = decision, keep_probs
        self.stride = plan.stride
        self.rows, self.cols = plan.rows, plan.cols
        tile, overlap = plan.tile, plan.overlap
        self.padded_w = self.cols[-1] + tile
        self.weights = plan.weights()
        # contributions of the previous row of tiles to the first `overlap` rows of this one. It is
        # updated in place: tile c reads carry columns [x0, x0+tile) and then overwrites only
        # [x0, x0+stride), which no later tile of the row reads (they start at x0+tile).
        self.carry = np.zeros((classes, overlap, self.padded_w), np.float32)
        self.carry_w = np.zeros((overlap, self.padded_w), np.float32)
        self._reset_row()

    def _reset_row(self) -> None:
        self.left = np.zeros((self.c, self.tile, self.ov), np.float32)  # right margin of the previous tile
        self.left_w = np.zeros((self.tile, self.ov), np.float32)
        self.row_labels = np.full((self._row_height(), self.w), -1, dtype=np.int16)
        self.row_conf = np.zeros((self._row_height() if self.keep_confidence else 0, self.w), dtype=np.float16)
        self.row_probs = (np.zeros((self.c, self._row_height(), self.w), self.keep_probs) if self.keep_probs
                          else None)
        self.expected_col = 0

    def start_at(self, row: int) -> None:
        """Begin at row of tiles `row` (resume): its top overlap band is then incomplete, so that
        row must be replayed without emitting; rows after it are exact when overlap ≤ tile/2."""
        self._row = row
        self._reset_row()

    @property
    def row_index(self) -> int:
        """The row of tiles being blended now."""
        return getattr(self, "_row", 0)

    def _row_height(self) -> int:
        r = getattr(self, "_row", 0)
        last = r == len(self.rows) - 1
        top = self.rows[r]
        bottom = self.h if last else top + self.stride
        return max(0, min(bottom, self.h) - top)

    def add(self, row: int, col: int, probs: np.ndarray | None,
            valid: np.ndarray | None = None) -> FinishedRows | None:
        """Blend one tile (C×tile×tile probabilities, or None for a skipped tile). `valid`
        (tile×tile, False where the input is nodata) marks this tile's final pixels -1 there.

        Returns the `FinishedRows` when `col` is the row's last tile."""
        return self._blend(row, col, None if probs is None else probs * self.weights, valid)

    def add_logits(self, row: int, col: int, logits: np.ndarray | None,
                   valid: np.ndarray | None = None) -> FinishedRows | None:
        """`add` for C×tile×tile logits, softmaxed here; a writable float32 array is used in place."""
        return self._blend(row, col, None if logits is None else weighted_softmax(logits, self.weights), valid)

    def add_output(self, row: int, col: int, output: np.ndarray | None,
                   valid: np.ndarray | None = None) -> FinishedRows | None:
        """`add_logits`, or `add` when the plan's TTA made `output` probabilities (`tta_forward`)."""
        return (self.add_logits if self.plan.tta == "none" else self.add)(row, col, output, valid)

    def _blend(self, row: int, col: int, weighted: np.ndarray | None,
               valid: np.ndarray | None) -> FinishedRows | None:
        if row != self.row_index or col != self.expected_col:
            raise ValueError(f"tiles must arrive in row-major order: expected ({self.row_index}, {self.expected_col}), "
                             f"got ({row}, {col})")
        t, ov, s = self.tile, self.ov, self.stride
        x0 = self.cols[col]
        if weighted is None:
            acc = np.zeros((self.c, t, t), np.float32)
            wsum = np.zeros((t, t), np.float32)
        else:
            acc, wsum = weighted, self.weights.copy()
        if ov:
            acc[:, :, :ov] += self.left
            wsum[:, :ov] += self.left_w
            # the previous row's band; where `left` already brought it (col > 0), skip those columns
            start = ov if col > 0 else 0
            acc[:, :ov, start:] += self.carry[:, :, x0 + start : x0 + t]
            wsum[:ov, start:] += self.carry_w[:, x0 + start : x0 + t]
        last_col = col == len(self.cols) - 1
        last_row = self.row_index == len(self.rows) - 1
        done_w = t if last_col else s  # columns no later tile of this row touches
        done_h = t if last_row else s
        # final block: rows [0, done_h) × cols [0, done_w) of this tile
        y_keep = min(done_h, self._row_height())
        x_end = min(x0 + done_w, self.w)
        if y_keep > 0 and x_end > x0:
            # a skipped tile is all nodata: every pixel it owns is nodata, whatever its neighbours blend there
            invalid = True if weighted is None else None if valid is None else ~valid[:y_keep, : x_end - x0]
            self._finish_block(acc[:, :y_keep, : x_end - x0], wsum[:y_keep, : x_end - x0], invalid, x0, x_end)
        if ov:
            # bottom overlap band goes to the next row of tiles; the right margin to the next tile
            self.carry[:, :, x0 : x0 + done_w] = acc[:, s:, :done_w]
            self.carry_w[:, x0 : x0 + done_w] = wsum[s:, :done_w]
            if not last_col:
                self.left = acc[:, :, s:].copy()
                self.left_w = wsum[:, s:].copy()
        self.expected_col += 1
        if not last_col:
            return None
        out = FinishedRows(self.row_labels, self.row_conf, self.row_probs)
        self._row = self.row_index + 1
        if self._row < len(self.rows):
            self._reset_row()
        return out

    def _finish_block(self, block: np.ndarray, bw: np.ndarray, invalid: np.ndarray | bool | None, x0: int,
                      x_end: int) -> None:
        """Classes (and confidence, probabilities) of pixels no later tile touches; -1 where the input
        is nodata or only skipped tiles covered them. Every class is divided by the same weight sum,
        so `decide` works on the weighted sums; only the confidence and probabilities need the division."""
        labels, best = decide(block, self.decision, bw)
        uncovered = bw <= 0
        if invalid is not None:
            uncovered |= invalid
        if uncovered.any():
            labels[uncovered] = -1
        y_keep = block.shape[1]
        self.row_labels[:y_keep, x0:x_end] = labels
        if self.keep_confidence:
            self.row_conf[:y_keep, x0:x_end] = best / np.maximum(bw, 1e-12)
        if self.row_probs is not None:
            probs = block / np.maximum(bw, np.float32(1e-12))
            self.row_probs[:, :y_keep, x0:x_end] = quantize_probs(probs) if self.keep_probs == "uint8" else probs

    def nbytes(self) -> int:
        """Bytes held between tiles (what must not grow with the scene's height)."""
        tensors = [self.carry, self.carry_w, self.left, self.left_w, self.row_labels, self.row_conf]
        tensors += [self.row_probs] if self.row_probs is not None else []
        return sum(t.nbytes for t in tensors)


# --------------------------------------------------------------------------- in-memory images

Observer = Callable[[list[tuple[int, Window]], np.ndarray], None]
# (normalised N×B×tile×tile batch, (image index, window) of each item) -> N×C×tile×tile logits
Infer = Callable[[np.ndarray, list[tuple[int, Window]]], np.ndarray]


class _InFlight:
    """One image whose tiles are on their way through the backend: its accumulator and the class
    map its finished rows are written into."""

    def __init__(self, index: int, image: np.ndarray, valid: np.ndarray | None, plan: TilePlan, classes: int,
                 decision: Decision, with_probs: bool) -> None:
        self.index, self.plan = index, plan
        self.bands_first = np.moveaxis(image, -1, 0)  # B×H×W view: windows are cut from it
        self.valid = valid
        self.acc = StripAccumulator(plan, classes, keep_confidence=False, decision=decision,
                                    keep_probs="float32" if with_probs else None)
        self.labels = np.empty((plan.height, plan.width), np.int16)
        self.probs = np.empty((classes, plan.height, plan.width), np.float32) if with_probs else None
        self.waiting = plan.total  # windows not blended yet

    def tiles(self) -> Iterator[tuple[Window, np.ndarray | None, np.ndarray | None]]:
        """(window, B×tile×tile pixels or None when all invalid, tile×tile validity or None when all
        valid), cut and padded exactly as predict cuts and pads a raster's windows."""
        for window in self.plan.windows():
            part = None if self.valid is None else self.valid[window.slices]
            if part is not None and not part.any():
                yield window, None, None  # all invalid: skipped, never blended, emitted as -1
                continue
            # padded like the pixels (as predict does), so a reflected invalid pixel is filled too
            valid = None if part is None or part.all() else self.plan.fill(part)
            yield window, self.plan.cut(self.bands_first, window), valid

    def blend(self, window: Window, output: np.ndarray | None, valid: np.ndarray | None) -> None:
        out = self.acc.add_output(window.row, window.col, output, valid)
        if out is not None:
            top = self.plan.rows[window.row]
            self.labels[top : top + len(out.labels)] = out.labels
            if self.probs is not None:
                self.probs[:, top : top + len(out.labels)] = out.probs
        self.waiting -= 1

    def result(self) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        return self.labels if self.probs is None else (self.labels, self.probs)


def predict_arrays(backend, items: Iterable[tuple[np.ndarray, np.ndarray | None]],  # noqa: ANN001 - any Backend
                   plan: TilePlan, max_pixel_value: float, observe: Observer | None = None,
                   infer: Infer | None = None, decision: Decision = ARGMAX,
                   with_probs: bool = False) -> Iterator[np.ndarray | tuple[np.ndarray, np.ndarray]]:
    """The class map of each in-memory image, predicted through predict's machinery: the windows,
    padding and blending of `plan` (its height and width are replaced by each image's), tiles
    normalised by `normalize`, blended by `StripAccumulator`. Tiles of consecutive images share
    batches of `plan.batch`; memory is one image, its class map and a batch of tiles.

    items: (H×W×B raw pixels of any dtype, H×W bool validity or None for all valid); max_pixel_value: the
    pixels' full-scale value. Yields H×W int16 class maps in input order, -1 where the input is
    invalid (`decision.WITHHELD` where `decision` withholds a pixel); with `with_probs`, (class map,
    C×H×W float32 blended probabilities) pairs. `observe(windows, logits)`, when given, sees each
    batch's (image index, window) pairs and the backend's float32 N×C×tile×tile logits before they
    are blended (validation loss; not with TTA); `infer(batch, windows)`, when given, replaces
    ``backend(batch)`` (a caller that checks or recomputes logits names the tiles by their windows;
    with TTA, `batch` holds views, and `windows` names each one's tile)."""
    if observe is not None and plan.tta != "none":
        raise ValueError("observe sees the logits of plain tiles: not with TTA")
    meta = backend.meta
    queue: list[_InFlight] = []
    batch: list[tuple[_InFlight, Window, np.ndarray | None, np.ndarray | None]] = []
    for index, (image, valid) in enumerate(items):
        height, width = image.shape[:2]
        queue.append(_InFlight(index, image, valid, _sized(plan, height, width), meta.num_classes, decision, with_probs))
        for window, pixels, tile_valid in queue[-1].tiles():
            batch.append((queue[-1], window, pixels, tile_valid))
            if sum(p is not None for _, _, p, _ in batch) >= plan.batch:
                _run_batch(backend, batch, max_pixel_value, observe, infer, plan)
                batch = []
                while queue and queue[0].waiting == 0:
                    yield queue.pop(0).result()
    _run_batch(backend, batch, max_pixel_value, observe, infer, plan)
    for done in queue:
        yield done.result()


def _sized(plan: TilePlan, height: int, width: int) -> TilePlan:
    from dataclasses import replace

    return replace(plan, height=height, width=width)


def _run_batch(backend, batch: list, max_pixel_value: float, observe: Observer | None,  # noqa: ANN001
               infer: Infer | None, plan: TilePlan) -> None:
    """Logits (or with TTA averaged probabilities) for the batch's tiles (skipped ones stay None),
    then each blended in order."""
    tiles = [(pixels, valid) for _, _, pixels, valid in batch if pixels is not None]
    logits: Iterator[np.ndarray] = iter(())
    if tiles:
        meta, t = backend.meta, tiles[0][0].shape[-1]
        valid = None
        if any(v is not None for _, v in tiles):  # invalid pixels: exactly the training mean, as in predict
            valid = np.stack([np.ones((t, t), bool) if v is None else v for _, v in tiles])
        x = normalize(np.stack([p for p, _ in tiles]), max_pixel_value, meta.mean, meta.std, valid)
        windows = [(item.index, window) for item, window, pixels, _ in batch if pixels is not None]
        def call(v: np.ndarray, items: list[int]) -> np.ndarray:
            return backend(v) if infer is None else infer(v, [windows[i] for i in items])

        out = tta_forward(call, x, plan.tta, backend.max_batch)
        if observe is not None:
            observe(windows, out)
        logits = iter(out)
    for item, window, pixels, valid in batch:
        item.blend(window, next(logits) if pixels is not None else None, valid)
