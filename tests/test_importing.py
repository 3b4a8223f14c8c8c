"""`segdeploy import`: every form a user brings a model in (state dicts as notebooks, Lightning,
DataParallel and torch.compile save them; smp folders; TorchScript; torch.export; a pickled
model; foreign ONNX in NCHW and NHWC with logits, softmax, log-softmax, sigmoid and label heads)
becomes a run whose `predict` gives the original model's class map, computed here independently
with torch or onnxruntime; each misfit fails in one line that says why; the gate runs on
imported runs; the imported file is the run's source for the staleness checks."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import rasterio
import torch
from torch import nn
from typer.testing import CliRunner

from segdeploy.cli import app
from tests.conftest import RECIPES

RECIPE = RECIPES / "demo.yaml"
TILE = ["--set", "data.tile_size=64"]
BINARY = [*TILE, "--set", "classes.names=[background,lesion]", "--set", "classes.palette=null",
          "--set", "data.mask_encoding=binary"]
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def cli(*args: object) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result: object) -> str:
    """The error line of a failed command, checked to be its only output (no traceback)."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def _cbr(a: int, b: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU())


class TinySegNet(nn.Module):
    """A custom encoder-decoder segdeploy cannot build (max pooling down, bilinear up, a skip)."""

    def __init__(self, bands: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.e1, self.e2, self.d2, self.d1 = _cbr(bands, 8), _cbr(8, 16), _cbr(16, 8), _cbr(16, 8)
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.e1(x)
        b = self.e2(nn.functional.max_pool2d(a, 2))
        c = nn.functional.interpolate(self.d2(nn.functional.max_pool2d(b, 2)), scale_factor=4.0, mode="bilinear")
        return self.head(self.d1(torch.cat([c, a], 1)))


class Head(nn.Module):
    """TinySegNet with an NHWC input and/or a final activation, as people export them to ONNX."""

    def __init__(self, net: nn.Module, kind: str, nhwc: bool = False) -> None:
        super().__init__()
        self.net, self.kind, self.nhwc = net, kind, nhwc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x.permute(0, 3, 1, 2) if self.nhwc else x)
        y = {"logits": y, "softmax": y.softmax(1), "logsoftmax": y.log_softmax(1), "sigmoid": y.sigmoid(),
             "labels": y.argmax(1).to(torch.uint8)}[self.kind]
        return y.permute(0, 2, 3, 1) if self.nhwc and y.dim() == 4 else y


