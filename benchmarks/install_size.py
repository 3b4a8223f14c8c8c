"""Core install against the full one (#12): `pip install segdeploy` (deployment: predict on ONNX
through onnxruntime, no torch) and `pip install 'segdeploy[train]'` (the PyTorch stack), each in a
fresh virtual environment; size on disk of each, and a real `segdeploy predict` on an ONNX model
in the core one (with its peak RSS), which proves the core install deploys.

    python benchmarks/install_size.py --model RUN/export/model.onnx --scene SCENE.tif \\
        --out benchmarks/results/install_size.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def du_mb(path: Path) -> float:
    return round(int(subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True)
                     .stdout.split()[0]) / 1024, 1)


def make_venv(where: Path, spec: str) -> dict:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    subprocess.run([str(where / "bin/pip"), "install", "-q", spec], check=True, capture_output=True)
    packages = subprocess.run([str(where / "bin/pip"), "list", "--format=freeze"], capture_output=True, text=True,
                              check=True).stdout.split()
    return {"spec": spec, "install_seconds": round(time.perf_counter() - t0, 1), "venv_mb": du_mb(where),
            "packages": len(packages), "has_torch": any(p.lower().startswith("torch==") for p in packages)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--scene", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/install_size.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        core, full = Path(tmp) / "core", Path(tmp) / "full"
        record = {"core": make_venv(core, str(ROOT))}
        report = Path(tmp) / "predict.json"
        proc = subprocess.run([str(core / "bin/segdeploy"), "predict", str(args.model), str(args.scene), "--out",
                               str(Path(tmp) / "pred.tif"), "--no-progress", "--json", str(report)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"predict failed in the core install:\n{proc.stderr}")
        result = json.loads(report.read_text())["results"][0]
        record["core"]["predict"] = {k: result[k] for k in ("width", "height", "seconds", "megapixels_per_s",
                                                            "peak_rss_mb")}
        train = subprocess.run([str(core / "bin/segdeploy"), "train", str(ROOT / "recipes/demo.yaml")],
                               capture_output=True, text=True)
        record["core"]["train_without_extra"] = {"exit_code": train.returncode, "stderr": train.stderr.strip()}
        record["full"] = make_venv(full, f"{ROOT}[train]")
    record["full_vs_core"] = round(record["full"]["venv_mb"] / record["core"]["venv_mb"], 2)
    record |= {"command": " ".join(["python", "benchmarks/install_size.py", *sys.argv[1:]]),
               "python": platform.python_version(), "machine": platform.machine()}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
