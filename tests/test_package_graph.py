"""The package graph: which ``meswitch.<pkg>`` imports which, read from the source with ``ast``.

Every import counts, those inside functions and under ``TYPE_CHECKING`` included: a lazy import is
still a dependency. The libraries point one way (store, deltas <- compress <- eval ... <- jobs <- cli);
orchestration (loading checkpoints, looping over experts, measuring what a library made) lives in
``meswitch.jobs``, and nothing below it imports it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "meswitch"

Graph = dict[str, set[str]]


def _package_of(path: Path, src: Path) -> str:
    """``src/meswitch/compress/pipeline.py`` -> ``meswitch.compress``; ``src/meswitch/errors.py`` -> ``meswitch.errors``;
    ``src/meswitch/__init__.py`` -> ``meswitch``."""
    parts = path.relative_to(src).with_suffix("").parts
    if parts == ("__init__",):
        return "meswitch"
    return f"meswitch.{parts[0]}"


def _module_of(path: Path, src: Path) -> list[str]:
    """The dotted name of the module at ``path``, as parts (a package's ``__init__`` is the package)."""
    parts = ["meswitch", *path.relative_to(src).with_suffix("").parts]
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imported(path: Path, src: Path) -> Iterable[str]:
    """Every absolute module name the file at ``path`` imports (``from X import y`` gives ``X`` and ``X.y``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = _module_of(path, src)
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing module's package
                anchor = here if is_pkg else here[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                module = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def _target(name: str, packages: set[str]) -> str | None:
    """The meswitch package an imported module name belongs to, or None outside meswitch."""
    parts = name.split(".")
    if parts[0] != "meswitch":
        return None
    if len(parts) > 1 and f"meswitch.{parts[1]}" in packages:
        return f"meswitch.{parts[1]}"
    return "meswitch"  # the root package itself (``from meswitch import __version__``)


def package_graph(src: Path = SRC) -> Graph:
    """``{package: packages it imports}`` over every ``.py`` under ``src``, self-imports left out."""
    files = sorted(src.rglob("*.py"))
    packages = {_package_of(f, src) for f in files}
    graph: Graph = {p: set() for p in packages}
    for f in files:
        pkg = _package_of(f, src)
        for name in _imported(f, src):
            dep = _target(name, packages)
            if dep is not None and dep != pkg:
                graph[pkg].add(dep)
    return graph


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None when it has none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _edges(graph: Mapping[str, set[str]]) -> str:
    return "\n".join(f"{a} -> {b}" for a in sorted(graph) for b in sorted(graph[a]))


@pytest.fixture(scope="module")
def graph() -> Graph:
    g = package_graph()
    print("\n" + _edges(g))  # visible with -s: the whole graph, one edge a line
    return g


def _forbidden(graph: Graph, pkg: str, banned: Iterable[str]) -> list[str]:
    return sorted(f"meswitch.{pkg} -> meswitch.{b}" for b in banned if f"meswitch.{b}" in graph[f"meswitch.{pkg}"])


# ---- the checks ----------------------------------------------------------------------------------------


def test_the_reader_sees_every_kind_of_import(tmp_path):
    src = tmp_path / "meswitch"
    for rel, text in {
        "__init__.py": "",
        "errors.py": "",
        "a/__init__.py": "from . import inner\n",
        "a/inner.py": "from ..b import thing\n",
        "b/__init__.py": "def f():\n    import meswitch.c.deep\n",
        "c/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from meswitch import a\n",
        "c/deep.py": "from meswitch.errors import E\nfrom meswitch import __version__\n",
    }.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    g = package_graph(src)
    assert g == {"meswitch": set(), "meswitch.errors": set(), "meswitch.a": {"meswitch.b"},
                 "meswitch.b": {"meswitch.c"}, "meswitch.c": {"meswitch.a", "meswitch.errors", "meswitch"}}
    assert find_cycle(g) == ["meswitch.a", "meswitch.b", "meswitch.c", "meswitch.a"]


def test_the_package_graph_has_no_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle or [])


def test_the_libraries_point_one_way(graph):
    bad = [
        *_forbidden(graph, "compress", ["eval", "engine", "server", "ray_app", "cli", "jobs"]),
        *_forbidden(graph, "eval", ["compress", "jobs", "cli"]),
        *(edge for pkg in ("store", "deltas") if f"meswitch.{pkg}" in graph
          for edge in _forbidden(graph, pkg, ["engine", "compress", "router", "server", "ray_app", "cli", "jobs",
                                              "front", "eval", "zoo", "data"])),
    ]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_engine_serves_named_experts_only_imports(graph):
    """The engine serves experts from a store: it neither routes, compresses, orchestrates nor builds the zoo."""
    bad = _forbidden(graph, "engine", ["router", "compress", "server", "ray_app", "cli", "jobs", "front",
                                       "zoo", "data"])
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_nothing_below_the_cli_imports_the_jobs(graph):
    """``meswitch.jobs`` sits above the libraries: only the entry points (cli, and the root's ``__main__``) import it."""
    users = sorted(p for p, deps in graph.items() if "meswitch.jobs" in deps)
    assert set(users) <= {"meswitch.cli", "meswitch.__main__"}, users
