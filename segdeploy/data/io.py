"""Mask decoding (index, binary, palette colours), with errors that name the file and the fix.
Images and raw masks are read by `segdeploy.data.decode`, the one decoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segdeploy.errors import DataError


def decode_mask(
    raw: np.ndarray,
    path: Path,
    encoding: str,
    num_classes: int,
    ignore_index: int,
    palette: list[tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """H×W int64 class indices; values outside the classes (and not ignore) are an error.

    A masked array (a GDAL mask's declared nodata, from `decode.read_mask`) has its masked pixels
    made ignore_index where the nodata value is no class (a label raster's -1 or 15 for
    "unlabelled"); a nodata value that is a class index (QGIS rasterizes with nodata 0, often the
    background class) stays that class."""
    if isinstance(raw, np.ma.MaskedArray):
        nodata = np.ma.getmaskarray(raw)
        raw = raw.data
        value = raw[nodata][0]
        if encoding == "index" and not 0 <= value < num_classes:
            raw = raw.astype(np.int64)
            raw[nodata] = ignore_index
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
