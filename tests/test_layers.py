"""What docs/ARCHITECTURE.md promises about the layers, checked over the source with an AST walk
of every import, including those inside functions: no import cycle between segdeploy's modules,
no verb importing another verb (the CLI composes them), a lower layer never importing a higher
one, and artifact never importing the model catalogue, a runtime or torch's model side."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "segdeploy"
VERBS = ("segdeploy.train", "segdeploy.evaluate", "segdeploy.export", "segdeploy.predict", "segdeploy.bench",
         "segdeploy.importing")
# each verb and the modules only it uses (predict's many-raster runners are predict's); the CLI
# (segdeploy.cli.*, quickstart included: its six steps are verbs called in a row) may import every
# verb, and `python -m segdeploy` (__main__) runs the CLI
VERB_FAMILIES = {"train": ("segdeploy.train",), "import": ("segdeploy.importing",),
                 "evaluate": ("segdeploy.evaluate",), "export": ("segdeploy.export",),
                 "predict": ("segdeploy.predict", "segdeploy.jobs", "segdeploy.cluster"), "bench": ("segdeploy.bench",)}


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


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_graph() -> dict[str, set[str]]:
    """segdeploy module -> the segdeploy modules it imports anywhere in its file (``from a import b``
    counts as a.b when that is a module, else as a)."""
    names = {module_name(p) for p in modules("**/*.py")}

    def owner(name: str) -> str:
        while name and name not in names:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for p in modules("**/*.py"):
        out: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("segdeploy"):
                out.update(owner(f"{node.module}.{a.name}") for a in node.names)
            elif isinstance(node, ast.Import):
                out.update(owner(a.name) for a in node.names if a.name.startswith("segdeploy"))
        graph[module_name(p)] = out - {module_name(p), ""}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_segdeploy_modules() -> None:
    assert not cycles(module_graph())


def test_the_cycle_check_sees_a_cycle_through_a_function_level_import() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_verb_imports_another_verb() -> None:
    family = {m: verb for verb, mods in VERB_FAMILIES.items() for m in mods}

    def verb_of(name: str) -> str | None:
        return next((family[f] for f in family if name == f or name.startswith(f + ".")), None)

    offenders = [(m, dep) for m, deps in module_graph().items() if not m.startswith("segdeploy.cli")
                 for dep in sorted(deps) if verb_of(dep) and verb_of(dep) != verb_of(m)]
    assert not offenders, offenders


def test_artifact_imports_no_model_runtime_or_verb() -> None:
    """artifact is read by every verb and by predict on an ONNX file: it must not pull the model
    catalogue, a runtime or a verb. torch itself only inside the Run methods that read and write
    torch-format files (weights, resume checkpoint), so reading a run never imports it."""
    tree = ast.parse((PKG / "artifact.py").read_text())
    deps = module_graph()["segdeploy.artifact"]
    assert not [d for d in deps if d == "segdeploy.models" or d.startswith(("segdeploy.runtime", "segdeploy.cli"))
                or any(d == v or d.startswith(v + ".") for v in VERBS)], deps
    torch_users = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))
                   and any((getattr(n, "module", None) or a.name).split(".")[0] in ("torch", "safetensors")
                           for a in n.names)}
    assert torch_users <= {"save_weights", "load_weights", "save_checkpoint", "load_checkpoint"}, torch_users
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [n for n in top if (getattr(n, "module", None) or n.names[0].name).split(".")[0] in ("torch", "safetensors")]


@pytest.mark.parametrize(("files", "forbidden"), [
    (("runtime/*.py",), VERBS + ("segdeploy.cli",)),  # runtime never reaches up to export or any verb
    (("data/*.py", "predict.py", "jobs.py", "cluster.py", "viz.py"), ("segdeploy.evaluate", "segdeploy.cli")),
    (("artifact.py", "tiling.py", "decision.py", "scoring.py", "metrics.py", "recipe.py", "registry.py", "errors.py", "utils.py",
      "viz.py", "tracking.py", "checkpoint.py", "foreign_onnx.py", "classes.py", "onnx_props.py"),
     VERBS + ("segdeploy.runtime", "segdeploy.cli")),
    (("recipe.py", "classes.py", "onnx_props.py", "errors.py", "registry.py"),
     ("segdeploy.metrics", "segdeploy.viz", "segdeploy.models", "segdeploy.artifact")),  # the schema sits at the bottom
    (("*.py", "data/*.py", "export/*.py", "runtime/*.py"), ("segdeploy.cli",)),  # only the CLI imports the CLI
])
def test_lower_layers_do_not_import_higher_ones(files: tuple[str, ...], forbidden: tuple[str, ...]) -> None:
    offenders = [(p.relative_to(PKG.parent).as_posix(), m) for p in modules(*files) for m in sorted(imports_of(p))
                 if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert not offenders, offenders


def test_the_layer_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    probe = tmp_path / "m.py"
    probe.write_text("def f():\n    from segdeploy.export.onnx import export_onnx\n")
    assert imports_of(probe) == {"segdeploy.export.onnx"}


# every name artifact.py gives a file or folder of a run (derived from it, so a new constant is
# covered), and those that must stay among them (so a renamed constant is not silently dropped)
RUN_FILE_NAMES = ("history.csv", "meta.json", "model.safetensors", "model.torchscript.pt", "model.pt2", "recipe.yaml",
                  "last.ckpt", "splits.json", "parity.json",
                  "parity.md", "model.onnx", "model.fp16.onnx", "model.int8.onnx", "model.int8.cpu.onnx",
                  "model.engine", "model.int8.engine", "metrics.json", "confusion_matrix.png", "overlay_{:02d}.png",
                  "loss.png", "miou.png", "threshold.json", "thresholds.png")
RUN_DIR_NAMES = ("plots", "tensorboard", "export", "eval", "export-rejected", ".staging-")


def artifact_names() -> tuple[set[str], set[str]]:
    """(file names, folder names) artifact.py defines: its *_FILE/*_CKPT/*_SUMMARY/*_PLOT constants and
    dict/tuple values of them, the table of export forms' files, its *_DIR/*_PREFIX constants."""
    import segdeploy.artifact as art

    dirs: set[str] = set()
    for name, value in vars(art).items():
        values = value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else (value,)
        if name.endswith(("_DIR", "_PREFIX")):
            dirs.update(v for v in values if isinstance(v, str))
    return set(art.run_file_names()), dirs


def test_the_run_file_names_checked_are_artifacts_own() -> None:
    files, dirs = artifact_names()
    assert set(RUN_FILE_NAMES) <= files and set(RUN_DIR_NAMES) <= dirs, (set(RUN_FILE_NAMES) - files,
                                                                            set(RUN_DIR_NAMES) - dirs)


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
    files, dirs = artifact_names()
    stems = {f.split("{")[0] for f in files if "{" in f}  # a pattern's fixed start ("overlay_")
    files = {f for f in files if "{" not in f}

    def spells(s: str) -> bool:
        return (any(name == s or f"/{name}" in s or s.startswith(name) for name in files)
                or any(s.startswith(stem) for stem in stems)
                or any(s.startswith(f"{d}/") or f"/{d}/" in s for d in dirs))

    offenders = [(p.relative_to(PKG.parent).as_posix(), s) for p in modules("**/*.py") if p.name != "artifact.py"
                 for s in code_strings(p) if spells(s)]
    assert not offenders, offenders