def spread(model: nn.Module) -> nn.Module:
    """Random weights that give varied class maps (so that agreeing on them means something)."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    last = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    last.weight.data.normal_(0, 1.0)
    return model.eval()


def export_onnx(model: nn.Module, path: Path, nhwc: bool = False, static: bool = False) -> Path:
    model.eval()  # the exporter restores the wrapper's mode afterwards, and the wrapped model's with it
    x = torch.zeros(1, 64, 64, 3) if nhwc else torch.zeros(1, 3, 64, 64)
    axes = None if static else {"image": {0: "n", 1: "h", 2: "w"} if nhwc else {0: "n", 2: "h", 3: "w"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["image"], output_names=["out"],
                          opset_version=17, dynamic_axes=axes)
    return path


ONNX_FILES = ("nchw_logits", "nhwc_softmax", "nchw_logsoftmax", "nhwc_labels", "sigmoid", "gate")


def make_sources(d: Path, synth_dir: Path) -> None:
    """Tiny models saved in every form, and a 64×128 raster (two 64² tiles) to predict."""
    import segmentation_models_pytorch as smp
    from safetensors.torch import save_file

    torch.manual_seed(0)
    unet = spread(smp.Unet("resnet18", encoder_weights=None, classes=5, activation="logsoftmax"))
    seg = spread(TinySegNet())
    sd = unet.state_dict()
    torch.save(sd, d / "unet.pth")
    torch.save({"epoch": 3, "state_dict": {f"model._orig_mod.{k}": v for k, v in sd.items()}
                | {"loss_fn.weight": torch.ones(5)}, "optimizer_states": [{"lr": 1e-3}]}, d / "lightning.ckpt")
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in sd.items()}}, d / "ddp.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "unet.safetensors"))
    unet.save_pretrained(d / "smp_folder")
    torch.save(unet, d / "unet_pickled.pth")
    torch.save(seg, d / "segnet_pickled.pth")
    torch.save(seg.state_dict(), d / "segnet_state.pth")
    torch.jit.script(seg).save(str(d / "segnet.ts"))
    dyn = torch.export.Dim("b", min=1, max=64)
    torch.export.save(torch.export.export(seg, (torch.zeros(2, 3, 64, 64),), dynamic_shapes=(
        {0: dyn, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO},)), d / "segnet.pt2")
    torch.export.save(torch.export.export(seg, (torch.zeros(1, 3, 64, 64),)), d / "segnet_static.pt2")
    # default init: small logits, as a trained model's are robust to INT8 (spread ones are not)
    torch.export.save(torch.export.export(TinySegNet().eval(), (torch.zeros(1, 3, 64, 64),)), d / "gate_static.pt2")
    export_onnx(Head(seg, "logits"), d / "nchw_logits.onnx")
    export_onnx(Head(seg, "softmax", nhwc=True), d / "nhwc_softmax.onnx", nhwc=True)
    export_onnx(Head(seg, "logsoftmax"), d / "nchw_logsoftmax.onnx")
    export_onnx(Head(seg, "labels", nhwc=True), d / "nhwc_labels.onnx", nhwc=True, static=True)
    export_onnx(Head(spread(TinySegNet(classes=1)), "sigmoid"), d / "sigmoid.onnx")
    # default init: small logits, as a trained model's are robust to INT8 (spread ones are not)
    export_onnx(Head(TinySegNet(), "softmax", nhwc=True), d / "gate.onnx", nhwc=True)
    with rasterio.open(synth_dir / "scene/scene.tif") as src:
        pixels, profile = src.read(window=((64, 128), (0, 128))), src.profile
    profile.update(height=64, width=128, nodata=None)
    with rasterio.open(d / "scene.tif", "w", **profile) as dst:
        dst.write(np.maximum(pixels, 1))  # no nodata pixels: every one is compared


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, synth_dir: Path) -> SimpleNamespace:
    """The sources (built once for every xdist worker; read-only) and the original models."""
    import segmentation_models_pytorch as smp

    from tests.conftest import shared

    d = shared(tmp_path_factory, "import_sources", lambda out: make_sources(out, synth_dir))
    unet = smp.Unet("resnet18", encoder_weights=None, classes=5, activation="logsoftmax")
    unet.load_state_dict(torch.load(d / "unet.pth", weights_only=True))
    seg = TinySegNet()
    seg.load_state_dict(torch.load(d / "segnet_state.pth", weights_only=True))
    with rasterio.open(d / "scene.tif") as src:
        pixels = src.read()
    x = ((pixels.transpose(1, 2, 0) / 255.0 - MEAN) / STD).astype(np.float32)  # H×W×3, normalised
    return SimpleNamespace(dir=d, unet=unet.eval(), seg=seg.eval(), onnx={n: d / f"{n}.onnx" for n in ONNX_FILES},
                           raster=d / "scene.tif", x=x, synth=synth_dir)


def windows(x: np.ndarray) -> list[np.ndarray]:
    """The two 64² tiles predict cuts the 64×128 raster into (tile 64, overlap 0), as 1×3×64×64."""
    return [x[:, c : c + 64].transpose(2, 0, 1)[None] for c in (0, 64)]


def torch_map(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """The original PyTorch model's class map, run directly."""
    with torch.no_grad():
        outs = [model(torch.from_numpy(w)).numpy() for w in windows(x)]
    return np.concatenate(outs, axis=3)[0].argmax(0)


