"""Pixels as they come from real files (issue 17, items 1, 3 and 4): invalid pixels never reach the
model (nodata values, NaN/±Inf with or without a nodata tag, dataset masks, alpha), georeference
kept in every form GDAL has, one decoder for every format (EXIF orientation, alpha, colour
tables, gray into a 3-band model), and every hint printed for a refused input is a command that
works. Expected values come from numpy, torch, Pillow and rasterio directly."""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.control import GroundControlPoint
from rasterio.enums import ColorInterp
from rasterio.rpc import RPC
from rasterio.transform import from_origin
from typer.testing import CliRunner

from segdeploy import recipe
from segdeploy.cli import app
from segdeploy.data.dataset import SampleReader, discover
from segdeploy.data.decode import open_image, read_mask
from segdeploy.data.torchdata import SegmentationDataset, band_stats
from segdeploy.errors import DataError
from segdeploy.predict import PredictOptions, predict_file
from segdeploy.recipe import AugmentConfig
from segdeploy.tiling import normalize
from tests.test_predict import ConvBackend, EchoBackend, write_tif

runner = CliRunner()


def write_bands(path: Path, arr: np.ndarray) -> None:
    """A multi-band raster of plain bands (GDAL would make 4 uint8 bands RGBA by default)."""
    with rasterio.open(path, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
                       dtype=str(arr.dtype), photometric="MINISBLACK", crs="EPSG:32633",
                       transform=from_origin(0, 100, 1, 1)) as dst:
        dst.write(arr)


