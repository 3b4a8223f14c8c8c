"""Raster I/O for predict: inputs (files, directories, globs, @manifests, remote rasters as GDAL
/vsi… strings), the windowed scene reader (bands, validity per window), the class-raster writer
(tiled GeoTIFF or COG, the input's georeference in every form, palette, nodata, failing writes as
one line) and the picture outputs. Inputs are decoded by `segdeploy.data.decode`, the one decoder.
numpy, rasterio and PIL only."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from segdeploy.data.decode import BandCountError, open_image
from segdeploy.errors import DataError
from segdeploy.utils import atomic_path, raise_write_error

RASTER = {".tif", ".tiff", ".vrt", ".img", ".jp2"}
PICTURE = {".png", ".jpg", ".jpeg", ".bmp"}
SUPPORTED_DTYPES = {"int8", "uint8", "uint16", "int16", "uint32", "int32", "float32", "float64"}


# --------------------------------------------------------------------------------------- inputs


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
    """True for a GDAL virtual path of a remote raster (/vsicurl/, /vsis3/, /vsigs/…)."""
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
    """The rasters an `@FILE` manifest lists, one path or URL per line (blank and # lines skipped), relative paths
    taken from the manifest's folder. DataError when the file does not exist."""
    if not path.is_file():
        raise DataError(f"manifest {path} not found (@FILE lists one raster path or URL per line)")
    lines = [line.strip() for line in path.read_text().splitlines()]
    items = [line for line in lines if line and not line.startswith("#")]
    import os

    return [i if gdal_path(i) is not None or Path(i).is_absolute() else os.path.normpath(path.parent / i)
            for i in items]


def is_picture(src: Path | str) -> bool:
    """A PNG/JPEG/BMP photo (read whole with PIL; predicted into a class PNG and an overlay), not a raster."""
    return not is_remote(src) and Path(src).suffix.lower() in PICTURE


def output_for(src: Path | str, out: Path, many: bool) -> Path:
    """Where `src`'s prediction goes: `out` itself for one input, else OUT/<stem>_pred.tif (.png for a picture)."""
    if not many:
        return out
    return out / f"{input_stem(src)}_pred{'.png' if is_picture(src) else '.tif'}"


def companion_paths(out: Path, picture: bool, probs: bool) -> list[Path]:
    """The files predict writes beside an output: a picture's overlay; a raster's preview and, with
    `probs`, its confidence raster."""
    from segdeploy.viz import preview_path

    if picture:
        return [overlay_path(out)]
    return [preview_path(out)] + ([probs_path(out)] if probs else [])


def overlay_path(out: Path) -> Path:
    """NAME_overlay.png beside a picture's class PNG `out`: the classes over the photo, with a legend."""
    return out.with_name(f"{out.stem}_overlay.png")


def probs_path(out: Path) -> Path:
    """NAME.probs.tif beside a class GeoTIFF `out`: its confidence raster (--probs)."""
    return out.with_name(f"{out.stem}.probs.tif")


def partial_paths(out: Path) -> tuple[Path, Path]:
    """(resume state, unfinished raster) of an output: present only while it is unfinished."""
    return out.with_name(out.name + ".partial.json"), out.with_name(f".{out.stem}.partial.tif")


def gdal_cache_bytes() -> int:
    """GDAL's block cache for predict. GDAL's default (5% of RAM) fills with input blocks on a
    wide scene and is what made peak memory grow with the scene; a row of 512² input blocks across
    a 20k-pixel RGB scene is ~31 MB, and 32 MB (measured at 5000², tile 512: 558 MB peak against
    615 MB with 64, no slower) holds it. Override with SEGDEPLOY_GDAL_CACHE_MB."""
    import os

    return int(float(os.environ.get("SEGDEPLOY_GDAL_CACHE_MB", 32)) * 2**20)


# --------------------------------------------------------------------------------------- readers


class SceneReader:
    """predict's view of one input, decoded by the one decoder (`segdeploy.data.decode`): rasters
    read by windows (pictures decoded whole, EXIF orientation applied), each window's validity
    (dataset mask, alpha, nodata — any fed band of a float raster, every fed band of an integer one —, NaN/±Inf), the georeference in
    every form GDAL has, and what was decided about the bands (`notes`). `model_dtype` (the model's
    input pixel type, None when --max-pixel-value is given) lets a refusal of the bands name the
    rescaling the input needs as well. Raises DataError naming the file."""

    def __init__(self, path: Path | str, bands: int, band_order: list[int] | None = None,
                 model_dtype: str | None = None) -> None:
        self.path = path  # a GDAL /vsi… path stays a string: Path would collapse its '//'
        if not is_remote(path) and not Path(path).exists():
            raise DataError(f"input {path} not found")
        try:
            self.source = open_image(path, bands, band_order)
        except BandCountError as exc:
            raise DataError(bands_fix(exc, model_dtype)) from None
        src = self.source
        self.array: np.ndarray | None = src.array if src.is_picture else None  # type: ignore[attr-defined]
        self.height, self.width, self.count, self.dtype = src.height, src.width, src.count, src.dtype
        self.indexes, self.notes, self.georef = src.indexes, src.notes, src.georef
        self.georeferenced = self.georef.present
        if self.dtype not in SUPPORTED_DTYPES:
            src.close()
            raise DataError(f"{path} has pixel type {self.dtype}; supported: {', '.join(sorted(SUPPORTED_DTYPES))}: "
                            f"convert it first, e.g. `rio convert --dtype float32 {path} "
                            f"{Path(str(path)).stem}_float32.tif` (rasterio's CLI)")

    def read(self, y: int, x: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(H×W×B pixels, H×W valid mask) for the in-image part of a window."""
        return self.source.read(y, x, h, w)

    def close(self) -> None:
        """Close the input (a raster's dataset stays open between windows until then)."""
        self.source.close()


def bands_fix(exc: BandCountError, model_dtype: str | None = None) -> str:
    """predict's refusal of an input whose bands do not fit the model, with the --bands that does; when
    the raster's pixel type is not `model_dtype` (the model's, None: no rescaling asked), the fix names
    --max-pixel-value too, so the one hint works when followed (not a second refusal after it)."""
    have, want = len(exc.colour), exc.bands
    if have > want:
        pick = ",".join(map(str, exc.colour[:want]))
        rescale = (f", and rescale its {exc.dtype} pixels (the model was trained on {model_dtype}) with "
                   f"{full_scale_flag(exc.dtype)}" if model_dtype and exc.dtype and exc.dtype != model_dtype else "")
        return (f"{exc.path} has {have} bands but the model expects {want}; pick {want} of them with --bands "
                f"(e.g. --bands {pick}){rescale}")
    return (f"{exc.path} has {have} band{'s' if have != 1 else ''} but the model expects {want}, and no choice of "
            f"its bands makes up the other {want - have}; predict it with a model trained on {have}-band images")


def full_scale_flag(dtype: str) -> str:
    """The --max-pixel-value that maps this pixel type's full scale to the model's (a flag that works as printed)."""
    if np.dtype(dtype).kind in "ui":
        return f"--max-pixel-value {np.iinfo(np.dtype(dtype)).max} (its pixel type's full scale)"
    return "--max-pixel-value 1.0 if its values run 0..1 (else --max-pixel-value with its largest value)"


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
    georeference copied in every form the input has (geotransform, GCPs, RPCs, with their CRS),
    nodata, palette as colormap; written by whole block rows. The probability raster gets the same:
    the confidence (max softmax, percent, nodata 255), or with `class_names` one band per class
    (described by its name) of `probs_dtype` — uint8 round(p·255) or float32 p — where invalid
    input pixels are masked by an internal mask band (every uint8 value is a probability)."""

    def __init__(self, final: Path, tmp: Path, state_path: Path, reader: SceneReader, classes: int,
                 palette: list[list[int]], block: int, probs_tmp: Path | None, resume: bool,
                 class_names: list[str] | None = None, probs_dtype: str = "uint8") -> None:
        self.final, self.state_path = final, state_path
        self.class_names, self.probs_dtype = class_names, probs_dtype
        self.dtype = "uint8" if classes < 255 else "uint16"
        self.nodata = 255 if self.dtype == "uint8" else 65535
        self.block = block
        self.paths = [tmp] + ([probs_tmp] if probs_tmp else [])
        profile = {
            "driver": "GTiff", "width": reader.width, "height": reader.height, "count": 1,
            **reader.georef.creation_options(), "tiled": True, "blockxsize": block, "blockysize": block, "compress": "deflate", "predictor": 2,
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
            if probs_tmp and self.class_names:
                scale = "round(p * 255)" if self.probs_dtype == "uint8" else "p"
                with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(
                        probs_tmp, "w", dtype=self.probs_dtype, **{**profile, "count": len(self.class_names)}) as dst:
                    dst.descriptions = tuple(self.class_names)
                    dst.update_tags(segdeploy="incomplete", scale=f"probability of each class: value = {scale}")
            elif probs_tmp:
                with rasterio.open(probs_tmp, "w", dtype="uint8", nodata=255, **profile) as dst:
                    dst.update_tags(segdeploy="incomplete", scale="percent confidence (max softmax × 100)")

    def write_rows(self, y: int, labels: np.ndarray, conf: np.ndarray | None, valid: np.ndarray | None = None) -> None:
        """Write full-width rows starting at `y` (the file is reopened so each call is on disk):
        classes, and the confidence (rows × W) or every class's probability (C × rows × W, masked
        where `valid`, rows × W bool, is False)."""
        import rasterio
        from rasterio.windows import Window

        win = Window(0, y, labels.shape[1], labels.shape[0])
        with warnings.catch_warnings(), self._failing_write():
            warnings.simplefilter("ignore")
            with rasterio.open(self.paths[0], "r+") as dst:
                dst.write(labels.astype(self.dtype)[None], window=win)
            if conf is not None and len(self.paths) > 1:
                with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(self.paths[1], "r+") as dst:
                    dst.write(conf if conf.ndim == 3 else conf[None], window=win)
                    if self.class_names:
                        dst.write_mask(np.where(valid, np.uint8(255), np.uint8(0)) if valid is not None
                                       else np.full(labels.shape, 255, np.uint8), window=win)

    def finish(self, cog: bool = False, source: str = "") -> None:
        """Mark the outputs complete (with `source`, the input they were predicted from, in the
        tag `FINISHED_SOURCE_TAG`: what `--resume` checks before it skips one); with `cog`, rewrite
        each as a Cloud-Optimized GeoTIFF in place (internal tiles, overviews by *mode* for the
        class map: classes are never averaged)."""
        import rasterio

        with self._failing_write():
            for p in self.paths:
                with rasterio.open(p, "r+") as dst:
                    dst.update_tags(segdeploy="complete", **({FINISHED_SOURCE_TAG: source} if source else {}))
                if cog:
                    _to_cog(p, "MODE" if p == self.paths[0] else "AVERAGE")


FINISHED_SOURCE_TAG = "segdeploy_input"  # a finished output's input (`input_id`)


def input_id(src: Path | str) -> str:
    """How an output records the input it was made from: a remote raster's string as given, a
    local file's absolute path (the resume state and the finished tag compare these)."""
    return src if is_remote(src) else str(Path(src).resolve())


def finished_source(path: Path) -> str | None:
    """The input a finished GeoTIFF output was predicted from (its `FINISHED_SOURCE_TAG`), or None
    when it does not say (an output of an older segdeploy, a picture's PNG, an unreadable file)."""
    try:
        import rasterio

        with rasterio.open(path) as src:
            return src.tags().get(FINISHED_SOURCE_TAG)
    except Exception:  # noqa: BLE001 - undecidable: the caller keeps its old rule and says nothing new
        return None


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


def write_picture_outputs(reader: SceneReader, rows: list[tuple[np.ndarray, np.ndarray | None]], meta, out: Path) -> list[str]:  # noqa: ANN001
    """The class PNG (palette mode: the labels themselves) and, beside it, NAME_overlay.png for
    people: the classes over the photo, the background class not painted, with a legend."""
    from PIL import Image

    from segdeploy.classes import background_index
    from segdeploy.viz import display_rgb, save_overlay_picture

    labels = np.concatenate([r[0] for r in rows]).astype(np.uint8)
    if out.suffix.lower() != ".png":  # jobs.check_output_name refuses such a name before the work
        raise DataError(f"the prediction of a picture is a PNG; {out} is not a .png name")
    im = Image.fromarray(labels, mode="P")
    flat = [v for c in meta.palette for v in c][: 256 * 3]
    im.putpalette(flat + [0] * (768 - len(flat)))
    with atomic_path(out) as tmp:
        im.save(tmp, format="PNG")
    _georeference_picture(out, reader.georef)
    rgb = display_rgb(reader.array, meta.max_pixel_value)
    ov_path = overlay_path(out)
    save_overlay_picture(rgb, labels, meta.classes, [tuple(c) for c in meta.palette], ov_path,
                         background_index(meta.classes, meta.background),
                         title=f"{Path(str(reader.path)).name} · {reader.width} x {reader.height} px")
    return [str(out), str(ov_path)]


def _georeference_picture(out: Path, georef) -> None:  # noqa: ANN001 - a decode.Georeference
    """Give a class PNG its input's georeference (a world file's geotransform, its CRS) the way GDAL
    keeps it for a PNG: in ``NAME.png.aux.xml``, which GDAL and QGIS read. An earlier output's
    sidecar is removed when the new one has none (it would georeference the wrong picture)."""
    sidecar = out.with_name(out.name + ".aux.xml")
    sidecar.unlink(missing_ok=True)
    if georef.transform is None:
        return
    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(out, "r+") as dst:
            dst.transform = georef.transform
            if georef.crs is not None:
                dst.crs = georef.crs


def pixel_agreement(pred: Path, labels: Path) -> float:
    """Pixel accuracy of a class raster against a label raster, read block row by block row."""
    import rasterio
    from rasterio.windows import Window

    hit = total = 0
    with rasterio.open(pred) as p, rasterio.open(labels) as t:
        for y in range(0, p.height, 512):
            win = Window(0, y, p.width, min(512, p.height - y))
            a, b = p.read(1, window=win), t.read(1, window=win)
            valid = b != t.nodata
            hit += int((a[valid] == b[valid]).sum())
            total += int(valid.sum())
    return hit / max(total, 1)
