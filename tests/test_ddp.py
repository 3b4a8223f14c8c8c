"""DDP training: two gloo processes on the CPU, as torchrun starts them (RANK, WORLD_SIZE,
LOCAL_RANK), over a file rendezvous and the loopback interface only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from segdeploy.distributed import ShardSampler, World
from segdeploy.evaluate import evaluate
from tests.conftest import RECIPES


def test_shards_cover_every_sample_once() -> None:
    for size in (1, 2, 3):
        shards = [list(ShardSampler(11, World(rank, size))) for rank in range(size)]
        assert sorted(i for s in shards for i in s) == list(range(11))


def test_two_gloo_processes_train_one_run_whose_metrics_equal_eval(synth_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "WORLD_SIZE": "2", "SEGDEPLOY_DIST_INIT": f"file://{tmp_path / 'rendezvous'}",
           "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "segdeploy", "train", str(RECIPES / "demo.yaml"), "--data", str(synth_dir),
           "--out", str(out), "--set", "train.epochs=2", "--set", "data.tile_size=64", "--set", "train.batch_size=4",
           "--no-progress", "--json", str(tmp_path / "summary.json")]
    outputs = _run_two(cmd, env)
    assert "global batch 8" in outputs[0] and "epoch   2" in outputs[0]
    assert outputs[1].strip() == ""  # rank 1 says nothing; rank 0 reports
    summary = json.loads((tmp_path / "summary.json").read_text())
    meta = json.loads((out / "meta.json").read_text())
    assert summary["world_size"] == 2 and meta["world_size"] == 2 and meta["status"] == "complete"
    # the all-reduced validation metrics equal what one process computes on the saved weights
    report = evaluate(out, "val", plots=False)
    assert report.metrics.miou == pytest.approx(meta["best_val_miou"], abs=1e-9)
    assert report.images == 8
    # --resume under DDP: both ranks continue from rank 0's last.ckpt
    (tmp_path / "rendezvous").unlink(missing_ok=True)
    more = [*cmd[:cmd.index("--set")], "--set", "train.epochs=3", "--set", "data.tile_size=64",
            "--set", "train.batch_size=4", "--no-progress", "--resume"]
    outputs = _run_two(more, env)
    assert "resuming" in outputs[0] and "epoch   3" in outputs[0]
    assert json.loads((out / "meta.json").read_text())["epochs_run"] == 3


def _run_two(cmd: list[str], env: dict[str, str]) -> list[str]:
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    return outputs
