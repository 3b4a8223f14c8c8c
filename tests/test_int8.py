"""INT8 export: the two QDQ forms, calibration on training keys only, the per-class gate and its
fallback, and the round trip through eval, predict and bench."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from segdeploy.cli import app
from segdeploy.errors import ParityError
from segdeploy.artifact import read_onnx_meta
from segdeploy.export.pipeline import ExportOptions, export_run
from segdeploy.utils import file_sha256
from tests.conftest import tree_digest

QUIET = lambda m: None  # noqa: E731
# the session's tiny run trained for 2 epochs: its near-tied logits flip under any noise, so the
# structural tests gate loosely; the harsh-gate test below gates strictly
LOOSE = ["parity.samples=4", "parity.int8_agreement=0.3", "parity.int8_class_iou_drop=100"]


@pytest.fixture(scope="module")
def int8_run(tiny_fp16: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """`export --fp16` (the session's tiny_fp16), then `export --int8` in a copy of it."""
    run = tmp_path_factory.mktemp("int8") / "run"
    shutil.copytree(tiny_fp16, run, ignore=shutil.ignore_patterns("eval"))
    report = export_run(run, ExportOptions(int8=True, calib_images=6, parity_overrides=LOOSE), log=QUIET)
    return run, report


def structure(proto: onnx.ModelProto) -> dict:
    """What a QDQ model holds: Q/DQ counts, whether every activation zero point is 0, and whether
    the weights are quantized per channel."""
    from onnx import numpy_helper

    init = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    zero_points = [init[n.input[2]] for n in q if len(n.input) > 2 and n.input[2] in init]
    weight_dq = [n for n in dq if n.input[0] in init and init[n.input[0]].ndim == 4]
    return {
        "quantize_nodes": len(q), "dequantize_nodes": len(dq),
        "activation_dtypes": sorted({str(z.dtype) for z in zero_points}),
        "activation_zero_points_all_zero": all(not np.any(z) for z in zero_points),
        "weights_per_channel": bool(weight_dq) and all(init[n.input[1]].ndim == 1 and init[n.input[1]].size > 1
                                                       for n in weight_dq),
    }


def test_both_forms_are_qdq_with_the_right_zero_points_and_per_channel_weights(int8_run: tuple) -> None:
    run, report = int8_run
    trt = structure(onnx.load(str(run / "export/model.int8.onnx")))
    cpu = structure(onnx.load(str(run / "export/model.int8.cpu.onnx")))
    for s in (trt, cpu):
        assert s["quantize_nodes"] > 10 and s["dequantize_nodes"] > s["quantize_nodes"]  # + one DQ per weight
        assert s["weights_per_channel"]
    assert trt["activation_dtypes"] == ["int8"] and trt["activation_zero_points_all_zero"]  # TensorRT's form
    assert "uint8" in cpu["activation_dtypes"] and not cpu["activation_zero_points_all_zero"]  # U8S8 for CPUs
    for key in ("int8", "int8_cpu"):
        rep = report.parity[key]
        assert rep.precision == "int8" and rep.passed
        assert 0.5 <= rep.reduced_flops_share <= 1.0 and 0 < rep.usage.reduced_nodes <= rep.usage.total_nodes
        assert "INT8 on" in rep.summary() and "of FLOPs" in rep.summary()
    assert report.files["int8"].endswith("model.int8.onnx")
    assert report.files["int8_cpu"].endswith("model.int8.cpu.onnx")


def test_gate_records_of_earlier_commands_persist_with_their_own_thresholds(int8_run: tuple, tiny_fp16: Path) -> None:
    """`export --fp16` then `export --int8`: parity.json/parity.md hold all four forms, each with the
    thresholds and time of the command that gated it; the FP32 model was rebuilt byte for byte, so
    the FP16 form made from it earlier is still current."""
    run, report = int8_run
    forms = json.loads((run / "export/parity.json").read_text())["forms"]
    earlier = json.loads((tiny_fp16 / "export/parity.json").read_text())["forms"]["fp16"]
    assert set(forms) == {"fp32", "fp16", "int8", "int8_cpu"} and not report.stale
    assert forms["fp16"] == earlier  # kept as the first command wrote it
    assert forms["fp16"]["thresholds"]["min_agreement"] == 0.999 and forms["fp16"]["command"].endswith(" --fp16")
    for key in ("int8", "int8_cpu"):
        assert forms[key]["thresholds"]["min_agreement"] == 0.3 and forms[key]["thresholds"]["max_class_iou_drop"] == 100
        assert forms[key]["gated_at"] >= forms["fp16"]["gated_at"] and "--int8 --calib-images 6" in forms[key]["command"]
    assert file_sha256(run / "export/model.onnx") == file_sha256(tiny_fp16 / "export/model.onnx")
    assert all(not r["stale"] for r in forms.values())
    md = (run / "export/parity.md").read_text()
    for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx", "model.int8.cpu.onnx"):
        assert f"## {name} (" in md


def test_calibration_reads_training_keys_only_and_the_metadata_travels(int8_run: tuple) -> None:
    run, report = int8_run
    splits = json.loads((run / "splits.json").read_text())
    meta = read_onnx_meta(run / "export/model.int8.cpu.onnx")
    calib = meta.extra["calibration"]
    assert calib["split"] == "train" and calib["method"] == "minmax"
    assert calib["keys"] == report.calibration_keys and 0 < len(calib["keys"]) <= 6
    assert set(calib["keys"]) <= set(splits["train"]) and not set(calib["keys"]) & set(splits["val"] + splits["test"])
    assert meta.classes == ["field", "forest", "water", "road", "building"] and meta.input_dtype == "uint8"
    assert meta.source == {"path": "model.onnx", "sha256": file_sha256(run / "export/model.onnx")}
    assert meta.extra["int8_form"] == "cpu" and read_onnx_meta(run / "export/model.int8.onnx").extra["int8_form"] == "tensorrt"


def test_a_harsh_gate_gates_each_form_on_its_own_and_replaces_nothing(int8_run: tuple, tmp_path: Path) -> None:
    """Both INT8 forms fail an impossible gate: each is tried (the CPU form although the TensorRT
    form failed) with one fallback round keeping its most effective nodes in float, the report says
    which passed, and RUN/export is left as it was. (Where the fallback stops at the share floor:
    test_gate.py and test_trust.py.)"""
    src, _ = int8_run
    run = tmp_path / "run"
    shutil.copytree(src, run)  # holds the int8 files of the earlier export: they stay as they were
    before = tree_digest(run / "export")
    harsh = ["parity.samples=4", "parity.int8_agreement=0.99999", "parity.int8_class_iou_drop=0.0"]
    logs: list[str] = []
    with pytest.raises(ParityError, match=r"parity gate failed for onnxruntime \(TensorRT form\) int8: .*"
                                          r"onnxruntime \(CPU form\) int8: .*Passed: model.onnx\.") as err:
        export_run(run, ExportOptions(int8=True, calib_images=4, parity_overrides=harsh, max_fallback_rounds=1),
                   log=logs.append)
    report = err.value.report
    for key, label in (("int8", "TensorRT form"), ("int8_cpu", "CPU form")):
        result = report.results[key]
        assert result.report is not None and not result.passed and result.report.precision == "int8"
        assert [r["round"] for r in result.rounds] == [0, 1] and result.rounds[1]["added"]
        assert result.rounds[1]["fp32_nodes"] == len(result.report.fp32_nodes) == len(result.rounds[1]["added"])
        assert all(r["reduced_flops_share"] >= 0.5 for r in result.rounds)
        assert result.note == "INT8 fallback gave up after 1 round(s)"
        assert any(f"({label}) INT8 fallback round 1: keeping" in line for line in logs)
    assert tree_digest(run / "export") == before and not list((run / "export").glob(".*"))
    assert json.loads((run / "export-rejected/parity.json").read_text())["passed"] is False
    assert "| round | nodes kept FP32 |" in (run / "export-rejected/parity.md").read_text()


def test_int8_round_trips_through_eval_predict_and_bench(int8_run: tuple, synth_dir: Path, tmp_path: Path) -> None:
    run, report = int8_run
    runner = CliRunner()
    cpu = run / "export/model.int8.cpu.onnx"
    result = runner.invoke(app, ["eval", str(cpu), "--split", "val", "--out", str(tmp_path / "ev"),
                                 "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["backend"].startswith("onnxruntime int8") and 0 <= ev["miou"] <= 1
    result = runner.invoke(app, ["predict", str(run / "export/model.int8.onnx"), str(synth_dir / "scene/scene.tif"),
                                 "--out", str(tmp_path / "p.tif"), "--tile", "64", "--overlap", "16", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.tif").exists()
    result = runner.invoke(app, ["bench", str(run), "--backend", "onnxruntime", "--batch", "1", "--size", "64",
                                 "--iters", "3", "--seconds", "0.1", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    rows = {r["precision"]: r for r in json.loads((tmp_path / "b.json").read_text())["rows"]}
    assert rows["int8"]["p50_ms"] > 0 and rows["int8"]["miou"] is not None and rows["int8"]["agreement"] is not None
    from segdeploy.bench import GATE_FAIL, OK

    # judged with the thresholds it was gated with (LOOSE), not the recipe's defaults (99% agreement)
    assert rows["int8"]["status"] == OK
    original = (run / "export/parity.json").read_text()
    records = json.loads(original)
    records["forms"]["int8_cpu"]["thresholds"]["min_agreement"] = 0.99999  # as if it had been gated strictly
    try:
        (run / "export/parity.json").write_text(json.dumps(records))
        result = runner.invoke(app, ["bench", str(run), "--backend", "onnxruntime", "--precision", "int8", "--batch",
                                     "1", "--size", "64", "--iters", "2", "--seconds", "0", "--json", str(tmp_path / "b2.json")])
    finally:
        (run / "export/parity.json").write_text(original)
    assert result.exit_code == 0, result.output
    (row,) = json.loads((tmp_path / "b2.json").read_text())["rows"]
    assert row["status"] == GATE_FAIL and "thresholds it was gated with" in row["reason"] and "99.999" in row["reason"]