def read_band(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


# ------------------------------------------------------------------------------ item 1: invalid pixels


def test_normalize_puts_every_invalid_or_nonfinite_pixel_at_exactly_zero_in_every_band() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.random((2, 3, 5, 6)).astype(np.float32) * 200
    pixels[0, 1, 2, 3] = np.nan  # one band non-finite: the whole pixel is invalid
    pixels[1, :, 4, 5] = np.inf
    pixels[1, 2, 0, 0] = -np.inf
    valid = np.ones((2, 5, 6), bool)
    valid[0, 0, :2] = False
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    x = normalize(pixels, 255.0, mean, std, valid)
    expect = (pixels.astype(np.float64) / 255 - np.reshape(mean, (3, 1, 1))) / np.reshape(std, (3, 1, 1))
    bad = ~valid | ~np.isfinite(pixels).all(1)
    assert x.dtype == np.float32 and np.isfinite(x).all()
    assert (x.transpose(1, 0, 2, 3)[:, bad] == 0.0).all()
    np.testing.assert_allclose(x.transpose(1, 0, 2, 3)[:, ~bad], expect.transpose(1, 0, 2, 3)[:, ~bad], rtol=1e-5)
    # integer input, no validity: the plain formula
    ints = rng.integers(0, 256, (3, 4, 4)).astype(np.uint8)
    np.testing.assert_allclose(normalize(ints, 255, mean, std), (ints / 255 - np.reshape(mean, (3, 1, 1)))
                               / np.reshape(std, (3, 1, 1)), rtol=1e-5)


def whole_image_reference(backend: ConvBackend, image: np.ndarray, tile: int, overlap: int) -> np.ndarray:
    """Labels of the whole image in one forward pass (torch directly), padded past its edge the way
    tiles are (reflect): what a crop-blended tiled prediction must equal exactly."""
    from segdeploy.tiling import window_starts

    _, h, w = image.shape
    ph, pw = window_starts(h, tile, overlap)[-1] + tile - h, window_starts(w, tile, overlap)[-1] + tile - w
    x = torch.nn.functional.pad(torch.from_numpy(image[None].astype(np.float32)), (0, pw, 0, ph), mode="reflect")
    return backend(x.numpy()).argmax(1)[0, :h, :w]


@pytest.mark.parametrize("fault", ["nan_declared", "nan_untagged", "inf_untagged", "nodata_-9999"])
def test_a_stripe_of_invalid_pixels_never_reaches_the_model(tmp_path: Path, fault: str) -> None:
    """Issue 17's examples: a 12-row stripe of NaN (nodata=NaN, or no tag at all) and float
    reflectance with nodata=-9999. The stripe is output nodata, and every valid pixel gets exactly
    the class of a whole-image pass over the scene with the stripe filled by hand with the mean."""
    rng = np.random.default_rng(7)
    scene = rng.random((3, 150, 190)).astype(np.float32)  # edge tiles reflect-padded (pad < image part)
    stripe = np.zeros((150, 190), bool)
    stripe[70:82] = True
    bad = scene.copy()
    value = {"nan_declared": np.nan, "nan_untagged": np.nan, "inf_untagged": np.inf, "nodata_-9999": -9999.0}[fault]
    bad[:, stripe] = value
    write_tif(tmp_path / "in.tif", bad, nodata={"nan_declared": np.nan, "nodata_-9999": -9999.0}.get(fault))
    backend = ConvBackend()
    backend.meta.max_pixel_value, backend.meta.input_dtype = 1.0, "float32"
    backend.meta.mean = [0.3, 0.5, 0.7]
    res = predict_file(backend, tmp_path / "in.tif", tmp_path / "out.tif",
                       PredictOptions(tile=64, overlap=16, blend="crop", probs=True))
    filled = scene.copy()
    filled[:, stripe] = np.reshape(backend.meta.mean, (3, 1))  # by hand: the training mean
    expect = whole_image_reference(backend, filled - np.reshape(backend.meta.mean, (3, 1, 1)), 64, 16)
    labels, conf = read_band(tmp_path / "out.tif"), read_band(tmp_path / "out.probs.tif")
    assert (labels[stripe] == 255).all() and (conf[stripe] == 255).all()
    assert np.array_equal(labels[~stripe], expect[~stripe])  # 100% agreement, next to the stripe too
    assert conf[~stripe].min() > 0  # the issue saw confidence 0 on 59,392 valid pixels
    assert res.nonfinite_pixels == (int(stripe.sum()) if fault in ("nan_untagged", "inf_untagged") else 0)


def test_valid_pixels_next_to_nodata_agree_with_a_hand_filled_scene_on_a_trained_model(tiny_onnx: Path,
                                                                                       synth_dir: Path,
                                                                                       tmp_path: Path) -> None:
    """The measurement stated in the README: the demo model (FP32 ONNX), float reflectance 0..1 with
    nodata=-9999 on a 12-row stripe, against the same scene with the stripe filled by hand with the
    training mean: agreement on the valid pixels within 32 px of the stripe and on all of them."""
    from segdeploy.runtime import load_backend

    with rasterio.open(synth_dir / "scene/scene.tif") as src:
        scene = src.read().astype(np.float32) / 255
        corner = src.dataset_mask() == 0
    backend = load_backend(tiny_onnx, threads=2)
    mean = np.reshape(backend.meta.mean, (3, 1)).astype(np.float32)
    stripe = np.zeros(scene.shape[1:], bool)
    stripe[120:132] = True
    raw, filled = scene.copy(), scene.copy()
    raw[:, stripe | corner] = -9999.0
    filled[:, corner] = -9999.0
    filled[:, stripe] = mean
    for name, arr in (("raw", raw), ("filled", filled)):
        write_tif(tmp_path / f"{name}.tif", arr, nodata=-9999.0)
        predict_file(backend, tmp_path / f"{name}.tif", tmp_path / f"{name}_pred.tif",
                     PredictOptions(max_pixel_value=1.0, probs=True, preview=False))
    a, b = read_band(tmp_path / "raw_pred.tif"), read_band(tmp_path / "filled_pred.tif")
    near = np.zeros_like(stripe)
    near[88:164] = True
    near &= ~stripe & ~corner
    assert (a[stripe] == 255).all() and (a[corner] == 255).all()
    assert (a[near] == b[near]).mean() == 1.0 and (a[~stripe] == b[~stripe]).mean() == 1.0
    assert read_band(tmp_path / "raw_pred.probs.tif")[~stripe & ~corner].min() > 0


def float_dataset(root: Path) -> recipe.Recipe:
    """Two 32×40 training pairs: float32 GeoTIFFs with a 4-row stripe of NaN and no nodata tag, and
    of -9999 declared nodata."""
    rng = np.random.default_rng(3)
    (root / "images/train").mkdir(parents=True)
    (root / "masks/train").mkdir(parents=True)
    for key in ("nan", "nodata"):
        img = rng.random((3, 32, 40)).astype(np.float32)
        img[:, 10:14] = np.nan if key == "nan" else -9999.0
        write_tif(root / f"images/train/{key}.tif", img, nodata=None if key == "nan" else -9999.0, crs=None)
        Image.fromarray(rng.integers(0, 3, (32, 40)).astype(np.uint8)).save(root / f"masks/train/{key}.tif")
    return recipe.validate({"data": {"root": str(root), "image_suffix": ".tif", "mask_suffix": ".tif",
                                     "max_pixel_value": 1.0, "mean": [0.3, 0.4, 0.5], "std": [0.2, 0.2, 0.2]},
                            "classes": {"names": ["a", "b", "c"]}}, "test")


def test_in_eval_and_training_invalid_pixels_are_ignore_index_and_exactly_the_mean(tmp_path: Path) -> None:
    rec = float_dataset(tmp_path)
    samples = discover(rec.data, "train")
    ds = SampleReader(samples, rec.data, rec.classes, rec.data.mean, rec.data.std)
    for i, s in enumerate(samples):
        with rasterio.open(s.image) as src:
            raw = src.read().astype(np.float64)
        bad = ~np.isfinite(raw).all(0) | (raw == -9999).any(0)
        x, y = ds.item(i)
        assert bad.sum() == 4 * 40 and (y[bad] == 255).all() and (y[~bad] < 3).all()
        assert (x[:, bad] == 0).all() and np.isfinite(x).all()
        expect = (raw - np.reshape(rec.data.mean, (3, 1, 1))) / 0.2
        np.testing.assert_allclose(x[:, ~bad], expect[:, ~bad], rtol=1e-4, atol=1e-5)
    # training: augmented, and still exactly 0 where the image was invalid, and ignore_index there
    train = SegmentationDataset(samples, rec.data, rec.classes, rec.data.mean, rec.data.std,
                                augment=AugmentConfig(hflip=1.0, vflip=0.0, rot90=True, crop=False, brightness=0.3,
                                                      contrast=0.3))
    torch.manual_seed(0)
    for i in range(len(train)):
        x, y = train[i]
        assert torch.isfinite(x).all()
        assert torch.equal((x == 0).all(0), y == 255) and int((y == 255).sum()) == 4 * 40
    # band statistics come from valid pixels only
    pix = []
    for s in samples:
        with rasterio.open(s.image) as src:
            v = np.moveaxis(src.read(), 0, -1).reshape(-1, 3).astype(np.float64)
        pix.append(v[np.isfinite(v).all(1) & (v != -9999).all(1)])
    pix = np.concatenate(pix)
    mean, std = band_stats(ds)
    np.testing.assert_allclose(mean, pix.mean(0), atol=1e-6)
    np.testing.assert_allclose(std, pix.std(0), atol=1e-5)


# ------------------------------------------------------------------------------ item 3: georeference


def rpc() -> RPC:
    return RPC(height_off=100.0, height_scale=50.0, lat_off=45.0, lat_scale=0.1, long_off=7.0, long_scale=0.1,
               line_off=60.0, line_scale=60.0, samp_off=50.0, samp_scale=50.0,
               line_num_coeff=[0.0, 0.0, -1.0] + [0.0] * 17, line_den_coeff=[1.0] + [0.0] * 19,
               samp_num_coeff=[0.0, 1.0] + [0.0] * 18, samp_den_coeff=[1.0] + [0.0] * 19)


GCPS = [GroundControlPoint(0, 0, 500_000.0, 4_200_000.0, 0.0), GroundControlPoint(0, 100, 501_000.0, 4_200_000.0, 0.0),
        GroundControlPoint(120, 0, 500_000.0, 4_198_800.0, 0.0), GroundControlPoint(120, 100, 501_000.0, 4_198_800.0, 0.0)]


@pytest.mark.parametrize("form", ["geotransform", "gcps", "rpcs"])
def test_every_form_of_georeference_reaches_class_probs_and_cog_outputs(tmp_path: Path, form: str) -> None:
    labels = np.random.default_rng(2).integers(0, 3, (120, 100)).astype(np.uint8)
    kw = {"geotransform": {"transform": from_origin(500_000, 4_200_000, 10, 10), "crs": "EPSG:32632"},
          "gcps": {"gcps": GCPS, "crs": "EPSG:32632"}, "rpcs": {"rpcs": rpc(), "crs": "EPSG:4326"}}[form]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(tmp_path / "in.tif", "w", driver="GTiff", width=100, height=120, count=1, dtype="uint8",
                           **kw) as dst:
            dst.write(labels[None])
    for cog in (False, True):
        out = tmp_path / f"out_{cog}.tif"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            predict_file(EchoBackend(3, 32), tmp_path / "in.tif", out, PredictOptions(tile=32, overlap=8, probs=True,
                                                                                      cog=cog, preview=False))
        assert not [w for w in caught if "georeference" in str(w.message)]
        for path in (out, out.with_name(f"{out.stem}.probs.tif")):
            with rasterio.open(tmp_path / "in.tif") as src, rasterio.open(path) as got:
                assert got.crs == src.crs and got.transform == src.transform
                (g1, c1), (g2, c2) = src.gcps, got.gcps
                assert c1 == c2 and [(p.row, p.col, p.x, p.y) for p in g1] == [(p.row, p.col, p.x, p.y) for p in g2]
                assert (src.rpcs is None) == (got.rpcs is None)
                if src.rpcs is not None:
                    a, b = src.rpcs.to_dict(), got.rpcs.to_dict()
                    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k]) for k in a)
        assert np.array_equal(read_band(out), labels)