def ort_map(path: Path, x: np.ndarray, nhwc: bool, kind: str) -> np.ndarray:
    """The original ONNX file's class map, run with onnxruntime directly."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = []
    for w in windows(x):
        (y,) = sess.run(None, {sess.get_inputs()[0].name: w.transpose(0, 2, 3, 1).copy() if nhwc else w})
        if kind == "labels":
            outs.append(y[0].astype(np.int64))
        elif kind == "sigmoid":
            outs.append((y[0, 0] > 0.5).astype(np.int64))
        else:
            outs.append((y[0].transpose(2, 0, 1) if nhwc else y[0]).argmax(0))
    return np.concatenate(outs, axis=1)


def import_run(source: Path | str, out: Path, *extra: str) -> Path:
    result = cli("import", source, "--recipe", RECIPE, "--out", out, *TILE, *extra)
    assert result.exit_code == 0, result.output
    return out


def predicted(run: Path, raster: Path, tmp: Path) -> np.ndarray:
    out = tmp / f"pred_{run.name}.tif"
    result = cli("predict", run, raster, "--out", out, "--tile", 64, "--overlap", 0, "--no-progress", "--no-preview")
    assert result.exit_code == 0, result.output
    with rasterio.open(out) as src:
        return src.read(1).astype(np.int64)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float((a == b).mean())


# ------------------------------------------------------------------------------------ each form, like the original


@pytest.mark.parametrize("name", ["unet.pth", "smp_folder"])
def test_a_state_dict_and_an_smp_folder_predict_the_original_class_map(made: SimpleNamespace, tmp_path: Path,
                                                                       name: str) -> None:
    run = import_run(made.dir / name, tmp_path / "run")
    want = torch_map(made.unet, made.x)
    assert len(np.unique(want)) >= 3  # a varied map: agreeing on it means something
    assert agreement(predicted(run, made.raster, tmp_path), want) >= 0.9999
    meta = json.loads((run / "meta.json").read_text())
    assert meta["model_format"] == "weights" and meta["imported_from"]["source"].endswith(name)


@pytest.mark.parametrize(("name", "said"), [
    ("lightning.ckpt", ["weights found under ['state_dict']", "model. + _orig_mod. removed", "1 tensor(s) outside"]),
    ("ddp.pt", ["weights found under ['model_state_dict']", "prefix module. removed"]),
    ("unet.safetensors", ["all 152 tensors loaded"])])
def test_checkpoints_nested_and_prefixed_load_every_tensor_exactly(made: SimpleNamespace, tmp_path: Path, name: str,
                                                                   said: list[str]) -> None:
    from safetensors.torch import load_file

    result = cli("import", made.dir / name, "--recipe", RECIPE, "--out", tmp_path / "run", *TILE)
    assert result.exit_code == 0, result.output
    for words in said:
        assert words in result.output, result.output
    saved = load_file(str(tmp_path / "run/model.safetensors"))
    original = made.unet.state_dict()
    assert saved.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(saved[key], value), key


@pytest.mark.parametrize(("name", "holds"), [("segnet.ts", "torchscript"), ("segnet.pt2", "exported_program"),
                                             ("segnet_static.pt2", "exported_program")])
def test_torchscript_and_torch_export_archives_need_no_python_class(made: SimpleNamespace, tmp_path: Path,
                                                                    name: str, holds: str) -> None:
    run = import_run(made.dir / name, tmp_path / "run")
    meta = json.loads((run / "meta.json").read_text())
    assert meta["model_format"] == holds
    mm = meta["model_meta"]
    if name == "segnet_static.pt2":  # torch.export fixed batch and size: measured, recorded
        assert (mm["static_size"], mm["static_batch"]) == (64, 1)
    else:
        assert (mm["static_size"], mm["static_batch"], mm["input_divisor"]) == (None, None, 4)
    assert agreement(predicted(run, made.raster, tmp_path), torch_map(made.seg, made.x)) >= 0.9999


def test_a_pickled_model_is_refused_with_the_two_safe_ways_and_loads_when_trusted(made: SimpleNamespace,
                                                                                   tmp_path: Path) -> None:
    err = one_line_error(cli("import", made.dir / "segnet_pickled.pth", "--recipe", RECIPE, "--out", tmp_path / "r"))
    assert "pickled Python object" in err and "tests.test_importing.TinySegNet" in err
    assert "torch.save(model.state_dict()" in err and "torch.jit.script(model)" in err and "--trust-pickle" in err
    assert not (tmp_path / "r").exists()
    result = cli("import", made.dir / "segnet_pickled.pth", "--recipe", RECIPE, "--out", tmp_path / "r", *TILE,
                 "--trust-pickle")
    assert result.exit_code == 0, result.output
    assert "warning: --trust-pickle: unpickling" in result.output and "converted to TorchScript" in result.output
    assert json.loads((tmp_path / "r/meta.json").read_text())["model_format"] == "torchscript"
    assert agreement(predicted(tmp_path / "r", made.raster, tmp_path), torch_map(made.seg, made.x)) >= 0.9999
    smp_run = import_run(made.dir / "unet_pickled.pth", tmp_path / "smp", "--trust-pickle")  # an smp model: weights
    assert json.loads((smp_run / "meta.json").read_text())["model_format"] == "weights"


ONNX_CASES = [("nchw_logits", False, "logits", []), ("nhwc_softmax", True, "softmax", ["input is NHWC", "probabilities"]),
              ("nchw_logsoftmax", False, "logsoftmax", ["LogSoftmax removed"]),
              ("nhwc_labels", True, "labels", ["input is NHWC", "labels"]), ("sigmoid", False, "sigmoid", ["Sigmoid removed"])]


@pytest.mark.parametrize(("name", "nhwc", "kind", "said"), ONNX_CASES)
def test_foreign_onnx_predicts_the_original_class_map(made: SimpleNamespace, tmp_path: Path, name: str, nhwc: bool,
                                                      kind: str, said: list[str]) -> None:
    extra = BINARY[2:] if kind == "sigmoid" else []
    result = cli("import", made.onnx[name], "--recipe", RECIPE, "--out", tmp_path / "run", *TILE, *extra)
    assert result.exit_code == 0, result.output
    for words in said:  # what was done to the graph is said
        assert words in result.output
    want = ort_map(made.onnx[name], made.x, nhwc, kind)
    assert len(np.unique(want)) >= 2
    assert agreement(predicted(tmp_path / "run", made.raster, tmp_path), want) >= 0.9999
    meta = json.loads((tmp_path / "run/meta.json").read_text())
    assert meta["model_format"] == "onnx" and (tmp_path / "run/export/model.onnx").is_file()
    if name == "nhwc_labels":
        assert (meta["model_meta"]["static_size"], meta["model_meta"]["static_batch"]) == (64, 1)


class QuarterResolution(nn.Module):
    """Scores at 1/4 of the input's size, as SegFormer-style exports give them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_an_onnx_output_at_a_fraction_of_the_input_is_resized_like_torch_bilinear(tmp_path: Path) -> None:
    from segdeploy.foreign_onnx import make_deployable

    torch.manual_seed(0)
    net = QuarterResolution().eval()
    export_onnx(net, tmp_path / "quarter.onnx")
    proto, plan = make_deployable(tmp_path / "quarter.onnx", 3, 5, 64)
    assert plan.scale == 4 and plan.input_divisor == 4 and any("resized" in a for a in plan.actions)
    x = np.random.default_rng(2).standard_normal((2, 3, 96, 96)).astype(np.float32)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():  # ONNX Resize (linear, half_pixel) is torch's bilinear with align_corners=False
        want = nn.functional.interpolate(net(torch.from_numpy(x)), size=(96, 96), mode="bilinear", align_corners=False)
    assert got.shape == (2, 5, 96, 96)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)


