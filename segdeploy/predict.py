"""Tiled inference on rasters of any size with bounded memory (numpy; the backend may be torch).

reader thread ──(bounded queue of tile batches)──► inference (caller's thread) ──(bounded queue)──►
writer thread: StripAccumulator blends tiles row by row, final rows are written as soon as no
later tile touches them. Nothing scene-sized is ever allocated: the accumulators hold the overlap
band below the current row of tiles and the current tile; the writer holds at most one output
block row. Raster I/O (reading, writing, inputs) lives in `segdeploy.raster`.

Output goes to a hidden temporary file beside OUT and is renamed onto OUT only when complete. A
JSON state file records how many rows are on disk, so `--resume` continues an interrupted run.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from segdeploy.decision import PROBS_DTYPES, WITHHELD, Decision
from segdeploy.errors import DataError, UserError
from segdeploy.raster import (
    ClassRasterWriter,
    SceneReader,
    full_scale_flag,
    gdal_cache_bytes,
    input_id,
    is_remote,
    partial_paths,
    remote_settings,
    probs_path,
    write_picture_outputs,
)
from segdeploy.runtime.base import Backend
from segdeploy.runtime.finite import FiniteLogits
from segdeploy.tiling import BLENDS, TTA_MODES, StripAccumulator, TilePlan, default_overlap, normalize, tta_forward
from segdeploy.utils import RssSampler, writable_location, write_json

if TYPE_CHECKING:
    from segdeploy.vector import VectorOptions

Progress = Callable[[int, int, int], None]  # (tiles done, tiles this run computes, pixels it writes)
# (row, col, pixels or logits or None for a skipped all-nodata tile, validity or None when all valid)
Tile = tuple[int, int, "np.ndarray | None", "np.ndarray | None"]


@dataclass
class PredictOptions:
    """How predict runs on each raster: tile and overlap (px; None: the model's tile, tile/8), batch size, blend
    window, whether to write the confidence raster (`probs`), resume/overwrite, which input bands to feed, the
    input's full-scale value when its pixel type differs from the model's, previews, COG output and vector output."""
    tile: int | None = None
    overlap: int | None = None  # None: default_overlap(tile)
    batch: int | None = None  # None: 8 on a GPU, 2 on CPU (larger batches cost memory and gain no speed there)
    blend: str = "gaussian"
    probs: bool = False  # also a confidence raster: the winning class's probability, percent
    class_probs: bool = False  # also every class's probability, one band each (`--probs all`)
    probs_dtype: str = "uint8"  # of the class probabilities: uint8 round(p·255), or float32 p
    tta: str = "none"  # test-time augmentation of each tile (tiling.TTA_MODES): none, flips, d4
    decision: Decision = field(default_factory=Decision)  # --threshold / --min-confidence (decision.decide)
    resume: bool = False
    overwrite: bool = False  # start an unfinished output over instead of refusing to (a finished one: jobs.plan_jobs)
    # 1-based input bands to feed the model, in order (None: all, or chosen by colour interpretation)
    bands: list[int] | None = None
    # full-scale value of the input when its pixel type differs from the model's (None: refuse);
    # --max-pixel-value (alias --input-max), the input's counterpart of ModelMeta.max_pixel_value
    max_pixel_value: float | None = None
    preview: bool = True  # a quick-look PNG beside each raster output
    cog: bool = False  # write Cloud-Optimized GeoTIFFs (overviews by mode) instead of plain tiled ones
    vector: VectorOptions | None = None  # also polygonise the class rows as they finish (segdeploy.vector)


@dataclass
class PredictResult:
    """One raster's prediction. The counts and speeds are this invocation's work: a resumed run
    counts the tiles it ran (the row above the resume point is recomputed to rebuild the blend)
    and the pixels it wrote, not those already on disk (`resumed_from_row`, `tiles_total`).
    `peak_rss_mb` is the process's resident memory sampled every 10 ms during this call."""

    input: str
    output: str
    width: int
    height: int
    tiles: int  # run in this invocation, all-nodata ones included
    skipped_tiles: int
    seconds: float
    megapixels_per_s: float  # pixels written in this invocation / seconds
    peak_rss_mb: float
    files: list[str] = field(default_factory=list)
    resumed_from_row: int = 0  # image rows already on disk when this invocation started
    tiles_total: int = 0  # tiles of the whole scene
    pixels: int = 0  # pixels written in this invocation
    accumulator_mb: float = 0.0
    bands: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # tiles whose logits were not finite at the model's precision, recomputed at FP32
    recomputed_tiles: list[str] = field(default_factory=list)
    # NaN/±Inf input pixels no nodata value declared (output as nodata all the same)
    nonfinite_pixels: int = 0
    tta: str = "none"
    decision: dict = field(default_factory=dict)  # the thresholds applied (decision.Decision), None: not applied
    withheld_pixels: int = 0  # written as nodata because their winning probability was below min_confidence
    withheld_share: float = 0.0  # of the valid pixels written in this invocation

    def to_dict(self) -> dict:
        """The result as JSON types (predict's `--json` per raster)."""
        return asdict(self)


def input_max_pixel_value(reader: SceneReader, meta, opts: PredictOptions) -> float:  # noqa: ANN001 - ModelMeta
    """The value that maps to 1.0 before normalisation: the model's own, unless the input has
    another pixel type, which is refused unless --max-pixel-value says what its full scale is."""
    if opts.max_pixel_value is not None:
        if opts.max_pixel_value <= 0:
            raise UserError(f"--max-pixel-value must be > 0 (got {opts.max_pixel_value:g})")
        return float(opts.max_pixel_value)
    if not meta.input_dtype:
        reader.notes.append(f"the model records no input pixel type (exported before segdeploy checked it): "
                            f"{reader.dtype} input assumed to match, scaled by 1/{meta.max_pixel_value:g}")
    elif reader.dtype != meta.input_dtype:
        raise DataError(f"{reader.path} is {reader.dtype} but the model was trained on {meta.input_dtype} images "
                        f"(full scale {meta.max_pixel_value:g}); rescale it with {full_scale_flag(reader.dtype)}, or "
                        f"convert it to {meta.input_dtype}")
    return float(meta.max_pixel_value)


def _refuse_unfinished(out: Path, state_path: Path, tmp: Path) -> None:
    """A rerun without --resume must not silently throw away an interrupted prediction."""
    if not state_path.is_file():
        return
    try:
        done = json.loads(state_path.read_text()).get("rows_on_disk", "?")
    except (json.JSONDecodeError, AttributeError):
        done = "?"
    raise UserError(f"an unfinished prediction of {out} exists ({done} rows on disk); pass --resume to continue it, "
                    "or --overwrite to start it over")


# --------------------------------------------------------------------------------------- plan


def plan_tiles(backend: Backend, reader: SceneReader, opts: PredictOptions) -> tuple[TilePlan, float]:
    """The scene's window grid (tiling.TilePlan: tile, overlap, blend, padding, batch) and the input's
    full-scale value, from the options and the model: the one place they meet. Without --tile, a
    static-size model's one size is used (said in the result's notes). Raises UserError for a tile
    the model cannot run at (another size than a static model's included), an overlap above half
    the tile, an unknown blend."""
    meta = backend.meta
    for flag, value in (("--tile", opts.tile), ("--batch", opts.batch)):
        if value is not None and value < 1:  # never a silent default for a number the user gave
            raise UserError(f"{flag} must be at least 1 (got {value})")
    max_pixel_value = input_max_pixel_value(reader, meta, opts)
    tile = meta.tile_size if opts.tile is None else opts.tile
    if backend.static_size and tile != backend.static_size:
        fixed = backend.static_size
        if opts.tile is not None:  # never another tile than the one the user gave
            raise UserError(f"--tile {opts.tile}: {backend.path} accepts only {fixed}×{fixed} inputs (a static-size "
                            f"export); pass --tile {fixed}, or drop --tile")
        reader.notes.append(f"tile {fixed}: the model accepts only {fixed}×{fixed} inputs (trained at {tile})")
        tile = fixed
    if tile % meta.input_divisor:
        div, low = meta.input_divisor, max(meta.input_divisor, meta.min_tile_size or 0)
        fits = sorted({t for t in (tile // div * div, -(-tile // div) * div) if t >= low} or {-(-low // div) * div})
        raise UserError(f"--tile {tile} must be a multiple of the model's input divisor {div}; use "
                        + " or ".join(f"--tile {t}" for t in fits))
    if meta.min_tile_size and tile < meta.min_tile_size:
        raise UserError(f"--tile {tile} is below the smallest tile {meta.min_tile_size} the model runs at; "
                        f"use --tile {meta.min_tile_size} or larger")
    overlap = default_overlap(tile) if opts.overlap is None else opts.overlap
    if not 0 <= overlap <= tile // 2:
        raise UserError(f"--overlap {overlap} must be between 0 and half the tile ({tile // 2})")
    if opts.blend not in BLENDS:
        raise UserError(f"--blend {opts.blend!r} is unknown; choose one of {', '.join(BLENDS)}")
    if opts.tta not in TTA_MODES:
        raise UserError(f"--tta {opts.tta!r} is unknown; choose one of {', '.join(TTA_MODES)}")
    if opts.probs_dtype not in PROBS_DTYPES:
        raise UserError(f"--probs-dtype {opts.probs_dtype!r} is unknown; choose one of {', '.join(PROBS_DTYPES)}")
    opts.decision.check(meta.num_classes, str(backend.path))
    check_head(getattr(backend, "output", "logits"), Path(backend.path).name, opts)
    batch = opts.batch if opts.batch is not None else (8 if backend.device.startswith("cuda") else 2)
    batch = min(batch, backend.max_batch or batch)
    return TilePlan(reader.height, reader.width, tile, overlap, opts.blend, batch=batch, tta=opts.tta), max_pixel_value


def check_head(output: str, name: str, opts: PredictOptions) -> None:
    """A model whose `output` (`artifact.ExportForm.output`) is "labels" — an argmax head, file
    `name` — returns one class per pixel, no scores: labels cannot be blended where tiles overlap,
    so it runs only with ``--blend crop`` (each pixel is decided by the tile whose centre holds it,
    and the one-hot scores make that exact) and without what needs probabilities: ``--probs``,
    ``--tta`` (it averages them), ``--threshold``/``--min-confidence``. Raises UserError."""
    if output != "labels":
        return
    needs = [flag for flag, on in (("--probs", opts.probs or opts.class_probs), ("--tta", opts.tta != "none"),
                                   ("--threshold/--min-confidence", not opts.decision.is_argmax)) if on]
    if needs:
        raise UserError(f"{name} is an argmax head, which returns the class map only, without the probabilities "
                        f"{needs[0]} needs; drop {needs[0]}, or use the model.onnx beside it")
    if opts.blend != "crop":
        raise UserError(f"{name} is an argmax head, which returns the class map only, and cannot serve --blend "
                        f"{opts.blend} (labels cannot be averaged where tiles overlap); pass --blend crop, or use the "
                        "model.onnx beside it")


def resume_point(out: Path, opts: PredictOptions, settings: dict, stride: int) -> tuple[int, int]:
    """(first tile row to emit, image rows already on disk) for a raster output."""
    state_path, tmp = partial_paths(out)
    if opts.resume and state_path.is_file():
        state = json.loads(state_path.read_text())
        if state.get("settings") != settings:
            theirs = state.get("settings") or {}
            differ = ", ".join(f"{k} {theirs.get(k)!r} (now {v!r})" for k, v in settings.items() if theirs.get(k) != v)
            raise UserError(f"{state_path} was written with other settings: {differ}; continue it with those "
                            "options plus --resume, or start it over with --overwrite instead of --resume")
        if not tmp.is_file():
            raise UserError(f"cannot resume {out}: its partial output {tmp.name} is gone; rerun without --resume")
        rows_on_disk = int(state["rows_on_disk"])
        return rows_on_disk // stride, rows_on_disk  # tile rows whose output is not fully on disk yet
    if opts.resume:
        raise UserError(f"nothing to resume for {out} (no {state_path.name}); drop --resume")
    if not opts.overwrite:
        _refuse_unfinished(out, state_path, tmp)
    return 0, 0


# --------------------------------------------------------------------------------------- entry point


def predict_file(backend: Backend, src: Path | str, out: Path, opts: PredictOptions,
                 progress: Progress | None = None) -> PredictResult:
    """Predict one image into `out` (GeoTIFF for rasters; PNG + overlay for pictures). `src` may be
    a GDAL virtual path of a remote raster (`/vsicurl/https://…`, `/vsis3/…`, `/vsigs/…`)."""
    import rasterio

    # the network settings only for a remote raster: their "no directory listing" would hide a local
    # file's sidecars from GDAL (a .msk mask, a .tfw world file, an .aux.xml with nodata or CRS)
    network = remote_settings() if is_remote(src) else {}
    with rasterio.Env(GDAL_CACHEMAX=gdal_cache_bytes(), **network), RssSampler() as rss:
        result = _predict_file(backend, src, Path(out), opts, progress)
    result.peak_rss_mb = round(rss.peak, 1)
    return result


def time_file(backend: Backend, src: Path, workdir: Path, tta: str = "none") -> float:
    """Megapixels per second of predicting `src` end to end (read, tile, infer, blend, write) into
    `workdir` with predict's own defaults at the model's tile size, each tile test-time augmented
    with `tta` (`tiling.TTA_MODES`): what ``bench --tiled`` reports (the CLI hands it to bench,
    which imports no other verb). Raises what `predict_file` raises."""
    from segdeploy.raster import is_picture

    out = workdir / ("pred.png" if is_picture(src) else "pred.tif")
    return predict_file(backend, src, out, PredictOptions(tile=backend.meta.tile_size, tta=tta)).megapixels_per_s


def _predict_file(backend: Backend, src: Path | str, out: Path, opts: PredictOptions,
                  progress: Progress | None) -> PredictResult:
    t0 = time.perf_counter()
    # the model's pixel type, for a --bands hint that also names the rescaling the input needs
    reader = SceneReader(src, backend.meta.bands, opts.bands,
                         backend.meta.input_dtype if opts.max_pixel_value is None else None)
    plan, max_pixel_value = plan_tiles(backend, reader, opts)
    is_picture = reader.array is not None
    if is_picture and (opts.probs or opts.class_probs):
        reader.notes.append("--probs writes a GeoTIFF beside a raster's output; a picture's prediction has none")
    if not is_picture and not reader.georeferenced:
        warnings.warn(f"{src} has no georeference (no geotransform, GCPs or RPCs); the output will not have one "
                      "either", stacklevel=3)
    elif not is_picture and reader.georef.transform is None:
        reader.notes.append(f"georeference kept as {' and '.join(reader.georef.forms())}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory {out.parent}: {exc.strerror}") from None
    settings = {"input": input_id(src), "model": str(backend.path),
                "tile": plan.tile, "overlap": plan.overlap, "blend": opts.blend, "probs": opts.probs}
    if opts.class_probs or opts.tta != "none" or not opts.decision.is_argmax:  # older state files stay valid
        settings |= {"class_probs": opts.class_probs and opts.probs_dtype, "tta": opts.tta,
                     "decision": opts.decision.to_dict()}
    start_row, rows_on_disk = (0, 0) if is_picture else resume_point(out, opts, settings, plan.stride)
    writable_location(out)
    sink = RowSink(out, reader, backend.meta, opts, settings, start_row, plan)
    pixels = (reader.height - rows_on_disk) * reader.width  # what this invocation writes
    try:
        pipeline = TilePipeline(backend, reader, plan, max_pixel_value, opts, sink, start_row, progress, pixels)
        pipeline.run()
        backend.trim()  # the outputs and the preview are made after inference: not on top of its peak
        files = sink.finish()
    finally:
        sink.close()
    seconds = time.perf_counter() - t0
    notes = list(reader.notes) + [n for n in (pipeline.finite.summary(), _nonfinite_note(pipeline.nonfinite)) if n]
    return PredictResult(str(src), str(out), reader.width, reader.height, pipeline.done, pipeline.skipped,
                         round(seconds, 3), round(pixels / 1e6 / seconds, 3), 0.0, files, rows_on_disk, plan.total,
                         pixels, round(pipeline.acc.nbytes() / 2**20, 2), list(reader.indexes), notes,
                         list(pipeline.finite.recomputed), pipeline.nonfinite, opts.tta, opts.decision.to_dict(),
                         sink.withheld, round(sink.withheld / max(sink.valid, 1), 6))


def _nonfinite_note(pixels: int) -> str:
    return (f"{pixels} NaN/Inf input pixels that no nodata value declares were output as nodata" if pixels else "")


# --------------------------------------------------------------------------------------- output rows


class RowSink:
    """Final class rows (and confidence, or every class's probability) in image order → the raster
    writer by whole block rows, with the resume state after each; or, for a picture, kept until the
    end. Counts the valid pixels written and those withheld by --min-confidence."""

    def __init__(self, out: Path, reader: SceneReader, meta, opts: PredictOptions, settings: dict,  # noqa: ANN001
                 start_row: int, plan: TilePlan) -> None:
        self.out, self.reader, self.meta, self.opts, self.settings = out, reader, meta, opts, settings
        self.state_path, self.tmp = partial_paths(out)
        self.block = 512 if min(reader.height, reader.width) >= 512 else 256
        self.labels: list[np.ndarray] = []
        self.conf: list[np.ndarray] = []
        self.probs: list[np.ndarray] = []  # C×rows×W (--probs all)
        self.valid_rows: list[np.ndarray] = []
        self.valid = self.withheld = 0
        self.picture_rows: list[tuple[np.ndarray, np.ndarray | None]] = []
        # first image row held in the buffers (emitting starts at the first tile row not on disk)
        self.buffered_from = plan.rows[start_row] if start_row < len(plan.rows) else reader.height
        wants_probs = (opts.probs or opts.class_probs) and reader.array is None
        self.probs_tmp = out.with_name(f".{out.stem}.probs.partial.tif") if wants_probs else None
        self.writer = None
        if reader.array is None:
            self.writer = ClassRasterWriter(out, self.tmp, self.state_path, reader, meta.num_classes, meta.palette,
                                            self.block, self.probs_tmp, resume=start_row > 0,
                                            class_names=list(meta.classes) if opts.class_probs else None,
                                            probs_dtype=opts.probs_dtype)
        self.nodata = self.writer.nodata if self.writer else 255
        self.vector = None  # a listener fed every band of rows as written (polygons: segdeploy.vector)
        if opts.vector is not None:
            from segdeploy.vector import VectorSink

            done = [(plan.rows[r], plan.rows[r] + plan.stride) for r in range(start_row)]  # on disk: rebuilt first
            self.vector = VectorSink(out, opts.vector, reader, meta, self.nodata, opts.probs, done, self.tmp,
                                     self.probs_tmp)

    def add(self, y: int, labels: np.ndarray, conf: np.ndarray, probs: np.ndarray | None = None) -> None:
        """Rows from image row `y` on, as the accumulator emits them (-1: nodata in the input,
        `WITHHELD`: below --min-confidence, both written as nodata; the validity came with the
        tiles, so this thread never reads the input)."""
        nodata_px = labels < 0
        withheld = int(np.count_nonzero(labels == WITHHELD)) if self.opts.decision.min_confidence else 0
        self.withheld += withheld
        self.valid += labels.size - int(np.count_nonzero(nodata_px)) + withheld
        lab = labels.astype(np.uint16 if self.meta.num_classes >= 255 else np.uint8)
        lab[nodata_px] = self.nodata
        self.labels.append(lab)
        if self.opts.class_probs and probs is not None:
            self.probs.append(probs)
            self.valid_rows.append(labels != -1)
        if self.opts.probs:
            cf = np.clip(np.round(conf.astype(np.float32) * 100), 0, 100).astype(np.uint8)
            cf[labels == -1] = 255  # a withheld pixel keeps its confidence: it says why it was withheld
            self.conf.append(cf)
        if self.vector is not None:
            self.vector.add_rows(y, lab, self.conf[-1] if self.opts.probs else None)
        self.flush(final=False)

    def flush(self, final: bool) -> None:
        """Write the buffered class rows (and confidence) that fill whole block rows of the output (all of them when
        `final`), then record the rows on disk for --resume."""
        if not self.labels:
            return
        lab = np.concatenate(self.labels)
        conf = np.concatenate(self.conf) if self.conf else None
        probs = np.concatenate(self.probs, axis=1) if self.probs else None
        valid = np.concatenate(self.valid_rows) if self.valid_rows else None
        y0 = self.buffered_from
        n = len(lab) if final else ((y0 + len(lab)) // self.block) * self.block - y0
        if n <= 0:
            return
        if self.writer is not None:
            if probs is not None:
                self.writer.write_rows(y0, lab[:n], probs[:, :n], valid[:n])
            else:
                self.writer.write_rows(y0, lab[:n], conf[:n] if conf is not None else None)
            write_json(self.state_path, {"settings": self.settings, "rows_on_disk": y0 + n,
                                         "height": self.reader.height})
        else:
            self.picture_rows.append((lab[:n], conf[:n] if conf is not None else None))
        more = n < len(lab)
        self.labels = [lab[n:]] if more else []
        self.conf = [conf[n:]] if conf is not None and more else []
        self.probs = [probs[:, n:]] if probs is not None and more else []
        self.valid_rows = [valid[n:]] if valid is not None and more else []
        self.buffered_from = y0 + n

    def close(self) -> None:
        """Stop the listeners' work (after `finish`, or a failed run: its partial files stay for --resume)."""
        if self.vector is not None:
            self.vector.close()

    def finish(self) -> list[str]:
        """Flush the last rows, mark the outputs complete and give them their final names."""
        self.flush(final=True)
        vector = [self.vector.finish()] if self.vector is not None else []
        if self.writer is None:
            return write_picture_outputs(self.reader, self.picture_rows, self.meta, self.out) + vector
        self.writer.finish(cog=self.opts.cog, source=str(self.settings.get("input", "")))
        os.replace(self.tmp, self.out)
        files = [str(self.out)]
        if self.probs_tmp:
            probs_out = probs_path(self.out)
            os.replace(self.probs_tmp, probs_out)
            files.append(str(probs_out))
        files += vector
        self.state_path.unlink(missing_ok=True)
        if self.opts.preview:
            from segdeploy.viz import preview_path, save_class_preview

            meta = self.meta
            files.append(str(save_class_preview(self.out, preview_path(self.out), meta.classes,
                                                [tuple(c) for c in meta.palette],
                                                title=f"{self.out.name} · {self.reader.width} x {self.reader.height} px")))
        return files


# --------------------------------------------------------------------------------------- pipeline


def _put(q: queue.Queue, item: object, stop: threading.Event, force: bool = False) -> None:
    """put() that gives up when the pipeline is stopping (a dead consumer must not hang us)."""
    while True:
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            if stop.is_set():
                if not force:
                    return
                try:  # make room for the end marker
                    q.get_nowait()
                except queue.Empty:
                    pass


class TilePipeline:
    """Reader thread → inference in the caller's thread → writer thread, over bounded queues. An
    error in any stage stops the others and is raised in the caller's thread; an interrupt leaves
    the rows on disk and the resume state for --resume."""

    def __init__(self, backend: Backend, reader: SceneReader, plan: TilePlan, max_pixel_value: float, opts: PredictOptions,
                 sink: RowSink, start_row: int, progress: Progress | None, pixels: int | None = None) -> None:
        self.backend, self.reader, self.plan, self.opts, self.sink = backend, reader, plan, opts, sink
        self.max_pixel_value = max_pixel_value
        self.start_row, self.progress = start_row, progress
        self.pixels = reader.width * reader.height if pixels is None else pixels  # written by this run
        self.acc = StripAccumulator(plan, backend.meta.num_classes, keep_confidence=opts.probs or reader.array is not None,
                                    decision=opts.decision,
                                    keep_probs=opts.probs_dtype if opts.class_probs and reader.array is None else None)
        # rebuild the overlap band of the row before `start_row` by recomputing that row (output not re-emitted)
        self.replay_from = max(start_row - 1, 0)
        if self.replay_from:
            self.acc.start_at(self.replay_from)
        self.total = (len(plan.rows) - self.replay_from) * len(plan.cols)  # tiles this run computes
        self.work: queue.Queue = queue.Queue(maxsize=2)
        self.results: queue.Queue = queue.Queue(maxsize=2)
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.skipped = 0
        self.done = 0
        self.finite = FiniteLogits(backend)
        self.nonfinite = 0  # NaN/Inf input pixels no nodata value declared, each counted once

    def tiles(self) -> Iterator[Tile]:
        """(row, col, B×tile×tile pixels padded past the edge or None when all nodata, tile×tile
        validity) in row-major order."""
        plan = self.plan
        for window in plan.windows(self.replay_from):
            r, c = window.row, window.col
            img, valid = self.reader.read(window.row_off, window.col_off, plan.tile, plan.tile)
            if self.reader.source.nonfinite_mask is not None and r >= self.start_row:
                self.nonfinite += self._owned(r, c, self.reader.source.nonfinite_mask)
            if not valid.any():
                yield r, c, None, None  # all nodata: skipped, never blended, emitted as nodata
                continue
            # padded like the pixels, so a reflected invalid pixel is filled too (the accumulator
            # keeps only the in-image part)
            valid = None if valid.all() else plan.fill(valid)
            yield r, c, plan.fill(np.moveaxis(img, -1, 0)), valid

    def _owned(self, r: int, c: int, mask: np.ndarray) -> int:
        """Pixels of `mask` (a window's) that no later tile reads: each counted once."""
        plan = self.plan
        h = (plan.rows[r + 1] if r + 1 < len(plan.rows) else self.reader.height) - plan.rows[r]
        w = (plan.cols[c + 1] if c + 1 < len(plan.cols) else self.reader.width) - plan.cols[c]
        return int(np.count_nonzero(mask[:h, :w]))

    def read_loop(self) -> None:
        """The reader thread: cut the input into tiles (`tiles`) and queue them in batches for inference."""
        try:
            items: list[Tile] = []
            for item in self.tiles():
                if self.stop.is_set():
                    return
                items.append(item)
                if sum(1 for _, _, a, _ in items if a is not None) >= self.plan.batch or len(items) >= 4 * self.plan.batch:
                    _put(self.work, items, self.stop)
                    items = []
            if items:
                _put(self.work, items, self.stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self.fail(exc)
        finally:
            _put(self.work, None, self.stop, force=True)

    def write_loop(self) -> None:
        """The writer thread: blend each tile's logits (softmax folded into the blend) and hand finished rows to the
        sink."""
        try:
            while (got := self.results.get()) is not None:
                for r, c, logits, valid in got:
                    emitted = self.acc.add_output(r, c, logits, valid)
                    self.done += 1
                    if self.progress:
                        self.progress(self.done, self.total, self.pixels)
                    if emitted is not None and r >= self.start_row:
                        self.sink.add(self.plan.rows[r], *emitted)
        except BaseException as exc:  # noqa: BLE001
            self.fail(exc)

    def infer(self, items: list[Tile]) -> list[Tile]:
        """Pixels → logits per tile (None stays None for skipped tiles); with --tta, each tile's views
        through the backend in one batch and their softmax averaged (`tiling.tta_forward`). Invalid
        pixels are filled with the training mean by `normalize`; a tile whose logits are not finite
        is recomputed at FP32 or named in an error (`FiniteLogits`). Without TTA the softmax is the
        writer thread's, folded into the blend, so this thread goes straight back to the backend."""
        tiles = [(r, c, a, v) for r, c, a, v in items if a is not None]
        logits: Iterator[np.ndarray] = iter(())
        if tiles:
            meta, t = self.backend.meta, self.plan.tile
            valid = None
            if any(v is not None for *_, v in tiles):
                valid = np.stack([np.ones((t, t), bool) if v is None else v for *_, v in tiles])
            x = normalize(np.stack([a for _, _, a, _ in tiles]), self.max_pixel_value, meta.mean, meta.std, valid)
            def call(batch: np.ndarray, index: list[int]) -> np.ndarray:
                return self.finite.check(batch, self.backend(batch), lambda i: self.tile_name(*tiles[index[i]][:2]))

            logits = iter(tta_forward(call, x, self.plan.tta, self.backend.max_batch))
        self.skipped += len(items) - len(tiles)
        return [(r, c, next(logits) if a is not None else None, v) for r, c, a, v in items]

    def tile_name(self, row: int, col: int) -> str:
        """A tile named for an error: its grid position, pixel rows and columns, and the input."""
        y, x, t = self.plan.rows[row], self.plan.cols[col], self.plan.tile
        return f"tile {row},{col} (rows {y}..{y + t}, columns {x}..{x + t}) of {self.reader.path}"

    def fail(self, exc: BaseException) -> None:
        """Record `exc` and stop every thread (the caller raises it once they are joined)."""
        self.errors.append(exc)
        self.stop.set()

    def run(self) -> None:
        """Run the three stages (reader thread, inference here, writer thread) to the end; raises the first error any
        of them hit, after stopping the others."""
        reader_t = threading.Thread(target=self.read_loop, daemon=True, name="segdeploy-reader")
        writer_t = threading.Thread(target=self.write_loop, daemon=True, name="segdeploy-writer")
        reader_t.start()
        writer_t.start()
        try:
            while not self.stop.is_set() and (items := self.work.get()) is not None:
                _put(self.results, self.infer(items), self.stop)
        except BaseException as exc:  # noqa: BLE001 - an inference error: stop the threads, then raise
            self.fail(exc)
        finally:
            _put(self.results, None, self.stop, force=True)
            writer_t.join()
            self.stop.set()
            while reader_t.is_alive():  # unblock the reader if it waits on a full queue
                try:
                    self.work.get_nowait()
                except queue.Empty:
                    time.sleep(0.01)
            self.reader.close()
        if self.errors:
            raise self.errors[0]
