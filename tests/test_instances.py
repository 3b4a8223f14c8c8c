"""Other instances of the fault kinds of issues 17, 18 and 19, each found by trying it as a user would
and fixed as a kind: decoding (16-bit colour PNGs, paletted and RGB-GeoTIFF masks under palette
encoding), checkpoints saved by a module attribute (`self.net`), outputs that would replace what
the command reads or writes, and hints that must be commands that work. Expected values come from
numpy, Pillow, rasterio and torch directly."""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image, ImageOps
from rasterio.transform import from_origin
from typer.testing import CliRunner

from segdeploy.cli import app
from segdeploy.errors import UserError
from segdeploy.predict import PredictOptions, predict_file
from tests.test_predict import EchoBackend, write_tif

runner = CliRunner()


def tif(path: Path, arr: np.ndarray) -> Path:
    write_tif(path, arr)
    return path


def run(*args: object):  # noqa: ANN201
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def one_line_error(result) -> str:  # noqa: ANN001
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


# ------------------------------------------------------------------------------ issue 17: one decoder


def png_with_exif(path: Path, orientation: int) -> None:
    """Add an eXIf chunk (EXIF Orientation) after IHDR of the PNG at `path`, as cameras and
    labelling tools do; GDAL cannot write one."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = exif.tobytes()[6:] if exif.tobytes().startswith(b"Exif\x00\x00") else exif.tobytes()
    chunk = struct.pack(">I", len(data)) + b"eXIf" + data + struct.pack(">I", zlib.crc32(b"eXIf" + data))
    raw = path.read_bytes()
    end_of_ihdr = 8 + 8 + 13 + 4
    path.write_bytes(raw[:end_of_ihdr] + chunk + raw[end_of_ihdr:])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_of_deep_pngs_is_pillows(tmp_path: Path, orientation: int) -> None:
    """The numpy orientation used for pictures Pillow cannot decode is Pillow's exif_transpose."""
    from segdeploy.data.decode import _orient

    stored = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "o.png", exif=exif)
    with Image.open(tmp_path / "o.png") as im:
        displayed = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert np.array_equal(_orient(stored, orientation), displayed)


@pytest.mark.parametrize(("bands", "orientation"), [(3, 1), (4, 6), (2, 8)])
def test_a_16_bit_colour_png_keeps_its_16_bits_alpha_and_orientation(tmp_path: Path, bands: int,
                                                                     orientation: int) -> None:
    """Pillow decodes 16-bit RGB(A) PNGs to their high bytes: predict with --input-max 65535 then
    saw values 257× too small (every class wrong, silently), and training on 16-bit PNGs saw 8 bits."""
    from segdeploy.data.decode import open_image

    rng = np.random.default_rng(bands)
    stored = rng.integers(1, 65536, (bands, 12, 20)).astype(np.uint16)
    if bands in (2, 4):
        stored[-1] = 65535
        stored[-1, 3:5, 2:9] = 0  # transparent
    with rasterio.open(tmp_path / "deep.png", "w", driver="PNG", width=20, height=12, count=bands,
                       dtype="uint16") as dst:
        dst.write(stored)
    if orientation != 1:
        png_with_exif(tmp_path / "deep.png", orientation)
    turn = {1: lambda a: a, 6: lambda a: np.rot90(a, -1), 8: lambda a: np.rot90(a, 1)}[orientation]
    displayed = turn(np.moveaxis(stored, 0, -1))
    with open_image(tmp_path / "deep.png", 3) as src:
        pixels, valid = src.read()
    colour = displayed[..., :3] if bands != 2 else np.repeat(displayed[..., :1], 3, -1)
    assert pixels.dtype == np.uint16 and np.array_equal(pixels, colour)
    assert np.array_equal(valid, displayed[..., -1] > 0 if bands in (2, 4) else np.ones(valid.shape, bool))


