"""eval and in-training validation score through predict's own machinery (one code path): the same
windows, padding and blending, so a score means what predict will do, memory is bounded by the
tile, and the two report the same number on the same weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segdeploy import recipe
from segdeploy.predict import PredictOptions, predict_file
from segdeploy.tiling import TilePlan, default_overlap, predict_arrays
from tests.test_predict import ConvBackend, write_tif


class ShapeRecorder(ConvBackend):
    def __init__(self) -> None:
        super().__init__()
        self.meta.max_pixel_value = 255.0
        self.shapes: list[tuple[int, ...]] = []

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.shapes.append(batch.shape)
        return super().run(batch)


def test_in_memory_images_get_exactly_what_predict_writes_and_the_backend_sees_only_tiles(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    images = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in ((150, 190), (40, 30), (64, 64), (97, 131))]
    backend = ShapeRecorder()
    expected = []
    for k, img in enumerate(images):  # predict's output for each image, written and read back with rasterio
        write_tif(tmp_path / f"{k}.tif", np.moveaxis(img, -1, 0))
        predict_file(backend, tmp_path / f"{k}.tif", tmp_path / f"{k}_out.tif", PredictOptions(preview=False))
        import rasterio

        with rasterio.open(tmp_path / f"{k}_out.tif") as src:
            expected.append(src.read(1))
    backend.shapes.clear()
    plan = TilePlan(0, 0, 64, default_overlap(64), "gaussian", "reflect", batch=3)
    got = list(predict_arrays(backend, ((img, None) for img in images), plan, 255.0))
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and np.array_equal(g, e)
    assert {s[1:] for s in backend.shapes} == {(3, 64, 64)} and max(s[0] for s in backend.shapes) == 3
    # tiles of consecutive images share batches: fewer calls than windows
    assert len(backend.shapes) < sum(TilePlan(*img.shape[:2], 64, 8).total for img in images)


def test_invalid_pixels_are_neither_predicted_nor_scored() -> None:
    backend = ShapeRecorder()
    image = (np.random.default_rng(4).random((100, 80, 3)) * 255).astype(np.uint8)
    valid = np.ones((100, 80), bool)
    valid[:64, :] = False  # the whole first row of tiles, and part of the second
    (labels,) = predict_arrays(backend, [(image, valid)], TilePlan(0, 0, 64, 8, batch=2), 255.0)
    assert (labels[~valid] == -1).all() and (labels[valid] >= 0).all()


def test_eval_validation_and_predict_agree_on_images_larger_than_the_tile(tiny_run: Path, synth_dir: Path,
                                                                          tmp_path: Path) -> None:
    """The issue's example: validation zero-padded, eval reflect-padded whole images (0.137398 vs
    0.137349 on the same weights). Now both are predict's tiles; the expected matrix is counted here
    with numpy from predict's own output PNGs."""
    from segdeploy.artifact import Run
    from segdeploy.data.dataset import discover
    from segdeploy.data.torchdata import SegmentationDataset
    from segdeploy.evaluate import evaluate
    from segdeploy.losses import build_loss
    from segdeploy.models import load_run_model
    from segdeploy.runtime.torch import TorchBackend
    from segdeploy.train import validate

    data = tmp_path / "data"
    (data / "val").mkdir(parents=True)
    palette = np.asarray([[255, 255, 0], [0, 160, 0], [0, 0, 255], [128, 128, 128], [255, 0, 255]], np.uint8)
    # 2×2 synth tiles stitched into 128² images, then cut to sizes that are not multiples of the tile
    sources = sorted((synth_dir / "train").glob("*_sat.png"))
    for k, (h, w) in enumerate(((100, 128), (128, 90), (77, 77))):
        tiles = [np.asarray(Image.open(p)) for p in sources[4 * k : 4 * k + 4]]
        masks = [np.asarray(Image.open(str(p).replace("_sat", "_mask"))) for p in sources[4 * k : 4 * k + 4]]
        img = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)[:h, :w]
        mask = np.concatenate([np.concatenate(masks[:2], 1), np.concatenate(masks[2:], 1)], 0)[:h, :w]
        Image.fromarray(img).save(data / "val" / f"v{k}_sat.png")
        Image.fromarray(mask).save(data / "val" / f"v{k}_mask.png")
    run = Run(tiny_run)
    report = evaluate(tiny_run, "val", data_root=data, plots=False)
    rec = recipe.load(run.recipe_path, data_root=data)
    model, meta = load_run_model(run), run.meta
    val = SegmentationDataset(discover(rec.data, "val"), rec.data, rec.classes, meta.mean, meta.std)
    loss_fn = build_loss(rec.loss, 5, 255, None)
    _, cm = validate(model, val, loss_fn, rec, "cpu", meta, False)
    expected = np.zeros((5, 5), np.int64)
    backend = TorchBackend(model, meta, tiny_run)
    for k in range(3):
        predict_file(backend, data / "val" / f"v{k}_sat.png", tmp_path / f"p{k}.png", PredictOptions(batch=8))
        pred = np.asarray(Image.open(tmp_path / f"p{k}.png")).astype(np.int64)
        rgb = np.asarray(Image.open(data / "val" / f"v{k}_mask.png"))[..., :3]
        truth = np.argmax((rgb[:, :, None, :] == palette[None, None]).all(-1), axis=-1)
        expected += np.bincount(truth.ravel() * 5 + pred.ravel(), minlength=25).reshape(5, 5)
    assert expected.sum() == 100 * 128 + 128 * 90 + 77 * 77
    assert np.array_equal(report.metrics.matrix, expected)
    assert np.array_equal(cm.matrix, expected)
    shutil.rmtree(data)


def test_the_gate_tiles_cover_every_pixel_once_padded_like_predict(tmp_path: Path) -> None:
    """The gate's tiles used to drop the pixels past the last whole tile; now edge windows run past
    the image and are reflect-padded, as predict pads them, with the padding never scored."""
    from segdeploy.artifact import ModelMeta
    from segdeploy.parity import parity_tiles
    from tests.conftest import RECIPES

    rng = np.random.default_rng(6)
    palette = np.asarray([[255, 255, 0], [0, 160, 0], [0, 0, 255], [128, 128, 128], [255, 0, 255]], np.uint8)
    (tmp_path / "val").mkdir()
    images = []
    for k, (h, w) in enumerate(((100, 110), (50, 130))):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / "val" / f"v{k}_sat.png")
        Image.fromarray(palette[rng.integers(0, 5, (h, w))]).save(tmp_path / "val" / f"v{k}_mask.png")
        images.append(img)
    rec = recipe.load(RECIPES / "demo.yaml", data_root=tmp_path)
    meta = ModelMeta(classes=rec.classes.names, palette=palette.tolist(), mean=[0.0] * 3, std=[1.0] * 3,
                     max_pixel_value=255, bands=3, input_divisor=32, tile_size=64)
    x, y = parity_tiles(rec, meta, 64, samples=100)
    assert len(x) == 2 * 2 + 1 * 3  # ceil(100/64)·ceil(110/64) + ceil(50/64)·ceil(130/64)
    assert int((y != 255).sum()) == 100 * 110 + 50 * 130  # every pixel once, padding never scored
    # the bottom-right window of image 0 (36×46 inside), padded independently with numpy's reflect
    expected = np.pad(images[0][64:, 64:].astype(np.float32) / 255, ((0, 28), (0, 18), (0, 0)), mode="reflect")
    np.testing.assert_allclose(x[3].numpy(), np.moveaxis(expected, -1, 0), atol=1e-6)
