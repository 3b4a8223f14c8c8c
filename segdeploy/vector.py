"""Polygons from predict's finished row bands, merged across seams, streamed to an OGR data source.

`predict --vector OUT.gpkg|.geojson|.fgb|.parquet` polygonises the class rows as the tiled
predictor finishes them, so a scene of any size gives its polygons without ever holding its class
raster:

    finished band (labels, confidence) ─► SeamPolygonizer ─► closed Regions ─► FeatureWriter ─► OUT
                                              │ open regions (touch the band's lower seam)
                                              └─ merged with their continuation in the next band

Each band is polygonised with GDAL (`rasterio.features.shapes`, 4-connectivity, as its default);
a piece touching the band's lower seam stays open, and is joined to the pieces of the next band
that continue it (same class, vertically adjacent pixels on the seam). A region is written when no
piece of it touches the newest seam; the union of its pieces (shapely 2) is then exactly the
polygon GDAL gives for the whole class raster at once. Memory holds the open regions and one band.

Geometry is built in pixel coordinates (corners at integers: exact, so pieces meet exactly) and
mapped to the raster's CRS when written, with GDAL's formula x = c + col·a + row·b. Features go
through pyogrio in batches (one transaction each) into a hidden GeoPackage beside the output,
converted to the requested format (GDAL, as an Arrow stream) and renamed when complete.

`--resume` rebuilds the vector from the class rows already on disk (polygonising costs a small
fraction of inference), then continues with the live bands: the same bands, the same features.

pyogrio and shapely are the `vector` extra; they are imported only when `--vector` is used.
"""

from __future__ import annotations

import difflib
import itertools
import os
import queue
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy.errors import BackendUnavailable, OutputError, UserError
from segdeploy.utils import describe_write_error

# format name -> (GDAL driver, file suffix)
FORMATS: dict[str, tuple[str, str]] = {
    "gpkg": ("GPKG", ".gpkg"),
    "geojson": ("GeoJSON", ".geojson"),
    "fgb": ("FlatGeobuf", ".fgb"),
    "parquet": ("Parquet", ".parquet"),
}
LAYOUTS = ("single", "per-class")
BATCH_FEATURES = 4096  # features per write (one transaction in a GeoPackage)
# pixels per GDAL polygonising call (rows = this / width, at least 64): rasterio holds the GIL for
# the whole call (a 448-row band of a 20000-px scene: ~1.5 s of stalled predictor threads), and its
# copy of the rows and the OGR layer it fills grow with it (20000×2240 px: 590 MB peak at 448 rows a
# call, 568 at 112); each slice adds a seam to dissolve (4096², 112 rows: +33% polygonising CPU)
POLYGONISE_PIXELS = 2_500_000
QUEUED_BANDS = 1  # bands waiting for the polygonising thread (each W × band height bytes, + confidence)
INSTALL = "pip install 'segdeploy[vector]'"


# --------------------------------------------------------------------------------------- options


