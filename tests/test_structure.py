"""The package's import structure, read with `ast`: every project import sits at the top of its module
(no import hidden inside a function to dodge a cycle), and the module import graph has no cycle."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "g2rpo_jax"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(node: ast.AST, modules: dict, current: str) -> set[str]:
    """The project modules an Import / ImportFrom node loads (``from pkg import mod`` counts mod)."""
    names = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
        base = node.module
        if node.level:  # relative import
            base = ".".join(current.split(".")[:-node.level] + [node.module])
        names = [base] + [f"{base}.{a.name}" for a in node.names]
    return {n for n in names if n in modules}


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    edges = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        edges[name] = set().union(*[imported_modules(n, modules, name) for n in tree.body]) - {name}
    return edges


def find_cycle(edges: dict[str, set[str]]):
    """One cycle as a list of modules, or None (depth-first search, colouring nodes)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_project_import_inside_a_function():
    modules = project_modules()
    hidden = []
    for name, path in modules.items():
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                hidden += [f"{path.relative_to(PACKAGE.parent)}:{n.lineno}" for n in ast.walk(fn)
                           if imported_modules(n, modules, name)]
    assert not hidden, f"project imports inside functions (move them to the module top): {hidden}"


def test_no_import_cycle_between_project_modules():
    edges = graph()
    assert "g2rpo_jax.setup" in edges["g2rpo_jax.train"]  # the graph is read (a sanity check of the parser)
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges))}"
