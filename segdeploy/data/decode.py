"""The one image decoder: train, eval, inspect and predict read every image through `open_image`.

The same rules for every format and every verb:

- PNG, JPEG and BMP through Pillow, decoded whole, with the EXIF orientation applied (all eight):
  pixels come out as the image is displayed, which is how labelling tools draw masks on it
  (`read_mask` applies the same orientation to masks); 16-bit colour PNGs, which Pillow cuts to
  their high bytes, through GDAL, oriented the same way;
- TIFF/GeoTIFF and every other GDAL raster (remote ones too) through rasterio, window by window,
  so memory is bounded by the window, never the scene;
- ``.npy`` arrays (H×W or H×W×B), for training data;
- a colour table (paletted PNG or GeoTIFF) is expanded to the RGB it displays;
- alpha is validity, never a model band: an alpha band or channel (RGBA, LA, PA, a tRNS colour,
  a colour-table alpha) of 0 marks the pixel invalid;
- a pixel is invalid where GDAL's dataset mask says so (alpha band, ``.msk`` sidecar, internal
  mask), where it holds the declared nodata value — in *any* fed band of a float raster (a float
  sentinel is never a measurement, so it is never fed raw), in *every* fed band of an integer
  raster (GDAL's dataset-mask rule: a dark 8-bit pixel with one channel at nodata 0 is data) —
  and where any band is NaN or ±Inf, with or without a nodata tag. In a ``.npy`` image NaN is how invalid
  pixels are marked (numpy has no nodata tag); non-finite values nothing declares invalid are
  counted (`ImageSource.nonfinite`) so `data inspect` can name the file;
- one gray band into a 3-band model is repeated as R, G, B (what Pillow's ``convert("RGB")``
  does); any other band-count mismatch raises `BandCountError`, which each verb words with the
  fix that works there (``--bands`` for predict, ``--set data.bands=`` for training).

numpy, Pillow and rasterio only: the deployment install (no torch) decodes exactly as training did.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy.errors import DataError

PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
NUMPY_SUFFIXES = {".npy"}

# EXIF Orientation (tag 274) -> what Pillow's exif_transpose does to show the image upright
ORIENTATIONS = {2: "mirrored", 3: "rotated 180°", 4: "flipped", 5: "transposed", 6: "rotated 90° clockwise",
                7: "transversed", 8: "rotated 90° counter-clockwise"}
EXIF_ORIENTATION = 0x0112


class BandCountError(DataError):
    """An image's bands cannot feed the model's; the verb that catches it words the fix."""

    def __init__(self, path: Path | str, colour: list[int], bands: int) -> None:
        self.path, self.colour, self.bands = path, colour, bands
        super().__init__(f"{path} has {len(colour)} bands but {bands} are expected")


@dataclass
class Georeference:
    """Every form of georeference GDAL has: a geotransform (+ CRS), ground control points (+ their
    CRS), rational polynomial coefficients. `creation_options` gives a new raster on the same grid
    all of them."""

    crs: Any = None
    transform: Any = None  # an Affine, None when the file has none (GDAL's identity)
    gcps: list = field(default_factory=list)
    gcp_crs: Any = None
    rpcs: Any = None

    @classmethod
    def of(cls, src: Any) -> Georeference:
        """The georeference of an open rasterio dataset."""
        gcps, gcp_crs = src.gcps
        transform = None if src.transform.is_identity else src.transform
        return cls(src.crs, transform, list(gcps or []), gcp_crs, src.rpcs)

    @property
    def present(self) -> bool:
        """True when the raster carries any georeference (a geotransform, GCPs or RPCs)."""
        return self.transform is not None or bool(self.gcps) or self.rpcs is not None

    def forms(self) -> list[str]:
        """The georeference forms present, in words ("geotransform (EPSG:32633)", "4 GCPs (…)", "RPCs")."""
        return ([f"geotransform ({self.crs or 'no CRS'})"] if self.transform is not None else []) + \
            ([f"{len(self.gcps)} GCPs ({self.gcp_crs or 'no CRS'})"] if self.gcps else []) + \
            (["RPCs"] if self.rpcs is not None else [])

    def creation_options(self) -> dict[str, Any]:
        """Keyword arguments for ``rasterio.open(path, "w", ...)``."""
        opts: dict[str, Any] = {}
        if self.transform is not None:
            opts.update(transform=self.transform, crs=self.crs)
        elif self.gcps:
            opts.update(gcps=self.gcps, crs=self.gcp_crs)
        elif self.crs is not None:
            opts["crs"] = self.crs
        if self.rpcs is not None:
            opts["rpcs"] = self.rpcs
        return opts


def choose_bands(path: Path | str, kinds: list[str], bands: int,
                 requested: list[int] | None) -> tuple[list[int], list[str]]:
    """1-based indexes of the decoded image's bands that feed a `bands`-band model, in order, and
    what was decided and why.

    `kinds` are the bands' colour interpretations (rasterio's names: red, green, blue, gray,
    alpha, undefined, …). `requested` (``--bands``) wins; repeats are allowed. Otherwise alpha is
    left out (it is validity), one gray band is repeated for a 3-band model, and bands labelled
    blue/green/red in another order are read as red, green, blue.

    Raises `BandCountError` when no automatic choice fits (the verb words the fix) and
    `DataError` for a requested band that does not exist.
    """
    count = len(kinds)
    if requested:
        bad = [b for b in requested if not 1 <= b <= count]
        if bad:
            raise DataError(f"--bands {','.join(map(str, requested))}: {path} has bands 1..{count} only")
        if len(requested) != bands:
            raise DataError(f"--bands gives {len(requested)} bands but the model expects {bands}")
        return list(requested), [f"bands {','.join(map(str, requested))} (from --bands)"]
    colour = [i for i, kind in enumerate(kinds, 1) if kind != "alpha"]
    notes = [f"alpha band {i} used as the validity mask" for i, kind in enumerate(kinds, 1) if kind == "alpha"]
    if len(colour) == 1 and bands == 3:
        return colour * 3, notes + ["1 gray band repeated as red, green, blue for the 3-band model"]
    if len(colour) != bands:
        if count == bands:  # the alpha band is wanted after all (a 4-band model on RGBA)
            return list(range(1, count + 1)), []
        raise BandCountError(path, colour, bands)
    order = {"red": 0, "green": 1, "blue": 2}
    picked = [kinds[i - 1] for i in colour]
    if bands == 3 and set(picked) == set(order) and [order[k] for k in picked] != [0, 1, 2]:
        colour = sorted(colour, key=lambda i: order[kinds[i - 1]])
        notes.append(f"bands {','.join(map(str, colour))} read as red, green, blue (the file's colour interpretation)")
    return colour, notes


class ImageSource:
    """A decoded image, read by windows: ``read(y, x, h, w)`` gives (H×W×B pixels in the file's
    dtype, after band choice and colour-table expansion; H×W bool validity). `indexes` are the
    1-based bands of the decoded image fed to the model; `nonfinite` counts the NaN/±Inf pixels
    read so far that nothing declared invalid, and `nonfinite_mask` marks them in the last window
    read (None when there were none), for a caller that counts each pixel once over overlapping
    windows."""

    path: Path | str
    height: int
    width: int
    dtype: str
    indexes: list[int]
    georef: Georeference
    is_picture = False
    orientation = 1  # EXIF orientation applied (1: none)
    stored_size: tuple[int, int]  # (height, width) as stored, before the orientation

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.nonfinite = 0
        self.nonfinite_mask: np.ndarray | None = None
        self.georef = Georeference()

    @property
    def count(self) -> int:
        """The number of bands fed to the model (len(indexes))."""
        return len(self.indexes)

    def read(self, y: int = 0, x: int = 0, h: int | None = None, w: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The window of `h` rows × `w` columns at row `y`, column `x` (None: to the image's edge; clipped to it) as
        (h×w×B pixels in the file's dtype, after band choice and colour-table expansion; h×w bool validity: the
        dataset mask, no fed band at its nodata value, finite)."""
        raise NotImplementedError

    def _clip(self, y: int, x: int, h: int | None, w: int | None) -> tuple[int, int]:
        h = self.height - y if h is None else min(h, self.height - y)
        w = self.width - x if w is None else min(w, self.width - x)
        return h, w

    def close(self) -> None:
        """Release the file (rasters keep theirs open between windows)."""

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ArraySource(ImageSource):
    """An image decoded whole (pictures, .npy): windows are views of the array."""

    def __init__(self, path: Path | str, array: np.ndarray, kinds: list[str], valid: np.ndarray | None,
                 bands: int, requested: list[int] | None, notes: list[str]) -> None:
        super().__init__()
        self.path = path
        self.indexes, band_notes = choose_bands(path, kinds, bands, requested)
        self.notes = notes + band_notes
        if self.indexes != list(range(1, array.shape[-1] + 1)):
            array = array[..., [i - 1 for i in self.indexes]]
        self.array = array
        self.height, self.width = array.shape[:2]
        self.stored_size = (self.height, self.width)
        self.dtype = str(array.dtype)
        self.undeclared: np.ndarray | None = None
        if array.dtype.kind == "f":
            finite = np.isfinite(array).all(-1)
            if not finite.all():
                # in a .npy, NaN marks invalid pixels (numpy has no nodata tag); pictures are never float
                declared = np.isnan(array).any(-1) if Path(path).suffix.lower() in NUMPY_SUFFIXES else ~finite
                self.undeclared = ~finite & ~declared & (True if valid is None else valid)
                self.nonfinite = int(self.undeclared.sum())
                valid = finite if valid is None else valid & finite
        self.valid_mask = valid

    def read(self, y: int = 0, x: int = 0, h: int | None = None, w: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The window of `h` rows × `w` columns at row `y`, column `x` (None: to the image's edge; clipped to it) as
        (h×w×B pixels in the file's dtype, after band choice and colour-table expansion; h×w bool validity: the
        dataset mask, no fed band at its nodata value, finite). A view of the decoded array, no copy."""
        h, w = self._clip(y, x, h, w)
        valid = (np.ones((h, w), bool) if self.valid_mask is None else self.valid_mask[y : y + h, x : x + w])
        self.nonfinite_mask = None if self.undeclared is None else self.undeclared[y : y + h, x : x + w]
        return self.array[y : y + h, x : x + w], valid


def _picture_array(path: Path) -> tuple[np.ndarray, list[str], list[str], int, tuple[int, int]]:
    """(H×W×C pixels as displayed, band kinds, notes, EXIF orientation, stored (H, W)) of a picture."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        orientation = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
        stored = (im.height, im.width)
        notes = []
        if (kinds := _deep_png_kinds(path)) is not None:  # Pillow would keep only each sample's high byte
            arr = _orient(_gdal_pixels(path), orientation)
            notes += [f"EXIF orientation {orientation} applied ({ORIENTATIONS[orientation]})"] \
                if orientation in ORIENTATIONS else []
            return arr, kinds, notes, orientation, stored
        if orientation in ORIENTATIONS:
            im = ImageOps.exif_transpose(im)
            notes.append(f"EXIF orientation {orientation} applied ({ORIENTATIONS[orientation]})")
        im.load()
        mode, transparent = im.mode, "transparency" in im.info
        if mode in ("P", "PA"):
            im = im.convert("RGBA" if mode == "PA" or transparent else "RGB")
            notes.append("colour table expanded to RGB")
        elif transparent and mode in ("L", "RGB"):
            im = im.convert("LA" if mode == "L" else "RGBA")
        elif mode in ("La", "RGBa"):
            im = im.convert("LA" if mode == "La" else "RGBA")
        elif mode == "1":
            im = im.convert("L")
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        arr = np.asarray(im)
        if im.mode.startswith("I;16"):
            arr = arr.astype(np.uint16)  # big-endian I;16B to the native uint16
        kinds = {"LA": ["gray", "alpha"], "RGB": ["red", "green", "blue"],
                 "RGBA": ["red", "green", "blue", "alpha"]}.get(im.mode, ["gray"])
    if arr.ndim == 2:
        arr = arr[..., None]
    return arr, kinds, notes, orientation, stored


def _deep_png_kinds(path: Path) -> list[str] | None:
    """The band kinds of a 16-bit colour PNG (RGB, RGBA, gray + alpha), None for any other file.
    Pillow decodes those to 8 bits (the high byte of each sample), so GDAL reads them instead. PNG
    header: 8-byte signature, IHDR length and type, width, height, then bit depth and colour type."""
    if path.suffix.lower() != ".png":
        return None
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[24] != 16:
        return None
    return {2: ["red", "green", "blue"], 4: ["gray", "alpha"], 6: ["red", "green", "blue", "alpha"]}.get(head[25])


def _gdal_pixels(path: Path) -> np.ndarray:
    """H×W×B pixels of a file as GDAL decodes it (all bands, the file's own sample type)."""
    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotGeoreferencedWarning: a picture has no georeference
        with rasterio.open(path) as src:
            return np.moveaxis(src.read(), 0, -1)


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """H×W×B pixels as stored → as displayed under EXIF `orientation` (what Pillow's
    ``ImageOps.exif_transpose`` does to an image: the same eight cases)."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
           8: lambda a: np.rot90(a, 1)}
    return np.ascontiguousarray(ops[orientation](arr)) if orientation in ops else arr


def _open_picture(path: Path, bands: int, requested: list[int] | None) -> ArraySource:
    arr, kinds, notes, orientation, stored = _picture_array(path)
    valid = None
    if "alpha" in kinds:
        valid = arr[..., kinds.index("alpha")] > 0
        if valid.all():
            valid = None
    src = ArraySource(path, arr, kinds, valid, bands, requested, notes)
    src.is_picture, src.orientation, src.stored_size = True, orientation, stored
    src.georef = _picture_georeference(path, orientation, src.notes)
    return src


WORLD_FILE_SUFFIXES = {".png": (".pgw", ".pngw"), ".jpg": (".jgw", ".jpgw"), ".jpeg": (".jgw", ".jpegw"),
                       ".bmp": (".bpw", ".bmpw")}  # GDAL's world-file names, besides .wld and NAME.aux.xml


def _picture_georeference(path: Path, orientation: int, notes: list[str]) -> Georeference:
    """A picture's georeference as GDAL reads it — a world file (``.pgw``, ``.jgw``, ``.wld``) or
    GDAL's ``.aux.xml`` — or none. GDAL is asked only when such a sidecar exists (training reads
    thousands of pictures). The georeference describes the stored pixels, so a picture whose EXIF
    orientation turns them keeps none, and a note says so."""
    sidecars = [path.with_suffix(s) for s in (*WORLD_FILE_SUFFIXES.get(path.suffix.lower(), ()), ".wld")]
    if not any(p.is_file() for p in [*sidecars, path.with_name(path.name + ".aux.xml")]):
        return Georeference()
    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path) as ds:
            georef = Georeference.of(ds)
    if georef.present and orientation in ORIENTATIONS:
        notes.append(f"its georeference (world file) is left out: it describes the stored pixels, which EXIF "
                     f"orientation {orientation} turns")
        return Georeference()
    return georef


def _open_numpy(path: Path, bands: int, requested: list[int] | None) -> ArraySource:
    arr = np.load(path, allow_pickle=False)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise DataError(f"image {path} is a {arr.ndim}-d array; a .npy image must be H×W or H×W×B")
    kinds = ["gray"] if arr.shape[-1] == 1 else ["undefined"] * arr.shape[-1]
    return ArraySource(path, arr, kinds, None, bands, requested, [])


class RasterSource(ImageSource):
    """A GDAL raster read window by window: validity per window is GDAL's dataset mask (only where
    the file has an alpha band or a mask) ∧ not at nodata (`_mask_nodata`) ∧ every band finite."""

    def __init__(self, path: Path | str, bands: int, requested: list[int] | None) -> None:
        super().__init__()
        import rasterio
        from rasterio.enums import ColorInterp, MaskFlags
        from rasterio.errors import RasterioIOError

        self.path = path
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # NotGeoreferencedWarning: the verb decides what to say
                self.src = rasterio.open(path)
        except RasterioIOError as exc:
            remote = isinstance(path, str) and path.startswith("/vsi")
            why = "unreachable, missing or not a raster?" if remote else "corrupt, truncated or not a raster?"
            raise DataError(f"cannot open raster {path}: {str(exc).splitlines()[0][:200]} ({why})") from None
        src = self.src
        self.height, self.width = src.height, src.width
        self.stored_size = (self.height, self.width)
        self.georef = Georeference.of(src)
        self.lut: np.ndarray | None = None
        kinds = [ci.name for ci in src.colorinterp]
        if src.colorinterp[0] == ColorInterp.palette:
            self.lut = self._colour_table()
            kinds = ["red", "green", "blue"] + kinds[1:]
            self.notes.append("colour table expanded to RGB")
        try:
            self.indexes, notes = choose_bands(path, kinds, bands, requested)
            if self.lut is not None and max(self.indexes) > 3:
                raise DataError(f"{path} is paletted: its bands are the colour table's red, green, blue (1..3)")
        except DataError:
            src.close()
            raise
        self.notes += notes
        # file bands to read: a palette image's R, G, B all come from band 1
        self.file_bands = [1 if self.lut is not None and i <= 3 else i - (2 if self.lut is not None else 0)
                           for i in self.indexes]
        self.dtype = "uint8" if self.lut is not None else src.dtypes[self.file_bands[0] - 1]
        self.nodata = src.nodata
        self.use_dataset_mask = any(set(flags) - {MaskFlags.nodata, MaskFlags.all_valid}
                                    for flags in src.mask_flag_enums)

    def _colour_table(self) -> np.ndarray:
        """index -> RGBA lookup table of band 1's colour table (indexes it lacks: alpha 0)."""
        cmap = self.src.colormap(1)
        lut = np.zeros((65536 if self.src.dtypes[0] == "uint16" else 256, 4), np.uint8)
        for index, rgba in cmap.items():
            if 0 <= index < len(lut):
                lut[index] = rgba
        return lut

    def read(self, y: int = 0, x: int = 0, h: int | None = None, w: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The window of `h` rows × `w` columns at row `y`, column `x` (None: to the image's edge; clipped to it) as
        (h×w×B pixels in the file's dtype, after band choice and colour-table expansion; h×w bool validity: the
        dataset mask, no fed band at its nodata value, finite). Read from the file through GDAL; DataError for a
        truncated or corrupt file."""
        from rasterio.windows import Window

        h, w = self._clip(y, x, h, w)
        win = Window(x, y, w, h)
        unique = sorted(set(self.file_bands))
        try:
            raw = self.src.read(unique, window=win)
            valid = self.src.dataset_mask(window=win) > 0 if self.use_dataset_mask else np.ones((h, w), bool)
        except Exception as exc:  # noqa: BLE001 - GDAL errors on truncated files surface here
            raise DataError(f"cannot read {self.path} at rows {y}..{y + h}: {str(exc)[:200]} "
                            "(truncated or corrupt file)") from None
        self._mask_nodata(raw, unique, valid)
        self.nonfinite_mask = None
        if raw.dtype.kind == "f":
            finite = np.isfinite(raw).all(0)
            if not finite.all():
                self.nonfinite_mask = valid & ~finite
                self.nonfinite += int(np.count_nonzero(self.nonfinite_mask))
                valid &= finite
        if self.lut is not None:
            rgba = self.lut[raw[0]]
            valid &= rgba[..., 3] > 0
            pixels = rgba[..., [min(i, 3) - 1 for i in self.indexes]]
            return pixels, valid
        pick = [unique.index(b) for b in self.file_bands]
        return np.moveaxis(raw if pick == list(range(len(unique))) else raw[pick], 0, -1), valid

    def _mask_nodata(self, raw: np.ndarray, bands: list[int], valid: np.ndarray) -> None:
        """valid &= not at the declared nodata value, in place (NaN nodata matches NaN).

        Float bands: a pixel is invalid where *any* fed band holds its nodata value — a float
        sentinel (-9999, -3.4e38, NaN) is never a measurement, and fed raw it would change the
        classes of its valid neighbours. Integer bands: invalid where *every* fed band holds it,
        GDAL's own dataset-mask rule (RFC 15) — in an 8-bit RGB scene with nodata 0, a dark pixel
        with one channel at 0 is a measurement, not a hole."""
        hits = []
        for k, b in enumerate(bands):
            nodata = self.src.nodatavals[b - 1]
            if nodata is None:
                hits.append(None)
            elif raw.dtype.kind == "f":
                hits.append(np.isnan(raw[k]) if math.isnan(nodata) else raw[k] == nodata)
            elif nodata == int(nodata) and np.iinfo(raw.dtype).min <= nodata <= np.iinfo(raw.dtype).max:
                hits.append(raw[k] == raw.dtype.type(nodata))
            else:
                hits.append(None)  # a value the type cannot hold marks nothing
        if raw.dtype.kind == "f":
            for hit in hits:
                if hit is not None:
                    valid &= ~hit
        elif hits and all(hit is not None for hit in hits):
            valid &= ~np.logical_and.reduce(hits)

    def close(self) -> None:
        """Close the rasterio dataset."""
        self.src.close()


def open_image(path: Path | str, bands: int, requested: list[int] | None = None) -> ImageSource:
    """The decoder for any image: a picture or .npy decoded whole, a GDAL raster (or a remote
    ``/vsi…`` path) opened for windowed reads. `bands` is what the model takes; `requested` are
    1-based bands to feed it (``--bands``). Raises DataError naming the file (BandCountError when
    its bands do not fit the model)."""
    remote = isinstance(path, str) and path.startswith("/vsi")
    suffix = "" if remote else Path(path).suffix.lower()
    if not remote and not Path(path).is_file():
        raise DataError(f"image {path} not found")
    if suffix not in PICTURE_SUFFIXES | NUMPY_SUFFIXES:
        return RasterSource(path, bands, requested)
    try:
        return (_open_picture if suffix in PICTURE_SUFFIXES else _open_numpy)(Path(path), bands, requested)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow's and numpy's decoding errors
        raise DataError(f"cannot read image {path}: {exc} (re-export or remove the file)") from None


def read_mask(path: Path, colours: bool = False) -> np.ndarray:
    """A mask as stored: H×W (indices, binary; a paletted PNG's or GeoTIFF's indices) or H×W×3
    (palette colours), in the displayed orientation like its image (EXIF applied).

    With `colours` (``data.mask_encoding: palette``: classes are told by colour) a colour table is
    expanded to the H×W×3 RGB it displays, as for images: a paletted mask's indices need not be the
    classes' order, and its table may hold colours no pixel uses."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"mask {path} not found (every image needs a mask with the same key)")
    suffix = path.suffix.lower()
    try:
        if suffix in NUMPY_SUFFIXES:
            return np.load(path, allow_pickle=False)
        if suffix not in PICTURE_SUFFIXES:
            return _read_raster_mask(path, colours)
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
            if colours and im.mode in ("P", "PA"):
                im = im.convert("RGB")
            if im.mode in ("RGBA", "LA", "PA"):
                im = im.convert({"RGBA": "RGB", "LA": "L", "PA": "P"}[im.mode])
            return np.asarray(im)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read mask {path}: {exc} (re-export or remove the file)") from None
    except Exception as exc:  # noqa: BLE001 - rasterio's own errors
        raise DataError(f"cannot read mask {path}: {exc} (re-export or remove the file)") from None


def _read_raster_mask(path: Path, colours: bool) -> np.ndarray:
    """Band 1 of a GDAL mask (its colour table expanded to RGB with `colours`; else 3 bands as RGB
    when it has them and `colours`). A declared nodata value comes back masked (a numpy masked
    array): `io.decode_mask` makes it ignore_index where it is no class."""
    import rasterio
    from rasterio.enums import ColorInterp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path) as src:
            band = src.read(1)
            if colours and src.colorinterp[0] == ColorInterp.palette:
                lut = np.zeros((max(256, int(band.max()) + 1), 3), np.uint8)
                for index, rgba in src.colormap(1).items():
                    if 0 <= index < len(lut):
                        lut[index] = rgba[:3]
                return lut[band]
            if colours and src.count >= 3:
                return np.moveaxis(src.read([1, 2, 3]), 0, -1)
            nodata = src.nodatavals[0]
            if nodata is not None and not math.isnan(nodata) and band.dtype.kind in "iu":
                return np.ma.masked_equal(band, nodata) if (band == nodata).any() else band
            return band
