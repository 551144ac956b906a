"""The inference package's module layout: no import cycles, and what it imports is declared."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import medpipe.inference as pkg

ROOT = Path(pkg.__file__).resolve().parent
PYPROJECT = ROOT.parent.parent / "pyproject.toml"


def _imports(path: Path) -> set[str]:
    """Sibling modules that ``path`` imports, at its top or inside functions (``from .x import``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:  # from . import evaluate
                found.update(a.name for a in node.names)
    return found & {p.stem for p in ROOT.glob("*.py")}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle_between_inference_modules():
    graph = {p.stem: _imports(p) for p in ROOT.glob("*.py") if p.stem != "__init__"}
    assert "stage" not in graph["saliency"] and "model_input" in graph["saliency"]
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_evaluation_is_split_and_its_names_stay_importable():
    from medpipe.inference import evaluate

    for name in ("binary_metrics", "evaluate_archive", "evaluate_masks", "evaluate_studies", "make_labelled_volumes",
                 "read_labels_file", "read_mask_labels"):
        assert hasattr(evaluate, name)
    assert {"labels_io", "metrics", "evaluation_report"} <= _imports(ROOT / "evaluate.py")


def test_scikit_learn_is_a_declared_dependency():
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower() for d in deps}
    assert "sklearn" in _third_party(ROOT / "metrics.py") and "scikit-learn" in names


def _third_party(path: Path) -> set[str]:
    return {(n.module or "").split(".")[0] for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.ImportFrom) and n.level == 0}