def test_the_no_georeference_warning_only_when_there_is_none(tmp_path: Path) -> None:
    write_tif(tmp_path / "plain.tif", np.ones((40, 40), np.uint8), crs=None)
    with pytest.warns(UserWarning, match="no georeference"):
        predict_file(EchoBackend(3, 32), tmp_path / "plain.tif", tmp_path / "o.tif", PredictOptions(tile=32, overlap=8))


# ------------------------------------------------------------------------------ item 4: one decoder

# EXIF orientation -> the displayed image from the stored one (the EXIF 2.3 definitions, in numpy)
DISPLAYED = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
             5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
             8: lambda a: np.rot90(a, 1)}


def save_with_orientation(path: Path, stored: np.ndarray, orientation: int, **kw: object) -> None:
    im = Image.fromarray(np.ascontiguousarray(stored))
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, exif=exif.tobytes(), **kw)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied_to_images_and_masks(tmp_path: Path, orientation: int) -> None:
    stored = np.random.default_rng(orientation).integers(0, 255, (5, 7, 3)).astype(np.uint8)
    save_with_orientation(tmp_path / "img.png", stored, orientation)
    with open_image(tmp_path / "img.png", 3) as src:
        pixels, valid = src.read()
    assert np.array_equal(pixels, DISPLAYED[orientation](stored)) and valid.all()
    mask = stored[..., 0] % 3
    save_with_orientation(tmp_path / "mask.png", mask, orientation)
    assert np.array_equal(read_mask(tmp_path / "mask.png"), DISPLAYED[orientation](mask))