def palette_dataset(root: Path, form: str):  # noqa: ANN201 - (Recipe, labels)
    """Two 16×16 image/mask pairs whose masks are palette colours stored as `form`: an RGB PNG (the
    reference), a paletted PNG whose table lists unused colours first and the classes in another
    order, a paletted GeoTIFF like it, or a 3-band GeoTIFF of the colours."""
    palette = [[255, 255, 0], [0, 160, 0], [0, 0, 255]]
    table = [[10, 10, 10], [20, 20, 20], palette[2], palette[0], [30, 30, 30], palette[1]]
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, (2, 16, 16))
    root = root / "train"
    root.mkdir()
    for k in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)).save(root / f"k{k}_sat.png")
        rgb = np.asarray(palette, np.uint8)[labels[k]]
        index = np.array([table.index(palette[c]) for c in range(3)], np.uint8)[labels[k]]
        if form == "rgb_png":
            Image.fromarray(rgb).save(root / f"k{k}_mask.png")
        elif form == "paletted_png":
            im = Image.fromarray(index, "P")
            im.putpalette(sum(table, []))
            im.save(root / f"k{k}_mask.png")
        else:
            profile = dict(driver="GTiff", width=16, height=16, dtype="uint8", crs="EPSG:32633",
                           transform=from_origin(0, 16, 1, 1))
            with rasterio.open(root / f"k{k}_mask.tif", "w", count=1 if form == "paletted_tif" else 3,
                               photometric="palette" if form == "paletted_tif" else "rgb", **profile) as dst:
                if form == "paletted_tif":
                    dst.write(index[None])
                    dst.write_colormap(1, {i: (*c, 255) for i, c in enumerate(table)})
                else:
                    dst.write(np.moveaxis(rgb, -1, 0))
    from segdeploy import recipe

    suffix = ".png" if form.endswith("png") else ".tif"
    rec = recipe.validate({"data": {"root": str(root.parent), "image_dir": "{split}", "mask_dir": "{split}",
                                    "image_suffix": "_sat.png", "mask_suffix": f"_mask{suffix}",
                                    "mask_encoding": "palette"},
                           "classes": {"names": ["field", "forest", "water"], "palette": palette}}, "test")
    return rec, labels


@pytest.mark.parametrize("form", ["paletted_png", "paletted_tif", "rgb_tif"])
def test_palette_masks_are_read_by_colour_whatever_holds_the_colours(tmp_path: Path, form: str) -> None:
    """A paletted mask under mask_encoding: palette was refused with 'use index', and following
    that hint read its table positions as classes (wrong classes, or values outside them)."""
    from segdeploy.data.dataset import SampleReader, discover

    rec, labels = palette_dataset(tmp_path, form)
    reader = SampleReader(discover(rec.data, "train"), rec.data, rec.classes, [0.5] * 3, [0.2] * 3)
    assert [s.image.name for s in reader.samples] == ["k0_sat.png", "k1_sat.png"]
    for k in range(2):
        assert np.array_equal(reader.sample(k).mask, labels[k])


@pytest.mark.parametrize(("nodata", "dtype", "ignored"), [(-1, "int16", True), (15, "uint8", True), (0, "uint8", False)])
def test_a_label_rasters_nodata_is_ignored_where_it_is_no_class(tmp_path: Path, nodata: int, dtype: str,
                                                                ignored: bool) -> None:
    """A label GeoTIFF with nodata -1 ("unlabelled") was refused as 'values [-1] outside classes';
    its nodata pixels are ignore_index now. A nodata value that is a class (QGIS rasterizes with
    nodata 0, often the background) stays that class."""
    from segdeploy import recipe
    from segdeploy.data.dataset import SampleReader, discover

    (tmp_path / "train").mkdir()
    labels = np.random.default_rng(6).integers(0, 3, (16, 16))
    stored = labels.astype(dtype)
    stored[:4] = nodata
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (16, 16, 3)).astype(np.uint8)).save(
        tmp_path / "train/k_sat.png")
    with rasterio.open(tmp_path / "train/k_mask.tif", "w", driver="GTiff", width=16, height=16, count=1, dtype=dtype,
                       nodata=nodata, crs="EPSG:32633", transform=from_origin(0, 16, 1, 1)) as dst:
        dst.write(stored[None])
    rec = recipe.validate({"data": {"root": str(tmp_path), "image_dir": "{split}", "mask_dir": "{split}",
                                    "image_suffix": "_sat.png", "mask_suffix": "_mask.tif"},
                           "classes": {"names": ["a", "b", "c"]}}, "test")
    mask = SampleReader(discover(rec.data, "train"), rec.data, rec.classes, [0.5] * 3, [0.2] * 3).sample(0).mask
    expect = stored.astype(np.int64)
    if ignored:
        expect[:4] = 255
    assert np.array_equal(mask, expect)


