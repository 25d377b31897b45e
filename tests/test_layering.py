"""The package's import graph: no cycles, and no module importing from a layer above its own.

Layers, lowest first (a module may import its own layer and the ones below):

0. model pieces: systems, solvers, stopping, data, readouts, results, plots, settings, errors
1. ``settle`` and its backends (``backend``, ``compiled``)
2. the event loop and what plugs into it: engine, callbacks, plasticity, monitors, evaluation,
   streaming, checkpoints, the SSL rules and stages
3. builders and each command's settings (``builders``, ``configs``)
4. experiments: pipelines, studies, sweeps, the scikit-learn transformer
5. the command line (``cli``, ``__main__``) and the package's flat namespace (``dynsim``)

Every ``from dynsim... import`` and ``import dynsim...`` counts, at module level or inside a
function (a lazy import still ties the modules together); only imports under
``if TYPE_CHECKING:`` are left out (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "dynsim"

# longest matching prefix wins
LAYERS: dict[str, int] = {
    "dynsim.errors": 0,
    "dynsim._version": 0,
    "dynsim.settings": 0,
    "dynsim.config": 0,
    "dynsim.data": 0,
    "dynsim.readouts": 0,
    "dynsim.results": 0,
    "dynsim.plots": 0,
    "dynsim.systems": 0,
    "dynsim.solvers": 0,
    "dynsim.stopping": 0,
    "dynsim.settle": 1,
    "dynsim.backend": 1,
    "dynsim.compiled": 1,
    "dynsim.compiled_deep": 1,
    "dynsim.compiled_cg": 1,
    "dynsim.engine": 2,
    "dynsim.callbacks": 2,
    "dynsim.plasticity": 2,
    "dynsim.monitors": 2,
    "dynsim.layer_monitor": 2,
    "dynsim.evaluation": 2,
    "dynsim.streaming": 2,
    "dynsim.checkpoint": 2,
    "dynsim.outputs": 2,
    "dynsim.warmup": 2,
    "dynsim.fused": 2,
    "dynsim.ssl": 2,
    "dynsim.builders": 3,
    "dynsim.configs": 3,
    "dynsim.pipelines": 4,
    "dynsim.studies": 4,
    "dynsim.sweeps": 4,
    "dynsim.sklearn": 4,
    "dynsim.cli": 5,
    "dynsim.__main__": 5,
    "dynsim": 5,
}


def _modules(root: Path = ROOT) -> dict[str, Path]:
    mods = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``module -> modules of the package it imports`` (module and function level)."""
    mods = _modules(root)

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "dynsim":
                for alias in node.names:  # ``from dynsim.cli import ssl`` names a submodule
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in mods else owner(node.module))
            elif isinstance(node, ast.Import):
                deps.update(owner(a.name) for a in node.names if a.name.split(".")[0] == "dynsim")
        deps.discard(mod)
        deps.discard(None)
        graph[mod] = deps
    return graph


def layer_of(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_layering.py")
    return LAYERS[best]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
                  for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m))


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
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


GRAPH = import_graph()


def test_every_module_has_a_layer():
    for module in GRAPH:
        layer_of(module)


def test_no_module_imports_from_a_layer_above():
    assert upward_imports(GRAPH) == []


def test_the_package_has_no_import_cycles():
    assert cycles(GRAPH) == []


def test_pipelines_only_orchestrate():
    """Each pipeline module stays small: builders, settings, the CLI and studies live elsewhere."""
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "pipelines").glob("*.py")}
    assert all(n <= 260 for n in sizes.values()), sizes
    for path in (ROOT / "pipelines").glob("*.py"):
        text = path.read_text()
        assert "argparse" not in text and "__main__" not in text, path.name


def test_solvers_plasticity_and_systems_do_not_reach_into_the_compiled_kernels():
    for module, deps in GRAPH.items():
        if module.startswith(("dynsim.solvers", "dynsim.plasticity", "dynsim.systems")):
            assert "dynsim.compiled" not in deps, module


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}, [["a", "b"], ["c", "d"]]),
    ],
)
def test_cycle_finder_on_known_graphs(graph, expected):
    assert sorted(cycles(graph)) == expected


def test_the_checks_catch_the_old_cli_cycle_and_an_upward_import(tmp_path):
    """The cli <-> pipelines.ssl cycle this package once had (a pipeline's ``__main__`` that
    imported the CLI), rebuilt in a scratch package, is found by both checks."""
    pkg = tmp_path / "dynsim"
    (pkg / "pipelines").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "pipelines" / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("def main():\n    from dynsim.pipelines import ssl\n")
    (pkg / "pipelines" / "ssl.py").write_text("if __name__ == '__main__':\n    from dynsim.cli import main\n")
    graph = import_graph(pkg)
    assert graph["dynsim.cli"] == {"dynsim.pipelines.ssl"}
    assert cycles(graph) == [["dynsim.cli", "dynsim.pipelines.ssl"]]
    assert upward_imports(graph) == ["dynsim.pipelines.ssl (layer 4) imports dynsim.cli (layer 5)"]
