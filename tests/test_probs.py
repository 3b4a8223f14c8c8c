"""Issue 21, parts 1-3: every class's probability (`predict --probs all`), test-time augmentation
inside the tiler (`--tta`), decision thresholds (`--threshold`, `--min-confidence`,
`eval --thresholds`). Expected values are computed independently with numpy, onnxruntime and
rasterio; models are numpy fakes or the session's tiny ONNX export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from segdeploy.artifact import ModelMeta, Run
from segdeploy.decision import WITHHELD, Decision, decide, parse_thresholds, quantize_probs, resolve
from segdeploy.errors import UserError
from segdeploy.predict import PredictOptions, predict_file
from segdeploy.tiling import TTA_MODES, tta_forward
from tests.test_predict import ConvBackend, EchoBackend, write_tif


class ProbabilityBackend(EchoBackend):
    """Two classes; band 0 of the input is class 1's probability p (logits [0, log(p / (1 - p))])."""

    def __init__(self) -> None:
        super().__init__(2, tile=32)

    def run(self, batch: np.ndarray) -> np.ndarray:
        p = np.clip(batch[:, 0].astype(np.float64), 1e-6, 1 - 1e-6)
        return np.stack([np.zeros_like(p), np.log(p / (1 - p))], axis=1).astype(np.float32)


def _scene(tmp_path: Path) -> Path:
    img = (np.random.default_rng(2).random((3, 150, 190)) * 255).astype(np.uint8)
    img[:, :40, :70] = 0  # nodata: more than a tile, so some tiles are skipped
    img[:, 100:104, 120:125] = 0  # and a hole inside a tile
    write_tif(tmp_path / "in.tif", img, nodata=0)
    return tmp_path / "in.tif"


def _conv() -> ConvBackend:
    backend = ConvBackend()
    backend.meta.max_pixel_value = 255.0
    return backend


def test_probs_all_is_the_blended_softmax_the_class_map_came_from(tmp_path: Path) -> None:
    src = _scene(tmp_path)
    backend = _conv()
    for dtype in ("float32", "uint8"):
        predict_file(backend, src, tmp_path / f"{dtype}.tif", PredictOptions(tile=64, overlap=16, batch=3, class_probs=True,
                                                                            probs_dtype=dtype, preview=False))
    with rasterio.open(tmp_path / "float32.tif") as out, rasterio.open(src) as inp:
        labels, invalid = out.read(1), (inp.read() == 0).all(0)  # an integer raster: nodata in every band
    with rasterio.open(tmp_path / "float32.probs.tif") as f, rasterio.open(tmp_path / "uint8.probs.tif") as q:
        assert f.descriptions == q.descriptions == ("c0", "c1", "c2", "c3") and q.dtypes[0] == "uint8"
        assert f.crs == q.crs == inp.crs and f.transform == inp.transform
        exact, quant = f.read(masked=True), q.read(masked=True)
    assert np.array_equal(exact.mask[0], invalid) and np.array_equal(quant.mask[0], invalid)  # nodata where invalid
    assert np.array_equal(labels == 255, invalid)
    p, u = exact.data[:, ~invalid], quant.data[:, ~invalid]
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-5)  # a probability distribution per pixel
    assert np.array_equal(p.argmax(0), labels[~invalid])  # exactly the class raster
    assert np.array_equal(u, np.rint(p * 255).astype(np.uint8))  # the documented scaling, round(p·255)
    # the quantised bands' argmax differs only where the top two classes share a 1/255 step
    differ = u.argmax(0) != labels[~invalid]
    top2 = np.sort(p, axis=0)[-2:]
    assert np.all(top2[1, differ] - top2[0, differ] < 1 / 255)
    assert np.all(u.max(0)[differ] == np.take_along_axis(u, labels[~invalid][None].astype(int), 0)[0, differ])
    assert differ.mean() < 0.02  # 331 of 25680 px here: a random model, its top classes close everywhere