def test_a_rotated_phone_photo_pairs_with_a_mask_drawn_on_the_displayed_image(tmp_path: Path) -> None:
    """A non-square JPEG stored sideways with Orientation=6 (as phones save them) and a PNG mask
    drawn on the displayed image: read as a pair, each pixel's colour is its mask's class. A mask
    drawn on the stored pixels is refused naming the orientation."""
    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], np.uint8)
    shown = np.zeros((48, 80), np.uint8)
    shown[:, 30:] = 1
    shown[20:, 55:] = 2
    (tmp_path / "images/train").mkdir(parents=True)
    (tmp_path / "masks/train").mkdir(parents=True)
    save_with_orientation(tmp_path / "images/train/p.jpg", np.rot90(colours[shown], 1), 6, quality=95)
    Image.fromarray(shown).save(tmp_path / "masks/train/p.png")
    rec = recipe.validate({"data": {"root": str(tmp_path), "image_suffix": ".jpg"},
                           "classes": {"names": ["a", "b", "c"]}}, "test")
    ds = SampleReader(discover(rec.data, "train"), rec.data, rec.classes, [0.5] * 3, [0.25] * 3)
    image, mask = ds.load(0)
    nearest = np.abs(image[..., None, :].astype(int) - colours[None, None].astype(int)).sum(-1).argmin(-1)
    assert image.shape == (48, 80, 3) and (nearest == mask).mean() > 0.99
    Image.fromarray(np.rot90(shown, 1).copy()).save(tmp_path / "masks/train/p.png")  # drawn on the stored pixels
    ds = SampleReader(discover(rec.data, "train"), rec.data, rec.classes, [0.5] * 3, [0.25] * 3)
    with pytest.raises(DataError, match=r"EXIF orientation 6 \(rotated 90° clockwise\) shows it as 80×48"):
        ds.load(0)


