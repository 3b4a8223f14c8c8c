"""`--backend auto`, `--backend NAME`, `--provider` (runtime.choose) and `export --head` (server heads).

Runs are copies of the session's `tiny_fp16` (model.onnx + model.fp16.onnx, really gated); other
forms are copies of model.onnx under the form's name with a fake gate record, which is all the
choice reads. Expected outputs are computed with onnxruntime and numpy directly."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import rasterio

from segdeploy.artifact import EXPORT_FORMS, Run
from segdeploy.errors import ArtifactError, BackendUnavailable, UserError
from segdeploy.runtime import choose as choose_mod
from segdeploy.runtime.choose import choose, machine_fingerprint


@pytest.fixture
def run(tiny_fp16: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(tiny_fp16, out, ignore=shutil.ignore_patterns("eval", "speed.json"))
    return out


def fake_form(run: Path, key: str, passed: bool = True) -> Path:
    """A copy of model.onnx standing for form `key`, with a gate record (what `choose` reads)."""
    form, path = EXPORT_FORMS[key], run / "export" / EXPORT_FORMS[key].file
    shutil.copy(run / "export/model.onnx", path)
    doc = json.loads((run / "export/parity.json").read_text())
    doc["forms"][key] = {**doc["forms"]["fp32"], "form": key, "file": form.file, "precision": form.precision,
                         "passed": passed, "args": list(form.flags), "failures": [] if passed else ["agreement 90%"]}
    (run / "export/parity.json").write_text(json.dumps(doc))
    return path


def test_auto_follows_the_rule_and_forced_forms_are_refused_with_the_command_that_makes_them(
        run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_form(run, "int8_cpu")
    monkeypatch.setattr(choose_mod, "int8_fast", lambda features=None: "AVX512VNNI")
    picked = choose(run)
    assert (picked.form, picked.basis, picked.provider) == ("int8_cpu", "rule", "CPUExecutionProvider")
    assert picked.path == run / "export/model.int8.cpu.onnx" and "AVX512VNNI" in picked.reason
    assert picked.line().startswith("model: model.int8.cpu.onnx (onnxruntime (CPU form) INT8) on CPU — rule: INT8")
    monkeypatch.setattr(choose_mod, "int8_fast", lambda features=None: "")
    assert choose(run).form == "fp32"  # without fast INT8 the FP32 ONNX: mixed FP16 on a CPU is no faster
    assert choose(run, "fp16").form == "fp16" and choose(run, "torch").options == {"device": "auto"}
    with pytest.raises(ArtifactError) as missing:
        choose(run, "engine")
    assert str(missing.value) == (f"--backend engine: run {run} has no model.engine; make it with "
                                  f"`segdeploy export {run} --trt`")
    fake_form(run, "int8_cpu", passed=False)
    assert choose(run).form == "fp32" and "failed its parity gate" in choose(run).skipped["int8_cpu"]
    with pytest.raises(ArtifactError, match=r"--backend int8: .*model.int8.cpu.onnx failed its parity gate "
                                            r"\(agreement 90%\); re-export it with `segdeploy export .* --int8`"):
        choose(run, "int8")
    with pytest.raises(UserError, match="--backend 'gpu' is unknown; choose from auto, torch, onnx, fp16, int8, engine"):
        choose(run, "gpu")


def test_a_stale_form_is_never_picked_and_forcing_it_names_the_rebuild(run: Path) -> None:
    import onnx

    fp16 = run / "export/model.fp16.onnx"
    proto = onnx.load(str(fp16))
    for prop in proto.metadata_props:
        if prop.key == "segdeploy":
            doc = json.loads(prop.value)
            doc["source"]["sha256"] = "0" * 64  # made from another model.onnx
            prop.value = json.dumps(doc)
    onnx.save(proto, str(fp16))
    assert "fp16" in choose(run).skipped
    with pytest.raises(ArtifactError, match=r"--backend fp16: .*model.fp16.onnx is stale: .*re-export it with "
                                            r"`segdeploy export .* --fp16`"):
        choose(run, "fp16")


def test_a_measurement_of_this_machine_wins_over_the_rule_until_the_file_changes(
        run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from segdeploy.runtime.choose import file_stamp

    monkeypatch.setattr(choose_mod, "int8_fast", lambda features=None: "")
    r = Run(run)
    rows = [{"candidate": k, "provider": "CPUExecutionProvider", "batch": 2, "size": 64, "images_per_s": v,
             **file_stamp(r.export_path(k))} for k, v in (("fp32", 5.0), ("fp16", 9.0))]
    rows.append({"candidate": "torch", "provider": "", "batch": 2, "size": 64, "images_per_s": 2.0,
                 **file_stamp(r.model_file)})
    r.write_speed_record(machine_fingerprint()["key"], {"measured_at": "2026-11-30T12:00:00+00:00", "rows": rows})
    r.write_speed_record("another-machine", {"rows": [{**rows[2], "images_per_s": 99.0}]})  # not this machine's
    picked = choose(run)
    assert (picked.form, picked.basis) == ("fp16", "measured")
    assert "fp16 9 img/s, fp32 5 img/s, torch 2 img/s" in picked.reason
    os.utime(r.export_path("fp16"), ns=(1, 1))  # the file measured is not this one any more
    picked = choose(run)
    assert (picked.form, picked.basis) == ("fp32", "measured") and "fp16" not in picked.reason
    os.utime(r.model_file, ns=(1, 1))  # one measured candidate left: nothing to compare, the rule decides
    assert (choose(run).form, choose(run).basis) == ("fp32", "rule")


def test_bench_records_its_speeds_and_auto_then_picks_the_fastest_measured(run: Path) -> None:
    from segdeploy.bench import BenchOptions, bench

    opts = BenchOptions(backends=("torch", "onnxruntime"), precisions=("fp32", "fp16"), batches=(2,), size=64,
                        threads=1, accuracy=False, record=True, min_iters=3, min_seconds=0.0, warmup=1)
    report = bench([run], opts, log=lambda m: None)
    measured = {("torch" if r.backend == "torch" else {"fp32": "fp32", "fp16": "fp16"}[r.precision]): r.images_per_s
                for r in report.rows if r.images_per_s is not None}
    assert set(measured) == {"torch", "fp32", "fp16"}
    record = Run(run).speed_records()[machine_fingerprint()["key"]]
    assert {row["candidate"]: row["images_per_s"] for row in record["rows"]} == measured
    assert report.auto[str(run)]["basis"] == "measured"
    assert report.auto[str(run)]["form"] == max(measured, key=measured.get)


def test_provider_is_checked_before_and_after_the_session_starts(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from segdeploy.runtime.onnxruntime import OrtBackend

    assert choose(run, provider="cpu").options == {"providers": ["CPUExecutionProvider"]}
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendUnavailable, match=r"^--provider cuda: onnxruntime [\d.]+ here has no "
                                                     r"CUDAExecutionProvider \(available: .*CPUExecutionProvider\); "
                                                     "install onnxruntime-gpu"):
            choose(run, provider="cuda")
        # a build that lists CUDA but cannot start it: onnxruntime falls back to the CPU with a warning only
        monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
        with pytest.warns(UserWarning), pytest.raises(BackendUnavailable, match="did not start CUDAExecutionProvider"):
            OrtBackend(run / "export/model.onnx", ["CUDAExecutionProvider"])
    with pytest.raises(UserError, match="--backend torch runs PyTorch; drop one of them"):
        choose(run, "torch", provider="cpu")


def test_predict_on_a_run_picks_its_onnx_and_imports_no_torch(run: Path, synth_dir: Path, tmp_path: Path) -> None:
    from segdeploy.predict import PredictOptions, predict_file
    from segdeploy.runtime.onnxruntime import OrtBackend
    from tests.test_lean import run_without_torch

    scene, out = synth_dir / "scene/scene.tif", tmp_path / "auto.tif"
    proc, loaded = run_without_torch(tmp_path, "predict", str(run), str(scene), "--out", str(out), "--no-progress",
                                     "--no-preview", "--json", str(tmp_path / "s.json"))
    assert proc.returncode == 0 and loaded == [], proc.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    expected = "fp16" if "CUDAExecutionProvider" in ort.get_available_providers() else "fp32"
    assert (summary["model"]["form"], summary["model"]["basis"]) == (expected, "rule")
    assert f"model: {Path(summary['model']['path']).name}" in proc.stderr
    direct = tmp_path / "direct.tif"
    predict_file(OrtBackend(Path(summary["model"]["path"])), scene, direct, PredictOptions(preview=False))
    with rasterio.open(out) as a, rasterio.open(direct) as b:
        assert np.array_equal(a.read(1), b.read(1))


# ------------------------------------------------------------------------------------ server heads


@pytest.fixture(scope="module")
def headed(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny ONNX run exported with --head argmax --head softmax (FP32 again, gated)."""
    from segdeploy.export.pipeline import ExportOptions, export_run

    run = tmp_path_factory.mktemp("heads") / "run"
    shutil.copytree(tiny_onnx.parent.parent, run, ignore=shutil.ignore_patterns("eval", "speed.json"))
    export_run(run, ExportOptions(heads=["argmax", "softmax"]), log=lambda m: None)
    return run


