"""The layering in docs/ARCHITECTURE.md, checked over the source: a lower layer never imports a
higher one (an AST walk of every import, including those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "segdeploy"
VERBS = ("segdeploy.train", "segdeploy.evaluate", "segdeploy.export", "segdeploy.predict", "segdeploy.bench")


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
    (("artifact.py", "tiling.py", "metrics.py", "recipe.py", "registry.py", "errors.py", "utils.py", "viz.py",
      "tracking.py"), VERBS + ("segdeploy.runtime", "segdeploy.cli")),
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

