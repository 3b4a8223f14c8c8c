"""Experiment tracking against a real local MLflow store and real TensorBoard event files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from segdeploy.cli import app
from tests.conftest import RECIPES


def test_train_logs_to_tensorboard_and_mlflow_and_export_and_bench_join_the_run(
        synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)  # a bare --mlflow means ./mlruns
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(RECIPES / "demo.yaml"), "--data", str(synth_dir), "--out", "run",
                                 "--set", "train.epochs=2", "--set", "data.tile_size=64", "--no-progress", "--mlflow"])
    assert result.exit_code == 0, result.output
    # MLflow writes its URI into os.environ; left there, every later run in this process (a
    # notebook, the Python API) would log to MLflow unasked
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_EXPERIMENT_ID" not in os.environ
    meta = json.loads((tmp_path / "run/meta.json").read_text())
    info = meta["mlflow"]
    assert info["tracking_uri"] == (tmp_path / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    run = client.get_run(info["run_id"])
    assert run.data.params["optimizer.lr"] == "0.003" and run.data.params["model.encoder"] == "resnet18"
    history = client.get_metric_history(info["run_id"], "val_miou")
    assert [m.step for m in history] == [1, 2]
    assert max(m.value for m in history) == pytest.approx(meta["best_val_miou"])
    assert run.data.metrics["best_val_miou"] == pytest.approx(meta["best_val_miou"])
    top = {f.path for f in client.list_artifacts(info["run_id"])}
    assert {"per_class.json", "run"} <= top
    logged = {f.path for f in client.list_artifacts(info["run_id"], "run")}
    assert {"run/model.safetensors", "run/meta.json", "run/plots"} <= logged and "run/last.ckpt" not in logged

    events = EventAccumulator(str(tmp_path / "run/tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/miou")] == [1, 2]
    assert [round(e.value, 6) for e in events.Scalars("val/miou")] == [round(m.value, 6) for m in history]

    result = runner.invoke(app, ["export", "run", "--set", "parity.samples=4"])
    assert result.exit_code == 0, result.output
    assert f"export logged to MLflow run {info['run_id']}" in result.output
    assert "export.json" in {f.path for f in client.list_artifacts(info["run_id"])}
    assert client.get_run(info["run_id"]).data.metrics["parity_fp32_agreement"] >= 0.9999
    result = runner.invoke(app, ["bench", "run", "--backend", "onnxruntime", "--precision", "fp32", "--batch", "1",
                                 "--size", "64", "--iters", "2", "--seconds", "0", "--no-accuracy"])
    assert result.exit_code == 0, result.output
    assert not {"MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"} & set(os.environ)  # export and bench joined the run without leaking it either
    metrics = client.get_run(info["run_id"]).data.metrics
    assert metrics["bench_onnxruntime_fp32_b1_p50_ms"] > 0 and "bench.json" in {
        f.path for f in client.list_artifacts(info["run_id"])}
