"""The package's layers point one way: no import cycles, the server never imports the simulator, and reading a
config loads no torch. Read statically from the source (imports inside functions count; ``TYPE_CHECKING``
imports do not, they never run)."""

from __future__ import annotations

import ast
import subprocess
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).parents[2] / "fedtune"


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        if "_proto" in path.parts:
            continue
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports inside ``if TYPE_CHECKING:`` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                for sub in ast.walk(inner):
                    if isinstance(sub, ast.Import | ast.ImportFrom):
                        lines.add(sub.lineno)
    return lines


def import_graph() -> dict[str, set[str]]:
    """Module -> the fedtune modules it imports (a name imported from a package counts as its submodule when
    there is one, else as the package)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_only(tree)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in modules else node.module)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 50
    assert cycles(graph) == []


def test_the_server_imports_nothing_from_the_simulator() -> None:
    graph = import_graph()
    server = [m for m in graph if m.startswith("fedtune.server")]
    assert server
    bad = {m: sorted(d for d in graph[m] if d.startswith("fedtune.simulation")) for m in server}
    assert not any(bad.values()), bad
    # nor do the shared layers the server stands on
    for shared in ("fedtune.rounds", "fedtune.dispatch", "fedtune.checkpoint", "fedtune.report", "fedtune.global_model"):
        assert not any(d.startswith(("fedtune.simulation", "fedtune.server")) for d in graph[shared]), shared


def test_reading_a_config_imports_no_torch() -> None:
    code = ("import sys; from fedtune.config import load_config; load_config(None, ['strategy.name=svd']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_the_wire_encodings_a_config_accepts_are_the_transports() -> None:
    from fedtune.sections import WireEncoding
    from fedtune.transport.encodings import ENCODINGS

    assert set(typing.get_args(WireEncoding)) == set(ENCODINGS)
