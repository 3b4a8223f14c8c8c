"""Many rasters on Ray: a local cluster bound to 127.0.0.1, an actor pool whose outputs equal a
serial run byte for byte, per-file resume, a bad raster among good ones, and an address where
nothing listens."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from typer.testing import CliRunner

from segdeploy.cli import app

pytest.importorskip("ray", reason="Ray is in segdeploy[dev]; install it with pip install -e '.[dev]'")

SIZES = [(300, 217), (129, 333), (97, 150), (200, 64)]  # odd sizes: partial tiles on both edges


def scenes(synth_dir: Path, folder: Path) -> list[Path]:
    with rasterio.open(synth_dir / "scene/scene.tif") as src:
        pixels, profile = src.read(), src.profile
    folder.mkdir()
    paths = []
    for i, (h, w) in enumerate(SIZES):
        profile.update(height=h, width=w, transform=from_origin(300_000 + i, 4_000_000, 10, 10))
        with rasterio.open(folder / f"s{i}.tif", "w", **profile) as dst:
            dst.write(np.roll(pixels, 37 * i, axis=(1, 2))[:, :h, :w])
        paths.append(folder / f"s{i}.tif")
    return paths


def listening_sockets() -> set[tuple[str, str]]:
    """(local address, inode) of every TCP socket in LISTEN state, from /proc (IPv4 and IPv6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A":
                found.add((cols[1].rsplit(":", 1)[0], cols[9]))
    return found


LOOPBACK_HEX = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def predict(*args: str) -> object:
    return CliRunner().invoke(app, ["predict", *args, "--no-progress", "--no-preview"])


def test_ray_pool_matches_a_serial_run_byte_for_byte_and_listens_on_loopback_only(tiny_onnx: Path, synth_dir: Path,
                                                                                tmp_path: Path) -> None:
    from segdeploy import cluster
    from segdeploy.jobs import Tally, plan_jobs
    from segdeploy.predict import PredictOptions
    from segdeploy.vector import VectorOptions

    files = scenes(synth_dir, tmp_path / "in")
    serial = predict(str(tiny_onnx), str(tmp_path / "in"), "--out", str(tmp_path / "serial"), "--vector", "fgb")
    assert serial.exit_code == 0, serial.output

    before = listening_sockets()
    cl = cluster.connect(None, workers=2, threads=None, gpu=False, jobs=len(files))
    try:
        opened = listening_sockets() - before
        assert opened and {addr for addr, _ in opened} <= LOOPBACK_HEX  # nothing on another interface
        assert (cl.workers, cl.threads, cl.address) == (2, 1, "local")
        jobs, _ = plan_jobs(files, tmp_path / "ray", many=True, resume=False)
        tally = Tally(len(jobs))
        opts = PredictOptions(batch=2, preview=False, vector=VectorOptions("fgb"))
        outcomes = list(cluster.run_on_ray(tiny_onnx, {}, jobs, opts, cl, on_tiles=tally.tiles))
    finally:
        cluster.disconnect(cl)
    assert not [o.error for o in outcomes if o.error] and tally.running  # tile counts reached the driver
    assert sorted(o.job.index for o in outcomes) == [0, 1, 2, 3]
    for f in files:
        name = f"{f.stem}_pred.tif"
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "serial" / name).read_bytes()
        assert vector_features(tmp_path / "ray" / f"{f.stem}_pred.fgb") == vector_features(
            tmp_path / "serial" / f"{f.stem}_pred.fgb")  # the same polygons, beside each raster
    assert not list((tmp_path / "ray").glob(".*"))  # no temp or partial files left behind


def vector_features(path: Path) -> list:
    """Every feature's geometry (WKB) and attributes, in file order."""
    from pyogrio.raw import read

    _, _, wkb, fields = read(path)
    assert len(wkb) > 10
    return [wkb.tolist(), *[f.tolist() for f in fields]]


def test_ray_cli_reports_a_bad_raster_by_name_finishes_the_rest_and_resumes_per_file(tiny_onnx: Path, synth_dir: Path,
                                                                                    tmp_path: Path) -> None:
    files = scenes(synth_dir, tmp_path / "in")
    (tmp_path / "in/broken.tif").write_bytes(b"II*\x00 not really a tiff")
    out = tmp_path / "out"
    first = predict(str(tiny_onnx), str(tmp_path / "in"), "--out", str(out), "--ray", "--workers", "2",
                    "--json", str(tmp_path / "first.json"))
    assert first.exit_code == 2, first.output
    errors = [line for line in first.output.splitlines() if line.startswith("error:")]
    assert any("broken.tif" in line for line in errors)
    assert "1 of 5 rasters failed: " in first.output and "--resume skips them" in first.output
    summary = json.loads((tmp_path / "first.json").read_text())
    assert summary["ray"]["workers"] == 2 and summary["ray"]["address"] == "local"
    assert len(summary["results"]) == 4 and [f["input"] for f in summary["failures"]] == [str(tmp_path / "in/broken.tif")]
    stamps = {f.stem: (out / f"{f.stem}_pred.tif").stat().st_mtime_ns for f in files}
    assert not (out / "broken_pred.tif").exists() and not list(out.glob(".*"))

    # fix the raster, rerun with --resume: the four finished outputs are skipped, only it runs
    (tmp_path / "in/broken.tif").unlink()
    scenes(synth_dir, tmp_path / "more")[0].rename(tmp_path / "in/broken.tif")
    again = predict(str(tiny_onnx), str(tmp_path / "in"), "--out", str(out), "--ray", "--workers", "2", "--resume",
                    "--json", str(tmp_path / "again.json"))
    assert again.exit_code == 0, again.output
    summary = json.loads((tmp_path / "again.json").read_text())
    assert [r["input"] for r in summary["results"]] == [str(tmp_path / "in/broken.tif")]
    assert len(summary["skipped"]) == 4 and again.output.count("already predicted") == 4
    assert {f.stem: (out / f"{f.stem}_pred.tif").stat().st_mtime_ns for f in files} == stamps