def test_predict_outputs_follow_the_displayed_orientation(tmp_path: Path) -> None:
    shown = np.random.default_rng(4).integers(0, 3, (30, 50)).astype(np.uint8)
    save_with_orientation(tmp_path / "x.png", np.rot90(shown, 1).copy(), 6)
    predict_file(EchoBackend(3, 32), tmp_path / "x.png", tmp_path / "x_pred.png", PredictOptions(tile=32, overlap=8))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x_pred.png")), shown)


def alpha_inputs(tmp_path: Path, labels: np.ndarray, alpha: np.ndarray) -> dict[str, Path]:
    """The same labels (in the red band) with the same transparent pixels, in every alpha form."""
    rgb = np.stack([labels, labels, labels], -1)
    paths = {k: tmp_path / f"{k}.{'tif' if k == 'tif' else 'png'}" for k in ("rgba", "la", "trns", "tif")}
    Image.fromarray(np.dstack([rgb, alpha])).save(paths["rgba"])
    Image.fromarray(np.dstack([labels, alpha])).save(paths["la"])  # (H, W, 2) uint8: mode LA
    pal = Image.fromarray(np.where(alpha > 0, labels, 9).astype(np.uint8))
    pal.putpalette([v for i in range(256) for v in (i, i, i)])
    pal.save(paths["trns"], transparency=9)  # one palette index transparent (tRNS)
    with rasterio.open(paths["tif"], "w", driver="GTiff", width=labels.shape[1], height=labels.shape[0], count=4,
                       dtype="uint8", photometric="RGB", crs="EPSG:32633",
                       transform=from_origin(0, 0, 1, 1)) as dst:
        dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]  # before the pixels
        dst.write(np.dstack([rgb, alpha]).transpose(2, 0, 1))
    return paths


def test_alpha_zero_is_nodata_in_every_alpha_form_in_predict_and_ignored_in_training(tmp_path: Path) -> None:
    labels = np.random.default_rng(5).integers(0, 3, (40, 50)).astype(np.uint8)
    alpha = np.full(labels.shape, 255, np.uint8)
    alpha[5:15, 10:30] = 0
    for kind, path in alpha_inputs(tmp_path, labels, alpha).items():
        out = tmp_path / f"{kind}_pred{path.suffix}"
        predict_file(EchoBackend(3, 32, bands=3), path, out, PredictOptions(tile=32, overlap=8, preview=False))
        pred = np.asarray(Image.open(out)) if out.suffix == ".png" else read_band(out)
        assert np.array_equal(pred == 255, alpha == 0), kind
        assert np.array_equal(pred[alpha > 0], labels[alpha > 0]), kind
    (tmp_path / "images/train").mkdir(parents=True)
    (tmp_path / "masks/train").mkdir(parents=True)
    (tmp_path / "rgba.png").rename(tmp_path / "images/train/k.png")
    Image.fromarray(labels).save(tmp_path / "masks/train/k.png")
    rec = recipe.validate({"data": {"root": str(tmp_path)}, "classes": {"names": ["a", "b", "c"]}}, "test")
    x, y = SampleReader(discover(rec.data, "train"), rec.data, rec.classes, [0.2] * 3, [0.3] * 3).item(0)
    assert np.array_equal(y == 255, alpha == 0) and (x[:, alpha == 0] == 0).all()