# ------------------------------------------------------------------------------ issue 18: checkpoints


@pytest.mark.parametrize("prefix", ["net.", "module.net.", "seg_model.", "_orig_mod.module.backbone_model."])
def test_a_model_saved_as_a_module_attribute_loads_with_its_prefix_removed(prefix: str) -> None:
    """A LightningModule with `self.net = smp.Unet(...)` saves `net.encoder…`: 0 tensors matched and
    'the keys look like no segdeploy architecture', though every tensor was there."""
    import torch

    from segdeploy.checkpoint import match_state_dict

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    target = model.state_dict()
    state = {prefix + k: v.clone() for k, v in target.items()} | {"criterion.weight": torch.ones(2)}
    match = match_state_dict(state, target)
    assert match.complete and set(match.loaded) == set(target), match.summary()
    assert all(torch.equal(match.loaded[k], target[k]) for k in target)
    assert "".join(match.stripped) == prefix and match.dropped == ["criterion.weight"]
    # a prefix is removed only where more keys then fit: another model's tensors stay unmatched
    other = {prefix + k.replace("0.", "7."): v for k, v in target.items()}
    assert not match_state_dict(other, target).complete


class RunsACommand:
    """An object whose unpickling would run a shell command (what a hostile checkpoint carries)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_whose_other_entries_need_classes_gives_its_tensors_without_running_code(tmp_path: Path) -> None:
    """A Lightning checkpoint whose hyper-parameters hold an argparse.Namespace, a Path (or an
    OmegaConf config) was refused as 'a pickled Python object' though its weights are plain
    tensors; they are read now, every class in the file replaced by an inert placeholder — even one
    whose unpickling would run a command — while a whole pickled model stays refused."""
    import argparse

    import torch

    from segdeploy.checkpoint import PickleRefused, read_state_dict

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    weights = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": weights, "hyper_parameters": {
        "args": argparse.Namespace(lr=0.1), "root": tmp_path}}, tmp_path / "l.ckpt")
    said: list[str] = []
    got = read_state_dict(tmp_path / "l.ckpt", warn=said.append)
    assert set(got.tensors) == set(weights) and all(torch.equal(got.tensors[k], weights[k]) for k in weights)
    assert "argparse.Namespace" in said[0] and "inert placeholders" in said[0]
    torch.save(model, tmp_path / "whole.pth")
    with pytest.raises(PickleRefused, match="torch.nn.modules"):
        read_state_dict(tmp_path / "whole.pth")
    marker = tmp_path / "code-ran"  # torch blocks os/posix even as a placeholder: refused, nothing run
    torch.save({"state_dict": weights, "hyper_parameters": {"payload": RunsACommand(marker)}}, tmp_path / "h.ckpt")
    with pytest.raises(PickleRefused, match="posix.system|os.system"):
        read_state_dict(tmp_path / "h.ckpt")
    assert not marker.exists()


# ------------------------------------------------------------------------------ issue 19: outputs and hints


def test_predict_never_replaces_its_input_even_with_overwrite(tmp_path: Path) -> None:
    """`predict m.onnx a.tif --out a.tif` said 'a.tif already exists: a finished prediction is
    replaced only with --overwrite'; following it replaced the input with its own prediction."""
    (tmp_path / "m.onnx").write_bytes(b"")
    scene = tif(tmp_path / "a.tif", np.full((3, 8, 8), 7, np.uint8))
    before = scene.read_bytes()
    for extra in ([], ["--overwrite"]):
        line = one_line_error(run("predict", tmp_path / "m.onnx", scene, "--out", tmp_path / "." / "a.tif", *extra))
        assert "is the input" in line and "never replaces what it reads" in line
    assert scene.read_bytes() == before
    # several inputs into their own folder: b.tif's output would be the input b_pred.tif
    write_tif(tmp_path / "b.tif", np.zeros((3, 8, 8), np.uint8))
    write_tif(tmp_path / "b_pred.tif", np.ones((3, 8, 8), np.uint8))
    line = one_line_error(run("predict", tmp_path / "m.onnx", tmp_path / "b.tif", tmp_path / "b_pred.tif",
                              "--out", tmp_path, "--overwrite"))
    assert "b_pred.tif is the input" in line
    fix = re.search(r"--out (\S+)$", line)
    assert fix and not Path(fix.group(1)).exists()
    # a file written beside the output: the confidence raster of c.tif is c.probs.tif, a picture's overlay
    tif(tmp_path / "c.probs.tif", np.zeros((3, 8, 8), np.uint8))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "d_overlay.png")
    for src, out, extra in (("c.probs.tif", "c.tif", ["--probs"]), ("d_overlay.png", "d.png", [])):
        before = (tmp_path / src).read_bytes()
        line = one_line_error(run("predict", tmp_path / "m.onnx", tmp_path / src, "--out", tmp_path / out, *extra))
        assert f"and that is the input {tmp_path / src}" in line, line
        assert (tmp_path / src).read_bytes() == before


