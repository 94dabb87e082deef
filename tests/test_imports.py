"""The package's imports go one way (ARCHITECTURE.md, "Layers of the package"): no cycles, `core/`
imports no method and `kernels/` imports no method or core module. Read with `ast`, not by importing."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "minipeft"
METHOD_PACKAGES = ("minipeft.additive", "minipeft.selective", "minipeft.reparameterized", "minipeft.quant")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph() -> dict[str, set[str]]:
    """{module: the minipeft modules it imports}, resolving relative imports and `from pkg import module`."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                candidates = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for target in candidates:
                while target and target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target in modules and target != name and not name.startswith(target + "."):
                    edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(u: str) -> None:
        state[u] = "open"
        stack.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == "open":
                found.append(stack[stack.index(v) :] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for u in sorted(edges):
        if u not in state:
            visit(u)
    return found


def test_the_checker_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_core_and_kernels_import_no_method():
    edges = graph()
    for module, targets in edges.items():
        if module.startswith(("minipeft.core", "minipeft.kernels")):
            assert not [t for t in targets if t.startswith(METHOD_PACKAGES)], module
        if module.startswith("minipeft.kernels"):
            assert not [t for t in targets if t.startswith("minipeft.core")], module