def test_a_colour_table_is_expanded_to_the_rgb_it_displays(tmp_path: Path) -> None:
    """A paletted GeoTIFF and a paletted PNG give exactly what their RGB expansion (numpy) gives; the
    GeoTIFF's nodata index is nodata."""
    rng = np.random.default_rng(6)
    index = rng.integers(0, 6, (70, 90)).astype(np.uint8)
    index[:5] = 7  # the nodata index
    table = {i: tuple(int(v) for v in rng.integers(1, 256, 3)) + (255,) for i in range(8)}
    lut = np.array([table[i][:3] for i in range(8)], np.uint8)
    rgb = lut[index].transpose(2, 0, 1)
    rgb[:, :5] = 0  # the reference's nodata, so both fill the same pixels
    with rasterio.open(tmp_path / "pal.tif", "w", driver="GTiff", width=90, height=70, count=1, dtype="uint8",
                       nodata=7, crs="EPSG:32633", transform=from_origin(0, 0, 1, 1)) as dst:
        dst.write(index[None])
        dst.write_colormap(1, table)
    write_tif(tmp_path / "rgb.tif", rgb, nodata=0)
    png = Image.fromarray(index)
    png.putpalette(lut.ravel().tolist())
    png.save(tmp_path / "pal.png")
    Image.fromarray(lut[index]).save(tmp_path / "rgb.png")
    backend = ConvBackend()
    backend.meta.max_pixel_value = 255.0
    opts = PredictOptions(tile=64, overlap=16, preview=False)
    for name in ("pal.tif", "rgb.tif", "pal.png", "rgb.png"):
        predict_file(backend, tmp_path / name, tmp_path / f"out_{name}", opts)
    got = {n: (read_band if n.endswith("tif") else lambda p: np.asarray(Image.open(p)))(tmp_path / f"out_{n}")
           for n in ("pal.tif", "rgb.tif", "pal.png", "rgb.png")}
    assert (got["pal.tif"][:5] == 255).all()
    assert np.array_equal(got["pal.tif"], got["rgb.tif"])
    assert np.array_equal(got["pal.png"], got["rgb.png"])