def test_probs_all_resumes_byte_identically_and_cogs_with_average_overviews(tmp_path: Path) -> None:
    from rio_cogeo.cogeo import cog_validate

    img = (np.random.default_rng(4).random((3, 700, 120)) * 255).astype(np.uint8)
    write_tif(tmp_path / "in.tif", img)
    backend = _conv()
    opts = {"tile": 64, "overlap": 16, "batch": 4, "class_probs": True, "preview": False}
    predict_file(backend, tmp_path / "in.tif", tmp_path / "ref.tif", PredictOptions(**opts))

    def interrupt(done: int, total: int, pixels: int) -> None:
        if done >= 40:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict_file(backend, tmp_path / "in.tif", tmp_path / "out.tif", PredictOptions(**opts), progress=interrupt)
    assert 0 < json.loads((tmp_path / "out.tif.partial.json").read_text())["rows_on_disk"] < 700
    predict_file(backend, tmp_path / "in.tif", tmp_path / "out.tif", PredictOptions(**opts, resume=True))
    for name in ("", ".probs"):
        assert (tmp_path / f"ref{name}.tif").read_bytes() == (tmp_path / f"out{name}.tif").read_bytes()
    # COG: 1 px stripes of classes 0 and 3: the probability bands' overviews average them (mode would not)
    stripes = (np.indices((600, 600)).sum(0) % 2 * 3).astype(np.uint8)
    write_tif(tmp_path / "stripes.tif", stripes)
    res = predict_file(EchoBackend(4, 64), tmp_path / "stripes.tif", tmp_path / "s.tif",
                       PredictOptions(tile=64, overlap=8, class_probs=True, cog=True, preview=False))
    assert res.files == [str(tmp_path / "s.tif"), str(tmp_path / "s.probs.tif")]
    valid, errors, _ = cog_validate(str(tmp_path / "s.probs.tif"))
    assert valid and not errors, errors
    with rasterio.open(tmp_path / "s.probs.tif") as pr:
        assert pr.overviews(1) and pr.descriptions == ("c0", "c1", "c2", "c3")
        small = pr.read(1, out_shape=(pr.height // 4, pr.width // 4))
    assert 120 <= small.mean() <= 135  # 255 and 0 alternating: averaged to about 127


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_tta_is_the_average_of_the_transformed_forwards_through_onnxruntime(tiny_onnx: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from segdeploy.artifact import read_onnx_meta
    from segdeploy.runtime import load_backend

    meta = read_onnx_meta(tiny_onnx)
    sess = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    t = meta.tile_size
    img = np.random.default_rng(0).integers(0, 256, (t, t, meta.bands)).astype(np.uint8)
    x = ((img.astype(np.float32) / np.float32(meta.max_pixel_value) - np.float32(meta.mean))
         / np.float32(meta.std)).transpose(2, 0, 1)[None].astype(np.float32)

    def forward(a: np.ndarray) -> np.ndarray:
        return _softmax(sess.run(None, {name: np.ascontiguousarray(a)})[0].astype(np.float64))

    # by hand: the tile and its mirror; every quarter turn, each also mirrored (undo each before averaging)
    flips = (forward(x) + forward(x[..., ::-1])[..., ::-1]) / 2
    d4 = sum(np.rot90(forward(np.rot90(x, k, (2, 3))), -k, (2, 3))
             + np.rot90(forward(np.rot90(x, k, (2, 3))[..., ::-1])[..., ::-1], -k, (2, 3)) for k in range(4)) / 8
    backend = load_backend(tiny_onnx)
    calls: list[int] = []

    def call(batch: np.ndarray, tiles: list[int]) -> np.ndarray:
        calls.append(len(batch))
        return backend(batch)

    for mode, expected in (("flips", flips), ("d4", d4)):
        calls.clear()

        np.testing.assert_allclose(tta_forward(call, x, mode), expected, atol=2e-6)
        assert calls == [len(TTA_MODES[mode])]  # every view of the tile in one batch
        np.testing.assert_allclose(tta_forward(call, x, mode, max_batch=3), expected, atol=2e-6)
    # and through predict: one tile, so the written probabilities are the TTA average itself
    write_tif(tmp_path / "tile.tif", img.transpose(2, 0, 1))
    predict_file(backend, tmp_path / "tile.tif", tmp_path / "o.tif", PredictOptions(
        tile=t, overlap=0, tta="d4", class_probs=True, probs_dtype="float32", preview=False))
    with rasterio.open(tmp_path / "o.probs.tif") as pr, rasterio.open(tmp_path / "o.tif") as out:
        np.testing.assert_allclose(pr.read(), d4[0], atol=2e-6)
        assert np.array_equal(out.read(1), d4[0].argmax(0))


def test_decide_threshold_ties_and_min_confidence_against_numpy() -> None:
    rng = np.random.default_rng(3)
    p1 = np.round(rng.random((40, 50)), 2).astype(np.float32)  # steps of 0.01: many exact ties at each T
    probs = np.stack([1 - p1, p1])
    w = rng.random((40, 50)).astype(np.float32) + 0.5  # a blend's weight sum: the rule depends on ratios only
    for t in (0.1, 0.3, 0.5, 0.75):
        labels, _ = decide(probs * w, Decision(threshold=t), w)
        expected = (p1.astype(np.float64) > t) if t != 0.5 else (probs.argmax(0) == 1)
        near = np.abs(p1 - t) < 1e-6  # an exact tie in float32 may fall either side of float64's T, not at 0.5
        assert np.array_equal(labels[~near], expected[~near]), t
    tie = np.full((2, 1, 1), 0.5, np.float32)
    assert decide(tie, Decision(threshold=0.5))[0][0, 0] == 0 and decide(tie)[0][0, 0] == 0  # a tie goes to class 0
    scores = rng.dirichlet(np.ones(4), (30, 30)).transpose(2, 0, 1).astype(np.float32)
    labels, _ = decide(scores, Decision(min_confidence=0.5))
    assert np.array_equal(labels == WITHHELD, scores.max(0) < 0.5)
    assert np.array_equal(labels[labels >= 0], scores.argmax(0)[labels >= 0])
    assert quantize_probs(np.array([0, 0.5 / 255, 0.2, 1.0], np.float32)).tolist() == [0, 0, 51, 255]
    assert parse_thresholds("0.1:0.9:0.05")[-1] == 0.9 and len(parse_thresholds("0.1:0.9:0.05")) == 17
    with pytest.raises(UserError, match="strictly between 0 and 1"):
        parse_thresholds("0:1:0.5")


def test_threshold_and_min_confidence_in_predict(tmp_path: Path) -> None:
    p1 = (np.random.default_rng(5).integers(0, 100, (90, 70)) / 100 + 0.005).astype(np.float32)  # never on a T
    write_tif(tmp_path / "p.tif", p1)
    backend = ProbabilityBackend()
    for t in (None, 0.3, 0.8):
        res = predict_file(backend, tmp_path / "p.tif", tmp_path / f"t{t}.tif", PredictOptions(
            tile=32, overlap=8, decision=Decision(threshold=t), preview=False))
        with rasterio.open(tmp_path / f"t{t}.tif") as out:
            assert np.array_equal(out.read(1), (p1 > (0.5 if t is None else t)).astype(np.uint8)), t
        assert res.decision == {"threshold": t, "min_confidence": None}
    res = predict_file(backend, tmp_path / "p.tif", tmp_path / "mc.tif", PredictOptions(
        tile=32, overlap=8, decision=Decision(min_confidence=0.7), preview=False))
    uncertain = np.maximum(p1, 1 - p1) < 0.7
    with rasterio.open(tmp_path / "mc.tif") as out:
        assert np.array_equal(out.read(1) == 255, uncertain)
    assert res.withheld_pixels == int(uncertain.sum()) and res.withheld_share == pytest.approx(uncertain.mean(), abs=1e-6)
    with pytest.raises(UserError, match="--threshold is for two-class models"):
        predict_file(EchoBackend(3, 32), tmp_path / "p.tif", tmp_path / "x.tif",
                     PredictOptions(decision=Decision(threshold=0.4)))


def test_predict_applies_the_threshold_eval_recorded_and_says_so(tmp_path: Path) -> None:
    meta = ModelMeta(classes=["background", "lesion"], palette=[[0, 0, 0], [255, 0, 0]], mean=[0.0], std=[1.0],
                     max_pixel_value=1.0, bands=1, input_divisor=8, tile_size=32)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text("{}\n")
    (tmp_path / "run" / "meta.json").write_text(json.dumps({"status": "complete", "model_meta": meta.to_dict()}))
    run = Run(tmp_path / "run")
    assert resolve(run.root, None, None) == (Decision(), "")  # nothing recorded: argmax
    run.write_threshold({"threshold": 0.35, "metric": "IoU of lesion", "score": 0.61, "split": "val"})
    decision, note = resolve(run.root, None, None)
    assert decision == Decision(threshold=0.35) and "recorded by `segdeploy eval --thresholds` on the val split" in note
    assert resolve(run.root, 0.6, None)[0] == Decision(threshold=0.6)  # --threshold overrides


def test_probs_flag_forms_and_refusals_on_the_cli(tiny_onnx: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from segdeploy.cli import app

    img = (np.random.default_rng(6).random((3, 80, 70)) * 255).astype(np.uint8)
    write_tif(tmp_path / "in.tif", img)
    runner = CliRunner()
    base = ["predict", str(tiny_onnx)]
    # the old form: a bare --probs before an input still means the confidence raster
    res = runner.invoke(app, [*base, "--probs", str(tmp_path / "in.tif"), "--out", str(tmp_path / "a.tif"), "--no-progress"])
    assert res.exit_code == 0, res.output
    with rasterio.open(tmp_path / "a.probs.tif") as pr:
        assert pr.count == 1
    res = runner.invoke(app, [*base, str(tmp_path / "in.tif"), "--out", str(tmp_path / "b.tif"), "--probs", "all",
                              "--tta", "flips", "--min-confidence", "0.5", "--no-progress", "--json", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "b.json").read_text())
    assert summary["decision"]["min_confidence"] == 0.5 and summary["decision"]["tta"] == "flips"
    assert 0 <= summary["results"][0]["withheld_share"] <= 1
    with rasterio.open(tmp_path / "b.probs.tif") as pr:
        assert pr.count == len(json.loads(json.dumps(pr.descriptions))) > 2
    res = runner.invoke(app, [*base, str(tmp_path / "in.tif"), "--out", str(tmp_path / "c.tif"), "--threshold", "0.4"])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert "--threshold is for two-class models" in res.output and "--min-confidence" in res.output
    res = runner.invoke(app, ["eval", str(tiny_onnx), "--thresholds", "0.3,0.5", "--out", str(tmp_path / "ev")])
    assert res.exit_code == 2 and "--thresholds is for two-class models" in res.output
    assert not (tmp_path / "ev").exists()


class ImageProbabilityBackend(ProbabilityBackend):
    """`ProbabilityBackend` for 3-band uint8 images: band 0 / 255 is class 1's probability."""

    def __init__(self) -> None:
        super().__init__()
        self.meta = ModelMeta(classes=["background", "lesion"], palette=[[0, 0, 0], [255, 0, 0]], mean=[0.0] * 3,
                              std=[1.0] * 3, max_pixel_value=255.0, bands=3, input_divisor=8, tile_size=32)
        self.path = Path("probability")


def _binary_run(tmp_path: Path) -> tuple[Path, Path, list[tuple[np.ndarray, np.ndarray]]]:
    """A hand-built two-class run, its recipe and a val split of 4 images whose band 0 is p(lesion)."""
    from PIL import Image

    rng = np.random.default_rng(9)
    (tmp_path / "data" / "val").mkdir(parents=True)
    pairs = []
    for i in range(4):
        p = rng.integers(0, 256, (40, 56)).astype(np.uint8)
        truth = (p > 100) ^ (rng.random(p.shape) < 0.1)  # a noisy truth: the best T is near 100/255
        Image.fromarray(np.stack([p, p // 2, p // 3], -1)).save(tmp_path / "data" / "val" / f"{i}_img.png")
        Image.fromarray((truth * 255).astype(np.uint8)).save(tmp_path / "data" / "val" / f"{i}_mask.png")
        pairs.append((p, truth))
    recipe = tmp_path / "binary.yaml"
    recipe.write_text(f"""name: binary
data: {{root: {tmp_path / 'data'}, image_dir: "{{split}}", mask_dir: "{{split}}", image_suffix: _img.png,
       mask_suffix: _mask.png, mask_encoding: binary, tile_size: 32}}
classes: {{names: [background, lesion]}}
model: {{arch: unet, encoder: resnet18, weights: null}}
""")
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(recipe.read_text())
    (run / "meta.json").write_text(json.dumps({"status": "complete",
                                               "model_meta": ImageProbabilityBackend().meta.to_dict()}))
    return run, recipe, pairs


def test_eval_threshold_sweep_and_tta_against_numpy_and_predict_applies_the_best(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from segdeploy.cli.evaluate import _print_tta_and_sweep
    from segdeploy.evaluate import evaluate

    run, recipe, pairs = _binary_run(tmp_path)
    report = evaluate(run, "val", recipe_path=recipe, backend=ImageProbabilityBackend(), tta="d4",
                      thresholds=parse_thresholds("0.21:0.61:0.1"))  # no k/255 on a T
    for row in report.sweep.rows():  # independently: class 1 where p > T, IoU/Dice over all images
        pred = np.concatenate([(p.astype(np.float64) / 255 > row["threshold"]).ravel() for p, _ in pairs])
        truth = np.concatenate([t.ravel() for _, t in pairs])
        inter, union = (pred & truth).sum(), (pred | truth).sum()
        assert row["iou"] == pytest.approx(inter / union, abs=1e-6)
        assert row["dice"] == pytest.approx(2 * inter / (pred.sum() + truth.sum()), abs=1e-6)
    best = max(report.sweep.rows(), key=lambda r: r["iou"])
    recorded = json.loads((run / "threshold.json").read_text())
    assert recorded["threshold"] == best["threshold"] == pytest.approx(0.41) and recorded["split"] == "val"
    assert (report.out_dir / "thresholds.png").is_file()
    # a per-pixel model is unchanged by rotations and mirrors: TTA must give the same IoU (views undone exactly)
    np.testing.assert_allclose(report.tta.metrics.iou, report.metrics.iou, atol=1e-9)
    assert report.tta.seconds > 0 and report.tta.mode == "d4"
    _print_tta_and_sweep(report)
    shown = capsys.readouterr().err
    assert "IoU with d4" in shown and f"best threshold {best['threshold']:g} (recorded in {run / 'threshold.json'}" in shown
    decision, note = resolve(run, None, None)
    assert decision.threshold == best["threshold"] and "threshold.json" in note
    again = evaluate(run, "val", recipe_path=recipe, backend=ImageProbabilityBackend())  # eval applies it too
    assert again.decision["threshold"] == best["threshold"]
    assert again.metrics.iou[1] == pytest.approx(best["iou"], abs=1e-6)


def _probability_onnx(path: Path, meta: ModelMeta) -> Path:
    """An ONNX model whose class-1 probability is its input's band 0 (logits [0, log(p / (1 - p))])."""
    import onnx
    from onnx import TensorProto, helper

    from segdeploy.artifact import write_onnx_meta

    const = [helper.make_tensor(n, TensorProto.FLOAT if t == "f" else TensorProto.INT64, [len(v)], v)
             for n, t, v in (("lo", "f", [1e-6]), ("hi", "f", [1 - 1e-6]), ("one", "f", [1.0]), ("zero", "f", [0.0]),
                             ("s", "i", [0]), ("e", "i", [1]), ("ax", "i", [1]))]
    nodes = [helper.make_node("Slice", ["x", "s", "e", "ax"], ["b0"]),
             helper.make_node("Clip", ["b0", "lo_s", "hi_s"], ["p"]),
             helper.make_node("Squeeze", ["lo"], ["lo_s"]), helper.make_node("Squeeze", ["hi"], ["hi_s"]),
             helper.make_node("Sub", ["one", "p"], ["q"]), helper.make_node("Div", ["p", "q"], ["odds"]),
             helper.make_node("Log", ["odds"], ["z"]), helper.make_node("Mul", ["z", "zero"], ["z0"]),
             helper.make_node("Concat", ["z0", "z"], ["logits"], axis=1)]
    graph = helper.make_graph(nodes, "probability", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2, "H", "W"])], const)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    write_onnx_meta(model, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def test_eval_thresholds_then_predict_on_the_cli_applies_the_recorded_threshold(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from segdeploy.cli import app

    run, recipe, pairs = _binary_run(tmp_path)
    onnx_path = _probability_onnx(run / "export" / "model.onnx", ImageProbabilityBackend().meta)
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(onnx_path), "--split", "val", "--thresholds", "0.21,0.41,0.61",
                              "--no-progress", "--json", str(tmp_path / "ev.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "threshold.json").read_text())["threshold"] == 0.41
    assert json.loads((tmp_path / "ev.json").read_text())["thresholds"]["best"]["threshold"] == 0.41
    p, _ = pairs[0]
    write_tif(tmp_path / "p.tif", np.stack([p, p // 2, p // 3]))
    res = runner.invoke(app, ["predict", str(onnx_path), str(tmp_path / "p.tif"), "--out", str(tmp_path / "o.tif"),
                              "--no-progress", "--json", str(tmp_path / "o.json")])
    assert res.exit_code == 0, res.output
    assert "decision: threshold 0.41 on the probability of 'lesion', recorded by" in " ".join(res.output.split())
    with rasterio.open(tmp_path / "o.tif") as out:
        assert np.array_equal(out.read(1), (p.astype(np.float64) / 255 > 0.41).astype(np.uint8))
    assert json.loads((tmp_path / "o.json").read_text())["decision"]["threshold"] == 0.41
    res = runner.invoke(app, ["predict", str(onnx_path), str(tmp_path / "p.tif"), "--out", str(tmp_path / "o2.tif"),
                              "--threshold", "0.61", "--no-progress"])
    with rasterio.open(tmp_path / "o2.tif") as out:  # --threshold overrides the record
        assert np.array_equal(out.read(1), (p.astype(np.float64) / 255 > 0.61).astype(np.uint8))


def test_bench_tta_column_times_every_view_in_one_batch() -> None:
    from segdeploy.bench import OK, BenchOptions, BenchRow, _time_row

    class Counting(EchoBackend):
        def run(self, batch: np.ndarray) -> np.ndarray:
            self.sizes.append(len(batch))
            return super().run(batch)

    backend = Counting(3, tile=32)
    backend.sizes = []

    class NoFlops:
        def get(self, bands: int, size: int) -> None:
            return None

    row = BenchRow("m", "fake", "fp32", 2, 32, OK)
    _time_row(row, backend, BenchOptions(size=32, min_iters=2, min_seconds=0, warmup=0, tta="d4"), NoFlops())
    assert row.tta == "d4" and row.tta_p50_ms > 0
    assert row.tta_mp_per_s == pytest.approx(2 * 32 * 32 / 1e6 / (row.tta_p50_ms / 1e3), rel=1e-3)
    assert backend.sizes[-2:] == [16, 16]  # 2 tiles × 8 views, one call each time