@dataclass
class VectorOptions:
    """What `--vector` and its companions ask for (validated by `check`).

    `target` is a file (`OUT.gpkg`, `.geojson`, `.fgb`, `.parquet`: one input only) or a format
    name (`gpkg`, `geojson`, `fgb`, `parquet`): a file beside each raster output, with its stem.
    `min_area` is in map units² ("250") or pixels ("40px"); `simplify` is a tolerance in map units;
    `classes` are class names or 0-based ids (None: every class)."""

    target: str
    layers: str = "single"
    min_area: str | None = None
    simplify: float | None = None
    classes: list[str] | None = None

    @property
    def format(self) -> str:
        """The vector format (a FORMATS key) from --vector's name or file suffix; UserError for an unknown one,
        listing those that work."""
        name = self.target.lower()
        if name in FORMATS:
            return name
        suffix = Path(self.target).suffix.lower()
        for fmt, (_, ext) in FORMATS.items():
            if suffix == ext:
                return fmt
        raise UserError(f"--vector {self.target}: unknown vector format {suffix or '(no suffix)'}; end the file "
                        f"name in {', '.join(ext for _, ext in FORMATS.values())} or pass a format name "
                        f"({', '.join(FORMATS)}) to write one beside each raster")

    @property
    def is_format_name(self) -> bool:
        """True when --vector names a format (a file beside each raster) rather than a file."""
        return self.target.lower() in FORMATS

    def path_for(self, raster_out: Path) -> Path:
        """The vector file of the raster written to `raster_out`."""
        if self.is_format_name:
            return raster_out.with_suffix(FORMATS[self.format][1])
        return Path(self.target)

    def check(self, many: bool = False) -> None:
        """Refuse, in one line each, what cannot work; before any prediction starts."""
        require_libraries()
        fmt = self.format
        if many and not self.is_format_name:
            raise UserError(f"--vector {self.target} names one file but several rasters are predicted; pass a "
                            f"format (--vector {fmt}) to write each raster's polygons beside its raster")
        if self.layers not in LAYOUTS:
            raise UserError(f"--vector-layers {self.layers!r} is unknown; choose single or per-class")
        if self.layers == "per-class" and fmt != "gpkg":
            raise UserError(f"--vector-layers per-class needs a format with several layers: use .gpkg "
                            f"({FORMATS[fmt][0]} holds one layer per file)")
        check_driver(fmt)
        if self.simplify is not None:
            if not self.simplify >= 0:
                raise UserError(f"--simplify must be ≥ 0 map units (got {self.simplify:g})")
            import shapely

            if shapely.geos_version < (3, 12, 0):
                raise BackendUnavailable(f"--simplify needs GEOS ≥ 3.12 (shapely's coverage simplification); "
                                         f"this shapely has GEOS {shapely.geos_version_string}: "
                                         f"pip install -U 'shapely>=2.1'")
        min_area_pixels(self.min_area, 1.0)

    def class_ids(self, names: list[str]) -> list[int]:
        """The class indices to polygonise (all when `classes` is None); a name that is not a
        class is refused with the closest matches."""
        if not self.classes:
            return list(range(len(names)))
        ids = []
        for item in self.classes:
            if item in names:
                ids.append(names.index(item))
            elif item.isdigit() and int(item) < len(names):
                ids.append(int(item))
            else:
                close = difflib.get_close_matches(item, names, n=3)
                hint = f"did you mean {', '.join(close)}? " if close else ""
                raise UserError(f"--classes {item!r} is not a class of this model ({hint}classes: "
                                f"{', '.join(names)}; or 0-based ids)")
        return sorted(set(ids))


def min_area_pixels(value: str | None, pixel_area: float) -> float:
    """`--min-area` as a pixel count: "40px" is 40 pixels, "250" is 250 map units² over the area of
    one pixel (|det| of the raster's transform). 0 when not given."""
    if value is None:
        return 0.0
    text = str(value).strip().lower()
    try:
        number = float(text[:-2]) if text.endswith("px") else float(text)
    except ValueError:
        raise UserError(f"--min-area {value!r} must be an area in map units² (e.g. 250) or pixels (e.g. 40px)") from None
    if not number >= 0:
        raise UserError(f"--min-area must be ≥ 0 (got {value})")
    return number if text.endswith("px") else number / pixel_area


def require_libraries() -> None:
    """pyogrio and shapely ≥ 2, or the one-line refusal naming the extra."""
    try:
        import pyogrio  # noqa: F401
        import shapely
    except ImportError as exc:
        raise BackendUnavailable(f"--vector needs pyogrio and shapely ({exc.name} is not installed): {INSTALL}") from None
    if int(shapely.__version__.split(".")[0]) < 2:
        raise BackendUnavailable(f"--vector needs shapely ≥ 2 (found {shapely.__version__}): {INSTALL}")


def check_driver(fmt: str) -> None:
    """Refuse a format whose GDAL driver pyogrio's GDAL lacks (GeoParquet needs GDAL's Parquet
    driver, built with Arrow: pyogrio's PyPI wheels leave it out)."""
    import pyogrio

    driver, have = FORMATS[fmt][0], pyogrio.list_drivers(write=True)
    if driver not in have:
        how = "libgdal-arrow-parquet" if fmt == "parquet" else "libgdal"
        others = " or ".join(ext for f, (drv, ext) in FORMATS.items() if f != fmt and drv in have)
        raise BackendUnavailable(f"--vector .{fmt}: the GDAL {pyogrio.__gdal_version_string__} that pyogrio uses has "
                                 f"no {driver} driver; install one built with it (conda install -c conda-forge pyogrio "
                                 f"{how}) or write {others or '.gpkg'}")


# --------------------------------------------------------------------------------------- polygonising