def test_a_report_is_never_written_over_the_commands_own_files_or_into_a_directory(tmp_path: Path) -> None:
    """`predict … --out pred.tif --json pred.tif` replaced the prediction with its summary, and
    `--json DIR` failed only after the work was done."""
    (tmp_path / "m.onnx").write_bytes(b"")
    scene = tif(tmp_path / "a.tif", np.full((3, 8, 8), 7, np.uint8))
    line = one_line_error(run("predict", tmp_path / "m.onnx", scene, "--out", tmp_path / "p.tif",
                              "--json", tmp_path / "p.tif"))
    assert "--json" in line and "same file as --out" in line
    line = one_line_error(run("predict", tmp_path / "m.onnx", scene, "--out", tmp_path / "p.tif", "--json", scene))
    assert "same file as an input" in line
    line = one_line_error(run("bench", tmp_path / "m.onnx", "--json", tmp_path / "r.json", "--csv", tmp_path / "r.json"))
    assert "--csv" in line and "same file as --json" in line
    line = one_line_error(run("predict", tmp_path / "m.onnx", scene, "--out", tmp_path / "p.tif", "--json", tmp_path))
    assert "is a directory" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "m.onnx"]  # refused before any work


def test_a_report_is_never_written_over_a_runs_own_file(tmp_path: Path) -> None:
    """`eval RUN --json RUN/recipe.yaml` replaced the run's recipe with the report: a run's own files
    (by name, inside a run, its export/ or eval/ folders) are refused before any work; a report file
    of the user's own in a run directory is fine."""
    run_dir = tmp_path / "run"
    (run_dir / "export").mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text("the recipe\n")
    (run_dir / "meta.json").write_text("{}")
    (run_dir / "export" / "parity.json").write_text("{}")
    for target in (run_dir / "recipe.yaml", run_dir / "export" / "parity.json"):
        line = one_line_error(run("eval", run_dir, "--json", target))
        assert f"is a file of the run {run_dir}" in line and "--json" in line, line
    assert (run_dir / "recipe.yaml").read_text() == "the recipe\n"
    result = run("eval", run_dir, "--json", run_dir / "my_eval.json")  # not refused by the guard (the run is fake)
    assert "is a file of the run" not in result.output


