"""The package's import graph: data flows forward, so no module imports one that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "analysis"



def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.AST) -> list[str]:
    """Every analysis module imported at run time (module level or inside functions), not the ones under
    ``if TYPE_CHECKING:`` (annotations only)."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("analysis"):
            found.extend(f"{node.module}.{alias.name}" for alias in node.names)
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names if alias.name.startswith("analysis"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {t for t in _runtime_imports(ast.parse(path.read_text())) if t in modules}
        edges[name] = {t for t in targets if t not in (name, "analysis") and not name.startswith(f"{t}.")}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
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
                found.append(frozenset(component))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return found


def test_no_module_imports_one_that_imports_it_back() -> None:
    edges = graph()
    assert {"analysis.report.summary", "analysis.report.figures"} <= edges["analysis.report.text"]  # lazy imports count too
    assert cycles(edges) == [], [sorted(c) for c in cycles(edges)]


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset({"a", "b", "c"})]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_modules_stay_short_or_say_why() -> None:
    """One module, one job: a module over 400 lines states at its top why it is not split."""
    long = {}
    for path in ROOT.rglob("*.py"):
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if len(text.splitlines()) > 400 and "Over 400 lines:" not in doc:
            long[str(path.relative_to(ROOT))] = len(text.splitlines())
    assert not long, long


def test_no_six_lines_written_twice() -> None:
    """No run of six code lines (imports, comments and blank lines aside) appears twice within analysis/."""
    first: dict[tuple[str, ...], str] = {}
    twice = []
    for path in sorted(ROOT.rglob("*.py")):
        lines = [line.strip() for line in path.read_text().splitlines()]
        code = [(n, line) for n, line in enumerate(lines, 1)
                if line and not line.startswith(("#", "import ", "from "))]
        for k in range(len(code) - 5):
            window = tuple(line for _, line in code[k:k + 6])
            if sum(map(len, window)) < 120:  # closing brackets, `else:`, `return x`: not code worth sharing
                continue
            where = f"{path.relative_to(ROOT)}:{code[k][0]}"
            if first.setdefault(window, where) != where:
                twice.append((first[window], where))
    assert not twice, twice
