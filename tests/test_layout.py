"""The layout holds: commands in front (short, never imported by the library), no import
circle among the project's modules (imports inside functions counted), triton only in
kernels/fused/, and at most two flat library modules in engine/."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("engine", "kernels", "models")
COMMANDS = {"engine.train", "engine.sample", "engine.evaluate", "engine.probe", "engine.toy",
            "engine.extract_latents", "engine.digits", "engine.plot"}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports anywhere in its file (relative imports resolved)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # ``from X import y``: the module X.y when there is one, else X itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node)


def test_no_library_module_imports_a_command():
    upward = sorted(f"{m} -> {d}" for m, ds in _graph().items() if m not in COMMANDS for d in ds if d in COMMANDS)
    assert upward == []


def test_commands_are_short_and_are_the_only_flat_modules_with_a_main():
    mods = _modules()
    for name in COMMANDS:
        lines = len(mods[name].read_text().splitlines())
        assert lines <= 150, f"{name} has {lines} lines"
    flat_library = sorted(n for n, path in mods.items() if n.count(".") == 1 and n.startswith("engine.")
                          and path.name != "__init__.py" and n not in COMMANDS)
    assert len(flat_library) <= 2, flat_library  # engine.distributed (and room for one more)
    for name in flat_library:
        assert "__main__" not in mods[name].read_text(), f"{name} looks like a command"


def test_only_kernels_fused_imports_triton():
    importers = []
    for path in [*REPO.joinpath("engine").rglob("*.py"), *REPO.joinpath("kernels").rglob("*.py"),
                 *REPO.joinpath("models").rglob("*.py"), *REPO.joinpath("bench").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n.split(".")[0] == "triton" for n in names):
                importers.append(str(path.relative_to(REPO)))
    assert importers and all(p.startswith("kernels/fused/") for p in importers), sorted(set(importers))