def test_resume_never_skips_an_output_predicted_from_another_input(tiny_onnx: Path, tmp_path: Path) -> None:
    """`predict M big.tif --out c.tif`, then `predict M small.tif --out c.tif --resume` said "already
    finished (skipped)" and kept big.tif's prediction as small.tif's."""
    import rasterio

    rng = np.random.default_rng(1)
    first = tif(tmp_path / "first.tif", rng.integers(0, 255, (3, 40, 40)).astype(np.uint8))
    second = tif(tmp_path / "second.tif", rng.integers(0, 255, (3, 24, 24)).astype(np.uint8))
    out = tmp_path / "c.tif"
    common = ["--out", out, "--no-progress", "--no-preview"]
    assert run("predict", tiny_onnx, first, *common).exit_code == 0
    with rasterio.open(out) as src:
        assert src.tags()["segdeploy_input"] == str(first.resolve())
    before = out.read_bytes()
    line = one_line_error(run("predict", tiny_onnx, second, *common, "--resume"))
    assert f"finished prediction of {first.resolve()}, not of {second}" in line and "--overwrite" in line
    assert out.read_bytes() == before
    result = run("predict", tiny_onnx, first, *common, "--resume")  # the same input: skipped as before
    assert result.exit_code == 0 and out.read_bytes() == before, result.output
    assert run("predict", tiny_onnx, second, *common, "--overwrite").exit_code == 0  # the fix it names
    with rasterio.open(out) as src:
        assert src.shape == (24, 24)


def test_an_existing_vector_file_is_replaced_only_with_overwrite(tiny_onnx: Path, tmp_path: Path) -> None:
    pytest.importorskip("pyogrio")
    scene = tif(tmp_path / "a.tif", np.random.default_rng(0).integers(0, 255, (3, 40, 40)).astype(np.uint8))
    mine = tmp_path / "mine.gpkg"
    mine.write_bytes(b"the user's own polygons")
    args = ["predict", tiny_onnx, scene, "--out", tmp_path / "p.tif", "--vector", mine, "--no-progress", "--no-preview"]
    line = one_line_error(run(*args))
    assert f"{mine} already exists" in line and "--overwrite" in line
    assert mine.read_bytes() == b"the user's own polygons" and not (tmp_path / "p.tif").exists()
    result = run(*args, "--overwrite")  # the fix it names
    assert result.exit_code == 0, result.output
    import pyogrio

    assert pyogrio.read_info(mine)["features"] > 0


def test_the_tile_a_divisor_refusal_suggests_is_accepted(tmp_path: Path) -> None:
    labels = np.random.default_rng(3).integers(0, 3, (40, 50)).astype(np.uint8)
    write_tif(tmp_path / "in.tif", labels)
    backend = EchoBackend(3, tile=32, divisor=8)
    backend.meta.min_tile_size = 16
    for tile, expect in ((20, [16, 24]), (12, [16])):
        with pytest.raises(UserError, match="input divisor 8") as refused:
            predict_file(backend, tmp_path / "in.tif", tmp_path / "x.tif", PredictOptions(tile=tile))
        suggested = [int(t) for t in re.findall(r"--tile (\d+)", str(refused.value))[1:]]
        assert suggested == expect
        for t in suggested:
            out = tmp_path / f"t{tile}_{t}.tif"
            predict_file(backend, tmp_path / "in.tif", out, PredictOptions(tile=t, overlap=0))
            with rasterio.open(out) as src:
                assert np.array_equal(src.read(1), labels)


def test_resuming_with_other_settings_names_them_and_the_fix_works(tmp_path: Path) -> None:
    """The refusal said 'rerun without --resume', which is refused in turn (an unfinished output
    is started over only with --overwrite)."""
    labels = np.random.default_rng(4).integers(0, 3, (700, 40)).astype(np.uint8)
    write_tif(tmp_path / "in.tif", labels)
    backend, out = EchoBackend(3, tile=32), tmp_path / "out.tif"

    def interrupt(done: int, total: int, pixels: int) -> None:
        if done >= 40:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict_file(backend, tmp_path / "in.tif", out, PredictOptions(tile=32, overlap=8), progress=interrupt)
    with pytest.raises(UserError) as refused:
        predict_file(backend, tmp_path / "in.tif", out, PredictOptions(tile=32, overlap=0, resume=True))
    assert "overlap 8 (now 0)" in str(refused.value) and "--overwrite" in str(refused.value)
    predict_file(backend, tmp_path / "in.tif", out, PredictOptions(tile=32, overlap=0, overwrite=True))
    with rasterio.open(out) as src:
        assert np.array_equal(src.read(1), labels)