def test_heads_return_the_class_map_and_the_probabilities_and_pass_the_gate(headed: Path) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64), dtype=np.float32)
    def run(name: str) -> np.ndarray:
        session = ort.InferenceSession(str(headed / "export" / name))
        return session.run(None, {session.get_inputs()[0].name: x})[0]

    logits, labels, probs = run("model.onnx"), run("model.argmax.onnx"), run("model.softmax.onnx")
    assert labels.dtype == np.uint8 and labels.shape == (2, 64, 64)
    assert np.array_equal(labels, logits.argmax(1))
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(1, keepdims=True), atol=1e-6)
    records = Run(headed).gate_records()
    for key in ("argmax", "softmax"):
        assert records[key]["passed"] and records[key]["agreement"] == 1.0 and records[key]["args"] == [f"--head={key}"]
    assert choose(headed).form == "fp32"  # auto never runs a head: predict wants the scores


def test_an_argmax_head_predicts_only_with_crop_blending_and_matches_the_fp32_model(
        headed: Path, synth_dir: Path, tmp_path: Path) -> None:
    from segdeploy.predict import PredictOptions, predict_file
    from segdeploy.runtime.onnxruntime import OrtBackend

    scene, head = synth_dir / "scene/scene.tif", OrtBackend(headed / "export/model.argmax.onnx")
    with pytest.raises(UserError, match=r"model.argmax.onnx is an argmax head, .* cannot serve --blend gaussian .*; "
                                        "pass --blend crop"):
        predict_file(head, scene, tmp_path / "g.tif", PredictOptions(preview=False))
    with pytest.raises(UserError, match="without the probabilities --probs needs; drop --probs"):
        predict_file(head, scene, tmp_path / "p.tif", PredictOptions(preview=False, blend="crop", probs=True))
    from typer.testing import CliRunner

    from segdeploy.cli import app

    many = CliRunner().invoke(app, ["predict", str(head.path), str(scene), str(synth_dir / "test/test0000_sat.png"),
                                    "--out", str(tmp_path / "many/")])  # refused before any raster
    assert many.exit_code == 2 and many.output.count("error:") == 1 and not (tmp_path / "many").exists()
    opts = PredictOptions(preview=False, blend="crop")
    predict_file(head, scene, tmp_path / "head.tif", opts)
    predict_file(OrtBackend(headed / "export/model.onnx"), scene, tmp_path / "fp32.tif", opts)
    with rasterio.open(tmp_path / "head.tif") as a, rasterio.open(tmp_path / "fp32.tif") as b:
        assert np.array_equal(a.read(1), b.read(1))


