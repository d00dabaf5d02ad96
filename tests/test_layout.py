"""The package layout: no import loops and dependencies that point down the stages.

Every module of ds_vicuna/, serve/ (installed as `ds_vicuna.serve`) and eval/ (`ds_vicuna.eval`) is parsed, and
every import in it counts, inside functions too: an import moved into a function to dodge a loop is still a loop.
Only import statements count: a package's `__init__` that Python runs before its modules is not an edge unless a
module imports from the package by name.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"ds_vicuna": "ds_vicuna", "serve": "ds_vicuna.serve", "eval": "ds_vicuna.eval"}
# stage -> the stages it must not import (nothing imports upward)
STAGES = ("chat", "model", "data", "train", "serve", "eval")
FORBIDDEN = {
    "chat": ("data", "model", "train", "serve", "eval"),
    "model": ("data", "train", "serve", "eval"),
    "data": ("train", "serve", "eval"),
    "train": ("serve", "eval"),
}


def module_files() -> dict[str, Path]:
    """Module name -> file, for every .py under the three folders."""
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `path` imports anywhere (module level, functions, classes)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]  # `from pkg import module`
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_every_folder_is_parsed():
    modules = module_files()
    assert {"ds_vicuna.chat.encoding", "ds_vicuna.serve.api_router", "ds_vicuna.eval.questions"} <= set(modules)
    assert "ds_vicuna.data.overlap" in import_graph()["ds_vicuna.data.cli"]


def test_no_import_loops():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import loop: " + " -> ".join(cycle)


def test_dependencies_point_down_the_stages():
    upward = []
    for module, imports in sorted(import_graph().items()):
        stage = stage_of(module)
        for target in sorted(imports):
            if stage_of(target) in FORBIDDEN.get(stage, ()):
                upward.append(f"{module} imports {target} ({stage} must not import {stage_of(target)})")
    assert not upward, "\n".join(upward)


def test_the_checks_catch_a_loop_and_an_upward_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert stage_of("ds_vicuna.data.overlap") == "data" and stage_of("ds_vicuna.cli") is None


def test_imports_inside_functions_and_relative_imports_count(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from ds_vicuna.eval import judge\n    from . import split\n")
    known = {"ds_vicuna.eval", "ds_vicuna.eval.judge", "ds_vicuna.data", "ds_vicuna.data.split", "ds_vicuna.data.x"}
    assert imported_modules("ds_vicuna.data.x", source, known) == {"ds_vicuna.eval", "ds_vicuna.eval.judge",
                                                                   "ds_vicuna.data", "ds_vicuna.data.split"}