@pytest.mark.parametrize(("setting", "said"), [
    ("data.cache=-5", "data.cache: input should be greater than or equal to 0 (got -5)"),
    ("data.crops_per_image=0", "data.crops_per_image: input should be greater than or equal to 1, or 'auto' (got 0)"),
])
def test_a_key_of_several_types_is_named_as_written_with_the_constraint_it_broke(setting: str, said: str) -> None:
    """`--set data.cache=-5` said 'data.cache.bool: input should be a valid boolean' (a key that does
    not exist, and not what is wrong with -5); crops_per_image said 'constrained-int'."""
    from segdeploy import recipe
    from segdeploy.errors import RecipeError
    from tests.conftest import RECIPES

    with pytest.raises(RecipeError) as refused:
        recipe.load(RECIPES / "demo.yaml", [setting], Path("."))
    assert said in str(refused.value)


def test_resume_with_every_output_finished_says_so_and_loads_no_model(tmp_path: Path) -> None:
    """It said '0 of 0 rasters predicted' under an empty progress bar, after loading the model."""
    (tmp_path / "m.onnx").write_bytes(b"")  # never loaded
    scene = tif(tmp_path / "a.tif", np.zeros((3, 8, 8), np.uint8))
    (tmp_path / "p.tif").write_bytes(b"a finished prediction")
    result = run("predict", tmp_path / "m.onnx", scene, "--out", tmp_path / "p.tif", "--resume", "--json",
                 tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "nothing to predict: 1 of 1 outputs already finished" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["results"] == [] and report["skipped"] == [str(scene)]
    assert (tmp_path / "p.tif").read_bytes() == b"a finished prediction"


def test_int8_rasters_are_predicted_and_an_unsupported_type_names_a_conversion_that_works(tmp_path: Path) -> None:
    """An int8 GeoTIFF (GDAL ≥ 3.7) was refused with only a list of types; complex64 too, without a fix."""
    import subprocess
    import sys

    labels = np.random.default_rng(8).integers(0, 3, (30, 40)).astype(np.int8)
    labels[5:9] = -128
    write_tif(tmp_path / "i8.tif", labels, nodata=-128)
    predict_file(EchoBackend(3), tmp_path / "i8.tif", tmp_path / "p.tif", PredictOptions(max_pixel_value=1.0))
    with rasterio.open(tmp_path / "p.tif") as src:
        got = src.read(1)
    assert (got[5:9] == 255).all() and np.array_equal(np.delete(got, range(5, 9), 0), np.delete(labels, range(5, 9), 0))
    write_tif(tmp_path / "c.tif", labels.clip(0).astype(np.complex64))
    with pytest.raises(UserError) as refused:
        predict_file(EchoBackend(3), tmp_path / "c.tif", tmp_path / "q.tif", PredictOptions())
    fix = re.search(r"`rio (convert [^`]+)`", str(refused.value))
    assert fix, refused.value
    rio = [sys.executable, "-c", "import sys; from rasterio.rio.main import main_group; sys.exit(main_group())"]
    subprocess.run(rio + fix.group(1).split(), check=True, capture_output=True, cwd=tmp_path)
    converted = tmp_path / fix.group(1).split()[-1]
    predict_file(EchoBackend(3), converted, tmp_path / "q.tif", PredictOptions(max_pixel_value=1.0))
    with rasterio.open(tmp_path / "q.tif") as src:
        assert np.array_equal(src.read(1), labels.clip(0))


def test_a_local_rasters_sidecars_reach_predict(tmp_path: Path) -> None:
    """predict applied the remote-raster setting GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR to local
    files too, so GDAL never saw their sidecars: a `.msk` mask's holes were predicted as classes
    (0 nodata pixels where there were 355), a `.tfw` world file's georeference was lost."""
    labels = np.random.default_rng(10).integers(0, 3, (40, 50)).astype(np.uint8)
    hole = np.zeros((40, 50), bool)
    hole[10:15] = True
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False), \
            rasterio.open(tmp_path / "m.tif", "w", driver="GTiff", width=50, height=40, count=1, dtype="uint8",
                          crs="EPSG:32633", transform=from_origin(0, 40, 1, 1)) as dst:
        dst.write(labels[None])
        dst.write_mask(np.where(hole, 0, 255).astype(np.uint8))
    assert (tmp_path / "m.tif.msk").is_file()
    predict_file(EchoBackend(3), tmp_path / "m.tif", tmp_path / "pm.tif", PredictOptions(max_pixel_value=1.0))
    with rasterio.open(tmp_path / "pm.tif") as src:
        got = src.read(1)
    assert (got[hole] == 255).all() and np.array_equal(got[~hole], labels[~hole])
    with rasterio.open(tmp_path / "w.tif", "w", driver="GTiff", width=50, height=40, count=1, dtype="uint8") as dst:
        dst.write(labels[None])
    (tmp_path / "w.tfw").write_text("0.5\n0\n0\n-0.5\n300000.25\n4000000.25\n")
    predict_file(EchoBackend(3), tmp_path / "w.tif", tmp_path / "pw.tif", PredictOptions(max_pixel_value=1.0))
    with rasterio.open(tmp_path / "w.tif") as a, rasterio.open(tmp_path / "pw.tif") as b:
        assert a.transform == b.transform == from_origin(300_000, 4_000_000.5, 0.5, 0.5)


