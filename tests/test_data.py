"""Dataset layouts, mask decodings, splits, integrity errors and augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segdeploy import recipe
from segdeploy.data.dataset import discover, ratio_split
from segdeploy.data.torchdata import SegmentationDataset, band_stats, build_augment
from segdeploy.data.inspect import inspect, recipe_for_data
from segdeploy.data.io import decode_mask
from segdeploy.errors import DataError
from segdeploy.recipe import AugmentConfig, Recipe

PALETTE = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]


def make_recipe(root: Path, **data: object) -> Recipe:
    raw = {"data": {"root": str(root), **data}, "classes": {"names": ["bg", "a", "b"], "palette": [list(c) for c in PALETTE]}}
    return recipe.validate(raw, "test")


def write_pair(img_dir: Path, mask_dir: Path, key: str, mask: np.ndarray, img_suffix: str = ".png",
               mask_suffix: str = ".png", rgb_mask: bool = False) -> None:
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    img = np.stack([mask * 80] * 3, -1).astype(np.uint8)
    Image.fromarray(img).save(img_dir / f"{key}{img_suffix}")
    if mask_suffix == ".npy":
        np.save(mask_dir / f"{key}.npy", mask.astype(np.int64))
    elif rgb_mask:
        Image.fromarray(np.asarray(PALETTE, np.uint8)[mask]).save(mask_dir / f"{key}{mask_suffix}")
    else:
        Image.fromarray(mask.astype(np.uint8)).save(mask_dir / f"{key}{mask_suffix}")


def test_palette_masks_decode_and_unknown_colour_names_file_and_colour(tmp_path: Path) -> None:
    raw = np.zeros((4, 4, 3), np.uint8)
    raw[1, 1] = (255, 0, 0)
    raw[2, 2] = (0, 255, 0)
    m = decode_mask(raw, tmp_path / "m.png", "palette", 3, 255, PALETTE)
    assert m[1, 1] == 1 and m[2, 2] == 2 and m.sum() == 3
    raw[3, 3] = (1, 2, 3)
    with pytest.raises(DataError, match=r"m.png has colour \[1, 2, 3\] \(1 px\) that is not in classes.palette"):
        decode_mask(raw, tmp_path / "m.png", "palette", 3, 255, PALETTE)


def test_binary_and_index_masks(tmp_path: Path) -> None:
    assert decode_mask(np.array([[0, 255], [255, 0]], np.uint8), tmp_path, "binary", 2, 255).tolist() == [[0, 1], [1, 0]]
    assert decode_mask(np.array([[0, 1]], np.uint8), tmp_path, "binary", 2, 255).tolist() == [[0, 1]]
    ok = decode_mask(np.array([[0, 2, 255]], np.uint8), tmp_path, "index", 3, 255)
    assert ok.tolist() == [[0, 2, 255]]
    with pytest.raises(DataError, match=r"values \[7\] outside classes 0..2"):
        decode_mask(np.array([[0, 7]], np.uint8), tmp_path / "bad.png", "index", 3, 255)


def test_mmseg_folder_layout(tmp_path: Path) -> None:
    for split in ("train", "val"):
        write_pair(tmp_path / "img_dir" / split, tmp_path / "ann_dir" / split, f"{split}1", np.eye(4, dtype=np.int64))
    rec = make_recipe(tmp_path, image_dir="img_dir/{split}", mask_dir="ann_dir/{split}")
    assert [s.key for s in discover(rec.data, "train")] == ["train1"]
    with pytest.raises(DataError, match="split 'test' is empty"):
        discover(rec.data, "test")


def test_npy_masks_with_id_lists(tmp_path: Path) -> None:
    for k in ("a", "b", "c"):
        write_pair(tmp_path / "JPEGImages", tmp_path / "gt", k, np.full((4, 4), 2), img_suffix=".jpg", mask_suffix=".npy")
    (tmp_path / "train_id.txt").write_text("a\nc\n")
    (tmp_path / "val_id.txt").write_text("b\nzzz\n")
    rec = make_recipe(tmp_path, image_dir="JPEGImages", mask_dir="gt", image_suffix=".jpg", mask_suffix=".npy",
                      split={"mode": "lists", "lists": {"train": "train_id.txt", "val": "val_id.txt"}})
    samples = discover(rec.data, "train")
    assert [s.key for s in samples] == ["a", "c"]
    ds = SegmentationDataset(samples, rec.data, rec.classes, [0.0] * 3, [1.0] * 3)
    assert int(ds[0][1].unique()) == 2
    with pytest.raises(DataError, match=r"val_id.txt names 1 ids without an image\+mask pair \(first: 'zzz'"):
        discover(rec.data, "val")


def test_ratio_split_is_seeded_disjoint_and_complete(tmp_path: Path) -> None:
    from segdeploy.data.dataset import Sample

    samples = [Sample(f"k{i}", Path(f"{i}"), Path(f"{i}")) for i in range(2000)]
    a = ratio_split(samples, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=1)
    b = ratio_split(list(reversed(samples)), {"train": 0.8, "val": 0.1, "test": 0.1}, seed=1)
    assert a == b
    # each key's own hash decides: the sizes follow the ratios up to sampling noise (binomial, ±3σ)
    for split, ratio in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert abs(len(a[split]) - 2000 * ratio) <= 3 * (2000 * ratio * (1 - ratio)) ** 0.5
    assert len({s.key for v in a.values() for s in v}) == 2000
    assert ratio_split(samples, {"train": 0.8, "val": 0.2}, seed=2)["val"] != a["val"]


def test_integrity_errors_name_the_file(tmp_path: Path) -> None:
    write_pair(tmp_path / "images/train", tmp_path / "masks/train", "ok", np.zeros((8, 8), np.int64))
    rec = make_recipe(tmp_path)
    # image without mask
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images/train/lonely.png")
    with pytest.raises(DataError, match=r"image .*lonely.png has no mask"):
        discover(rec.data, "train")
    (tmp_path / "images/train/lonely.png").unlink()
    # size mismatch
    write_pair(tmp_path / "images/train", tmp_path / "masks/train", "big", np.zeros((8, 8), np.int64))
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "masks/train/big.png")
    # truncated image
    write_pair(tmp_path / "images/train", tmp_path / "masks/train", "trunc", np.zeros((64, 64), np.int64))
    data = (tmp_path / "images/train/trunc.png").read_bytes()
    (tmp_path / "images/train/trunc.png").write_bytes(data[: len(data) // 2])
    ds = SegmentationDataset(discover(rec.data, "train"), rec.data, rec.classes, [0.0] * 3, [1.0] * 3)
    keys = [s.key for s in ds.samples]
    with pytest.raises(DataError, match=r"image .*big.png is 8×8 but mask .*big.png is 8×6"):
        ds.load(keys.index("big"))
    with pytest.raises(DataError, match=r"cannot read image .*trunc.png"):
        ds.load(keys.index("trunc"))
    # inspect reports all problems instead of stopping at the first
    report = inspect(rec, splits=("train",))
    assert {Path(p["file"]).name for p in report.problems} == {"big.png", "trunc.png"}
    assert not report.ok


def test_multiband_16bit_geotiff_with_auto_band_stats(tmp_path: Path) -> None:
    import rasterio

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "masks" / split).mkdir(parents=True)
        arr = (rng.random((4, 16, 16)) * [[[1000]], [[2000]], [[3000]], [[60000]]]).astype(np.uint16)
        with rasterio.open(tmp_path / "images" / split / "t.tif", "w", driver="GTiff", width=16, height=16, count=4,
                           dtype="uint16") as dst:
            dst.write(arr)
        Image.fromarray(np.ones((16, 16), np.uint8)).save(tmp_path / "masks" / split / "t.png")
    rec = make_recipe(tmp_path, image_suffix=".tif", bands=4, max_pixel_value=65535, mean="auto", std="auto")
    ds = SegmentationDataset(discover(rec.data, "train"), rec.data, rec.classes, [0.0] * 4, [1.0] * 4)
    assert ds.load(0)[0].dtype == np.uint16 and ds.load(0)[0].shape == (16, 16, 4)
    mean, std = band_stats(ds)
    assert len(mean) == 4 and mean[0] < mean[1] < mean[2] < mean[3]
    norm = SegmentationDataset(ds.samples, rec.data, rec.classes, mean, std)[0][0]
    torch.testing.assert_close(norm.mean((1, 2)), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(norm.std((1, 2), correction=0), torch.ones(4), atol=1e-3, rtol=0)
    with pytest.raises(DataError, match="has 4 bands but the recipe says data.bands=3"):
        bad = make_recipe(tmp_path, image_suffix=".tif", max_pixel_value=65535)
        SegmentationDataset(ds.samples, bad.data, bad.classes, [0.0] * 3, [1.0] * 3).load(0)


def test_joint_augmentation_keeps_image_and_mask_aligned() -> None:
    from torchvision import tv_tensors

    torch.manual_seed(0)
    aug = build_augment(AugmentConfig(hflip=0.5, vflip=0.5, rot90=True, crop=True), 24, 255, 1)
    mask = torch.randint(0, 3, (32, 40))
    image = mask[None].float() / 10  # the image encodes its own label
    for _ in range(20):
        xi, ym = aug(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert xi.shape[-2:] == (24, 24) and ym.shape == (24, 24)
        torch.testing.assert_close((xi[0] * 10).round().long(), ym.as_subclass(torch.Tensor))


def test_synth_is_deterministic_and_inspect_reads_its_description(synth_dir: Path, tmp_path: Path) -> None:
    from segdeploy.data.synth import CLASSES, synth_tile

    a, b = synth_tile(5, 64), synth_tile(5, 64)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert set(np.unique(synth_tile(1, 128)[1])) >= {0, 3, 4}
    rec = recipe_for_data(synth_dir)
    assert rec.classes.names == CLASSES
    report = inspect(rec)
    assert report.ok and report.splits == {"train": 24, "val": 8, "test": 8}
    fr = report.fractions("train")
    assert sum(fr) == pytest.approx(1.0) and all(f > 0 for f in fr)
    # roads and buildings are the rare classes: they get the largest suggested weights
    w = report.suggested_class_weights
    assert min(w[3], w[4]) > max(w[0], w[1], w[2])


def test_demo_recipe_agrees_with_synth_description() -> None:
    from segdeploy.data.synth import dataset_description
    from tests.conftest import RECIPES

    demo = recipe.load(RECIPES / "demo.yaml")
    desc = dataset_description()
    assert demo.classes.names == desc["classes"]["names"]
    assert [list(c) for c in demo.classes.palette] == desc["classes"]["palette"]
    for k, v in desc["data"].items():
        assert getattr(demo.data, k) == v


def test_scene_is_georeferenced_with_nodata_and_colormap(synth_dir: Path) -> None:
    import rasterio

    with rasterio.open(synth_dir / "scene/scene.tif") as src:
        assert src.crs.to_epsg() == 32633 and src.count == 3 and src.nodata == 0 and src.width == 256
        assert src.transform.a == 1.0 and src.transform.c == 500_000.0
        assert (src.read(1)[0, 0] == 0) and (src.read(1)[-1, -1] != 0)
    with rasterio.open(synth_dir / "scene/scene_labels.tif") as lab:
        assert lab.nodata == 255 and lab.colormap(1)[4][:3] == (255, 0, 255)
        assert set(np.unique(lab.read(1))) <= {0, 1, 2, 3, 4, 255}


def test_the_sample_cache_holds_what_fits_and_says_so(tmp_path: Path) -> None:
    from segdeploy.data.dataset import SampleCache, SampleReader

    for k in range(4):
        write_pair(tmp_path / "images" / "train", tmp_path / "masks" / "train", f"k{k}", np.eye(32, dtype=np.int64))
    rec = make_recipe(tmp_path, cache=True)
    assert (rec.data.cache_bytes, make_recipe(tmp_path, cache=False).data.cache_bytes) == (1024 * 2**20, 0)
    assert make_recipe(tmp_path, cache=0).data.cache_bytes == 0
    per_sample = 32 * 32 * 3 + 32 * 32  # uint8 image + uint8 mask
    cache = SampleCache(make_recipe(tmp_path, cache=1).data.cache_bytes)  # 1 MB
    cache.limit = 2 * per_sample + 10  # room for two samples
    reader = SampleReader(discover(rec.data, "train"), rec.data, rec.classes, [0.0] * 3, [1.0] * 3, cache)
    first = [reader.load(i)[0] for i in range(4)]
    assert cache.nbytes == 2 * per_sample and reader.load(0)[0] is first[0] and reader.load(3)[0] is not first[3]
    assert cache.describe() == ("data cache: 2 of 4 samples read so far (0 MB of the 0 MB data.cache limit); "
                                "the other 2 are decoded again every epoch")
    plain = SampleReader(discover(rec.data, "train"), rec.data, rec.classes, [0.0] * 3, [1.0] * 3)
    assert plain.load(1)[0] is not plain.load(1)[0]  # eval's reader keeps nothing


def test_large_training_images_give_as_many_crops_as_they_hold_tiles(tmp_path: Path) -> None:
    from segdeploy.data.torchdata import CropEpoch, EpochPlan

    plan = EpochPlan.of([(2448, 2448), (100, 50), (512, 300)], 256, "auto", cropping=True)
    assert plan.crops == [92, 1, 3]  # ceil(2448²/256²) = ceil(91.4); ceil(5000/65536); ceil(153600/65536)
    assert plan.pixels == 92 * 256**2 + 100 * 50 + 3 * 256 * 256 and plan.split_pixels == 2448**2 + 5000 + 153600
    assert EpochPlan.of([(2448, 2448)], 256, 4, cropping=True).crops == [4]
    assert EpochPlan.of([(2448, 2448)], 256, "auto", cropping=False).crops == [1]
    # the loader's dataset: image 0 four times, each a fresh random tile² crop of it
    for k, mask in enumerate((np.zeros((128, 128), np.int64), np.ones((40, 40), np.int64))):
        write_pair(tmp_path / "images" / "train", tmp_path / "masks" / "train", f"k{k}", mask)
    rec = make_recipe(tmp_path, tile_size=64)
    ds = SegmentationDataset(discover(rec.data, "train"), rec.data, rec.classes, [0.0] * 3, [1.0] * 3,
                             augment=AugmentConfig(hflip=0))
    epoch = CropEpoch(ds, EpochPlan.of([(128, 128), (40, 40)], 64, "auto", cropping=True))
    assert len(epoch) == 5
    items = [epoch[k] for k in range(5)]
    assert all(x.shape == (3, 64, 64) for x, _ in items)
    assert [int((y == 0).sum()) for _, y in items[:4]] == [64 * 64] * 4  # image 0: class 0 everywhere
    assert int((items[4][1] == 1).sum()) == 40 * 40  # image 1: 40² inside, the rest padded with ignore


def test_the_run_records_what_an_epoch_sees(tiny_run: Path) -> None:
    import json

    info = json.loads((tiny_run / "meta.json").read_text())
    assert info["train_samples_per_epoch"] == 24 and info["crops_per_image"].startswith("off")
    assert info["train_pixels_per_epoch"] == info["train_split_pixels"] == 24 * 64 * 64
    assert info["model_meta"]["min_tile_size"] == 32