def test_one_gray_band_feeds_a_3_band_model_the_same_way_everywhere(tmp_path: Path) -> None:
    gray = np.random.default_rng(8).integers(0, 256, (60, 70)).astype(np.uint8)
    write_tif(tmp_path / "gray.tif", gray)
    write_tif(tmp_path / "rgb.tif", np.stack([gray] * 3))
    Image.fromarray(gray).save(tmp_path / "gray.png")
    backend = ConvBackend()
    backend.meta.max_pixel_value = 255.0
    opts = PredictOptions(tile=64, overlap=16, preview=False)
    res = predict_file(backend, tmp_path / "gray.tif", tmp_path / "g.tif", opts)
    predict_file(backend, tmp_path / "rgb.tif", tmp_path / "r.tif", opts)
    predict_file(backend, tmp_path / "gray.png", tmp_path / "g.png", opts)
    assert np.array_equal(read_band(tmp_path / "g.tif"), read_band(tmp_path / "r.tif"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png")), read_band(tmp_path / "r.tif"))
    assert res.bands == [1, 1, 1] and any("repeated" in n for n in res.notes)
    for name in ("gray.tif", "gray.png"):  # training reads them alike
        with open_image(tmp_path / name, 3) as src:
            assert np.array_equal(src.read()[0], np.stack([gray] * 3, -1))


# ------------------------------------------------------------------------------ every hint is a command that works


def cli(*args: object):  # noqa: ANN201
    return runner.invoke(app, [str(a) for a in args])


def test_every_hint_for_a_refused_input_is_a_command_that_works(tiny_onnx: Path, tmp_path: Path) -> None:
    """predict refuses an input whose bands or pixel type do not fit the model with a hint; each
    hint, run as printed, predicts the input. Inputs no flag can fit say so and suggest no flag."""
    rng = np.random.default_rng(9)
    cases = {"rgbn.tif": (rng.integers(0, 256, (4, 64, 64)), "uint8", r"--bands [\d,]+"),
             "u16.tif": (rng.integers(0, 65536, (3, 64, 64)), "uint16", r"--max-pixel-value \S+"),
             "f32.tif": (rng.random((3, 64, 64)), "float32", r"--max-pixel-value [\d.]+")}
    for name, (arr, dtype, hint) in cases.items():
        write_bands(tmp_path / name, arr.astype(dtype))
        out = tmp_path / f"pred_{name}"
        refused = cli("predict", tiny_onnx, tmp_path / name, "--out", out, "--no-progress", "--no-preview")
        assert refused.exit_code == 2 and not out.exists(), refused.output
        flag = re.search(hint, refused.output)
        assert flag, refused.output
        done = cli("predict", tiny_onnx, tmp_path / name, "--out", out, "--no-progress", "--no-preview",
                   *shlex.split(flag.group(0).rstrip(")")))
        assert done.exit_code == 0, done.output
        assert read_band(out).max() < 5
    write_tif(tmp_path / "two.tif", rng.integers(0, 256, (2, 64, 64)).astype("uint8"))
    refused = cli("predict", tiny_onnx, tmp_path / "two.tif", "--out", tmp_path / "two_pred.tif", "--no-progress")
    assert refused.exit_code == 2 and "no choice of its bands makes up the other 1" in refused.output
    assert "--bands" not in refused.output


def test_the_training_hint_for_images_with_other_bands_works(tmp_path: Path) -> None:
    from rich.console import Console

    from segdeploy.train import prepare_data

    rng = np.random.default_rng(10)
    for split in ("train", "val"):
        (tmp_path / f"masks/{split}").mkdir(parents=True)
        (tmp_path / f"images/{split}").mkdir(parents=True)
        for k in range(2):
            write_bands(tmp_path / f"images/{split}/{split}{k}.tif", rng.integers(0, 256, (4, 32, 32)).astype("uint8"))
            Image.fromarray(rng.integers(0, 2, (32, 32)).astype(np.uint8)).save(tmp_path / f"masks/{split}/{split}{k}.png")
    path = tmp_path / "r.yaml"
    path.write_text("data: {image_suffix: .tif, tile_size: 32}\nclasses: {names: [a, b]}\n")
    with pytest.raises(DataError, match="has 4 bands but the recipe says data.bands=3") as refused:
        prepare_data(recipe.load(path, [], tmp_path), Console(quiet=True))
    fix = re.search(r"--set ((?:\S+=\S+ ?)+)", str(refused.value))
    assert fix, refused.value
    data = prepare_data(recipe.load(path, fix.group(1).split(), tmp_path), Console(quiet=True))
    assert data.train.sample(0).image.shape == (32, 32, 4) and len(data.mean) == 4


def test_integer_nodata_follows_gdals_rule_and_float_nodata_masks_any_band(tmp_path: Path) -> None:
    """8-bit RGB with nodata 0: a dark pixel with one channel at 0 is data (GDAL's dataset mask
    marks only pixels where every band is nodata); float: -9999 in any one band is invalid."""
    import rasterio
    from rasterio.transform import from_origin

    from segdeploy.data.decode import open_image

    rgb = np.full((3, 4, 4), 50, np.uint8)
    rgb[0, 0, 0] = 0          # dark water: red at 0, green/blue not
    rgb[:, 1, 1] = 0          # every band at nodata: a hole
    flt = rgb.astype(np.float32)
    flt[flt == 0] = -9999.0
    for name, arr, nodata in (("u8.tif", rgb, 0), ("f32.tif", flt, -9999.0)):
        with rasterio.open(tmp_path / name, "w", driver="GTiff", width=4, height=4, count=3, dtype=arr.dtype,
                           nodata=nodata, crs="EPSG:32633", transform=from_origin(0, 4, 1, 1)) as dst:
            dst.write(arr)
    with rasterio.open(tmp_path / "u8.tif") as src:
        gdal_valid = src.dataset_mask() > 0  # GDAL's own answer for the integer file
    src = open_image(tmp_path / "u8.tif", 3)
    _, valid = src.read()
    src.close()
    assert np.array_equal(valid, gdal_valid) and valid[0, 0] and not valid[1, 1]
    src = open_image(tmp_path / "f32.tif", 3)
    _, valid = src.read()
    src.close()
    assert not valid[0, 0] and not valid[1, 1] and valid.sum() == 14
