"""The layering in docs/ARCHITECTURE.md, checked over the source: a lower layer never imports a
higher one (an AST walk of every import, including those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "segdeploy"
VERBS = ("segdeploy.train", "segdeploy.evaluate", "segdeploy.export", "segdeploy.predict", "segdeploy.bench",
         "segdeploy.importing")


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("segdeploy")}


def modules(*globs: str) -> list[Path]:
    """The package's modules but the entry point (`python -m segdeploy` runs the CLI, like the script)."""
    return sorted({p for g in globs for p in PKG.glob(g)} - {PKG / "__main__.py"})


@pytest.mark.parametrize(("files", "forbidden"), [
    (("runtime/*.py",), VERBS + ("segdeploy.cli",)),  # runtime never reaches up to export or any verb
    (("data/*.py", "predict.py", "jobs.py", "cluster.py", "viz.py"), ("segdeploy.evaluate", "segdeploy.cli")),
    (("artifact.py", "tiling.py", "decision.py", "scoring.py", "metrics.py", "recipe.py", "registry.py", "errors.py", "utils.py",
      "viz.py", "tracking.py", "checkpoint.py", "foreign_onnx.py"), VERBS + ("segdeploy.runtime", "segdeploy.cli")),
    (("*.py", "data/*.py", "export/*.py", "runtime/*.py"), ("segdeploy.cli",)),  # only the CLI imports the CLI
])
def test_lower_layers_do_not_import_higher_ones(files: tuple[str, ...], forbidden: tuple[str, ...]) -> None:
    offenders = [(p.relative_to(PKG.parent).as_posix(), m) for p in modules(*files) for m in sorted(imports_of(p))
                 if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert not offenders, offenders


def test_the_layer_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    probe = tmp_path / "m.py"
    probe.write_text("def f():\n    from segdeploy.export.onnx import read_metadata\n")
    assert imports_of(probe) == {"segdeploy.export.onnx"}


RUN_FILE_NAMES = ("history.csv", "meta.json", "model.safetensors", "model.torchscript.pt", "model.pt2", "recipe.yaml",
                  "last.ckpt", "splits.json", "parity.json",
                  "parity.md", "model.onnx", "model.fp16.onnx", "model.int8.onnx", "model.int8.cpu.onnx",
                  "model.engine", "model.int8.engine", "threshold.json", "thresholds.png")


def code_strings(path: Path) -> list[str]:
    """String constants in code, docstrings and help texts aside (those may name files for people)."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    helps = {id(k.value) for n in ast.walk(tree) if isinstance(n, ast.Call) for k in n.keywords if k.arg == "help"}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs and id(n) not in helps]


def test_run_file_names_are_spelled_only_in_artifact() -> None:
    offenders = [(p.relative_to(PKG.parent).as_posix(), s) for p in modules("**/*.py") if p.name != "artifact.py"
                 for s in code_strings(p) if any(name == s or f"/{name}" in s or s.startswith(name) for name in RUN_FILE_NAMES)]
    assert not offenders, offenders


def test_no_function_is_longer_than_80_lines() -> None:
    long = [(p.relative_to(PKG.parent).as_posix(), n.name, n.end_lineno - n.lineno + 1) for p in modules("**/*.py")
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 80]
    assert not long, long