@dataclass
class Regions:
    """Complete 4-connected regions, one entry per region (struct of arrays, so a band's thousands
    of small polygons pass without a Python object each).

    `geometries`: shapely Polygons in pixel coordinates (x = column, y = row, pixel corners at
    integers); `class_ids` and `pixels` (exact counts) int64; `confidence_sum` float64, the sum of
    the pixels' confidence in percent (0 when no confidence was given)."""

    class_ids: np.ndarray
    geometries: np.ndarray
    pixels: np.ndarray
    confidence_sum: np.ndarray

    def __len__(self) -> int:
        return len(self.class_ids)

    def take(self, index: np.ndarray) -> Regions:
        """The regions at `index` (a boolean mask or indices)."""
        return Regions(self.class_ids[index], self.geometries[index], self.pixels[index], self.confidence_sum[index])

    @staticmethod
    def concat(batches: list[Regions]) -> Regions:
        """The regions of `batches` in order, as one Regions (empty when there are none)."""
        if not batches:
            return Regions(np.zeros(0, np.int64), np.empty(0, dtype=object), np.zeros(0, np.int64), np.zeros(0))
        return Regions(*(np.concatenate([getattr(b, f) for b in batches]) for f in
                         ("class_ids", "geometries", "pixels", "confidence_sum")))


class _OpenRegion:
    __slots__ = ("class_id", "parts", "pixels", "confidence_sum")

    def __init__(self, class_id: int) -> None:
        self.class_id, self.parts, self.pixels, self.confidence_sum = class_id, [], 0, 0.0

    def absorb(self, other: _OpenRegion) -> None:
        self.parts += other.parts
        self.pixels += other.pixels
        self.confidence_sum += other.confidence_sum


@dataclass
class _Band:
    """One band's pieces (4-connected within the band) of the tracked classes."""

    geoms: np.ndarray  # shapely Polygons, exact
    kept: np.ndarray  # the geometries to keep (simplified when asked)
    classes: np.ndarray
    pixels: np.ndarray
    confidence: np.ndarray
    top: np.ndarray  # piece index of each pixel of the band's first row (-1: none)
    bottom: np.ndarray  # and of its last row


