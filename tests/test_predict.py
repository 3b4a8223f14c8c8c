"""Tiled prediction: tiling math (property-based), exact stitching, bounded memory, georeference,
nodata, resume, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.transform import from_origin

from segdeploy.artifact import ModelMeta
from segdeploy.errors import DataError, UserError
from segdeploy.predict import PredictOptions, predict_file
from segdeploy.runtime.base import Backend
from segdeploy.tiling import (
    BLENDS,
    StripAccumulator,
    TilePlan,
    blend_weights,
    class_argmax,
    weighted_softmax,
    window_starts,
)


# ------------------------------------------------------------------------------ tiling properties


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 3000), tile=st.integers(8, 600), frac=st.floats(0, 0.5))
def test_windows_cover_every_pixel_once_per_stride_and_never_shift_inward(size: int, tile: int, frac: float) -> None:
    overlap = int(tile * frac)
    starts = window_starts(size, tile, overlap)
    stride = tile - overlap
    assert starts[0] == 0 and all(b - a == stride for a, b in zip(starts, starts[1:]))  # same stride, last too
    assert starts[-1] + tile >= size  # the last window reaches the edge (padded past it)
    assert len(starts) == 1 or starts[-2] + tile < size  # and no window is redundant
    counts = np.zeros(size, int)
    for s in starts:
        counts[s : min(s + tile, size)] += 1
    assert counts.min() >= 1  # every pixel covered
    assert counts.max() <= -(-tile // stride)  # no pixel counted more often than the overlap allows


@settings(max_examples=30, deadline=None)
@given(tile=st.integers(4, 300), kind=st.sampled_from(BLENDS), frac=st.floats(0, 0.5))
def test_blend_weights_are_positive_and_peak_in_the_centre(tile: int, kind: str, frac: float) -> None:
    w = blend_weights(tile, kind, int(tile * frac))
    assert w.shape == (tile, tile) and float(w.min()) > 0 and float(w.max()) == pytest.approx(1.0)
    assert float(w[tile // 2, tile // 2]) == pytest.approx(1.0, abs=0.05)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 150), w=st.integers(1, 150), tile=st.sampled_from([8, 16, 32, 48]), frac=st.floats(0, 0.5),
       kind=st.sampled_from(BLENDS), seed=st.integers(0, 10_000))
def test_stitcher_reproduces_a_probability_field_exactly(h: int, w: int, tile: int, frac: float, kind: str, seed: int) -> None:
    """Tiles cut from a field of logits and blended back give the field's classes and softmax
    confidence: no seams, no double counting. Each pixel's classes are a permutation of logits 0,
    1.5, 3 (no near-ties, so the argmax is exact whatever the rounding)."""
    overlap = int(tile * frac)
    rng = np.random.default_rng(seed)
    field = (rng.random((3, h, w)).argsort(0) * 1.5).astype(np.float32)
    probs = np.exp(field - field.max(0)) / np.exp(field - field.max(0)).sum(0)  # numpy's own softmax
    acc = StripAccumulator(TilePlan(h, w, tile, overlap, kind), 3)
    rows, cols = window_starts(h, tile, overlap), window_starts(w, tile, overlap)
    padded = np.pad(field, ((0, 0), (0, rows[-1] + tile - h), (0, cols[-1] + tile - w)), mode="edge")
    labels, conf = [], []
    for r, y in enumerate(rows):
        for c, x in enumerate(cols):
            out = acc.add_logits(r, c, padded[:, y : y + tile, x : x + tile].copy())
            if out is not None:
                labels.append(out[0])
                conf.append(out[1])
    assert np.array_equal(np.concatenate(labels), field.argmax(0))
    np.testing.assert_allclose(np.concatenate(conf).astype(np.float32), probs.max(0), atol=1e-3, rtol=0)  # float16


@settings(max_examples=60, deadline=None)
@given(classes=st.integers(1, 12), h=st.integers(1, 20), w=st.integers(1, 20), levels=st.integers(1, 4),
       seed=st.integers(0, 10_000))
def test_class_argmax_is_numpy_argmax_ties_included(classes: int, h: int, w: int, levels: int, seed: int) -> None:
    """Few distinct values make ties common: the first class must win them, as argmax(0)."""
    scores = np.random.default_rng(seed).integers(0, levels, (classes, h, w)).astype(np.float32)
    labels, best = class_argmax(scores)
    assert labels.dtype == np.int16 and np.array_equal(labels, scores.argmax(0)) and np.array_equal(best, scores.max(0))


def test_logits_blend_like_their_softmax_and_are_used_in_place() -> None:
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((2, 4, 32, 32)) * 20).astype(np.float32)  # large: the max shift matters
    weights = blend_weights(32, "gaussian", 8)

    def softmax(z: np.ndarray) -> np.ndarray:  # an independent reference, in float64
        shifted = np.exp(z.astype(np.float64) - z.max(-3, keepdims=True))
        return shifted / shifted.sum(-3, keepdims=True)

    expected = (softmax(logits) * weights).astype(np.float32)
    batch = logits.copy()
    got = weighted_softmax(batch, weights)
    assert got is batch and np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    half = logits.astype(np.float16)  # an FP16 model's logits: converted, not modified
    before = half.copy()
    np.testing.assert_allclose(weighted_softmax(half, weights), softmax(half) * weights, atol=1e-6)
    assert np.array_equal(half, before)


def test_accumulator_memory_does_not_grow_with_height() -> None:
    short = StripAccumulator(TilePlan(200, 5000, 64, 16), 10).nbytes()
    tall = StripAccumulator(TilePlan(200_000, 5000, 64, 16), 10).nbytes()
    assert short == tall
    # and with width only by the overlap band: C × overlap × W floats (+ one row of tiles' labels)
    wide = StripAccumulator(TilePlan(200, 10_000, 64, 16), 10).nbytes()
    assert wide - short <= (10 * 16 * 5000 * 4 + 16 * 5000 * 4) + 48 * 5000 * 4  # carry + weights + one label/conf row


# ------------------------------------------------------------------------------ end to end with echo models


class EchoBackend(Backend):
    """A 'model' whose logits are the one-hot of band 0: predict must return the input labels."""

    name = "echo"

    def __init__(self, classes: int, tile: int = 32, divisor: int = 8, bands: int = 1) -> None:
        self.meta = ModelMeta(classes=[f"c{i}" for i in range(classes)], palette=[[i * 40, 0, 0] for i in range(classes)],
                              mean=[0.0] * bands, std=[1.0] * bands, max_pixel_value=1.0, bands=bands,
                              input_divisor=divisor, tile_size=tile)
        self.path = Path("echo")
        self.calls = 0

    @classmethod
    def load(cls, path: Path, **options: object) -> EchoBackend:
        return cls(int(options.get("classes", 3)))  # type: ignore[arg-type]

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        labels = np.clip(np.round(batch[:, 0]), 0, self.meta.num_classes - 1).astype(np.int64)
        return np.moveaxis(np.eye(self.meta.num_classes, dtype=np.float32)[labels], -1, 1) * 20


class ConvBackend(EchoBackend):
    """A small random CNN (receptive field 7 px) — for tiled vs whole-image agreement."""

    def __init__(self) -> None:
        super().__init__(4, tile=64, divisor=1, bands=3)
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.Conv2d(8, 4, 3, padding=1)).eval()

    @torch.inference_mode()
    def run(self, batch: np.ndarray) -> np.ndarray:
        return (self.net(torch.from_numpy(batch)) * 5).numpy()


def write_tif(path: Path, arr: np.ndarray, nodata: float | None = None, crs: str | None = "EPSG:32633") -> None:
    bands = arr[None] if arr.ndim == 2 else arr
    with rasterio.open(path, "w", driver="GTiff", width=bands.shape[2], height=bands.shape[1], count=bands.shape[0],
                       dtype=str(bands.dtype), crs=crs, transform=from_origin(300_000, 4_000_000, 10, 10) if crs else None,
                       nodata=nodata) as dst:
        dst.write(bands)


@pytest.mark.parametrize(("h", "w", "tile", "overlap", "blend"), [
    (300, 217, 32, 8, "gaussian"), (20, 25, 32, 16, "hann"), (129, 65, 64, 0, "pyramid"), (97, 150, 32, 16, "crop"),
])
def test_identity_model_reproduces_the_labels_exactly(tmp_path: Path, h: int, w: int, tile: int, overlap: int,
                                                       blend: str) -> None:
    labels = np.random.default_rng(1).integers(0, 5, (h, w)).astype(np.uint8)
    write_tif(tmp_path / "in.tif", labels)
    res = predict_file(EchoBackend(5, tile), tmp_path / "in.tif", tmp_path / "out.tif",
                       PredictOptions(tile=tile, overlap=overlap, batch=3, blend=blend))
    with rasterio.open(tmp_path / "out.tif") as out:
        assert np.array_equal(out.read(1), labels)
    assert res.tiles == len(window_starts(h, tile, overlap)) * len(window_starts(w, tile, overlap))


def test_tiled_output_matches_whole_image_inference_when_overlap_covers_the_receptive_field(tmp_path: Path) -> None:
    img = (np.random.default_rng(2).random((3, 150, 190)) * 255).astype(np.uint8)
    write_tif(tmp_path / "in.tif", img)
    backend = ConvBackend()
    backend.meta.max_pixel_value = 255.0
    # the whole image, padded past its right/bottom edge the way tiles are (reflect), in one pass
    ph = window_starts(150, 64, 16)[-1] + 64 - 150
    pw = window_starts(190, 64, 16)[-1] + 64 - 190
    x = torch.nn.functional.pad(torch.from_numpy(img[None].astype(np.float32) / 255), (0, pw, 0, ph), mode="reflect")
    whole = backend(x.numpy()).argmax(1)[0, :150, :190]
    for blend, min_agree in (("crop", 1.0), ("gaussian", 0.999)):
        predict_file(backend, tmp_path / "in.tif", tmp_path / f"{blend}.tif",
                     PredictOptions(tile=64, overlap=16, batch=4, blend=blend))
        with rasterio.open(tmp_path / f"{blend}.tif") as out:
            agree = (out.read(1) == whole).mean()
        assert agree >= min_agree, (blend, agree)


def test_georeference_nodata_and_colormap_survive_and_nodata_never_leaks(tmp_path: Path) -> None:
    labels = np.random.default_rng(3).integers(1, 4, (200, 160)).astype(np.uint8)
    labels[:70, :] = 0  # a nodata region larger than a tile: its tiles are skipped
    labels[150:160, 100:110] = 0  # and a small hole
    write_tif(tmp_path / "in.tif", labels, nodata=0)
    backend = EchoBackend(4, 32)
    res = predict_file(backend, tmp_path / "in.tif", tmp_path / "out.tif",
                       PredictOptions(tile=32, overlap=8, batch=4, probs=True))
    assert res.skipped_tiles >= 5
    with rasterio.open(tmp_path / "in.tif") as src, rasterio.open(tmp_path / "out.tif") as out:
        assert out.crs == src.crs and out.transform == src.transform and out.nodata == 255
        assert out.colormap(1)[2][:3] == (80, 0, 0) and out.tags()["segdeploy"] == "complete"
        assert out.profile["tiled"] and out.compression.value.lower() == "deflate"
        pred = out.read(1)
    assert np.array_equal(pred == 255, labels == 0)
    assert np.array_equal(pred[labels != 0], labels[labels != 0])  # nodata never blended into neighbours
    with rasterio.open(tmp_path / "out.probs.tif") as pr:
        conf = pr.read(1)
    assert conf[labels == 0].tolist() == [255] * int((labels == 0).sum()) and conf[labels != 0].min() >= 99


def test_resume_continues_an_interrupted_run_and_gives_the_same_output(tmp_path: Path) -> None:
    img = (np.random.default_rng(4).random((3, 700, 300)) * 255).astype(np.uint8)
    write_tif(tmp_path / "in.tif", img)
    backend = ConvBackend()
    backend.meta.max_pixel_value = 255.0
    opts = PredictOptions(tile=64, overlap=16, batch=4)
    predict_file(backend, tmp_path / "in.tif", tmp_path / "ref.tif", opts)
    out = tmp_path / "out.tif"
    def interrupt_after_tile_60(done: int, total: int, pixels: int) -> None:  # Ctrl-C, injected from outside
        if done >= 60:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict_file(backend, tmp_path / "in.tif", out, opts, progress=interrupt_after_tile_60)
    assert not out.exists()  # an unfinished output never sits at the final path
    state = json.loads((tmp_path / "out.tif.partial.json").read_text())
    assert 0 < state["rows_on_disk"] < 700
    with pytest.raises(UserError, match=r"unfinished prediction of .*out.tif exists .*pass --resume to continue it"):
        predict_file(backend, tmp_path / "in.tif", out, opts)  # a rerun without --resume does not start over
    assert json.loads((tmp_path / "out.tif.partial.json").read_text()) == state
    with pytest.raises(UserError, match="other settings"):
        predict_file(backend, tmp_path / "in.tif", out, PredictOptions(tile=64, overlap=8, resume=True))
    res = predict_file(backend, tmp_path / "in.tif", out, PredictOptions(tile=64, overlap=16, batch=4, resume=True))
    assert res.resumed_from_row == state["rows_on_disk"]
    with rasterio.open(tmp_path / "ref.tif") as a, rasterio.open(out) as b:
        assert np.array_equal(a.read(1), b.read(1))
    assert not (tmp_path / "out.tif.partial.json").exists()


def test_png_input_gives_class_png_and_overlay(tmp_path: Path) -> None:
    from PIL import Image

    labels = np.random.default_rng(5).integers(0, 3, (40, 50)).astype(np.uint8)
    Image.fromarray(labels).save(tmp_path / "x.png")
    res = predict_file(EchoBackend(3, 32), tmp_path / "x.png", tmp_path / "x_pred.png", PredictOptions(tile=32, overlap=8))
    assert [Path(f).name for f in res.files] == ["x_pred.png", "x_pred_overlay.png"]
    out = Image.open(tmp_path / "x_pred.png")
    assert out.mode == "P" and np.array_equal(np.asarray(out), labels)


def test_ungeoreferenced_tiff_works_with_a_warning(tmp_path: Path) -> None:
    write_tif(tmp_path / "plain.tif", np.ones((40, 40), np.uint8), crs=None)
    with pytest.warns(UserWarning, match="no georeference"):
        predict_file(EchoBackend(3, 32), tmp_path / "plain.tif", tmp_path / "o.tif", PredictOptions(tile=32, overlap=8))
    assert (tmp_path / "o.tif").exists()


def test_bad_inputs_are_clear_and_leave_nothing_that_looks_finished(tmp_path: Path) -> None:
    backend = EchoBackend(3, 32)
    with pytest.raises(DataError, match="not found"):
        predict_file(backend, tmp_path / "missing.tif", tmp_path / "o.tif", PredictOptions())
    write_tif(tmp_path / "rgb.tif", np.ones((3, 40, 40), np.uint8))
    with pytest.raises(DataError, match="has 3 bands but the model expects 1"):
        predict_file(backend, tmp_path / "rgb.tif", tmp_path / "o.tif", PredictOptions())
    write_tif(tmp_path / "c.tif", np.ones((40, 40), np.complex64))
    with pytest.raises(DataError, match="pixel type complex64"):
        predict_file(backend, tmp_path / "c.tif", tmp_path / "o.tif", PredictOptions())
    write_tif(tmp_path / "big.tif", np.ones((600, 600), np.uint8))
    data = (tmp_path / "big.tif").read_bytes()
    (tmp_path / "trunc.tif").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match="trunc.tif"):
        predict_file(backend, tmp_path / "trunc.tif", tmp_path / "t.tif", PredictOptions(tile=32, overlap=8))
    assert not (tmp_path / "t.tif").exists()
    (tmp_path / "garbage.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(DataError, match="cannot open raster .*garbage.tif"):
        predict_file(backend, tmp_path / "garbage.tif", tmp_path / "g.tif", PredictOptions())
    with pytest.raises(UserError, match="half the tile"):
        predict_file(backend, tmp_path / "big.tif", tmp_path / "o.tif", PredictOptions(tile=32, overlap=20))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="cannot create output directory"):
        predict_file(backend, tmp_path / "big.tif", tmp_path / "afile" / "o.tif", PredictOptions(tile=32, overlap=8))


def test_only_the_reader_thread_touches_the_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GDAL datasets are not thread-safe (the writer's mask reads once collided with the reader's
    tile reads on a 20000² scene: "Read failed"), and reading the masks twice cost a second decode:
    validity travels with the tiles, and the input is opened once."""
    labels = np.random.default_rng(5).integers(1, 4, (90, 70)).astype(np.uint8)
    labels[20:25, 30:33] = 0  # a hole inside a tile
    write_tif(tmp_path / "in.tif", labels, nodata=0)
    opened = []
    real_open = rasterio.open

    def counting_open(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if str(path) == str(tmp_path / "in.tif"):
            opened.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(rasterio, "open", counting_open)
    predict_file(EchoBackend(4, 32), tmp_path / "in.tif", tmp_path / "out.tif", PredictOptions(tile=32, overlap=8))
    assert len(opened) == 1
    with real_open(tmp_path / "out.tif") as out:
        assert np.array_equal(out.read(1) == 255, labels == 0)


def test_default_overlap_is_an_eighth_of_the_tile_so_small_tiles_work(tmp_path: Path) -> None:
    """A fixed 64 px default failed outright for a model trained on 96² crops (> half the tile)."""
    from segdeploy.predict import default_overlap

    assert [default_overlap(t) for t in (64, 96, 128, 256, 512)] == [8, 8, 16, 32, 64]
    labels = np.random.default_rng(7).integers(0, 4, (200, 150)).astype(np.uint8)
    write_tif(tmp_path / "in.tif", labels)
    res = predict_file(EchoBackend(4, tile=96, divisor=32), tmp_path / "in.tif", tmp_path / "out.tif", PredictOptions())
    assert res.tiles == len(window_starts(200, 96, 8)) * len(window_starts(150, 96, 8))
    with rasterio.open(tmp_path / "out.tif") as out:
        assert np.array_equal(out.read(1), labels)


def test_cog_output_validates_and_its_overviews_never_average_classes(tmp_path: Path) -> None:
    from rio_cogeo.cogeo import cog_validate

    blocks = (np.indices((700, 600)).sum(0) // 2 % 2 * 3).astype(np.uint8)  # classes 0 and 3 only, 1 px stripes
    blocks[:40, :40] = 0
    write_tif(tmp_path / "in.tif", blocks)
    res = predict_file(EchoBackend(4, 64), tmp_path / "in.tif", tmp_path / "out.tif",
                       PredictOptions(tile=64, overlap=8, probs=True, cog=True, preview=False))
    assert res.files == [str(tmp_path / "out.tif"), str(tmp_path / "out.probs.tif")]
    for path in res.files:
        valid, errors, _ = cog_validate(path)
        assert valid and not errors, errors
    with rasterio.open(tmp_path / "out.tif") as out:
        assert np.array_equal(out.read(1), blocks) and out.overviews(1)  # full resolution exact, overviews exist
        assert out.colormap(1)[3][:3] == (120, 0, 0) and out.tags()["segdeploy"] == "complete"
        small = out.read(1, out_shape=(out.height // 4, out.width // 4))  # read from an overview
    assert set(np.unique(small)) <= {0, 3}  # mode: a 0/3 stripe pattern never becomes 1 or 2
    assert not list(tmp_path.glob(".*"))  # no partial or COG temporaries left


def test_every_cpu_backend_returns_logits_the_caller_owns(tiny_run: Path, tiny_onnx: Path) -> None:
    """predict's writer thread softmaxes a batch's logits in place while the next batch runs: a
    backend that handed out (or later reused) its own buffer would corrupt them."""
    from segdeploy.runtime import load_backend

    rng = np.random.default_rng(0)
    first, second = (rng.standard_normal((2, 3, 64, 64), dtype=np.float32) for _ in range(2))
    for model in (tiny_run, tiny_onnx):
        backend = load_backend(model, device="cpu")
        logits = backend(first)
        kept = logits.copy()
        later = backend(second)
        assert logits.dtype == np.float32 and logits.flags.writeable, model
        assert not np.shares_memory(logits, later) and np.array_equal(logits, kept), model


def test_a_tile_below_the_models_smallest_is_refused_and_the_suggested_tile_works(tmp_path: Path) -> None:
    write_tif(tmp_path / "in.tif", np.random.default_rng(5).integers(0, 3, (80, 70)).astype(np.uint8))
    backend = EchoBackend(3, tile=64)
    backend.meta.min_tile_size = 64  # e.g. PAN at stride 16 needs 128; recorded by training
    with pytest.raises(UserError, match=r"--tile 32 is below the smallest tile 64 the model runs at; use --tile 64"):
        predict_file(backend, tmp_path / "in.tif", tmp_path / "out.tif", PredictOptions(tile=32))
    predict_file(backend, tmp_path / "in.tif", tmp_path / "out.tif", PredictOptions(tile=64, preview=False))
    with rasterio.open(tmp_path / "out.tif") as out, rasterio.open(tmp_path / "in.tif") as src:
        assert np.array_equal(out.read(1), src.read(1))


def test_a_static_size_model_refuses_another_tile_and_says_when_it_replaces_the_default(tmp_path: Path) -> None:
    """A model exported at one size never silently replaces the --tile the user gave; without
    --tile its one size is used and the result's notes say so."""
    labels = np.random.default_rng(6).integers(0, 3, (80, 70)).astype(np.uint8)
    write_tif(tmp_path / "in.tif", labels)
    backend = EchoBackend(3, tile=64)
    backend.meta.static_size = 32  # a static export at 32² of a model trained at 64²
    with pytest.raises(UserError, match=r"--tile 64: echo accepts only 32×32 inputs .*pass --tile 32, or drop --tile"):
        predict_file(backend, tmp_path / "in.tif", tmp_path / "out.tif", PredictOptions(tile=64))
    assert not (tmp_path / "out.tif").exists()
    res = predict_file(backend, tmp_path / "in.tif", tmp_path / "out.tif", PredictOptions(overlap=8, preview=False))
    assert "tile 32: the model accepts only 32×32 inputs (trained at 64)" in res.notes
    assert res.tiles == len(window_starts(80, 32, 8)) * len(window_starts(70, 32, 8))
    with rasterio.open(tmp_path / "out.tif") as out:
        assert np.array_equal(out.read(1), labels)


def test_each_rasters_peak_rss_is_measured_during_that_raster_not_the_process_lifetime(tmp_path: Path) -> None:
    """In a many-raster run, a raster's `peak_rss_mb` is the resident memory sampled while it ran:
    a 400 MB block the process held (and gave back) before is not in it, though it stays in the
    process's high-water mark."""
    from segdeploy.utils import peak_rss_mb

    write_tif(tmp_path / "in.tif", np.random.default_rng(7).integers(0, 3, (64, 64)).astype(np.uint8))
    before = np.ones(400 * 2**20 // 8)  # touched: resident; freed by munmap when deleted
    del before
    res = predict_file(EchoBackend(3, tile=32), tmp_path / "in.tif", tmp_path / "out.tif",
                       PredictOptions(overlap=0, preview=False))
    assert 0 < res.peak_rss_mb < peak_rss_mb() - 300
