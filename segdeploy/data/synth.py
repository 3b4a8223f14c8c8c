"""A deterministic synthetic land-cover dataset, so everything runs with no downloads.

Five classes with distinct textures: fields (striped), forest (blotchy dark green), water
(smooth blue), roads (thin grey lines) and buildings (bright rectangles). Masks are written as
DeepGlobe-style RGB palette PNGs. A large georeferenced scene is written block by block, so a
20k×20k GeoTIFF takes no more memory than one block.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from segdeploy.utils import atomic_path

CLASSES = ["field", "forest", "water", "road", "building"]
PALETTE = [(255, 255, 0), (0, 160, 0), (0, 0, 255), (128, 128, 128), (255, 0, 255)]
SPLIT_SIZES = {"train": 160, "val": 32, "test": 32}
SUMMARY_FILE = "synth.json"  # what marks a directory as synth output (replaceable with --overwrite)


def synth_tile(seed: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 image and its class-index mask, a pure function of `seed`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    # background land cover: Voronoi regions of field / forest / water
    n = int(rng.integers(3, 7))
    pts = rng.uniform(0, size, (n, 2)).astype(np.float32)
    kinds = rng.choice([0, 1, 2], size=n, p=[0.45, 0.35, 0.2])
    dist = (yy[None] - pts[:, 0, None, None]) ** 2 + (xx[None] - pts[:, 1, None, None]) ** 2
    mask = kinds[np.argmin(dist, axis=0)].astype(np.uint8)

    # roads: 1-2 straight lines, 3 px wide
    for _ in range(int(rng.integers(1, 3))):
        angle = rng.uniform(0, np.pi)
        c = rng.uniform(0.2 * size, 0.8 * size, 2)
        d = np.abs((xx - c[1]) * np.sin(angle) - (yy - c[0]) * np.cos(angle))
        mask[d < 1.6] = 3
    # buildings: rectangles, on land only
    for _ in range(int(rng.integers(2, 7))):
        h, w = rng.integers(6, 16, 2)
        y0, x0 = rng.integers(0, size - h), rng.integers(0, size - w)
        if (mask[y0 : y0 + h, x0 : x0 + w] != 2).all():
            mask[y0 : y0 + h, x0 : x0 + w] = 4

    img = np.zeros((size, size, 3), dtype=np.float32)
    noise = rng.normal(0, 1, (size, size)).astype(np.float32)
    # field: yellow-green with stripes in a random direction
    a = rng.uniform(0, np.pi)
    stripes = np.sin((xx * np.cos(a) + yy * np.sin(a)) * 0.9)
    field = np.stack([190 + 25 * stripes, 180 + 20 * stripes, 70 + 10 * stripes], -1)
    # forest: dark green blotches (smoothed noise)
    blot = _smooth(rng.normal(0, 1, (size, size)).astype(np.float32), 3)
    forest = np.stack([30 + 12 * blot, 95 + 30 * blot, 35 + 10 * blot], -1)
    water = np.stack([np.full_like(xx, 30), np.full_like(xx, 70), 150 + 8 * _smooth(noise, 6)], -1)
    road = np.stack([np.full_like(xx, 125)] * 3, -1)
    roof = rng.uniform(170, 240)
    building = np.stack([np.full_like(xx, roof), np.full_like(xx, roof * 0.55), np.full_like(xx, roof * 0.5)], -1)
    for k, tex in enumerate([field, forest, water, road, building]):
        img[mask == k] = tex[mask == k]
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def _smooth(a: np.ndarray, r: int) -> np.ndarray:
    """Box blur by separable cumulative sums (no scipy)."""
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        c = np.cumsum(np.pad(a, pad, mode="reflect"), axis=axis)
        c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
        a = (np.take(c, range(2 * r + 1, c.shape[axis]), axis=axis) - np.take(c, range(0, c.shape[axis] - 2 * r - 1), axis=axis)) / (2 * r + 1)
    return a / (a.std() + 1e-6)


def dataset_description() -> dict:
    """The `data` and `classes` sections a recipe needs for a synth directory."""
    return {
        "data": {
            "image_dir": "{split}",
            "mask_dir": "{split}",
            "image_suffix": "_sat.png",
            "mask_suffix": "_mask.png",
            "mask_encoding": "palette",
        },
        "classes": {"names": CLASSES, "palette": [list(c) for c in PALETTE]},
    }


def write_dataset(out: Path, tile: int = 128, sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, int]:
    """DeepGlobe-style `{split}/{key}_sat.png` + `{key}_mask.png` and a dataset.yaml."""
    from segdeploy.viz import colorize_classes

    sizes = sizes or SPLIT_SIZES
    out.mkdir(parents=True, exist_ok=True)
    offset = {"train": 0, "val": 100_000, "test": 200_000}
    for split, count in sizes.items():
        d = out / split
        d.mkdir(exist_ok=True)
        for i in range(count):
            img, mask = synth_tile(seed * 1_000_003 + offset[split] + i, tile)
            key = f"{split}{i:04d}"
            Image.fromarray(img).save(d / f"{key}_sat.png")
            Image.fromarray(colorize_classes(mask, PALETTE, 255)).save(d / f"{key}_mask.png")
    with atomic_path(out / "dataset.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(dataset_description(), sort_keys=False))
    return dict(sizes)


def write_scene(
    image_path: Path,
    label_path: Path | None,
    size: int = 2048,
    block: int = 256,
    seed: int = 7,
    nodata_corner: bool = True,
) -> None:
    """A georeferenced RGB GeoTIFF (UTM 33N, 1 m pixels) and its label raster, written block-wise.

    With `nodata_corner`, a triangle in the top-left corner is nodata (0 in every band), as at
    the edge of a real satellite swath.
    """
    import rasterio
    from rasterio.transform import from_origin

    transform = from_origin(500_000.0, 5_000_000.0, 1.0, 1.0)
    common = dict(driver="GTiff", width=size, height=size, crs="EPSG:32633", transform=transform,
                  tiled=True, blockxsize=block, blockysize=block, compress="deflate", BIGTIFF="IF_SAFER")
    cmap = {i: (*c, 255) for i, c in enumerate(PALETTE)}
    with atomic_path(image_path) as tmp_img, atomic_path(label_path) if label_path else nullcontext() as tmp_lab:
        with rasterio.open(tmp_img, "w", count=3, dtype="uint8", nodata=0, photometric="RGB", **common) as dst:
            lab = rasterio.open(tmp_lab, "w", count=1, dtype="uint8", nodata=255, **common) if tmp_lab else None
            try:
                if lab is not None:
                    lab.write_colormap(1, cmap)
                for by in range(0, size, block):
                    for bx in range(0, size, block):
                        h, w = min(block, size - by), min(block, size - bx)
                        img, mask = synth_tile(seed * 7919 + (by // block) * 100_003 + bx // block, block)
                        img, mask = img[:h, :w].copy(), mask[:h, :w].copy()
                        img[img == 0] = 1  # 0 is reserved for nodata
                        if nodata_corner:
                            yy, xx = np.mgrid[by : by + h, bx : bx + w]
                            hole = (yy + xx) < size // 8
                            img[hole] = 0
                            mask[hole] = 255
                        window = rasterio.windows.Window(bx, by, w, h)
                        dst.write(img.transpose(2, 0, 1), window=window)
                        if lab is not None:
                            lab.write(mask[None], window=window)
            finally:
                if lab is not None:
                    lab.close()


def synth(out: Path, tile: int = 128, scene_size: int = 2048, sizes: dict[str, int] | None = None,
          overwrite: bool = False) -> dict:
    """Write the dataset, the scene and synth.json into `out`, built beside it and put in place when
    complete. A non-empty `out` is refused unless it holds an earlier synth output and `overwrite`
    is set; then it is replaced whole (never merged: old files would otherwise stay beside the new
    ones). Raises OutputError."""
    from segdeploy.utils import staged_dir
    from segdeploy.viz import preview_path, save_class_preview

    out = Path(out)
    with staged_dir(out, overwrite, SUMMARY_FILE, "synthetic dataset") as work:
        counts = write_dataset(work, tile=tile, sizes=sizes)
        scene_dir = work / "scene"
        scene_dir.mkdir(exist_ok=True)
        write_scene(scene_dir / "scene.tif", scene_dir / "scene_labels.tif", size=scene_size)
        save_class_preview(scene_dir / "scene_labels.tif", preview_path(scene_dir / "scene_labels.tif"),
                           CLASSES, PALETTE, title=f"synthetic scene labels · {scene_size} x {scene_size} px")
        final = out / "scene"  # what the summary names: the paths once the directory is in place
        summary = {"dir": str(out), "splits": counts, "tile": tile, "scene": str(final / "scene.tif"),
                   "scene_labels": str(final / "scene_labels.tif"),
                   "scene_preview": str(preview_path(final / "scene_labels.tif")), "scene_size": scene_size}
        (work / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary
