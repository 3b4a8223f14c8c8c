"""Tiled inference on rasters of any size with bounded memory.

reader thread ──(bounded queue of tile batches)──► inference (caller's thread) ──(bounded queue)──►
writer thread: StripAccumulator blends tiles row by row, final rows are written as soon as no
later tile touches them. Nothing scene-sized is ever allocated: the accumulators hold the overlap
band below the current row of tiles and the current tile; the writer holds at most one output
block row.

Output goes to a hidden temporary file beside OUT and is renamed onto OUT only when complete. A
JSON state file records how many rows are on disk, so `--resume` continues an interrupted run.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from segdeploy.errors import DataError, UserError
from segdeploy.runtime.base import Backend
from segdeploy.tiling import BLENDS, StripAccumulator, blend_weights, window_starts
from segdeploy.utils import atomic_path, peak_rss_mb, raise_write_error, writable_location, write_json

RASTER = {".tif", ".tiff", ".vrt", ".img", ".jp2"}
PICTURE = {".png", ".jpg", ".jpeg", ".bmp"}
SUPPORTED_DTYPES = {"uint8", "uint16", "int16", "uint32", "int32", "float32", "float64"}


@dataclass
class PredictOptions:
    tile: int | None = None
    overlap: int | None = None  # None: default_overlap(tile)
    batch: int = 8
    blend: str = "gaussian"
    probs: bool = False
    resume: bool = False
    pad: str = "reflect"
    # 1-based input bands to feed the model, in order (None: all, or chosen by colour interpretation)
    bands: list[int] | None = None
    # full-scale value of the input when its pixel type differs from the model's (None: refuse)
    input_max: float | None = None
    preview: bool = True  # a quick-look PNG beside each raster output
    cog: bool = False  # write Cloud-Optimized GeoTIFFs (overviews by mode) instead of plain tiled ones


@dataclass
class PredictResult:
    input: str
    output: str
    width: int
    height: int
    tiles: int
    skipped_tiles: int
    seconds: float
    megapixels_per_s: float
    peak_rss_mb: float
    files: list[str] = field(default_factory=list)
    resumed_from_row: int = 0
    accumulator_mb: float = 0.0
    bands: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------- readers


class SceneReader:
    """Windowed reads with padding past the edge, validity from GDAL's dataset mask (nodata, an
    alpha band, a .msk sidecar or an internal mask). GeoTIFF via rasterio, pictures via PIL."""

    def __init__(self, path: Path | str, bands: int, band_order: list[int] | None = None) -> None:
        self.path = path  # a GDAL /vsi… path stays a string: Path would collapse its '//'
        if not is_remote(path) and not Path(path).exists():
            raise DataError(f"input {path} not found")
        self.profile: dict = {}
        self.array: np.ndarray | None = None
        self.georeferenced = False
        self.masked = False
        self.indexes: list[int] = list(range(1, bands + 1))
        self.notes: list[str] = []
        if not is_remote(path) and Path(path).suffix.lower() in PICTURE:
            from segdeploy.data.io import read_image

            self.array = read_image(path, bands)
            self.height, self.width, self.count = self.array.shape
            self.dtype = str(self.array.dtype)
            self.nodata = None
        else:
            self._open_raster(path, bands, band_order)
        if self.dtype not in SUPPORTED_DTYPES:
            raise DataError(f"{path} has pixel type {self.dtype}; supported: {', '.join(sorted(SUPPORTED_DTYPES))}")

    def _open_raster(self, path: Path, bands: int, band_order: list[int] | None) -> None:
        import rasterio
        from rasterio.enums import MaskFlags
        from rasterio.errors import RasterioIOError

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.src = rasterio.open(path)
        except RasterioIOError as exc:
            why = "unreachable, missing or not a raster?" if is_remote(path) else "corrupt, truncated or not a raster?"
            raise DataError(f"cannot open raster {path}: {str(exc).splitlines()[0][:200]} ({why})") from None
        self.height, self.width = self.src.height, self.src.width
        self.indexes, self.notes = choose_bands(path, self.src.colorinterp, bands, band_order)
        self.count = len(self.indexes)
        self.dtype = self.src.dtypes[self.indexes[0] - 1]
        self.nodata = self.src.nodata
        self.masked = any(flags != [MaskFlags.all_valid] for flags in self.src.mask_flag_enums)
        self.profile = self.src.profile.copy()
        self.georeferenced = self.src.crs is not None and not self.src.transform.is_identity

    def read(self, y: int, x: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(H×W×B pixels, H×W valid mask) for the in-image part of a window."""
        h, w = min(h, self.height - y), min(w, self.width - x)
        if self.array is not None:
            img = self.array[y : y + h, x : x + w]
            return img, np.ones((h, w), dtype=bool)
        from rasterio.windows import Window

        win = Window(x, y, w, h)
        try:
            img = np.moveaxis(self.src.read(self.indexes, window=win), 0, -1)
        except Exception as exc:  # noqa: BLE001 - GDAL errors on truncated files surface here
            raise DataError(f"cannot read {self.path} at rows {y}..{y + h}: {str(exc)[:200]} "
                            "(truncated or corrupt file)") from None
        return img, self.valid(y, x, h, w)

    def valid(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """H×W mask, False where GDAL's dataset mask says invalid (1 byte per pixel)."""
        h, w = min(h, self.height - y), min(w, self.width - x)
        if self.array is not None or not self.masked:
            return np.ones((h, w), dtype=bool)
        from rasterio.windows import Window

        return self.src.dataset_mask(window=Window(x, y, w, h)) > 0

    def second_handle(self) -> SceneReader:
        """The same raster opened again: a GDAL dataset must not be read from two threads at once."""
        if self.array is not None:
            return self
        import rasterio

        twin = object.__new__(SceneReader)
        twin.__dict__.update(self.__dict__)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            twin.src = rasterio.open(self.path)
        return twin

    def close(self) -> None:
        if self.array is None:
            self.src.close()


def choose_bands(path: Path, colorinterp: tuple, bands: int, requested: list[int] | None) -> tuple[list[int], list[str]]:
    """1-based band indexes to feed a `bands`-band model, and what was decided and why.

    `--bands` wins. Otherwise an alpha band is left out (it is the validity mask), and a file
    whose colour interpretation says blue/green/red in another order is read as red, green, blue.
    """
    from rasterio.enums import ColorInterp

    count = len(colorinterp)
    if requested:
        bad = [b for b in requested if not 1 <= b <= count]
        if bad:
            raise DataError(f"--bands {','.join(map(str, requested))}: {path} has bands 1..{count} only")
        if len(requested) != bands:
            raise DataError(f"--bands gives {len(requested)} bands but the model expects {bands}")
        return list(requested), [f"bands {','.join(map(str, requested))} (from --bands)"]
    notes = []
    colour = [i for i, ci in enumerate(colorinterp, 1) if ci != ColorInterp.alpha]
    if len(colour) < count:
        notes.append(f"alpha band {','.join(str(i) for i in range(1, count + 1) if i not in colour)} used as the "
                     "validity mask")
    if len(colour) != bands:
        if count == bands:
            return list(range(1, count + 1)), []
        raise DataError(f"{path} has {len(colour)} bands but the model expects {bands}; pick them with "
                        f"--bands (e.g. --bands {','.join(str(i) for i in range(1, bands + 1))})")
    rgb = {ColorInterp.red: 0, ColorInterp.green: 1, ColorInterp.blue: 2}
    kinds = [colorinterp[i - 1] for i in colour]
    if bands == 3 and set(kinds) == set(rgb) and [rgb[k] for k in kinds] != [0, 1, 2]:
        colour = sorted(colour, key=lambda i: rgb[colorinterp[i - 1]])
        notes.append(f"bands {','.join(map(str, colour))} read as red, green, blue (the file's colour interpretation)")
    return colour, notes


def pad_tile(img: np.ndarray, tile: int, mode: str) -> np.ndarray:
    ph, pw = tile - img.shape[0], tile - img.shape[1]
    if not ph and not pw:
        return img
    if mode == "reflect" and (ph >= img.shape[0] or pw >= img.shape[1]):
        mode = "symmetric" if ph <= img.shape[0] and pw <= img.shape[1] else "edge"
    return np.pad(img, ((0, ph), (0, pw), (0, 0)), mode=mode)


# --------------------------------------------------------------------------------------- writers


def _with_errno(exc: Exception, directory: Path) -> OSError:
    """GDAL reports a failed write ("Write failed") without an errno; a full disk is the usual
    cause, and the free space says whether it was."""
    import errno
    import shutil

    if not isinstance(exc, OSError) or exc.errno is None:  # CPLE errors carry GDAL's codes, not errno
        try:
            if shutil.disk_usage(directory).free < 4 * 2**20:
                return OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            pass
    return exc if isinstance(exc, OSError) else OSError(None, str(exc).splitlines()[0][:160])


class ClassRasterWriter:
    """Class-index GeoTIFF (uint8 while classes fit), tiled, compressed, BigTIFF when needed,
    georeference and nodata copied, palette as colormap; written by whole block rows."""

    def __init__(self, final: Path, tmp: Path, state_path: Path, reader: SceneReader, classes: int,
                 palette: list[list[int]], block: int, probs_tmp: Path | None, resume: bool) -> None:
        self.final, self.state_path = final, state_path
        self.dtype = "uint8" if classes < 255 else "uint16"
        self.nodata = 255 if self.dtype == "uint8" else 65535
        self.block = block
        self.paths = [tmp] + ([probs_tmp] if probs_tmp else [])
        profile = {
            "driver": "GTiff", "width": reader.width, "height": reader.height, "count": 1,
            "crs": reader.profile.get("crs"), "transform": reader.profile.get("transform"),
            "tiled": True, "blockxsize": block, "blockysize": block, "compress": "deflate", "predictor": 2,
            "BIGTIFF": "IF_SAFER",
        }
        if not resume:
            with self._failing_write():
                self._create(tmp, profile, palette, probs_tmp)

    @contextmanager
    def _failing_write(self) -> Iterator[None]:
        """A write that fails (disk full, read-only, denied) becomes one line naming the output,
        and leaves no partial file behind (an interrupt, unlike this, keeps them for --resume)."""
        from rasterio._err import CPLE_BaseError
        from rasterio.errors import RasterioError

        try:
            yield
        except (OSError, RasterioError, CPLE_BaseError) as exc:  # GDAL sets no errno on its write errors
            for p in self.paths:
                p.unlink(missing_ok=True)
            self.state_path.unlink(missing_ok=True)
            raise_write_error(self.final, _with_errno(exc, self.final.parent))

    def _create(self, tmp: Path, profile: dict, palette: list[list[int]], probs_tmp: Path | None) -> None:
        import rasterio

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rasterio.open(tmp, "w", dtype=self.dtype, nodata=self.nodata, **profile) as dst:
                if self.dtype == "uint8":
                    dst.write_colormap(1, {i: (*map(int, c), 255) for i, c in enumerate(palette[:255])})
                dst.update_tags(segdeploy="incomplete")
            if probs_tmp:
                with rasterio.open(probs_tmp, "w", dtype="uint8", nodata=255, **profile) as dst:
                    dst.update_tags(segdeploy="incomplete", scale="percent confidence (max softmax × 100)")

    def write_rows(self, y: int, labels: np.ndarray, conf: np.ndarray | None) -> None:
        """Write full-width rows starting at `y` (the file is reopened so each call is on disk)."""
        import rasterio
        from rasterio.windows import Window

        win = Window(0, y, labels.shape[1], labels.shape[0])
        with warnings.catch_warnings(), self._failing_write():
            warnings.simplefilter("ignore")
            with rasterio.open(self.paths[0], "r+") as dst:
                dst.write(labels.astype(self.dtype)[None], window=win)
            if conf is not None and len(self.paths) > 1:
                with rasterio.open(self.paths[1], "r+") as dst:
                    dst.write(conf[None], window=win)

    def finish(self, cog: bool = False) -> None:
        """Mark the outputs complete; with `cog`, rewrite each as a Cloud-Optimized GeoTIFF in place
        (internal tiles, overviews by *mode* for the class map: classes are never averaged)."""
        import rasterio

        with self._failing_write():
            for p in self.paths:
                with rasterio.open(p, "r+") as dst:
                    dst.update_tags(segdeploy="complete")
                if cog:
                    _to_cog(p, "MODE" if p == self.paths[0] else "AVERAGE")


def _to_cog(path: Path, resampling: str) -> None:
    """GDAL's COG driver: 512² internal tiles, deflate, overviews down to one tile; atomic."""
    import os

    from rasterio.shutil import copy as gdal_copy

    cog = path.with_name(path.name.replace(".partial.tif", ".cog.partial.tif"))
    try:
        gdal_copy(str(path), str(cog), driver="COG", COMPRESS="DEFLATE", PREDICTOR="2", BLOCKSIZE="512",
                  OVERVIEW_RESAMPLING=resampling, BIGTIFF="IF_SAFER")
        os.replace(cog, path)
    finally:
        cog.unlink(missing_ok=True)


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


def _tiles(reader: SceneReader, rows: list[int], cols: list[int], tile: int, pad: str,
           start_row: int) -> Iterator[tuple[int, int, np.ndarray | None]]:
    for r in range(start_row, len(rows)):
        for c in range(len(cols)):
            img, valid = reader.read(rows[r], cols[c], tile, tile)
            if not valid.any():
                yield r, c, None  # all nodata: skipped, never blended
                continue
            yield r, c, pad_tile(img, tile, pad)


def gdal_cache_bytes() -> int:
    """GDAL's block cache for predict. GDAL's default (5% of RAM) fills with input blocks on a
    wide scene and is what made peak memory grow with the scene; a row of 512² input blocks across
    a 20k-pixel scene is ~31 MB. Override with SEGDEPLOY_GDAL_CACHE_MB."""
    import os

    return int(float(os.environ.get("SEGDEPLOY_GDAL_CACHE_MB", 64)) * 2**20)


def predict_file(backend: Backend, src: Path | str, out: Path, opts: PredictOptions,
                 progress: Callable[[int, int], None] | None = None) -> PredictResult:
    """Predict one image into `out` (GeoTIFF for rasters; PNG + overlay for pictures). `src` may be
    a GDAL virtual path of a remote raster (`/vsicurl/https://…`, `/vsis3/…`, `/vsigs/…`)."""
    import rasterio

    with rasterio.Env(GDAL_CACHEMAX=gdal_cache_bytes(), **remote_settings()):
        return _predict_file(backend, src, out, opts, progress)


REMOTE_PREFIXES = {"s3://": "/vsis3/", "gs://": "/vsigs/", "http://": "/vsicurl/http://",
                   "https://": "/vsicurl/https://"}


def gdal_path(item: str) -> str | None:
    """The GDAL virtual path of a remote input (a URL, s3://, gs://, or /vsi… already), or None."""
    if item.startswith("/vsi"):
        return item
    for prefix, vsi in REMOTE_PREFIXES.items():
        if item.startswith(prefix):
            return vsi + item[len(prefix):]
    return None


def is_remote(path: Path | str) -> bool:
    return isinstance(path, str) and path.startswith("/vsi")


def input_stem(path: Path | str) -> str:
    """The file name's stem, for a local path or a URL (query string dropped)."""
    name = str(path).split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return Path(name).stem


def remote_settings() -> dict[str, str]:
    """GDAL network settings for remote rasters: bounded time-outs and retries (an unreachable host
    fails instead of hanging), no directory listing per file. Environment variables win."""
    import os

    defaults = {"GDAL_HTTP_CONNECTTIMEOUT": "10", "GDAL_HTTP_TIMEOUT": "60", "GDAL_HTTP_MAX_RETRY": "2",
                "GDAL_HTTP_RETRY_DELAY": "1", "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}
    return {k: v for k, v in defaults.items() if k not in os.environ}


def input_scale(reader: SceneReader, meta, opts: PredictOptions) -> float:  # noqa: ANN001 - ModelMeta
    """The value that maps to 1.0 before normalisation: the model's own, unless the input has
    another pixel type, which is refused unless --input-max says what its full scale is."""
    if opts.input_max is not None:
        if opts.input_max <= 0:
            raise UserError(f"--input-max must be > 0 (got {opts.input_max:g})")
        return float(opts.input_max)
    if not meta.input_dtype:
        reader.notes.append(f"the model records no input pixel type (exported before segdeploy checked it): "
                            f"{reader.dtype} input assumed to match, scaled by 1/{meta.max_pixel_value:g}")
    elif reader.dtype != meta.input_dtype:
        raise DataError(f"{reader.path} is {reader.dtype} but the model was trained on {meta.input_dtype} images "
                        f"(full scale {meta.max_pixel_value:g}); pass --input-max with this raster's full scale "
                        f"(e.g. {_full_scale(reader.dtype)}) to rescale it, or convert it to {meta.input_dtype}")
    return float(meta.max_pixel_value)


def _full_scale(dtype: str) -> str:
    return f"{np.iinfo(np.dtype(dtype)).max}" if np.dtype(dtype).kind in "ui" else "1.0"


def _refuse_unfinished(out: Path, state_path: Path, tmp: Path) -> None:
    """A rerun without --resume must not silently throw away an interrupted prediction."""
    if not state_path.is_file():
        return
    try:
        done = json.loads(state_path.read_text()).get("rows_on_disk", "?")
    except (json.JSONDecodeError, AttributeError):
        done = "?"
    raise UserError(f"an unfinished prediction of {out} exists ({done} rows on disk); pass --resume to continue it, "
                    f"or delete {tmp} and {state_path} to start over")


def default_overlap(tile: int) -> int:
    """An eighth of the tile, in multiples of 8 px: enough context at tile edges for the blend, and
    a fixed 64 px would be half of a 128² tile (4× the compute) or more than half of a 96² one."""
    return (tile // 8) // 8 * 8


def _predict_file(backend: Backend, src: Path | str, out: Path, opts: PredictOptions,
                  progress: Callable[[int, int], None] | None) -> PredictResult:
    meta = backend.meta
    t0 = time.perf_counter()
    reader = SceneReader(src, meta.bands, opts.bands)
    scale = input_scale(reader, meta, opts)
    tile = opts.tile or meta.tile_size
    if backend.static_shape and (tile, tile) != backend.static_shape:
        tile = backend.static_shape[0]
    if tile % meta.input_divisor:
        raise UserError(f"--tile {tile} must be a multiple of the model's input divisor {meta.input_divisor}")
    overlap = default_overlap(tile) if opts.overlap is None else opts.overlap
    if not 0 <= overlap <= tile // 2:
        raise UserError(f"--overlap {overlap} must be between 0 and half the tile ({tile // 2})")
    if opts.blend not in BLENDS:
        raise UserError(f"--blend {opts.blend!r} is unknown; choose one of {', '.join(BLENDS)}")
    batch = min(opts.batch, backend.max_batch or opts.batch)
    is_picture = reader.array is not None
    if not is_picture and not reader.georeferenced:
        warnings.warn(f"{src} has no georeference; the output will not have one either", stacklevel=2)
    rows, cols = window_starts(reader.height, tile, overlap), window_starts(reader.width, tile, overlap)
    stride = tile - overlap
    total_tiles = len(rows) * len(cols)

    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory {out.parent}: {exc.strerror}") from None
    state_path = out.with_name(out.name + ".partial.json")
    tmp = out.with_name(f".{out.stem}.partial.tif")  # rasters only; pictures are written whole at the end
    probs_tmp = out.with_name(f".{out.stem}.probs.partial.tif") if opts.probs and not is_picture else None
    settings = {"input": src if is_remote(src) else str(Path(src).resolve()), "model": str(backend.path), "tile": tile, "overlap": overlap,
                "blend": opts.blend, "probs": opts.probs}
    start_row, rows_on_disk = 0, 0
    if opts.resume and state_path.is_file() and not is_picture:
        state = json.loads(state_path.read_text())
        if state.get("settings") != settings:
            raise UserError(f"{state_path} was written with other settings {state.get('settings')}; "
                            "rerun without --resume or with the same options")
        if not tmp.is_file():
            raise UserError(f"cannot resume {out}: its partial output {tmp.name} is gone; rerun without --resume")
        rows_on_disk = int(state["rows_on_disk"])
        start_row = rows_on_disk // stride  # tile rows whose output is not fully on disk yet
    elif opts.resume and not state_path.is_file():
        raise UserError(f"nothing to resume for {out} (no {state_path.name}); drop --resume")
    elif not opts.resume and not is_picture:
        _refuse_unfinished(out, state_path, tmp)
    writable_location(out)

    mask_reader = reader.second_handle()  # for the writer thread
    weights = blend_weights(tile, opts.blend, overlap)
    acc = StripAccumulator(reader.height, reader.width, meta.num_classes, tile, overlap, weights,
                           keep_confidence=opts.probs or is_picture)
    # rebuild the overlap band of the row before `start_row` by recomputing that row (output not re-emitted)
    replay_from = max(start_row - 1, 0)
    if replay_from:
        acc.start_at(replay_from)
    block = 512 if min(reader.height, reader.width) >= 512 else 256
    writer = None
    labels_buf: list[np.ndarray] = []
    conf_buf: list[np.ndarray] = []
    picture_rows: list[tuple[np.ndarray, np.ndarray]] = []
    if not is_picture:
        writer = ClassRasterWriter(out, tmp, state_path, reader, meta.num_classes, meta.palette, block, probs_tmp,
                                   resume=start_row > 0)

    # first image row held in labels_buf (the emitting rows start at the first tile row not on disk)
    written = {"buffered_from": rows[start_row] if start_row < len(rows) else reader.height}

    def flush(final: bool) -> None:
        if not labels_buf:
            return
        lab = np.concatenate(labels_buf)
        conf = np.concatenate(conf_buf) if conf_buf else None
        y0 = written["buffered_from"]
        n = len(lab) if final else ((y0 + len(lab)) // block) * block - y0
        if n <= 0:
            return
        if writer is not None:
            writer.write_rows(y0, lab[:n], conf[:n] if conf is not None else None)
            write_json(state_path, {"settings": settings, "rows_on_disk": y0 + n, "height": reader.height})
        else:
            picture_rows.append((lab[:n], conf[:n] if conf is not None else None))
        labels_buf[:] = [lab[n:]] if n < len(lab) else []
        conf_buf[:] = [conf[n:]] if conf is not None and n < len(lab) else []
        written["buffered_from"] = y0 + n

    work: queue.Queue = queue.Queue(maxsize=2)
    results: queue.Queue = queue.Queue(maxsize=2)
    errors: list[BaseException] = []
    stop = threading.Event()
    skipped = [0]
    done_tiles = [0]

    def read_loop() -> None:
        try:
            items: list[tuple[int, int, np.ndarray | None]] = []
            for item in _tiles(reader, rows, cols, tile, opts.pad, replay_from):
                if stop.is_set():
                    return
                items.append(item)
                if sum(1 for _, _, a in items if a is not None) >= batch or len(items) >= 4 * batch:
                    _put(work, items, stop)
                    items = []
            if items:
                _put(work, items, stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)
            stop.set()
        finally:
            _put(work, None, stop, force=True)

    def write_loop() -> None:
        try:
            while True:
                got = results.get()
                if got is None:
                    return
                for r, c, probs in got:
                    res = acc.add(r, c, probs)
                    done_tiles[0] += 1
                    if progress:
                        progress(done_tiles[0], total_tiles)
                    if res is None or r < start_row:
                        continue
                    lab, conf = res
                    valid = mask_reader.valid(rows[r], 0, lab.shape[0], reader.width)
                    lab_np = lab.numpy()
                    nodata_px = (~valid) | (lab_np < 0)
                    out_dtype = np.uint16 if meta.num_classes >= 255 else np.uint8
                    lab_np = lab_np.astype(out_dtype)
                    lab_np[nodata_px] = writer.nodata if writer else 255
                    labels_buf.append(lab_np)
                    if opts.probs:
                        cf = np.clip(np.round(conf.numpy().astype(np.float32) * 100), 0, 100).astype(np.uint8)
                        cf[nodata_px] = 255
                        conf_buf.append(cf)
                    flush(final=False)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            stop.set()

    mean = torch.tensor(meta.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(meta.std, dtype=torch.float32).view(1, -1, 1, 1)
    reader_t = threading.Thread(target=read_loop, daemon=True, name="segdeploy-reader")
    writer_t = threading.Thread(target=write_loop, daemon=True, name="segdeploy-writer")
    reader_t.start()
    writer_t.start()
    try:
        while not stop.is_set():
            items = work.get()
            if items is None:
                break
            arrays = [a for _, _, a in items if a is not None]
            probs_iter: Iterator[torch.Tensor] = iter(())
            if arrays:
                x = torch.from_numpy(np.stack(arrays).astype(np.float32)).permute(0, 3, 1, 2)
                x = (x / scale - mean) / std
                pin = backend.device.startswith("cuda")
                if pin:
                    x = x.pin_memory()
                probs = torch.softmax(backend(x).float(), dim=1).cpu()
                probs_iter = iter(probs)
            packed = [(r, c, next(probs_iter) if a is not None else None) for r, c, a in items]
            skipped[0] += sum(1 for _, _, a in items if a is None)
            _put(results, packed, stop)
    except BaseException as exc:  # noqa: BLE001 - an inference error: stop the threads, then raise
        errors.append(exc)
        stop.set()
    finally:
        _put(results, None, stop, force=True)
        writer_t.join()
        stop.set()
        while reader_t.is_alive():  # unblock the reader if it waits on a full queue
            try:
                work.get_nowait()
            except queue.Empty:
                time.sleep(0.01)
        reader.close()
        if mask_reader is not reader:
            mask_reader.close()
    if errors:
        raise errors[0]
    flush(final=True)

    files = []
    if writer is not None:
        writer.finish(cog=opts.cog)
        import os

        os.replace(tmp, out)
        files.append(str(out))
        if probs_tmp:
            probs_out = out.with_name(f"{out.stem}.probs.tif")
            os.replace(probs_tmp, probs_out)
            files.append(str(probs_out))
        state_path.unlink(missing_ok=True)
        if opts.preview:
            from segdeploy.viz import preview_path, save_class_preview

            files.append(str(save_class_preview(out, preview_path(out), meta.classes, [tuple(c) for c in meta.palette],
                                                title=f"{out.name} · {reader.width}×{reader.height} px")))
    else:
        files += _write_picture_outputs(reader, picture_rows, meta, out)
    seconds = time.perf_counter() - t0
    mp = reader.width * reader.height / 1e6
    return PredictResult(str(src), str(out), reader.width, reader.height, total_tiles, skipped[0], round(seconds, 3),
                         round(mp / seconds, 3), round(peak_rss_mb(), 1), files, rows_on_disk,
                         round(acc.nbytes() / 2**20, 2), list(reader.indexes), list(reader.notes))


def _write_picture_outputs(reader: SceneReader, rows: list[tuple[np.ndarray, np.ndarray | None]], meta, out: Path) -> list[str]:  # noqa: ANN001
    """Class PNG (palette mode) and a colourised overlay beside it."""
    from PIL import Image

    from segdeploy.viz import colorize_classes, display_rgb

    labels = np.concatenate([r[0] for r in rows]).astype(np.uint8)
    png = out if out.suffix.lower() == ".png" else out.with_suffix(".png")
    im = Image.fromarray(labels, mode="P")
    flat = [v for c in meta.palette for v in c][: 256 * 3]
    im.putpalette(flat + [0] * (768 - len(flat)))
    with atomic_path(png) as tmp:
        im.save(tmp, format="PNG")
    rgb = display_rgb(reader.array, meta.max_pixel_value).astype(np.float32)
    colour = colorize_classes(labels, [tuple(c) for c in meta.palette], 255).astype(np.float32)
    overlay = (0.55 * rgb + 0.45 * colour).astype(np.uint8)
    ov_path = png.with_name(f"{png.stem}_overlay.png")
    with atomic_path(ov_path) as tmp:
        Image.fromarray(overlay).save(tmp, format="PNG")
    return [str(png), str(ov_path)]


def expand_inputs(inputs: list[str | Path]) -> list[Path | str]:
    """Files, directories (their images), globs, remote rasters (URLs, s3://, gs://, /vsi…, kept
    as strings) and @manifests (one of those per line; relative paths from the manifest's folder)."""
    import glob

    found: list[Path | str] = []
    for raw in inputs:
        item = str(raw)
        if item.startswith("@"):
            found += expand_inputs(read_manifest(Path(item[1:])))
        elif gdal_path(item) is not None:
            found.append(gdal_path(item))  # type: ignore[arg-type]
        elif any(ch in item for ch in "*?["):
            found += [Path(p) for p in sorted(glob.glob(item))]
        elif Path(item).is_dir():
            found += sorted(p for p in Path(item).iterdir() if p.suffix.lower() in RASTER | PICTURE)
        elif not Path(item).exists():
            raise DataError(f"input {item} not found")
        else:
            found.append(Path(item))
    if not found:
        raise DataError(f"no input images found in {', '.join(map(str, inputs))}")
    return found


def read_manifest(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"manifest {path} not found (@FILE lists one raster path or URL per line)")
    lines = [line.strip() for line in path.read_text().splitlines()]
    items = [line for line in lines if line and not line.startswith("#")]
    import os

    return [i if gdal_path(i) is not None or Path(i).is_absolute() else os.path.normpath(path.parent / i)
            for i in items]


def output_for(src: Path | str, out: Path, many: bool) -> Path:
    if not many:
        return out
    suffix = ".png" if not is_remote(src) and Path(src).suffix.lower() in PICTURE else ".tif"
    return out / f"{input_stem(src)}_pred{suffix}"

