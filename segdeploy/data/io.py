"""Reading images and masks, with errors that name the file and the fix."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from segdeploy.errors import DataError

RASTER_SUFFIXES = {".tif", ".tiff"}


def read_image(path: Path, bands: int) -> np.ndarray:
    """H×W×B array in the file's own dtype (uint8, uint16 or float32)."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"image {path} not found")
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
            if arr.ndim == 2:
                arr = arr[..., None]
        elif suffix in RASTER_SUFFIXES:
            import rasterio

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # NotGeoreferencedWarning is fine for training tiles
                with rasterio.open(path) as src:
                    arr = np.moveaxis(src.read(), 0, -1)
        else:
            with Image.open(path) as im:
                im.load()
                if bands == 3 and im.mode not in ("RGB", "I;16", "I", "F"):
                    im = im.convert("RGB")
                arr = np.asarray(im)
                if arr.ndim == 2:
                    arr = arr[..., None]
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image {path}: {exc} (re-export or remove the file)") from None
    except Exception as exc:  # rasterio's own errors
        raise DataError(f"cannot read image {path}: {exc} (re-export or remove the file)") from None
    if arr.shape[-1] != bands:
        if bands == 3 and arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        else:
            raise DataError(
                f"image {path} has {arr.shape[-1]} bands but the recipe says data.bands={bands}; "
                "set data.bands to match"
            )
    return arr


def read_mask_raw(path: Path) -> np.ndarray:
    """The mask as stored: H×W (indices/binary) or H×W×3 (palette colours)."""
    if not path.is_file():
        raise DataError(f"mask {path} not found (every image needs a mask with the same key)")
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix.lower() in RASTER_SUFFIXES:
            import rasterio

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with rasterio.open(path) as src:
                    return src.read(1)
        with Image.open(path) as im:
            im.load()
            if im.mode == "P":
                return np.asarray(im)  # palette PNGs store indices; their colours are display only
            if im.mode in ("RGBA", "LA"):
                im = im.convert("RGB" if im.mode == "RGBA" else "L")
            return np.asarray(im)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read mask {path}: {exc} (re-export or remove the file)") from None


def decode_mask(
    raw: np.ndarray,
    path: Path,
    encoding: str,
    num_classes: int,
    ignore_index: int,
    palette: list[tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """H×W int64 class indices; values outside the classes (and not ignore) are an error."""
    if encoding == "palette":
        if raw.ndim != 3 or raw.shape[-1] < 3:
            raise DataError(f"mask {path} is single-channel but data.mask_encoding is 'palette'; use 'index'")
        assert palette is not None
        rgb = raw[..., :3].astype(np.int64)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        pal = np.array([(r << 16) | (g << 8) | b for r, g, b in palette], dtype=np.int64)
        order = np.argsort(pal)
        pos = np.clip(np.searchsorted(pal[order], code), 0, len(pal) - 1)
        found = pal[order][pos] == code
        if not found.all():
            bad = code[~found][0]
            colour = [int(bad >> 16), int((bad >> 8) & 255), int(bad & 255)]
            raise DataError(
                f"mask {path} has colour {colour} ({int((~found).sum())} px) that is not in classes.palette; "
                "add it to the palette or fix the mask"
            )
        return order[pos].astype(np.int64)
    if raw.ndim == 3:
        if raw.shape[-1] >= 3 and np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 0], raw[..., 2]):
            raw = raw[..., 0]
        elif raw.shape[-1] == 1:
            raw = raw[..., 0]
        else:
            raise DataError(
                f"mask {path} has colour channels but data.mask_encoding is {encoding!r}; "
                "use 'palette' with classes.palette"
            )
    if encoding == "binary":
        return (raw > (127 if raw.max() > 1 else 0)).astype(np.int64)
    if raw.dtype.kind == "f":
        if not np.all(np.isfinite(raw)) or not np.all(raw == np.round(raw)):
            raise DataError(f"mask {path} holds non-integer values; masks must be class indices")
    mask = raw.astype(np.int64)
    bad = (mask < 0) | ((mask >= num_classes) & (mask != ignore_index))
    if bad.any():
        values = sorted(int(v) for v in np.unique(mask[bad])[:5])
        raise DataError(
            f"mask {path} has values {values} outside classes 0..{num_classes - 1} "
            f"(ignore_index {ignore_index}); fix the mask or classes.names"
        )
    return mask
