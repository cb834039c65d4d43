"""The shape of model/, the shared core: imports go one way, none hide inside functions, nothing reaches up.

Read from the source with ``ast``, so a cycle or an upward import fails here before it fails at import
time in some order nobody tried.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

MODEL = ROOT / "model"
UPWARD = ("app", "serving", "training", "bench", "deploy", "tests")


def _modules() -> dict[str, ast.Module]:
    return {f"model.{p.stem}": ast.parse(p.read_text(), str(p)) for p in sorted(MODEL.glob("*.py"))}


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return [node.module or ""]


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    return [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_no_import_inside_a_function_in_model() -> None:
    hidden = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                hidden += [
                    f"{name}:{sub.lineno}" for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))
                ]
    assert not hidden, f"imports inside functions or classes: {hidden}"


def test_model_imports_nothing_above_it_and_no_private_names() -> None:
    for name, tree in _modules().items():
        for node in _top_level_imports(tree):
            for target in _imported(node):
                assert target.split(".")[0] not in UPWARD, f"{name} imports {target}"
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("model."):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{name} imports private {private} from {node.module}"


def test_model_import_graph_has_no_cycle() -> None:
    modules = _modules()
    graph = {
        name: {t for n in _top_level_imports(tree) for t in _imported(n) if t in modules and t != name}
        for name, tree in modules.items()
    }
    graph["model.__init__"] = set()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, "import cycle: " + " -> ".join([*path[path.index(name) :], name])
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


# What a serving worker on the ONNX backend imports: none of it may pull in torch (a lean worker).
LIGHT = (
    "model.images",
    "model.preprocessing",
    "model.files",
    "model.pixels",
    "model.bundle_format",
    "model.predictor",
    "model.export_metadata",
    "model.onnx_runner",
    "serving.registry",
    "serving.api",
    "serving.explain",
    "app",
)


def test_every_model_module_imports_and_the_light_ones_stay_torch_free() -> None:
    names = sorted(f"model.{p.stem}" for p in MODEL.glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for light in {LIGHT!r}:\n"
        "    importlib.import_module(light)\n"
        "assert 'torch' not in sys.modules, 'a light module pulled in torch'\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_model_holds_no_training_or_serving_tool() -> None:
    present = {p.name for p in Path(MODEL).glob("*.py")}
    assert not present & {"prune.py", "sparsity.py", "allocator.py", "onnx_files.py"}
