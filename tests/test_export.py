"""ONNX / FP16 export, the parity gate and its fallback, TensorRT profile and compatibility logic.

Everything here runs on CPU through onnxruntime; the engine build itself is in test_gpu.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from segdeploy import recipe
from segdeploy.errors import ArtifactError, ParityError, UserError
from segdeploy.evaluate import evaluate
from segdeploy.artifact import read_onnx_meta
from segdeploy.export.onnx import FixedAdaptiveAvgPool2d, graph_findings
from segdeploy.export.pipeline import ExportOptions, export_run
from segdeploy.export.tensorrt import (
    DeviceInfo,
    Profile,
    check_engine_compat,
    derive_profile,
    network_flags,
    parse_batch,
    timing_cache_path,
)
from segdeploy.runtime import load_backend
from segdeploy.train import fit
from tests.conftest import RECIPES, demo_overrides, tree_digest

QUIET = lambda m: None  # noqa: E731


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("export", "eval"))
    return dst


@pytest.fixture(scope="module")
def exported(tiny_fp16: Path) -> Path:
    return tiny_fp16  # read only: tests copy it before changing anything


def test_export_writes_gated_onnx_pair_with_metadata(exported: Path) -> None:
    out = exported / "export"
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.fp16.onnx", "parity.json", "parity.md"}
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and set(parity["forms"]) == {"fp32", "fp16"}  # one record per form
    fp32, fp16 = parity["forms"]["fp32"], parity["forms"]["fp16"]
    assert fp32["agreement"] >= 0.9999 and fp16["agreement"] >= 0.999
    # each record: the thresholds it was judged with, the split its tiles came from, when, and the command
    assert fp32["thresholds"]["min_agreement"] == 0.9999 and fp16["thresholds"]["min_agreement"] == 0.999
    assert fp16["thresholds"]["min_reduced_share"] == 0.5 and fp32["thresholds"]["min_reduced_share"] is None
    assert fp32["split"] == fp16["split"] == "val" and fp16["tiles"] == 8
    assert fp16["command"] == f"segdeploy export {exported} --fp16" and fp16["gated_at"].endswith("+00:00")
    assert fp32["max_abs"] < 1e-3 and fp16["cosine"] > 0.999
    assert len(fp16["per_class"]) == 5 and {"iou_gt", "dice_gt", "iou_vs_reference", "iou_drop_points"} <= set(fp16["per_class"][0])
    for name in ("model.onnx", "model.fp16.onnx"):  # readable axis names, not the exporter's s0/s53
        graph = onnx.load(str(out / name)).graph
        dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
        assert dims == ["batch", 3, "height", "width"], (name, dims)
        out_dims = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
        assert out_dims[:2] == ["batch", 5] and "height" in str(out_dims[2]) and "width" in str(out_dims[3]), out_dims
    meta = read_onnx_meta(out / "model.onnx")
    run_meta = json.loads((exported / "meta.json").read_text())["model_meta"]
    assert meta.classes == run_meta["classes"] and meta.palette == run_meta["palette"]
    assert meta.mean == run_meta["mean"] and meta.recipe_digest == run_meta["recipe_digest"]
    assert meta.versions["segdeploy"] and meta.tile_size == 64 and meta.static_size is None
    proto = onnx.load(str(out / "model.onnx"))
    assert proto.opset_import[0].version >= 17
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert not dims[0].HasField("dim_value") and not dims[2].HasField("dim_value")  # dynamic batch and size
    props = {p.key for p in proto.metadata_props}
    assert {"classes", "palette", "mean", "std", "input_divisor", "tile_size", "bands", "recipe_digest"} <= props
    p16 = onnx.load(str(out / "model.fp16.onnx"))
    assert p16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # I/O stays FP32
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in p16.graph.initializer)


def test_onnx_backend_runs_dynamic_shapes_and_eval_matches_the_run(exported: Path) -> None:
    backend = load_backend(exported / "export/model.onnx")
    for shape in ((1, 3, 64, 64), (3, 3, 96, 160)):
        assert backend(np.random.default_rng(0).standard_normal(shape, dtype=np.float32)).shape == (shape[0], 5, *shape[2:])
    ref = evaluate(exported, "test", plots=False, overwrite=True).metrics
    for name in ("model.onnx", "model.fp16.onnx"):
        got = evaluate(exported / "export" / name, "test", plots=False, overwrite=True).metrics
        assert got.miou == pytest.approx(ref.miou, abs=2e-3)
        np.testing.assert_allclose(got.iou, ref.iou, atol=5e-3)


def test_fp16_fallback_keeps_more_nodes_fp32_until_a_strict_gate_passes(tiny_run: Path, tmp_path: Path) -> None:
    run = copy_run(tiny_run, tmp_path)
    # exact agreement needs most of this tiny model in FP32: allow that here (the share floor has its own test)
    strict = ["parity.fp16_agreement=1.0", "parity.max_class_iou_drop=0.0", "parity.samples=4",
              "parity.min_fp16_share=0.0"]
    logs: list[str] = []
    report = export_run(run, ExportOptions(fp16=True, parity_overrides=strict, max_fallback_rounds=8), log=logs.append)
    rep, rounds = report.parity["fp16"], report.results["fp16"].rounds
    assert rep.passed and rep.agreement == 1.0
    assert len(rounds) >= 2 and any("fallback round 1" in line for line in logs)
    assert [r["round"] for r in rounds] == list(range(len(rounds))) and rounds[-1]["passed"]
    assert rounds[-1]["agreement"] == 1.0 and all(not r["passed"] for r in rounds[:-1])
    assert sum(len(r["added"]) for r in rounds) == len(rep.fp32_nodes) == rounds[-1]["fp32_nodes"]
    graph_nodes = {n.name for n in onnx.load(str(run / "export/model.onnx")).graph.node}
    assert rep.fp32_nodes and set(rep.fp32_nodes) <= graph_nodes  # reported by ONNX node name
    saved = read_onnx_meta(run / "export/model.fp16.onnx").extra["fp32_nodes"]
    assert saved == rep.fp32_nodes
    md = (run / "export/parity.md").read_text()  # what each round recovered, in agreement points
    first, last = rounds[0], rounds[-1]
    assert "| round | nodes kept FP32 |" in md and f"| {last['round']} | {last['fp32_nodes']} |" in md
    recovered = (last["agreement"] - rounds[-2]["agreement"]) * 100
    assert f"{recovered:+.3f}" in md and first["agreement"] < 1.0


def test_a_failed_gate_names_its_classes_and_leaves_export_byte_identical(exported: Path, tmp_path: Path) -> None:
    run = copy_run(exported, tmp_path)
    shutil.copytree(exported / "export", run / "export")
    (run / "export/model.fp16.onnx").write_bytes(b"an older export")  # whatever is there stays as it was
    before = tree_digest(run / "export")
    impossible = ["parity.fp16_agreement=1.0", "parity.max_class_iou_drop=0.0", "parity.samples=4"]
    with pytest.raises(ParityError, match=r"parity gate failed for onnxruntime fp16: .*\(worst classes by IoU drop: |"
                                          r"no class lost IoU.*most disagreement") as err:
        export_run(run, ExportOptions(fp16=True, parity_overrides=impossible, max_fallback_rounds=0), log=QUIET)
    assert "Passed: model.onnx" in str(err.value) and "Nothing in" in str(err.value)
    report = err.value.report
    assert not report.passed and report.results["fp32"].passed and not report.results["fp16"].passed
    assert tree_digest(run / "export") == before  # nothing replaced, nothing left behind
    rejected = json.loads((run / "export-rejected/parity.json").read_text())
    assert rejected["passed"] is False and rejected["forms"]["fp16"]["passed"] is False
    assert rejected["forms"]["fp16"]["thresholds"]["min_agreement"] == 1.0
    with pytest.raises(UserError, match="only parity"):
        export_run(run, ExportOptions(parity_overrides=["train.epochs=3"]), log=QUIET)


@pytest.mark.parametrize("fault", ["interrupt_in_fp16", "crash_writing_fp32"])
def test_an_interrupted_or_crashed_export_leaves_export_byte_identical(exported: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       fault: str) -> None:
    """Ctrl-C while the FP16 form is being made (the FP32 candidate already built), or a crash
    half-way through writing the FP32 file: RUN/export is as it was, no staging folder left."""
    from segdeploy.export import fp16 as fp16_mod
    from segdeploy.export import pipeline

    run = copy_run(exported, tmp_path)
    shutil.copytree(exported / "export", run / "export")
    before = tree_digest(run / "export")
    if fault == "interrupt_in_fp16":
        def convert(*args: object, **kwargs: object) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(fp16_mod, "convert", convert)
        expected: type[BaseException] = KeyboardInterrupt
    else:
        def export_onnx(model: object, meta: object, path: Path, *args: object) -> list[str]:
            path.write_bytes(b"half a model")
            raise RuntimeError("disk went away")

        monkeypatch.setattr(pipeline, "export_onnx", export_onnx)
        expected = RuntimeError
    with pytest.raises(expected):
        export_run(run, ExportOptions(fp16=True), log=QUIET)
    assert tree_digest(run / "export") == before
    assert not list((run / "export").glob(".*")) and not (run / "export-rejected").exists()


def test_every_prerequisite_is_checked_before_any_work(exported: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Too few calibration tiles and too little disk space are refused before anything is built; the
    suggested --calib-images gets past the checks (the build, stubbed from outside, is reached)."""
    from segdeploy.export import pipeline

    run = copy_run(exported, tmp_path)
    shutil.copytree(exported / "export", run / "export")
    before = tree_digest(run / "export")
    built: list[str] = []

    class Reached(Exception):
        pass

    def build_all(self: object) -> None:
        built.append("build")
        raise Reached

    monkeypatch.setattr(pipeline._Builder, "build_all", build_all)
    with pytest.raises(UserError, match=r"--calib-images 500: the training split holds only (\d+) tiles of 64² .*"
                                        r"pass --calib-images (\d+)") as err:
        export_run(run, ExportOptions(int8=True, calib_images=500), log=QUIET)
    tiles = int(err.value.args[0].split("pass --calib-images ")[1].split()[0])
    assert tiles == 24 and not built  # synth_dir: 24 training images of 64²
    with pytest.raises(Reached):  # the fix works: the checks pass and the build starts
        export_run(run, ExportOptions(int8=True, calib_images=tiles), log=QUIET)
    assert built == ["build"]
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**12, used=10**12, free=1000))
    with pytest.raises(UserError, match=r"not enough disk space for model.onnx, model.fp16.onnx \(about \d+ MB needed, "
                                        r"0 MB free\)"):
        export_run(run, ExportOptions(fp16=True), log=QUIET)
    assert built == ["build"] and tree_digest(run / "export") == before


