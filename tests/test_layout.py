"""The package's shape: one top-level name, serving code apart from training and benchmarks, no import cycles.

Imports are read from the source (ast), every `import` statement counted wherever it stands (module level,
inside functions, under TYPE_CHECKING), so a lazy import cannot hide a cycle or a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "specdesk"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules a file imports. `from pkg import mod` names the submodule pkg.mod, not pkg's
    __init__ (which Python runs first anyway); `from pkg import name` names pkg's __init__."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names}
            names.update(subs & modules)
            if subs - modules:
                names.add(node.module)
    return names & modules


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in [*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]}
    return {mod: _imports(path, set(files)) - {mod} for mod, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None. Iterative DFS with colours."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        path = [start]
        state[start] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                stack.pop()
                path.pop()
                state[node] = 2
                continue
            nxt = todo.pop()
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(graph[nxt])))
    return None


def test_graph_sees_real_imports() -> None:
    graph = import_graph()
    assert "specdesk.engine.llm_engine" in graph["specdesk.engine.llm"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    cycle = _cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_serving_code_imports_no_training_or_benchmarks() -> None:
    offenders = {
        mod: sorted(n for n in deps if n.startswith(("specdesk.training", "benchmarks")))
        for mod, deps in import_graph().items()
        if not mod.startswith(("specdesk.training", "benchmarks"))
    }
    assert not {m: d for m, d in offenders.items() if d}


def test_engine_and_kernels_import_no_app_db_or_prompts() -> None:
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith(("specdesk.engine", "specdesk.kernels")):
            bad = [n for n in deps if n.startswith(("specdesk.app", "specdesk.db", "specdesk.prompts"))]
            assert not bad, (mod, bad)


def test_no_file_over_400_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n for p in ROOT.glob("[!.]*/**/*.py") if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long


def test_one_top_level_name_and_no_shadowing() -> None:
    # Hugging Face's `kernels` (a transformers dependency) must stay importable from the repository root.
    code = "import kernels, transformers.models.llama.configuration_llama, specdesk; print(kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "site-packages" in out.stdout or "dist-packages" in out.stdout, out.stdout
    tops = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert tops == {"specdesk", "tests", "benchmarks"}, tops
