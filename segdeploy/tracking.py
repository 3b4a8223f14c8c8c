"""Experiment tracking where users already look: TensorBoard event files in the run directory,
and an MLflow run when one is asked for (``--mlflow [URI]`` or ``MLFLOW_TRACKING_URI``).

Both are optional extras (``pip install 'segdeploy[tracking]'``), imported only here and only
when used. The MLflow run's id is recorded in the run's meta.json, so ``export`` and ``bench``
log their reports to the same MLflow run later.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from segdeploy.artifact import LAST_CKPT, TENSORBOARD_DIR
from segdeploy.errors import UserError


def resolve_mlflow_uri(option: str | None) -> str | None:
    """'local' (a bare --mlflow) -> ./mlruns as a file store; a URI as given; no option ->
    MLFLOW_TRACKING_URI when set; else no MLflow."""
    if option is None:
        return os.environ.get("MLFLOW_TRACKING_URI") or None
    if option == "local":
        return Path("mlruns").resolve().as_uri()
    if "://" not in option and not option.startswith("file:"):
        return Path(option).expanduser().resolve().as_uri()  # a directory: a local file store there
    return option


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def _mlflow(uri: str):  # noqa: ANN202
    if uri.startswith("file:"):
        # MLflow ≥ 3.x keeps its local file store behind this switch ("maintenance mode"); it is the
        # embedded default here because a database store would need the full mlflow package. Left
        # set for the process, on purpose: MLflow reads it whenever it makes a store for a file: URI
        # (mlflow/store/tracking/file_store.py), and a Tracker's stores are made through a training
        # run's whole life (log_metrics each epoch, log_report after export/bench), so a scoped value
        # would be gone when they are; all it allows is the file store this user asked for.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        import logging

        import mlflow

        # mlflow's INFO lines (a run's URL at each end_run) would break into the progress bar; a
        # logger's level is process-wide, and mlflow logs through a training run's whole life
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    except ImportError:
        raise UserError("MLflow logging needs mlflow: pip install 'segdeploy[tracking]' (or drop --mlflow and "
                        "unset MLFLOW_TRACKING_URI)") from None
    with _environ_kept():
        mlflow.set_tracking_uri(uri)
    return mlflow


@contextlib.contextmanager
def _environ_kept() -> Iterator[None]:
    """MLflow ≥ 2 writes the tracking URI and the experiment id into os.environ: left there, a later
    run in the same process (a notebook, the Python API, the tests) would log to MLflow, or to
    another experiment, without being asked. They stay inside mlflow's own state."""
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")
    before = {n: os.environ.get(n) for n in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Tracker:
    """Per-epoch scalars and the final report of one training run, to every sink that is on."""

    def __init__(self, tensorboard_dir: Path, recipe: dict, mlflow_uri: str | None, run_name: str) -> None:
        self.notes: list[str] = []
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tensorboard_dir))
        except ImportError:
            self.notes.append("TensorBoard logging off: pip install 'segdeploy[tracking]'")
        self.mlflow = None
        self.mlflow_run: dict[str, str] | None = None
        if mlflow_uri:
            mlflow = _mlflow(mlflow_uri)
            with _environ_kept():
                mlflow.set_experiment(str(recipe.get("name") or "segdeploy"))
            run = mlflow.start_run(run_name=run_name)
            mlflow.log_params(_flatten({k: v for k, v in recipe.items() if k != "description"}))
            self.mlflow, self.mlflow_run = mlflow, {"tracking_uri": mlflow_uri, "run_id": run.info.run_id}
            self.notes.append(f"MLflow run {run.info.run_id} at {mlflow_uri}")

    def log_epoch(self, row: dict[str, float]) -> None:
        """One history row's losses, metrics and learning rate as train/* and val/* scalars at step = epoch, to every
        sink on."""
        step = int(row["epoch"])
        scalars = {f"{'train' if k.startswith('train') else 'val'}/{k.split('_', 1)[-1]}": float(v)
                   for k, v in row.items() if k.startswith(("train_", "val_"))}
        scalars["lr"] = float(row["lr"])
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, step)
            self.tb.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars.items()}, step=step)

    def finish(self, run_dir: Path, final: dict, per_class: list[dict]) -> None:
        """The best epoch's per-class table, the plots and the run directory (less the resume state)."""
        if self.tb is not None:
            self.tb.add_text("best/per_class", "\n".join(f"{c['class']}: IoU {c['iou']}" for c in per_class))
            self.tb.close()
        if self.mlflow is None:
            return
        m = self.mlflow
        m.log_metrics({"best_val_miou": float(final["best_val_miou"]), "best_epoch": float(final["best_epoch"])})
        m.log_metrics({f"best_val_iou_{c['class']}": c["iou"] for c in per_class if c["iou"] is not None})
        m.log_dict({"per_class": per_class}, "per_class.json")
        for path in sorted(run_dir.iterdir()):
            if path.name in (LAST_CKPT, TENSORBOARD_DIR):
                continue
            if path.is_dir():
                m.log_artifacts(str(path), f"run/{path.name}")
            else:
                m.log_artifact(str(path), "run")
        m.end_run()

    def abort(self) -> None:
        """Close the sinks of an interrupted or failed run (its MLflow run ends as KILLED)."""
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run(status="KILLED")


def log_report(run_meta: dict, name: str, report: dict, metrics: dict[str, float] | None = None) -> str | None:
    """Attach a later verb's report (export's parity, bench's rows) to the run's MLflow run, if
    training recorded one. Returns a line saying where it went, or None."""
    info = run_meta.get("mlflow")
    if not info:
        return None
    mlflow = _mlflow(info["tracking_uri"])
    with mlflow.start_run(run_id=info["run_id"]):
        mlflow.log_dict(report, f"{name}.json")
        if metrics:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
    return f"{name} logged to MLflow run {info['run_id']}"