def test_no_function_is_longer_than_80_lines() -> None:
    long = [(p.relative_to(PKG.parent).as_posix(), n.name, n.end_lineno - n.lineno + 1) for p in modules("**/*.py")
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 80]
    assert not long, long


def test_figures_are_written_only_by_viz_save_figure() -> None:
    """One helper writes figures (atomically); nobody switches matplotlib's backend or uses pyplot."""
    offenders = []
    for p in modules("**/*.py"):
        tree = ast.parse(p.read_text())
        for n in ast.walk(tree):
            called = n.func.attr if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) else None
            if (called == "savefig" and p.name != "viz.py") or (called == "use" and "matplotlib" in ast.unparse(n.func)):
                offenders.append((p.relative_to(PKG.parent).as_posix(), n.lineno, called))
        offenders += [(p.relative_to(PKG.parent).as_posix(), "imports", m) for m in imports_of_all(p)
                      if m == "matplotlib.pyplot"]
    assert not offenders, offenders


def imports_of_all(path: Path) -> set[str]:
    """Every module `path` imports, segdeploy's or not."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


# public definitions that may stay without a docstring (none today: keep it that way)
UNDOCUMENTED_ALLOWED: set[str] = set()


def test_every_public_definition_has_a_docstring() -> None:
    """Public functions, classes and their public methods say what they take and give (shapes,
    dtypes, units, errors): `_private` names and dunders are exempt, nothing else."""
    missing = []
    for p in modules("**/*.py"):
        def visit(body: list[ast.stmt], prefix: str) -> None:
            for n in body:
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not n.name.startswith("_"):
                    name = f"{p.relative_to(PKG.parent).as_posix()}::{prefix}{n.name}"
                    if ast.get_docstring(n) is None and name not in UNDOCUMENTED_ALLOWED:
                        missing.append(name)
                    if isinstance(n, ast.ClassDef):
                        visit(n.body, f"{prefix}{n.name}.")

        visit(ast.parse(p.read_text()).body, "")
    assert not missing, missing
