"""Pictures people read: class colours, overlay strips with titles and a legend, and quick-look
previews of class rasters. Imports no verb; every verb that draws comes here.

Figures use matplotlib, imported inside each function and made without pyplot (`new_figure`:
no global backend switch), so importing this module costs nothing and drawing changes no
process-wide state; `save_figure` writes every one. The per-raster quick-look preview is drawn
with Pillow alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segdeploy.classes import background_index
from segdeploy.utils import atomic_path

NODATA_RGB = (40, 40, 40)  # dark grey: clearly "no data", unlike any palette's black
PREVIEW_MAX = 1024
# colours an error panel may use for "wrong", most visible first; the first far from every class is taken
ERROR_CANDIDATES = ((230, 30, 30), (255, 0, 255), (0, 255, 255), (255, 255, 255), (255, 140, 0), (0, 0, 0),
                    (128, 0, 255), (0, 255, 0))


def error_colour(palette: list[tuple[int, int, int]], avoid: tuple[tuple[int, int, int], ...] = (NODATA_RGB,)) -> tuple:
    """The colour for "wrong" pixels: the first of ERROR_CANDIDATES at least 100 (Euclidean RGB
    distance) from every class colour and from `avoid`, else the candidate farthest from them all,
    so an error can never be read as a class."""
    taken = np.asarray([*palette, *avoid], dtype=np.float64).reshape(-1, 3)

    def gap(c: tuple) -> float:
        return float(np.sqrt(((taken - np.asarray(c, dtype=np.float64)) ** 2).sum(1)).min())

    for c in ERROR_CANDIDATES:
        if gap(c) >= 100:
            return c
    return max(ERROR_CANDIDATES, key=gap)


def display_rgb(image: np.ndarray, max_value: float) -> np.ndarray:
    """First three bands (or the single band) as uint8 RGB; high-bit-depth data is stretched."""
    img = image[..., :3] if image.shape[-1] >= 3 else np.repeat(image[..., :1], 3, -1)
    stretch = max_value > 255 or img.dtype.kind == "f"  # 8-bit pictures are shown as they are
    img = img.astype(np.float32)
    if stretch:
        lo, hi = np.percentile(img, 2), np.percentile(img, 98)
        img = (img - lo) / max(hi - lo, 1e-6) * 255
    return np.clip(img, 0, 255).astype(np.uint8)


def colorize_classes(mask: np.ndarray, palette: list[tuple[int, int, int]], ignore_index: int,
                     ignore_rgb: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """An H×W class map as H×W×3 uint8 RGB in `palette`'s colours, `ignore_index` pixels in `ignore_rgb`."""
    lut = np.zeros((max(256, len(palette)), 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    m = mask.astype(np.int64)
    out = lut[np.clip(m, 0, len(lut) - 1)]
    out[m == ignore_index] = ignore_rgb
    return out


def paint_classes(rgb: np.ndarray, labels: np.ndarray, palette: list[tuple[int, int, int]], background: int | None,
                  ignore_index: int | None = None, alpha: float = 1.0) -> np.ndarray:
    """Class colours over an H×W×3 uint8 picture: each pixel of a class gets its colour (blended
    with the picture by `alpha`); the background class and `ignore_index` keep the picture."""
    colour = colorize_classes(labels, palette, -1 if ignore_index is None else ignore_index).astype(np.float32)
    out = rgb.astype(np.float32) * (1 - alpha) + colour * alpha
    keep = np.zeros(labels.shape, dtype=bool)
    if background is not None:
        keep |= labels == background
    if ignore_index is not None:
        keep |= labels == ignore_index
    out[keep] = rgb[keep]
    return np.clip(out, 0, 255).astype(np.uint8)


def save_overlay_picture(rgb: np.ndarray, labels: np.ndarray, names: list[str], palette: list[tuple[int, int, int]],
                         path: Path, background: int | None, title: str = "") -> Path:
    """A photo's prediction for people: class colours at 45% over the photo (the background class
    not painted), a title, and a legend of the classes. Pillow only (predict imports no matplotlib)."""
    painted = paint_classes(rgb, labels, palette, background, alpha=0.45)
    entries = [(n, tuple(c)) for i, (n, c) in enumerate(zip(names, palette, strict=False)) if i != background]
    if background is not None:
        entries.append((f"{names[background]} (not painted)", None))
    return _save_with_legend(painted, entries, path, title or path.name)


def new_figure(**kwargs: object):  # noqa: ANN201 - a matplotlib.figure.Figure
    """A matplotlib Figure made directly, not through pyplot: no process-wide backend switch
    (``matplotlib.use``), no global figure registry to close it from, so drawing leaves a caller's
    own matplotlib session (a notebook's backend, its open figures) as it was. `kwargs` are
    `Figure`'s: ``figsize`` (inches), ``dpi``. Draw on ``fig.subplots(...)``; write with `save_figure`."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)  # type: ignore[arg-type]


def _legend(fig, names: list[str], palette: list[tuple[int, int, int]], extra: dict[str, tuple] | None = None,  # noqa: ANN001
            ncol: int | None = None) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=np.asarray(c) / 255, edgecolor="black", label=n) for n, c in zip(names, palette)]
    handles += [Patch(facecolor=np.asarray(c) / 255, edgecolor="black", label=n) for n, c in (extra or {}).items()]
    fig.legend(handles=handles, loc="lower center", ncol=ncol or min(len(handles), 6), frameon=False, fontsize=9)


def overlay_figure(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, names: list[str],
                   palette: list[tuple[int, int, int]], max_value: float, ignore_index: int,
                   background: str | int | None = None):  # noqa: ANN201
    """image | ground truth | prediction | errors, titled, with a legend of the classes. The
    background class (`background_index`) is left as the image in the class panels; "wrong" has a
    colour no class has (`error_colour`)."""
    rgb = display_rgb(image, max_value)
    valid = truth != ignore_index
    wrong = valid & (pred != truth)
    wrong_rgb = error_colour(palette)
    errors = (rgb.astype(np.float32) * 0.35).astype(np.uint8)
    errors[wrong] = wrong_rgb
    errors[~valid] = NODATA_RGB
    bg = background_index(names, background)
    panels = [("image", rgb), ("ground truth", paint_classes(rgb, truth, palette, bg, ignore_index)),
              ("prediction", paint_classes(rgb, pred, palette, bg, ignore_index)),
              (f"errors ({wrong.sum() / max(valid.sum(), 1):.1%} of pixels)", errors)]
    fig = new_figure(figsize=(13, 3.9), dpi=100)
    axes = fig.subplots(1, 4)
    for ax, (title, panel) in zip(axes, panels, strict=True):
        ax.imshow(panel, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    shown = [(n, c) for i, (n, c) in enumerate(zip(names, palette, strict=False)) if i != bg]
    extra = {"wrong": wrong_rgb, "ignored": NODATA_RGB}
    if bg is not None:
        extra = {f"{names[bg]} (not painted)": (255, 255, 255), **extra}
    _legend(fig, [n for n, _ in shown], [c for _, c in shown], extra)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def save_figure(fig, path: Path) -> Path:  # noqa: ANN001 - a matplotlib.figure.Figure
    """`fig` as a PNG at `path`, atomically (temp file + rename: never half a picture); returns
    `path`. The one place segdeploy writes a matplotlib figure (train, eval, bench, data inspect)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def read_preview(raster: Path, max_size: int = PREVIEW_MAX) -> tuple[np.ndarray, int | None]:
    """Band 1 of a raster decimated to at most `max_size` px on its long side (nearest: a class
    map is never averaged), read through GDAL's overviews when present, and its nodata value."""
    import rasterio
    from rasterio.enums import Resampling

    with rasterio.open(raster) as src:
        scale = max(src.width, src.height) / max_size
        shape = (max(1, round(src.height / max(scale, 1))), max(1, round(src.width / max(scale, 1))))
        return src.read(1, out_shape=shape, resampling=Resampling.nearest), src.nodata


def save_class_preview(raster: Path, path: Path, names: list[str], palette: list[tuple[int, int, int]],
                       title: str = "") -> Path:
    """A quick look at a class raster: the palette's colours under a title, a legend of the
    classes below, and nodata in dark grey. Drawn with Pillow, not matplotlib: predict makes one
    per raster, and importing matplotlib alone took longer than drawing it (0.7 s measured)."""
    labels, nodata = read_preview(raster)
    nodata_value = -1 if nodata is None else int(nodata)
    rgb = colorize_classes(labels, palette, nodata_value, NODATA_RGB)
    entries: list[tuple[str, tuple | None]] = [(n, tuple(c)) for n, c in zip(names, palette, strict=False)]
    if nodata is not None:
        entries.append(("no data", NODATA_RGB))
    return _save_with_legend(rgb, entries, path, title or raster.name)


def _save_with_legend(rgb: np.ndarray, entries: list[tuple[str, tuple | None]], path: Path, title: str) -> Path:
    """An H×W×3 picture under a title with a legend below (a None colour: a white swatch crossed
    out, "not painted"), written as PNG atomically."""
    from PIL import Image, ImageDraw

    font = _font(14)
    h, w = rgb.shape[:2]
    width = max(w, 480)
    pad, line = 8, 22
    legend = _legend_rows(entries, font, width - 2 * pad)
    canvas = Image.new("RGB", (width, line + h + pad + line * len(legend) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 4), title, fill="black", font=font)
    canvas.paste(Image.fromarray(rgb), ((width - w) // 2, line))
    y = line + h + pad
    for row in legend:
        x = pad
        for name, colour, step in row:
            box = (x, y + 3, x + 14, y + 17)
            draw.rectangle(box, fill="white" if colour is None else tuple(int(v) for v in colour), outline="black")
            if colour is None:
                draw.line(box, fill="black")
            draw.text((x + _SWATCH, y + 2), name, fill="black", font=font)
            x += step
        y += line
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def _font(size: int):  # noqa: ANN202 - a Pillow font
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType (Pillow >= 10.1)
    except (TypeError, OSError):
        return ImageFont.load_default()


_SWATCH, _GAP = 20, 16  # px: a colour swatch and its spacing before the name; the gap after it


def _legend_rows(entries: list[tuple[str, tuple]], font, width: int) -> list[list[tuple[str, tuple, int]]]:  # noqa: ANN001
    """Legend entries (name, colour, px the entry takes) wrapped into rows that fit `width` px."""
    rows: list[list[tuple[str, tuple, int]]] = [[]]
    used = 0
    for name, colour in entries:
        step = _SWATCH + int(font.getlength(name)) + _GAP
        if rows[-1] and used + step > width:
            rows.append([])
            used = 0
        rows[-1].append((name, colour, step))
        used += step
    return rows


def preview_path(raster: Path) -> Path:
    """The quick-look PNG beside a class raster: <stem>_preview.png."""
    return raster.with_name(f"{raster.stem}_preview.png")