def test_a_pictures_world_file_georeferences_its_class_png_and_polygons(tmp_path: Path) -> None:
    """A PNG with a world file (.pgw, QGIS's 'save as image') gave a class PNG without georeference
    and polygons in pixel coordinates; with EXIF orientation the world file no longer fits: left out."""
    pytest.importorskip("pyogrio")
    import pyogrio
    import shapely
    from rasterio.features import rasterize

    from segdeploy.vector import VectorOptions

    labels = np.random.default_rng(11).integers(0, 3, (30, 40)).astype(np.uint8)
    Image.fromarray(labels).save(tmp_path / "a.png")
    (tmp_path / "a.pgw").write_text("0.5\n0\n0\n-0.5\n300000.25\n4000000.25\n")
    with rasterio.open(tmp_path / "a.png", "r+") as dst:  # the CRS, in GDAL's .aux.xml
        dst.crs = "EPSG:32633"
    grid = from_origin(300_000, 4_000_000.5, 0.5, 0.5)
    opts = PredictOptions(max_pixel_value=1.0, vector=VectorOptions(str(tmp_path / "a.gpkg")))
    predict_file(EchoBackend(3), tmp_path / "a.png", tmp_path / "p.png", opts)
    with rasterio.open(tmp_path / "p.png") as src:
        assert src.transform == grid and src.crs == "EPSG:32633" and np.array_equal(src.read(1), labels)
    meta, _, wkb, fields = pyogrio.raw.read(tmp_path / "a.gpkg")
    assert "32633" in pyogrio.read_info(tmp_path / "a.gpkg")["crs"]
    ids = fields[list(meta["fields"]).index("class_id")]
    back = rasterize(zip(shapely.from_wkb(wkb), ids.tolist()), out_shape=labels.shape, transform=grid, dtype="uint8")
    assert np.array_equal(back, labels)
    png_with_exif(tmp_path / "a.png", 6)
    res = predict_file(EchoBackend(3), tmp_path / "a.png", tmp_path / "q.png", PredictOptions(max_pixel_value=1.0))
    assert any("world file" in n and "left out" in n for n in res.notes)
    assert not (tmp_path / "q.png.aux.xml").exists()
