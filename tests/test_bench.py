"""`segdeploy bench`: rows per backend/precision/batch, honest skips, accuracy columns, outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from segdeploy.bench import OK, UNAVAILABLE, BenchOptions, bench, candidates
from segdeploy.cli import app

FAST = dict(min_iters=3, min_seconds=0.0, warmup=1)


@pytest.fixture(scope="module")
def exported_run(tiny_fp16: Path) -> Path:
    return tiny_fp16  # model.onnx + model.fp16.onnx; read only


def test_every_backend_gets_a_row_and_unavailable_ones_say_why(exported_run: Path) -> None:
    report = bench([exported_run], BenchOptions(batches=(1, 2), size=64, threads=1, **FAST), log=lambda m: None)
    rows = {(r.backend, r.precision, r.batch): r for r in report.rows}
    for key in (("torch", "fp32", 1), ("torch", "fp32", 2), ("onnxruntime", "fp32", 1), ("onnxruntime", "fp16", 2)):
        r = rows[key]
        assert r.status == OK and r.p50_ms > 0 and r.p50_ms <= r.p90_ms <= r.p99_ms
        assert r.iterations >= 3 and r.images_per_s > 0 and r.peak_rss_mb > 0 and r.threads == 1
        assert r.megapixels_per_s == pytest.approx(r.images_per_s * 64 * 64 / 1e6, rel=1e-2)
        assert r.miou is not None and 0 <= r.miou <= 1 and r.agreement >= 0.999
    assert rows[("torch", "fp32", 1)].agreement == 1.0
    assert rows[("torch", "fp32", 1)].tflops > 0  # from counted FLOPs
    import torch

    if not torch.cuda.is_available():
        assert rows[("torch", "fp16", 0)].status == UNAVAILABLE and "CUDA" in rows[("torch", "fp16", 0)].reason
    trt = rows[("tensorrt", "fp16", 0)]
    assert trt.status == UNAVAILABLE and ("TensorRT" in trt.reason or "no engine" in trt.reason)


def test_candidates_for_a_single_artifact_and_missing_exports(exported_run: Path, tiny_run: Path) -> None:
    only = candidates(exported_run / "export/model.fp16.onnx", BenchOptions())
    assert [(c.backend, c.precision) for c in only] == [("onnxruntime", "fp16")]
    assert only[0].gate["thresholds"]["min_agreement"] == 0.999  # its gate record travels with it
    bare = {(c.backend, c.precision): c for c in candidates(tiny_run, BenchOptions())}
    # every pair something makes: PyTorch FP32/FP16, and each bench form of the table of export forms
    assert set(bare) == {("torch", "fp32"), ("torch", "fp16"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16"),
                         ("onnxruntime", "int8"), ("tensorrt", "fp16"), ("tensorrt", "int8")}
    hints = {k: c.reason for k, c in bare.items() if c.artifact is None}
    assert hints == {("onnxruntime", "fp32"): "not exported: run `segdeploy export RUN`",
                     ("onnxruntime", "fp16"): "not exported: run `segdeploy export RUN --fp16`",
                     ("onnxruntime", "int8"): "not exported: run `segdeploy export RUN --int8`",
                     ("tensorrt", "fp16"): "no engine: run `segdeploy export RUN --trt`",
                     ("tensorrt", "int8"): "no engine: run `segdeploy export RUN --trt --int8`"}


def test_one_table_of_export_forms_drives_suffixes_names_and_precisions(tmp_path: Path) -> None:
    """The runtime's suffix map, form_of (renamed copies too), bench's precision names and the CLI's
    validation of them all come from artifact.EXPORT_FORMS."""
    from segdeploy.artifact import EXPORT_FORMS, form_of, forms_for
    from segdeploy.errors import ArtifactError
    from segdeploy.runtime import backend_for

    for form in EXPORT_FORMS.values():
        assert form_of(Path(form.file)) is form
        for suffix in form.suffixes:
            assert backend_for(Path(f"m{suffix}")) == form.backend
            if form.tag:
                assert form_of(Path(f"scene_copy{form.tag}{suffix}")) is form
    assert form_of(Path("scene_copy.onnx")).key == "fp32" and form_of(Path("a.plan")).key == "engine"
    with pytest.raises(ArtifactError, match=r"expected a run directory or a .engine, .onnx, .plan file"):
        backend_for(tmp_path / "m.pt")
    # sources come along; the server heads only when asked
    assert [f.key for f in forms_for(["--trt", "--int8"])] == [k for k, f in EXPORT_FORMS.items() if f.output == "logits"]
    assert [f.key for f in forms_for(["--head=argmax"])] == ["fp32", "argmax"]
    assert [f.key for f in forms_for(["--int8"])] == ["fp32", "int8", "int8_cpu"]
    result = CliRunner().invoke(app, ["bench", str(tmp_path / "m.onnx"), "--precision", "int4"])
    assert result.exit_code == 2 and "--precision 'int4' is unknown; choose from fp32, fp16, int8" in result.output


def test_cli_writes_json_csv_plot_and_keeps_going_past_bad_models(exported_run: Path, tmp_path: Path) -> None:
    (tmp_path / "broken.onnx").write_bytes(b"junk")
    result = CliRunner().invoke(app, [
        "bench", str(exported_run), str(tmp_path / "broken.onnx"), "--backend", "torch,onnxruntime", "--no-record",
        "--precision", "fp32", "--batch", "1", "--size", "64", "--iters", "3", "--seconds", "0", "--threads", "1",
        "--json", str(tmp_path / "b.json"), "--csv", str(tmp_path / "b.csv"), "--plot", str(tmp_path / "b.png")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    broken = [r for r in rows if r["model"].endswith("broken.onnx")]
    assert broken and broken[0]["status"] == UNAVAILABLE and "broken.onnx" in broken[0]["reason"]
    assert {r["backend"] for r in rows if r["status"] == OK} == {"torch", "onnxruntime"}
    assert len(list(csv.DictReader((tmp_path / "b.csv").open()))) == len(rows)
    assert (tmp_path / "b.png").stat().st_size > 1000
    assert "✅" in result.output and "forward only" in result.output


def test_static_size_mismatch_is_a_row_not_a_crash_and_nothing_measured_exits_nonzero(tmp_path: Path) -> None:
    (tmp_path / "broken.onnx").write_bytes(b"junk")
    result = CliRunner().invoke(app, ["bench", str(tmp_path / "broken.onnx"), "--size", "64"])
    assert result.exit_code == 1 and "❌" in result.output


def test_tiled_column_measures_predict_end_to_end(exported_run: Path, synth_dir: Path) -> None:
    from segdeploy.predict import time_file

    report = bench([exported_run / "export/model.onnx"], BenchOptions(batches=(1,), size=64, threads=1,
                   tiled=synth_dir / "scene/scene.tif", tiled_run=time_file, accuracy=False, **FAST),
                   log=lambda m: None)
    (row,) = report.rows
    assert row.status == OK and row.tiled_mp_per_s > 0 and row.tiled_peak_rss_mb > 0


def test_plot_labels_batches_as_plain_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    from segdeploy.bench import BenchReport, BenchRow, plot

    seen: dict[str, list[str]] = {}
    real_savefig = Figure.savefig

    def spy(self: Figure, *args: object, **kwargs: object) -> None:
        seen["labels"] = [t.get_text() for t in self.axes[0].get_xticklabels()]
        real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    rows = [BenchRow("m", "onnxruntime", "fp32", b, 64, OK, p50_ms=2.0 * b, p90_ms=2.5 * b) for b in (1, 2, 4, 8)]
    plot(BenchReport(rows=rows, threads=1), tmp_path / "p.png")
    assert seen["labels"] == ["1", "2", "4", "8"] and (tmp_path / "p.png").stat().st_size > 1000


def test_a_lone_int8_onnx_file_is_benched_as_onnxruntime_int8(tmp_path: Path) -> None:
    """Either INT8 form copied out of its run is still an onnxruntime INT8 candidate."""
    for name in ("model.int8.onnx", "model.int8.cpu.onnx", "scene_model.int8.onnx"):
        (tmp_path / name).write_bytes(b"")
        cands = candidates(tmp_path / name, BenchOptions())
        assert [(c.backend, c.precision, c.artifact) for c in cands] == [("onnxruntime", "int8", tmp_path / name)]