class SeamPolygonizer:
    """Row bands of a class raster in, complete regions out, equal to polygonising the whole raster.

    Feed bands top to bottom with `add_band(y0, labels, confidence)`; each call returns the regions
    that no later band can extend; `finish()` returns the rest. Regions are those of
    `rasterio.features.shapes(labels, connectivity=4)` over the whole raster for the selected
    classes (pixels of other values, nodata included, are never polygonised).

    With `simplify_px`, each band's pieces (every value, so neighbours share edges) are simplified
    together by shapely's `coverage_simplify` (GEOS, topology-preserving Visvalingam-Whyatt,
    tolerance in pixels ≈ √ of the area removed) with the band's outline kept fixed, so pieces
    still meet exactly across seams."""

    def __init__(self, width: int, selected: np.ndarray, simplify_px: float | None = None) -> None:
        self.width = width
        self.selected = np.asarray(selected, bool)  # by class value: polygonise this value?
        self.simplify_px = simplify_px or None
        self.open: dict[int, _OpenRegion] = {}
        self.seam_ids = np.full(width, -1, np.int64)  # open region of each pixel of the last row fed
        self.seam_labels: np.ndarray | None = None
        self.next_id = 0
        self.rows_done = 0

    def add_band(self, y0: int, labels: np.ndarray, confidence: np.ndarray | None = None) -> Regions:
        """`labels`: H×W integer class values (uint8/uint16/int16/int32) of rows y0..y0+H;
        `confidence`: H×W percent (uint8) or None. Returns the regions closed by this band."""
        if y0 != self.rows_done or labels.shape[1] != self.width:
            raise ValueError(f"bands must arrive in order and {self.width} px wide: expected row {self.rows_done}, "
                             f"got a band at row {y0} of width {labels.shape[1]}")
        band = self._pieces(y0, labels, confidence)
        on_seam = np.zeros(len(band.geoms), bool)  # reaching the band's first or last row
        on_seam[band.top[band.top >= 0]] = True
        on_seam[band.bottom[band.bottom >= 0]] = True
        piece_region = self._link(band, labels[0], np.flatnonzero(on_seam))
        self.seam_ids = np.append(piece_region, -1)[band.bottom]  # -1 (no piece) picks the appended -1
        self.seam_labels = labels[-1].copy()
        self.rows_done = y0 + labels.shape[0]
        alive = set(np.unique(self.seam_ids[self.seam_ids >= 0]).tolist())
        inside = np.flatnonzero(~on_seam)  # complete already: GDAL's polygon is the region's
        within = Regions(band.classes[inside], band.kept[inside], band.pixels[inside], band.confidence[inside])
        return Regions.concat([within, self._close([i for i in sorted(self.open) if i not in alive])])

    def finish(self) -> Regions:
        """The regions still open after the last band."""
        self.seam_ids[:] = -1
        return self._close(sorted(self.open))

    def _pieces(self, y0: int, labels: np.ndarray, confidence: np.ndarray | None) -> _Band:
        import shapely

        everything = self.simplify_px is not None  # the whole band is one coverage to simplify
        geoms, values = _polygonise(labels, None if everything else self.selected, y0)
        kept = geoms
        if everything and len(geoms):
            kept = shapely.coverage_simplify(geoms, self.simplify_px, simplify_boundary=False)
        keep = self.selected[values]
        geoms, kept, values = geoms[keep], kept[keep], values[keep]
        pixels = np.rint(shapely.area(geoms)).astype(np.int64)
        h = labels.shape[0]
        top = self._row_pieces(geoms, labels[0], y0)
        bottom = self._row_pieces(geoms, labels[-1], y0 + h - 1)
        conf = np.zeros(len(geoms))
        if confidence is not None and len(geoms):
            from rasterio.features import rasterize

            ids = rasterize(zip(geoms, range(len(geoms))), out_shape=labels.shape, transform=_rows_at(y0), fill=-1,
                            dtype="int32")  # a pixel is burnt when its centre is inside: exact here
            inside = ids >= 0
            conf = np.bincount(ids[inside], weights=confidence[inside], minlength=len(geoms))
        return _Band(geoms, kept, values, pixels, conf, top, bottom)

    def _row_pieces(self, geoms: np.ndarray, row: np.ndarray, y: int) -> np.ndarray:
        """The piece covering each pixel of image row `y` (-1: none): a run of one value along a row
        lies in one piece, found by the piece that contains the centre of its first pixel."""
        import shapely

        starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
        run_piece = np.full(len(starts), -1, np.int64)
        tracked = np.flatnonzero(self.selected[row[starts]])
        bounds = shapely.bounds(geoms) if len(geoms) else np.zeros((0, 4))
        near = np.flatnonzero((bounds[:, 1] <= y) & (bounds[:, 3] > y))  # pieces that reach this row
        if len(tracked) and len(near):
            tree = shapely.STRtree(geoms[near])
            run, hit = tree.query(shapely.points(starts[tracked] + 0.5, y + 0.5), predicate="within")
            run_piece[tracked[run]] = near[hit]
        return np.repeat(run_piece, np.diff(np.r_[starts, len(row)]))

    def _link(self, band: _Band, first_row: np.ndarray, on_seam: np.ndarray) -> np.ndarray:
        """Join each piece on a seam (`on_seam`: their indices) to the open regions it continues
        (vertical neighbours of the same class across the upper seam; regions that one piece joins
        become one) or open a region for it. Returns each piece's region (-1: not on a seam)."""
        piece_region = np.full(len(band.geoms), -1, np.int64)
        merged: dict[int, int] = {}  # region absorbed -> the region that absorbed it

        def find(r: int) -> int:
            while r in merged:
                r = merged[r]
            return r

        if self.seam_labels is not None:
            touching = (self.seam_ids >= 0) & (band.top >= 0) & (self.seam_labels == first_row)
            pairs = np.unique(np.stack([self.seam_ids[touching], band.top[touching]], 1), axis=0)
            for region, piece in pairs.tolist():
                region = find(region)
                if piece_region[piece] < 0:
                    piece_region[piece] = region
                    continue
                other = find(int(piece_region[piece]))
                if other != region:  # a piece joins two regions: the younger is absorbed
                    keep, gone = min(other, region), max(other, region)
                    self.open[keep].absorb(self.open.pop(gone))
                    merged[gone] = keep
        for piece in on_seam.tolist():
            region = find(int(piece_region[piece])) if piece_region[piece] >= 0 else self._new(int(band.classes[piece]))
            piece_region[piece] = region
            target = self.open[region]
            target.parts.append(band.kept[piece])
            target.pixels += int(band.pixels[piece])
            target.confidence_sum += float(band.confidence[piece])
        return piece_region

    def _new(self, class_id: int) -> int:
        self.open[self.next_id] = _OpenRegion(class_id)
        self.next_id += 1
        return self.next_id - 1

    def _close(self, region_ids: list[int]) -> Regions:
        closed = [self.open.pop(i) for i in region_ids]
        geoms = np.empty(len(closed), dtype=object)
        geoms[:] = [r.parts[0] if len(r.parts) == 1 else dissolve_seams(r.parts) for r in closed]
        return Regions(np.array([r.class_id for r in closed], np.int64), geoms,
                       np.array([r.pixels for r in closed], np.int64),
                       np.array([r.confidence_sum for r in closed], np.float64))