def test_offline_uncached_hub_id_is_one_line_in_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    err = one_line_error(cli("import", "nobody-here/no-such-model", "--recipe", RECIPE, "--out", tmp_path / "r"))
    assert time.perf_counter() - t0 < 10
    assert "offline and not in the local cache" in err and "huggingface-cli download nobody-here/no-such-model" in err


# ------------------------------------------------------------------------------------ misfits: one line, with the cause


def test_mismatches_fail_in_one_line_with_the_likely_cause(made: SimpleNamespace, tmp_path: Path) -> None:
    seven = ["--set", "classes.names=[a,b,c,d,e,f,g]", "--set", "classes.palette=null", "--set",
             "data.mask_encoding=index"]
    cases = [
        (made.dir / "unet.pth", seven, "the file's segmentation head has 5 classes, the recipe has 7"),
        (made.dir / "unet.pth", ["--set", "model.arch=fpn"], "keys look like a Unet with a resnet18 encoder"),
        (made.dir / "unet.pth", ["--set", "data.bands=4", "--set", "data.mean=[0,0,0,0]", "--set", "data.std=[1,1,1,1]"],
         "the file's first convolution takes 3 bands, the recipe has 4"),
        (made.dir / "smp_folder", ["--set", "model.encoder=resnet34"],
         "has model.encoder: \"resnet18\" but the recipe sets \"resnet34\""),
        (made.dir / "segnet.ts", seven, "the model outputs 5 classes, the recipe has 7"),
        (made.onnx["nchw_logits"], seven, "the model outputs 5 classes, the recipe has 7"),
        (made.onnx["nhwc_softmax"], ["--set", "data.bands=4", "--set", "data.mean=[0,0,0,0]", "--set", "data.std=[1,1,1,1]"],
         "the model's input (?×?×?×3) takes 3 bands, the recipe has 4"),
        (made.dir / "notes.txt", [], "unknown model file type '.txt'"),
    ]
    (made.dir / "notes.txt").write_text("not a model")
    for source, extra, words in cases:
        err = one_line_error(cli("import", source, "--recipe", RECIPE, "--out", tmp_path / "never", *TILE, *extra))
        assert words in err, (source, err)
        assert not (tmp_path / "never").exists()
    head = one_line_error(cli("import", made.dir / "unet.pth", "--recipe", RECIPE, "--out", tmp_path / "never", *TILE,
                              *seven))
    assert "150 of 152 tensors matched" in head and "segmentation_head.0.weight is [5, 16, 3, 3] in the file" in head