@pytest.mark.parametrize(("arch", "encoder", "kwargs", "static", "finding"), [
    ("pspnet", "resnet18", {}, True, "non-divisible"),
    ("segnet", "unused", {"widths": [8, 16, 16]}, False, "MaxUnpool"),
    ("vit_segmenter", "test_vit", {"img_size": 64}, True, None),
])
def test_trt_hostile_architectures_export_after_preflight(arch: str, encoder: str, kwargs: dict, static: bool,
                                                           finding: str | None, synth_dir: Path, tmp_path: Path) -> None:
    over = demo_overrides(**{"train.epochs": 1, "model.arch": arch, "model.encoder": encoder,
                             "model.kwargs": json.dumps(kwargs), "parity.samples": 4})
    rec = recipe.load(RECIPES / "demo.yaml", over, synth_dir)
    fit(rec, tmp_path / "run", progress=False)
    report = export_run(tmp_path / "run", ExportOptions(), log=QUIET)
    assert report.parity["fp32"].passed
    assert report.plan.dynamic is (not static)
    if finding:
        assert any(finding in f.construct for f in report.plan.findings)
    proto = onnx.load(str(tmp_path / "run/export/model.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    assert "MaxUnpool" not in ops and not any(n.op_type == "MaxPool" and len(n.output) > 1 for n in proto.graph.node)
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert (dims[2:] == [64, 64]) is static
    if static:
        assert read_onnx_meta(tmp_path / "run/export/model.onnx").static_size == 64


@pytest.mark.parametrize(("size", "out"), [((16, 16), (3, 3)), ((13, 20), (6, 4)), ((8, 8), (2, 2)), ((7, 9), (7, 9))])
def test_fixed_adaptive_pool_rewrite_is_exact(size: tuple[int, int], out: tuple[int, int]) -> None:
    x = torch.randn(2, 4, *size)
    torch.testing.assert_close(FixedAdaptiveAvgPool2d(out, size)(x), nn.AdaptiveAvgPool2d(out)(x), atol=1e-5, rtol=1e-5)


def test_graph_findings_flag_maxunpool_and_align_corners() -> None:
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("MaxPool", ["x"], ["p", "idx"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("MaxUnpool", ["p", "idx"], ["u"], name="unpool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Resize", ["u", "", "scales"], ["y"], name="up", mode="linear",
                         coordinate_transformation_mode="align_corners"),
        helper.make_node("Resize", ["y", "", "scales"], ["z"], name="fine", mode="linear"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                              [helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])])
    findings = graph_findings(helper.make_model(graph))
    assert {(f.where, f.action.split(":")[0]) for f in findings} == {("pool", "error"), ("unpool", "error"), ("up", "gated")}


def test_batch_profile_and_trt_version_logic() -> None:
    assert parse_batch("1:4:8") == (1, 4, 8) and parse_batch("8") == (1, 8, 8)
    for bad in ("0:1:2", "4:2:8", "x", "1:2"):
        with pytest.raises(UserError, match="--batch"):
            parse_batch(bad)
    assert derive_profile((1, 4, 8), 512, 3, 32, dynamic=True) == Profile((1, 3, 32, 32), (4, 3, 512, 512), (8, 3, 512, 512))
    assert derive_profile((1, 2, 2), 224, 4, 16, dynamic=False).min == (1, 4, 224, 224)
    with pytest.raises(UserError, match="not a multiple"):
        derive_profile((1, 1, 1), 500, 3, 32, dynamic=True)
    assert network_flags("10.13.0", 1) == 2 and network_flags("11.2.0", 1) == 0
    p = timing_cache_path(Path("/c"), "NVIDIA H100 80GB HBM3", "9.0", "10.13.0")
    assert p.name == "timing-nvidia-h100-80gb-hbm3-sm90-trt10.13.0.cache"


def test_engine_from_another_gpu_or_tensorrt_is_refused_with_the_rebuild_command() -> None:
    built = {"device": {"gpu_name": "NVIDIA A10", "compute_capability": "8.6", "trt_version": "10.13.0"}}
    here = DeviceInfo("NVIDIA H100 80GB HBM3", "9.0", "12.8", "10.13.0")
    path = Path("runs/demo/export/model.engine")
    with pytest.raises(ArtifactError, match=r"built for NVIDIA A10 sm8.6 .* rebuild with `segdeploy export runs/demo --trt`"):
        check_engine_compat(built, here, path)
    with pytest.raises(ArtifactError, match=r"TensorRT 10.13.0 \(here 11.1.0\)"):
        check_engine_compat({**built, "device": {**built["device"], "gpu_name": here.gpu_name,
                                                  "compute_capability": "9.0"}},
                            DeviceInfo(here.gpu_name, "9.0", "12.8", "11.1.0"), path)
    check_engine_compat({"device": {"gpu_name": here.gpu_name, "compute_capability": "9.0", "trt_version": "10.13.0"}},
                        here, path)


def test_bad_artifacts_are_one_line_errors(exported: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "bad.onnx"
    corrupt.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ArtifactError, match="bad.onnx"):
        load_backend(corrupt)
    eng = tmp_path / "model.engine"
    eng.write_bytes(b"x")
    with pytest.raises(ArtifactError, match=r"no model.engine.json metadata; rebuild"):
        load_backend(eng)
    with pytest.raises(ArtifactError, match="not a model artifact"):
        load_backend(tmp_path / "bad.onnx.txt") if (tmp_path / "bad.onnx.txt").write_text("x") else None
    backend = load_backend(exported / "export/model.onnx")
    with pytest.raises(ArtifactError, match="expects 3 bands, got an image with 4"):
        backend(torch.zeros(1, 4, 64, 64))


def test_trt_export_without_tensorrt_is_refused_before_any_work(exported: Path, tmp_path: Path) -> None:
    """Without TensorRT, `export --trt` used to export and gate FP32 and FP16 (129 s on a real model),
    rewrite both, and only then fail: now it refuses first and leaves RUN/export byte-identical."""
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here; test_gpu.py covers the real build")
    except ImportError:
        pass
    from typer.testing import CliRunner

    from segdeploy.cli import app

    run = copy_run(exported, tmp_path)
    shutil.copytree(exported / "export", run / "export")
    before = tree_digest(run / "export")
    result = CliRunner().invoke(app, ["export", str(run), "--trt"])
    assert result.exit_code == 2
    assert "TensorRT is not installed" in result.output and "pip install 'segdeploy[trt]'" in result.output
    assert len(result.output.strip().splitlines()) == 1  # nothing was exported first
    assert tree_digest(run / "export") == before


def test_every_export_form_has_its_builder_and_every_builder_its_form() -> None:
    """A form is its row in artifact.EXPORT_FORMS and its builder in export/pipeline.py: neither
    without the other (docs/ARCHITECTURE.md, "How to add an export form")."""
    from segdeploy.artifact import EXPORT_FLAGS, EXPORT_FORMS, PRECISIONS, SUFFIX_BACKENDS, forms_for
    from segdeploy.export.pipeline import _Builder
    from segdeploy.runtime import _BACKENDS

    assert set(_Builder.BUILDERS) == set(EXPORT_FORMS)
    assert all(callable(getattr(_Builder, m, None)) for m in _Builder.BUILDERS.values())
    for form in EXPORT_FORMS.values():  # what derives from the row is there
        assert form.backend in _BACKENDS and SUFFIX_BACKENDS[form.suffixes[0]] == form.backend
        assert form.precision in PRECISIONS and set(form.flags) <= set(EXPORT_FLAGS)
        assert form.source == "weights" or form.source in EXPORT_FORMS
        assert form in forms_for(form.flags) or not form.flags