def dissolve_seams(parts: list) -> Any:
    """The union of one region's pieces (shapely Polygons in pixel coordinates, each from one band),
    which meet only along band seams, horizontal lines where one piece's exterior has its bottom
    edges and the next one's its top edges (a hole never reaches its band's edge).

    Every vertex either side has on a seam is inserted into the other side's seam edges, so the
    pieces match vertex for vertex and GEOS's coverage union (linear: it drops the edges that
    appear twice) dissolves them — 2× faster than a general overlay union, which remains the
    fallback should GEOS find the pieces unfit. The vertices then left on the seams are collinear
    and dropped, as GDAL's polygons have none."""
    import shapely

    shells = [shapely.get_coordinates(p.exterior) for p in parts]
    ys = np.concatenate([xy[:, 1] for xy in shells])
    xs = np.concatenate([xy[:, 0] for xy in shells])
    tops = {float(shapely.bounds(p)[1]) for p in parts}
    bottoms = {float(shapely.bounds(p)[3]) for p in parts}
    seams = np.array(sorted(tops & bottoms))  # lines where one piece ends and another begins
    breaks = {y: np.unique(xs[ys == y]) for y in seams.tolist()}
    noded = [p if not np.isin(xy[:, 1], seams).any() else shapely.Polygon(_node_ring(xy, seams, breaks), p.interiors)
             for p, xy in zip(parts, shells)]
    try:
        union = shapely.coverage_union_all(noded)
    except shapely.errors.GEOSException:
        union = shapely.union_all(parts)
    return shapely.simplify(union, 0, preserve_topology=False)


def _node_ring(xy: np.ndarray, seams: np.ndarray, breaks: dict) -> np.ndarray:
    """Ring coordinates (N×2) with the seam's breakpoints inserted into each edge lying on a seam,
    in the edge's direction."""
    y = xy[:, 1]
    on_seam = np.flatnonzero((y[:-1] == y[1:]) & np.isin(y[:-1], seams))
    pieces, last = [], 0
    for i in on_seam.tolist():
        x0, x1 = xy[i, 0], xy[i + 1, 0]
        b = breaks[y[i]]
        inside = b[(b > min(x0, x1)) & (b < max(x0, x1))]
        pieces += [xy[last : i + 1], np.column_stack([inside if x1 > x0 else inside[::-1], np.full(len(inside), y[i])])]
        last = i + 1
    return np.concatenate([*pieces, xy[last:]])


def _xy(ring: list) -> np.ndarray:
    """A ring of (x, y) tuples as an N×2 float64 array (fromiter: ~2× np.asarray on tuples)."""
    return np.fromiter(itertools.chain.from_iterable(ring), np.float64, 2 * len(ring)).reshape(-1, 2)


def _shapes_dtype(labels: np.ndarray) -> np.ndarray:
    """GDAL polygonises int16, int32, uint8, uint16 and float32 rasters."""
    return labels if labels.dtype in (np.uint8, np.uint16, np.int16, np.int32) else labels.astype(np.int32)


def _rows_at(y0: int):  # noqa: ANN202 - an affine.Affine
    """Pixel coordinates of a band whose first row is y0: x = column, y = row."""
    from affine import Affine

    return Affine(1.0, 0.0, 0.0, 0.0, 1.0, float(y0))