def test_an_existing_run_is_replaced_only_with_overwrite(made: SimpleNamespace, tmp_path: Path) -> None:
    run = import_run(made.onnx["nchw_logits"], tmp_path / "run")
    err = one_line_error(cli("import", made.onnx["nchw_logits"], "--recipe", RECIPE, "--out", run, *TILE))
    assert "pass --overwrite" in err
    import_run(made.onnx["nchw_logsoftmax"], run, "--overwrite")
    assert json.loads((run / "meta.json").read_text())["imported_from"]["file"] == "nchw_logsoftmax.onnx"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden work dirs left behind


# ------------------------------------------------------------------------------------ model.weights is as strict


def test_model_weights_loads_a_whole_model_or_an_encoder_and_says_which(made: SimpleNamespace, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from segdeploy.models import build_model
    from segdeploy.recipe import ModelConfig

    said: list[str] = []
    whole = build_model(ModelConfig(arch="unet", encoder="resnet18", weights=str(made.dir / "lightning.ckpt")), 3, 5,
                        log=said.append)
    for key, value in made.unet.state_dict().items():  # the decoder and head too, not just the encoder
        torch.testing.assert_close(whole.state_dict()[key], value)
    assert "holds the whole model: all 152 tensors loaded (encoder, decoder and head)" in said[-1]
    save_file({f"encoder.{k}": v.contiguous() for k, v in made.unet.encoder.state_dict().items()},
              str(tmp_path / "enc.safetensors"))
    fpn = build_model(ModelConfig(arch="fpn", encoder="resnet18", weights=str(tmp_path / "enc.safetensors")), 3, 5,
                      log=said.append)
    torch.testing.assert_close(fpn.encoder.layer4[1].conv2.weight, made.unet.encoder.layer4[1].conv2.weight)
    assert "holds an encoder" in said[-1] and "decoder and head start random" in said[-1]


# ------------------------------------------------------------------------------------ the gate, the source, the check


@pytest.fixture(scope="module")
def onnx_run(made: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An imported NHWC softmax ONNX model with data, exported to FP16 and INT8 behind the gate
    (built once for every xdist worker; read-only)."""
    from tests.conftest import shared

    def build(out: Path) -> None:
        import_run(made.onnx["gate"], out / "run", "--data", made.synth)
        result = cli("export", out / "run", "--fp16", "--int8", "--calib-images", 8)
        assert result.exit_code == 0, result.output

    return shared(tmp_path_factory, "import_onnx_run", build) / "run"


def test_fp16_and_int8_of_an_onnx_import_are_gated_against_the_onnx_itself(onnx_run: Path) -> None:
    parity = json.loads((onnx_run / "export/parity.json").read_text())
    assert parity["passed"] and parity["reference"].startswith("FP32 ONNX")
    forms = parity["forms"]
    assert set(forms) == {"fp32", "fp16", "int8", "int8_cpu"}
    assert "agreement" not in forms["fp32"] and "the gate's reference" in forms["fp32"]["note"]  # not gated against itself
    assert all(forms[k]["passed"] and forms[k]["agreement"] >= 0.99 for k in ("fp16", "int8", "int8_cpu"))
    summary = (onnx_run / "export/parity.md").read_text()
    assert "the reference is ONNX, not PyTorch" in summary and "IoU (FP32 ONNX)" in summary
    for name in ("model.fp16.onnx", "model.int8.cpu.onnx"):  # each export predicts the reference's map
        ref = ort.InferenceSession(str(onnx_run / "export/model.onnx"))
        cand = ort.InferenceSession(str(onnx_run / "export" / name))
        x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
        a, b = (s.run(None, {s.get_inputs()[0].name: x})[0].argmax(1) for s in (ref, cand))
        assert agreement(a, b) >= 0.99


def test_bench_and_eval_take_an_onnx_import_like_their_own(onnx_run: Path, tmp_path: Path) -> None:
    result = cli("bench", onnx_run, "--backend", "torch,onnxruntime", "--precision", "fp32,int8", "--batch", 1,
                 "--size", 64, "--iters", 2, "--seconds", 0.1, "--json", tmp_path / "b.json", "--no-record")
    assert result.exit_code == 0, result.output
    rows = {(r["backend"], r["precision"]): r for r in json.loads((tmp_path / "b.json").read_text())["rows"]}
    assert rows[("onnxruntime", "fp32")]["status"] == "ok" and rows[("onnxruntime", "fp32")]["agreement"] == 1.0
    assert rows[("onnxruntime", "int8")]["status"] == "ok"
    assert rows[("torch", "fp32")]["reason"] == "an imported ONNX model has no PyTorch model"
    result = cli("eval", onnx_run, "--split", "test", "--out", tmp_path / "eval", "--json", tmp_path / "e.json",
                 "--backend", "onnx")  # the imported model itself (auto would run the INT8 form exported here)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e.json").read_text())["backend"].startswith("onnxruntime fp32")
    result = cli("info", onnx_run, "--json", tmp_path / "i.json")
    assert result.exit_code == 0, result.output
    facts = json.loads((tmp_path / "i.json").read_text())
    assert facts["model_format"] == "onnx" and facts["imported_from"]["file"] == "gate.onnx"
    assert "imported  " in result.output and "held as onnx" in result.output


def test_a_torch_import_is_gated_like_a_trained_run_and_its_file_is_the_source(made: SimpleNamespace,
                                                                              tmp_path: Path) -> None:
    import shutil

    from segdeploy.artifact import Run

    src = tmp_path / "mine.pt2"  # a torch.export program fixed at batch 1 and 64²
    shutil.copy(made.dir / "gate_static.pt2", src)
    run = import_run(src, tmp_path / "run", "--data", made.synth)
    result = cli("export", run, "--fp16", "--int8", "--calib-images", 4)
    assert result.exit_code == 0, result.output
    parity = json.loads((run / "export/parity.json").read_text())
    assert parity["passed"] and parity["reference"] == "PyTorch FP32"
    assert set(parity["forms"]) == {"fp32", "fp16", "int8", "int8_cpu"}
    assert all(r["passed"] and r["agreement"] >= 0.99 for r in parity["forms"].values())
    assert ort.InferenceSession(str(run / "export/model.onnx")).get_inputs()[0].shape == [1, 3, 64, 64]
    assert [e.stale for e in Run(run).exports()] == [""] * 4
    src.write_bytes(src.read_bytes() + b"\0")  # the user re-saved the model
    err = one_line_error(cli("predict", run, made.raster, "--out", tmp_path / "p.tif", "--no-progress"))
    assert "changed after it was imported" in err and f"segdeploy import {src}" in err and "--overwrite" in err
    assert all("changed after it was imported" in e.stale for e in Run(run).exports())  # through the run's model


def test_a_one_channel_binary_state_dict_is_read_as_a_sigmoid(made: SimpleNamespace, tmp_path: Path) -> None:
    import segmentation_models_pytorch as smp

    from segdeploy.artifact import Run
    from segdeploy.models import load_run_model

    torch.manual_seed(1)
    net = spread(smp.Unet("resnet18", encoder_weights=None, classes=1))  # a lesion model trained with BCE
    torch.save(net.state_dict(), tmp_path / "lesion.pth")
    result = cli("import", tmp_path / "lesion.pth", "--recipe", RECIPE, "--out", tmp_path / "run", *BINARY)
    assert result.exit_code == 0, result.output
    assert "one channel for two classes: read as a sigmoid" in result.output
    model = load_run_model(Run(tmp_path / "run"))
    with torch.no_grad():
        for w in windows(made.x):
            z = net(torch.from_numpy(w))[:, 0]
            probs = model(torch.from_numpy(w)).softmax(1)
            torch.testing.assert_close(probs[:, 1], torch.sigmoid(z), atol=1e-5, rtol=1e-5)
            assert agreement(probs.argmax(1).numpy(), (z > 0).long().numpy()) >= 0.9999


def nearest_colour_model(synth_dir: Path) -> nn.Module:
    """A model that works on the synthetic land cover without training: each pixel goes to the
    class whose mean normalised colour (on the train split) is nearest, as a 1×1 convolution
    (logit_c = 2 μ_c·x - |μ_c|², the squared distance up to a term every class shares)."""
    from segdeploy import recipe as recipe_mod
    from segdeploy.data.dataset import SampleReader, discover

    rec = recipe_mod.load(RECIPE, ["data.tile_size=64"], synth_dir)
    reader = SampleReader(discover(rec.data, "train"), rec.data, rec.classes, list(MEAN), list(STD))
    sums, counts = np.zeros((5, 3)), np.zeros(5)
    for i in range(len(reader)):
        x, y = reader.item(i)
        for c in range(5):
            sums[c] += x[:, y == c].sum(1)
            counts[c] += (y == c).sum()
    mu = torch.tensor(sums / counts[:, None], dtype=torch.float32)
    conv = nn.Conv2d(3, 5, 1)
    conv.weight.data = (2 * mu)[:, :, None, None]
    conv.bias.data = -(mu**2).sum(1)
    return conv.eval()


def test_the_check_on_val_passes_a_working_model_and_warns_about_a_one_class_one(made: SimpleNamespace,
                                                                                 tmp_path: Path) -> None:
    torch.jit.script(nearest_colour_model(made.synth)).save(str(tmp_path / "colour.ts"))
    good = cli("import", tmp_path / "colour.ts", "--recipe", RECIPE, "--out", tmp_path / "good", *TILE,
               "--data", made.synth, "--json", tmp_path / "good.json")
    assert good.exit_code == 0, good.output
    report = json.loads((tmp_path / "good.json").read_text())
    assert report["check"]["status"] == "ok" and report["check"]["kappa"] > 0.5, report["check"]
    assert "building" in good.output and report["eval"]["miou"] > 0.3  # the per-class table on val
    flat = TinySegNet()
    flat.head.bias.data = torch.tensor([9.0, 0, 0, 0, 0])  # "field" everywhere: what a wrong normalisation looks like
    torch.jit.script(flat.eval()).save(str(tmp_path / "flat.ts"))
    bad = cli("import", tmp_path / "flat.ts", "--recipe", RECIPE, "--out", tmp_path / "bad", *TILE, "--data", made.synth)
    assert bad.exit_code == 0, bad.output
    warning = [line for line in bad.output.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "'field' on 100.0% of the val pixels" in warning[0]
    assert "normalisation" in warning[0] and "BGR" in warning[0]


def test_prediction_check_decides_only_when_it_can() -> None:
    from segdeploy.importing import check_predictions

    names = ["a", "b", "c"]
    good = np.diag([4000, 3000, 3000])
    assert check_predictions(good, names).status == "ok"
    assert check_predictions(good, names).kappa == pytest.approx(1.0)
    chance = np.outer([0.4, 0.3, 0.3], [0.4, 0.3, 0.3]) * 10_000  # independent of the truth: kappa 0
    verdict = check_predictions(chance, names)
    assert verdict.status == "warning" and verdict.kappa == pytest.approx(0.0, abs=1e-9) and "chance" in verdict.message
    assert check_predictions(np.diag([9950, 30, 20]), names).status == "undecided"  # masks nearly one class
    assert check_predictions(np.diag([10, 10, 10]), names).status == "undecided"  # too few pixels
