"""`segdeploy info RUN|MODEL`: what a run or an exported model is, read from its files alone.

For a run: status (and why it failed), epochs, best validation metrics, the model, the data it
was trained on and its splits, the evaluations on disk, every export form with its gate result,
staleness and size, and the versions that made it. For an `.onnx`/`.engine`: its metadata, what
it was made from (and whether that changed since), its gate result when its run is beside it.
Imports neither torch nor onnxruntime: it runs in the core install.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from segdeploy.artifact import EXPORT_FORMS, ModelMeta, Run, artifact_meta, check_source, form_of, read_onnx_meta
from segdeploy.errors import ArtifactError


def describe(path: Path) -> dict[str, Any]:
    """A JSON-able description of a run directory or an exported model file. Raises ArtifactError
    for a path that is neither."""
    path = Path(path)
    if path.is_dir():
        return describe_run(Run(path))
    if not path.is_file():
        raise ArtifactError(f"{path} not found; pass a run directory, a .onnx or a .engine file")
    if form_of(path) is None:
        raise ArtifactError(f"{path} is not a model artifact: expected a run directory, a .onnx or a .engine file")
    return describe_model(path)


def describe_run(run: Run) -> dict[str, Any]:
    """The facts `segdeploy info` shows for a run directory as JSON types: status, epochs, best metrics, model, data
    and splits, evaluations, exports with their gate records and staleness, versions. Raises ArtifactError when
    meta.json is missing or corrupt; needs no torch."""
    info = run.info  # ArtifactError when meta.json is missing or corrupt
    meta = ModelMeta.from_dict(info.get("model_meta") or {}, str(run.meta_path)) if info.get("model_meta") else None
    recipe = _recipe_facts(run)
    history = run.read_history()
    out: dict[str, Any] = {
        "kind": "run", "path": str(run.root), "status": info.get("status"), "error": info.get("error"),
        "epochs_done": info.get("epochs_run", info.get("epochs_done", len(history))),
        "epochs_planned": recipe.get("epochs"),
        "best": {"val_miou": info.get("best_val_miou"), "epoch": info.get("best_epoch"),
                 "levels": info.get("best_val_levels")} if info.get("best_epoch") else None,
        "last_epoch": history[-1] if history else None,
        "stopped_early": info.get("stopped_early"), "train_images_per_s": info.get("train_images_per_s"),
        "world_size": info.get("world_size"), "nondeterministic_ops": info.get("nondeterministic_ops"),
        "model": _model_facts(meta) if meta else None, "recipe": recipe,
        "splits": {k: len(v) for k, v in run.split_keys().items()},
        "evaluations": _evaluations(run), "exports": _exports(run),
        "versions": meta.versions if meta else {}, "mlflow": info.get("mlflow"),
        "model_format": info.get("model_format", "weights"), "imported_from": info.get("imported_from"),
    }
    if info.get("status") != "complete":
        from segdeploy.artifact import continue_hint

        out["next"] = continue_hint(run.root)
    return out


def _recipe_facts(run: Run) -> dict[str, Any]:
    """Name, data root, seed and epochs from RUN/recipe.yaml (read as YAML: no validation needed)."""
    import yaml

    try:
        raw = yaml.safe_load(run.recipe_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    train, data = raw.get("train") or {}, raw.get("data") or {}
    return {"name": raw.get("name"), "data_root": data.get("root"), "seed": train.get("seed"),
            "epochs": train.get("epochs"), "deterministic": train.get("deterministic", False),
            "loss": [t.get("name") for t in raw.get("loss") or [] if isinstance(t, dict)]}


def _model_facts(meta: ModelMeta) -> dict[str, Any]:
    return {"arch": meta.arch, "encoder": meta.encoder, "classes": meta.classes, "bands": meta.bands,
            "input_dtype": meta.input_dtype, "tile_size": meta.tile_size, "input_divisor": meta.input_divisor,
            "static_size": meta.static_size, "recipe_digest": meta.recipe_digest}


def _evaluations(run: Run) -> list[dict[str, Any]]:
    """Each evaluation on disk under RUN/eval (split, mIoU, images, backend)."""
    found = []
    for metrics in run.evaluation_files():
        try:
            m = json.loads(metrics.read_text())
        except (OSError, ValueError):
            continue
        found.append({"dir": str(metrics.parent), "split": m.get("split"), "miou": m.get("miou"),
                      "images": m.get("images"), "backend": m.get("backend")})
    return found


def _exports(run: Run) -> list[dict[str, Any]]:
    """Every export form: present or not (with the command that makes it), its size, staleness and
    the gate's verdict on it."""
    present = {e.form.key: e for e in run.exports()}
    rows = []
    for key, form in EXPORT_FORMS.items():
        row: dict[str, Any] = {"form": key, "file": form.file, "backend": form.backend, "precision": form.precision}
        found = present.get(key)
        if found is None:
            row["present"] = False
            row["make_with"] = " ".join((f"segdeploy export {run.root}", *form.flags))
        else:
            row |= {"present": True, "path": str(found.path), "size_mb": round(found.path.stat().st_size / 2**20, 2),
                    "stale": found.stale or None, "gate": _gate_summary(found.gate)}
        rows.append(row)
    return rows


def _gate_summary(record: dict[str, Any] | None) -> dict[str, Any] | None:
    if not record:
        return None
    keys = ("passed", "agreement", "thresholds", "reduced_flops_share", "failures", "gated_at", "command", "note")
    out = {k: record.get(k) for k in keys if k in record}
    drops = [c.get("iou_drop_points") for c in record.get("per_class", []) if c.get("iou_drop_points") is not None]
    out["worst_class_iou_drop_points"] = round(max(drops), 3) if drops else None
    return out


def describe_model(path: Path) -> dict[str, Any]:
    """An exported file: its metadata, its source and whether that changed, its run's gate record."""
    meta = artifact_meta(path)
    form = form_of(path)
    stale = None
    try:
        check_source(path, meta, read_onnx_meta)
    except ArtifactError as exc:
        stale = str(exc)
    run = Run.find(path)
    gate = None
    if run is not None and form is not None and path.resolve() == run.export_path(form.key).resolve():
        gate = _gate_summary(run.gate_records().get(form.key))
    return {"kind": "model", "path": str(path), "form": form.key if form else None,
            "backend": form.backend if form else None, "precision": form.precision if form else None,
            "size_mb": round(path.stat().st_size / 2**20, 2), "model": _model_facts(meta),
            "source": meta.source, "stale": stale, "gate": gate, "run": str(run.root) if run else None,
            "versions": meta.versions}