def _polygonise(labels: np.ndarray, wanted: np.ndarray | None, y0: int) -> tuple[np.ndarray, np.ndarray]:
    """GDAL's polygons of a band (rasterio.features.shapes, 4-connectivity) as shapely Polygons in
    pixel coordinates, and their values: those whose value is `wanted` (a lookup by value; None:
    all). Each is converted as it comes (GDAL's GeoJSON-like dicts cost ~10× the memory of the
    geometry), and no mask is passed (rasterio would copy it twice: 2 bytes a pixel)."""
    import shapely
    from rasterio.features import shapes

    geoms, values = [], []
    for geojson, value in shapes(_shapes_dtype(labels), connectivity=4, transform=_rows_at(y0)):
        if wanted is not None and not wanted[int(value)]:
            continue
        shell, *holes = geojson["coordinates"]
        if holes:
            geoms.append(shapely.polygons(shapely.linearrings(_xy(shell)), [shapely.linearrings(_xy(h)) for h in holes]))
        else:
            geoms.append(shapely.polygons(_xy(shell)))
        values.append(int(value))
    out = np.empty(len(geoms), dtype=object)
    out[:] = geoms
    return out, np.array(values, np.int64)


# --------------------------------------------------------------------------------------- writing


def to_map(geoms: np.ndarray, transform) -> np.ndarray:  # noqa: ANN001 - an affine.Affine
    """Pixel-coordinate geometries mapped by the raster's transform with GDAL's formula
    (x = c + col·a + row·b, y = f + col·d + row·e): a corner shared by two polygons maps to the
    same coordinates in both."""
    import shapely

    t = transform

    def affine(xy: np.ndarray) -> np.ndarray:
        col, row = xy[:, 0], xy[:, 1]
        return np.column_stack([t.c + col * t.a + row * t.b, t.f + col * t.d + row * t.e])

    return shapely.transform(geoms, affine)


