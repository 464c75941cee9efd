"""Imports: the task path never imports MPI, the command line does not load the benchmark,
and no module of hpcshare imports one that imports it back (imports inside functions count)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hpcshare"


def python(code: str) -> str:
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_importing_hpcshare_and_resolving_a_handle_never_import_mpi4py():
    out = python(
        """
        import pickle, sys
        import numpy as np
        import hpcshare
        from hpcshare import context, registry
        print("import", "mpi4py" in sys.modules)
        h = pickle.loads(pickle.dumps(hpcshare.ArrayHandle("lut", (4,), np.dtype("f8"), "C", "g1")))
        print("unpickle", "mpi4py" in sys.modules)
        with context.running(context.JobContext(generation="g1")):
            registry.register("lut", "g1", np.arange(4.0))
            print("resolve", h.resolve().sum() == 6.0 and np.asarray(h)[3] == 3.0, "mpi4py" in sys.modules)
            print("dask_array", float(hpcshare.dask_array(h).sum().compute(scheduler="sync")), "mpi4py" in sys.modules)
        """
    )
    assert out.splitlines() == [
        "import False",
        "unpickle False",
        "resolve True False",
        "dask_array 6.0 False",
    ]


def test_the_check_would_see_mpi4py_if_it_were_imported():
    # the same detection as above, on a process that does import MPI: the test above can fail
    out = python("import sys, hpcshare\nfrom mpi4py import MPI\nprint('mpi4py' in sys.modules)")
    assert out.strip() == "True"


@pytest.mark.parametrize(
    "module", ["hpcshare.handles", "hpcshare.store", "hpcshare.codec", "hpcshare.arrays"]
)
def test_task_path_modules_do_not_import_mpi4py(module):
    out = python(f"import sys, {module}\nprint('mpi4py' in sys.modules)")
    assert out.strip() == "False"


def test_the_command_line_does_not_load_the_benchmark():
    # every rank of every job imports hpcshare.cli: only the names its help shows may come with it
    out = python(
        "import sys, hpcshare.cli\nprint(sorted(m for m in sys.modules if m.startswith('hpcshare.bench')))"
    )
    assert out.strip() == "['hpcshare.bench', 'hpcshare.bench.names']"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at module level or inside functions.

    Imports under ``if TYPE_CHECKING:`` do not run, so they do not count.
    """
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        skipped = {
            id(node)
            for branch in ast.walk(tree)
            if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
            for stmt in branch.body
            for node in ast.walk(stmt)
        }
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
                module = ".".join([*base, *([node.module] if node.module else [])])
                for alias in node.names:
                    target = f"{module}.{alias.name}"
                    edges.add(target if target in files else module)
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif (
                isinstance(node, ast.Assign)
                and [ast.unparse(t) for t in node.targets] == ["_LAZY"]
                and isinstance(node.value, ast.Dict)
            ):
                # a package's names loaded when first used: {name: submodule}
                edges.update(f"{package}.{ast.literal_eval(v)}" for v in node.value.values if v is not None)
        graph[name] = {e for e in edges if e in files and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while (w := stack.pop()) != v:
                group.append(w)
            if group:
                found.append(sorted([v, *group]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_of_hpcshare_imports_itself_back():
    graph = import_graph(PACKAGE)
    assert {"hpcshare.runtime", "hpcshare.sync", "hpcshare.store", "hpcshare.handles"} <= set(graph)
    assert "hpcshare.ending" in graph["hpcshare.sync"]  # imports are seen, also those inside functions
    assert cycles(graph) == []


def test_the_package_loads_its_public_names_when_first_used():
    # every rank of `hpcshare job` imports the package and the command line before MPI starts: its
    # first steps (the supervisor's fork, MPI_Init) must not wait for Dask's workers or numpy to load
    out = python(
        """
        import sys
        import hpcshare.cli
        heavy = ("numpy", "distributed", "mpi4py", "hpcshare.runtime", "h5py", "pandas")
        print(sorted(m for m in heavy if m in sys.modules))
        import hpcshare
        from hpcshare import put
        print(hpcshare.run.__module__, put.__module__, hpcshare.ArrayHandle.__name__, hpcshare.sharing.__name__)
        print("run" in dir(hpcshare), hasattr(hpcshare, "no_such_name"))
        """
    )
    assert out.splitlines() == [
        "[]",
        "hpcshare.runtime hpcshare.sharing ArrayHandle hpcshare.sharing",
        "True False",
    ]


def test_the_cycle_check_sees_the_packages_lazy_names(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('_LAZY = {"f": "a"}\n')
    (pkg / "a.py").write_text("import pkg\n")
    assert cycles(import_graph(pkg)) == [["pkg", "pkg.a"]]


def test_the_cycle_check_sees_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.b"]]