@pytest.mark.gpu
def test_on_a_gpu_onnxruntime_cuda_runs_the_fp16_form_and_agrees_with_the_cpu(run: Path) -> None:
    """Where onnxruntime-gpu and a CUDA GPU are: auto picks FP16 on the CUDA provider (the run has
    no engine), and `--provider cuda` really runs on CUDA with the CPU's classes."""
    from segdeploy.runtime import load_backend

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
    assert (choose(run).form, choose(run).provider) == ("fp16", "CUDAExecutionProvider")  # the run has no engine
    picked = choose(run, "onnx", provider="cuda")
    gpu, cpu = load_backend(picked.path, **picked.options), load_backend(picked.path, providers=["CPUExecutionProvider"])
    assert gpu.providers[0] == "CUDAExecutionProvider" and gpu.device == "cuda"
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64), dtype=np.float32)
    assert (gpu(x).argmax(1) == cpu(x).argmax(1)).mean() >= 0.999


def test_eval_scores_an_argmax_head_with_crop_tiles_like_the_fp32_model(headed: Path, tmp_path: Path) -> None:
    """`eval RUN/export/model.argmax.onnx` crashed (UnboundLocalError): it scores with crop tiles, and
    its confusion matrix is the FP32 model's under the same crop tiles (labels = argmax of logits)."""
    from dataclasses import replace

    from segdeploy.data.dataset import SampleReader, discover
    from segdeploy.evaluate import evaluate
    from segdeploy.recipe import load
    from segdeploy.runtime.onnxruntime import OrtBackend
    from segdeploy.scoring import default_plan, score_split

    report = evaluate(headed / "export/model.argmax.onnx", "val", out_dir=tmp_path / "ev")
    fp32 = OrtBackend(headed / "export/model.onnx")
    rec = load(headed / "recipe.yaml")
    ds = SampleReader(discover(rec.data, "val"), rec.data, rec.classes, fp32.meta.mean, fp32.meta.std)
    plan = replace(default_plan(fp32.meta, 8), blend="crop")
    expected = score_split(fp32, ds, plan)
    assert np.array_equal(report.metrics.matrix, expected.matrix)


def test_when_auto_falls_back_to_pytorch_it_says_why_with_the_run_not_a_placeholder(tiny_onnx: Path,
                                                                                     tmp_path: Path) -> None:
    """The fallback line said "no gated ONNX export can run here (export one with `segdeploy export
    RUN`)" even when the exports were only stale: now each export's reason (with its exact rebuild
    command), or the command with this run's path when there is no export yet."""
    run = tmp_path / "run"
    shutil.copytree(tiny_onnx.parent.parent, run, ignore=shutil.ignore_patterns("eval", "speed.json"))
    with open(run / "model.safetensors", "ab") as f:  # other weights: every export is now stale
        f.write(b" ")
    picked = choose(run)
    assert picked.form == "torch" and "stale" in picked.reason and f"segdeploy export {run}" in picked.reason
    assert "RUN" not in picked.reason
    shutil.rmtree(run / "export")
    picked = choose(run)
    assert picked.form == "torch" and f"make one with `segdeploy export {run}`" in picked.reason