class FeatureWriter:
    """Regions → features of an OGR data source, `BATCH_FEATURES` per write (one transaction each
    in a GeoPackage). Until `finish`, features go to a hidden GeoPackage beside the output; then it
    is renamed (GeoPackage) or converted by GDAL as an Arrow stream (other formats) and renamed.

    Attributes: class_id, class_name, area (of the written polygon, map units²), pixels (exact
    count), and confidence (mean max-softmax of its pixels, 0-1) when confidence is given.
    Regions under `min_pixels` are left out."""

    def __init__(self, final: Path, fmt: str, class_names: list[str], class_ids: list[int], per_class: bool,
                 crs: str | None, transform, with_confidence: bool, min_pixels: float = 0.0) -> None:  # noqa: ANN001
        self.final, self.fmt = Path(final), fmt
        self.staging = self.final.with_name(f".{self.final.stem}.partial.gpkg")
        self.converted = self.final.with_name(f".{self.final.stem}.partial{FORMATS[fmt][1]}")
        self.class_names, self.per_class = class_names, per_class
        self.layer_names = [class_names[i] for i in class_ids] if per_class else [self.final.stem]
        self.crs, self.transform = crs, transform
        self.with_confidence, self.min_pixels = with_confidence, min_pixels
        self.pending: list[Regions] = []
        self.pending_count = 0
        self.dropped = 0
        self.discard()
        self.final.parent.mkdir(parents=True, exist_ok=True)
        for name in self.layer_names:  # every layer exists, with its schema, even if it stays empty
            self._write(name, Regions.concat([]), append=name != self.layer_names[0])

    @property
    def fields(self) -> list[str]:
        """The attribute columns written: class_id, class_name, area, pixels, and confidence with --probs."""
        return ["class_id", "class_name", "area", "pixels"] + (["confidence"] if self.with_confidence else [])

    def add(self, regions: Regions) -> None:
        """Queue finished regions (those under --min-area dropped and counted), writing a batch when BATCH_FEATURES
        are pending."""
        kept = regions.take(regions.pixels >= self.min_pixels)
        self.dropped += len(regions) - len(kept)
        self.pending.append(kept)
        self.pending_count += len(kept)
        if self.pending_count >= BATCH_FEATURES:
            self.flush()

    def flush(self) -> None:
        """Write the pending regions to their layer (one per class with per-class layers)."""
        if not self.pending_count:
            return
        batch = Regions.concat(self.pending)
        if self.per_class:
            for cid in np.unique(batch.class_ids).tolist():
                self._write(self.class_names[cid], batch.take(batch.class_ids == cid), append=True)
        else:
            self._write(self.layer_names[0], batch, append=True)
        self.pending, self.pending_count = [], 0

    def _write(self, layer: str, regions: Regions, append: bool) -> None:
        import shapely
        from pyogrio.raw import write

        geoms = to_map(regions.geometries, self.transform)
        data = [regions.class_ids.astype(np.int32), np.array(self.class_names, dtype=object)[regions.class_ids],
                shapely.area(geoms).astype(np.float64), regions.pixels.astype(np.int64)]
        if self.with_confidence:
            data.append(regions.confidence_sum / np.maximum(regions.pixels, 1) / 100)
        with self._failing_write(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*'crs' was not provided.*")  # predict warned already
            write(str(self.staging), shapely.to_wkb(geoms), data, self.fields, layer=layer, driver="GPKG",
                  geometry_type="Polygon", crs=self.crs, append=append)

    def finish(self) -> Path:
        """Write what is pending, give the file its format and its final name."""
        self.flush()
        with self._failing_write():
            if self.fmt == "gpkg":
                os.replace(self.staging, self.final)
                return self.final
            from pyogrio.raw import open_arrow, write_arrow

            with open_arrow(str(self.staging), layer=self.layer_names[0]) as (meta, stream), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*'crs' was not provided.*")
                write_arrow(stream, str(self.converted), layer=self.layer_names[0], driver=FORMATS[self.fmt][0],
                            geometry_name=meta["geometry_name"], geometry_type="Polygon", crs=self.crs)
            os.replace(self.converted, self.final)
            self.staging.unlink(missing_ok=True)
        return self.final

    def discard(self) -> None:
        """Remove the unfinished files (a fresh start, or a failed write)."""
        for p in (self.staging, self.converted):
            p.unlink(missing_ok=True)
            for extra in ("-journal", "-wal", "-shm"):  # SQLite's sidecars of a GeoPackage
                p.with_name(p.name + extra).unlink(missing_ok=True)

    @contextmanager
    def _failing_write(self) -> Iterator[None]:
        """A write that fails (disk full, read-only, denied) becomes one line naming the output, and
        the unfinished vector files are removed."""
        from pyogrio.errors import DataLayerError, DataSourceError, FeatureError, FieldError, GeometryError

        try:
            yield
        except (OSError, DataSourceError, DataLayerError, FeatureError, FieldError, GeometryError) as exc:
            self.discard()
            raise OutputError(describe_write_error(self.final, _write_reason(exc, self.final.parent))) from None


def _write_reason(exc: Exception, directory: Path) -> OSError:
    """GDAL reports a failed write without an errno; a full disk is the usual cause."""
    import errno
    import shutil

    if isinstance(exc, OSError) and exc.errno is not None:
        return exc
    try:
        if shutil.disk_usage(directory).free < 4 * 2**20:
            return OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        pass
    return OSError(None, " ".join(str(exc).split())[:200])


# --------------------------------------------------------------------------------------- predict's listener


class VectorSink:
    """What predict's `RowSink` feeds: the class rows (and confidence) of one raster as they are
    written, band by band → its vector file.

    `done_bands` are the bands already on disk when predict resumes: they are read back from the
    unfinished class raster (`raster_tmp`, and `probs_tmp` for confidence) and polygonised first,
    with the same band edges as the live run, so the features are the same."""

    def __init__(self, raster_out: Path, options: VectorOptions, reader, meta, nodata: int,  # noqa: ANN001
                 confidence: bool, done_bands: list[tuple[int, int]] = (), raster_tmp: Path | None = None,
                 probs_tmp: Path | None = None) -> None:
        from affine import Affine

        options.check()
        self.path = options.path_for(raster_out)
        ids = options.class_ids(list(meta.classes))
        georef = getattr(reader, "georef", None)  # a picture's reader has none
        transform = georef.transform if georef is not None and georef.transform is not None else None
        crs = georef.crs if transform is not None else None
        self._note_coordinates(reader, options, georef, transform, crs)
        transform = transform or Affine.identity()
        selected = np.zeros(65536 if nodata > 255 else 256, bool)
        selected[ids] = True
        pixel_px = options.simplify / np.sqrt(abs(transform.determinant)) if options.simplify else None
        self.polygonizer = SeamPolygonizer(reader.width, selected, pixel_px)
        self.writer = FeatureWriter(self.path, options.format, list(meta.classes), ids, options.layers == "per-class",
                                    crs.to_wkt() if crs else None, transform, confidence,
                                    min_area_pixels(options.min_area, abs(transform.determinant)))
        self.confidence = confidence
        self.bands: queue.Queue = queue.Queue(maxsize=QUEUED_BANDS)
        self.thread: threading.Thread | None = None
        self.failures: list[BaseException] = []
        self.dropping = False
        if done_bands:
            self._rebuild(done_bands, raster_tmp, probs_tmp)

    def _note_coordinates(self, reader, options: VectorOptions, georef, transform, crs) -> None:  # noqa: ANN001
        """Say when the polygons are not in a CRS: pixel coordinates without a geotransform (GCPs and
        RPCs are not an affine map: warp the raster for map coordinates), or no CRS."""
        lonlat = "; GeoJSON readers will take them for longitude, latitude" if options.format == "geojson" else ""
        if transform is None:
            why = " (its GCPs/RPCs are no geotransform: warp the raster first)" if georef is not None and \
                georef.present else ""
            reader.notes.append(f"{self.path.name}: polygons in pixel coordinates (x = column, y = row from the top)"
                                f"{why}{lonlat}")
        elif crs is None:
            reader.notes.append(f"{self.path.name}: the input has no CRS, nor have the polygons{lonlat}")

    def add_rows(self, y: int, labels: np.ndarray, confidence: np.ndarray | None) -> None:
        """Rows y.. of the class raster as written (nodata already set; not modified afterwards),
        and their confidence in percent (uint8) when computed. They are polygonised on this
        sink's own thread, so the predictor's writer goes on blending meanwhile; at most
        `QUEUED_BANDS` bands wait (memory), and a failure there is raised here or by `finish`."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._polygonise_loop, daemon=True, name="segdeploy-vector")
            self.thread.start()
        self._raise_failure()
        self.bands.put((y, labels, confidence if self.confidence else None))

    def finish(self) -> str:
        """Polygonise what is queued, write the regions still open, and give the file its name."""
        self._stop(drain=True)
        self._raise_failure()
        self.writer.add(self.polygonizer.finish())
        return str(self.writer.finish())

    def close(self) -> None:
        """Stop the polygonising thread, dropping queued bands (a failed or interrupted run: the
        unfinished files stay, and --resume rebuilds them from the raster). No-op after `finish`."""
        self._stop(drain=False)

    def _stop(self, drain: bool) -> None:
        if self.thread is None:
            return
        self.dropping = not drain
        self.bands.put(None)
        self.thread.join()
        self.thread = None

    def _polygonise_loop(self) -> None:
        while (band := self.bands.get()) is not None:
            if self.failures or self.dropping:
                continue
            try:
                self._polygonise(*band)
            except BaseException as exc:  # noqa: BLE001 - raised in the predictor's thread
                self.failures.append(exc)

    def _polygonise(self, y: int, labels: np.ndarray, confidence: np.ndarray | None) -> None:
        """One band, in slices of about `POLYGONISE_PIXELS`: rasterio holds the GIL while GDAL
        polygonises, which stalls the predictor's threads for as long as one call lasts. The slices
        depend on the width alone, so a rebuild (--resume) cuts them the same."""
        step = max(64, POLYGONISE_PIXELS // labels.shape[1])
        for top in range(0, labels.shape[0], step):
            rows = slice(top, top + step)
            self.writer.add(self.polygonizer.add_band(y + top, labels[rows],
                                                      None if confidence is None else confidence[rows]))

    def _raise_failure(self) -> None:
        if self.failures:
            raise self.failures[0]

    def _rebuild(self, bands: list[tuple[int, int]], raster_tmp: Path | None, probs_tmp: Path | None) -> None:
        import rasterio
        from rasterio.windows import Window

        with rasterio.open(raster_tmp) as labels, rasterio.open(probs_tmp) if self.confidence else nullcontext() as probs:
            for y0, y1 in bands:  # here, before the predictor starts
                win = Window(0, y0, labels.width, y1 - y0)
                self._polygonise(y0, labels.read(1, window=win), probs.read(1, window=win) if probs else None)


def model_classes(model: Path) -> list[str] | None:
    """The class names a model artifact records, read without loading it (None when they cannot
    be read here: loading the model then reports why)."""
    from segdeploy.artifact import Run, artifact_meta

    try:
        meta = Run(model).meta if Path(model).is_dir() else artifact_meta(Path(model))
    except (UserError, OSError, KeyError, ValueError):
        return None
    return list(meta.classes)