def test_a_ray_address_with_nothing_listening_fails_in_one_line_within_seconds(tiny_onnx: Path, synth_dir: Path,
                                                                               tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    files = scenes(synth_dir, tmp_path / "in")
    t0 = time.perf_counter()
    result = predict(str(tiny_onnx), str(files[0]), "--out", str(tmp_path / "o.tif"), "--ray-address",
                     f"127.0.0.1:{port}")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"no Ray cluster answers at 127.0.0.1:{port}" in lines[0]
    assert time.perf_counter() - t0 < 20 and not (tmp_path / "o.tif").exists()
    bad = predict(str(tiny_onnx), str(files[0]), "--out", str(tmp_path / "o.tif"), "--ray-address", "nowhere")
    assert bad.exit_code == 2 and "is not HOST:PORT" in bad.output


def test_the_plan_skips_finished_outputs_continues_unfinished_ones_and_starts_the_rest(tmp_path: Path) -> None:
    from segdeploy.jobs import plan_jobs
    from segdeploy.errors import UserError

    files = [tmp_path / f"{n}.tif" for n in ("done", "half", "new")]
    out = tmp_path / "out"
    out.mkdir()
    (out / "done_pred.tif").write_bytes(b"finished")
    (out / ".half_pred.partial.tif").write_bytes(b"rows")
    (out / "half_pred.tif.partial.json").write_text("{}")
    todo, finished = plan_jobs(files, out, many=True, resume=True)
    assert [j.src.stem for j in finished] == ["done"]
    assert [(j.src.stem, j.resume) for j in todo] == [("half", True), ("new", False)]
    with pytest.raises(UserError, match=r"done_pred.tif already exists: .* only with --overwrite"):
        plan_jobs(files, out, many=True, resume=False)  # a finished output is never replaced silently
    todo, finished = plan_jobs(files, out, many=True, resume=False, overwrite=True)  # --overwrite: all start over
    assert finished == [] and [j.resume for j in todo] == [False] * 3
    with pytest.raises(UserError, match="would both be written to"):
        plan_jobs([tmp_path / "a/x.tif", tmp_path / "b/x.tif"], out, many=True, resume=False)


def test_the_single_machine_settings_hold_only_while_a_local_cluster_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's environment variable and private constant are put back after `ray.init` (an error
    included), and a user's own setting of the variable is left alone."""
    import os

    from ray._private import ray_constants

    from segdeploy.cluster import SINGLE_MACHINE_ENV, single_machine

    monkeypatch.delenv(SINGLE_MACHINE_ENV, raising=False)
    before = ray_constants.ENABLE_RAY_CLUSTER
    with pytest.raises(RuntimeError, match="init failed"), single_machine():
        assert os.environ[SINGLE_MACHINE_ENV] == "0" and ray_constants.ENABLE_RAY_CLUSTER is False
        raise RuntimeError("init failed")
    assert SINGLE_MACHINE_ENV not in os.environ and ray_constants.ENABLE_RAY_CLUSTER == before
    monkeypatch.setenv(SINGLE_MACHINE_ENV, "1")
    with single_machine():
        assert os.environ[SINGLE_MACHINE_ENV] == "1" and ray_constants.ENABLE_RAY_CLUSTER == before
    assert os.environ[SINGLE_MACHINE_ENV] == "1"


def test_each_backend_says_whether_a_ray_worker_needs_a_gpu(tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cluster asks the model's backend (Backend.needs_gpu), no backend named in cluster.py."""
    import torch

    from segdeploy.cluster import backend_for_gpu
    from segdeploy.runtime.tensorrt import TensorRTBackend
    from segdeploy.runtime.torch import TorchBackend

    assert backend_for_gpu(tiny_onnx, {}) is False and TensorRTBackend.needs_gpu({}) is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert TorchBackend.needs_gpu({}) is True and TorchBackend.needs_gpu({"device": "cpu"}) is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert TorchBackend.needs_gpu({"device": "auto"}) is False
