"""The package's import graph has no cycles, and importing it leaves the process state alone.

The graph is read from the source (`ast`): every `import` / `from ... import` anywhere in a module,
function-level imports included (they hide a cycle from Python but not from a reader), except
those under `if TYPE_CHECKING:`. An edge points from a module to each clade_jax module it names
(`from clade_jax.a import b` names `clade_jax.a.b` when that is a module, else `clade_jax.a`).
Any strongly connected component of more than one module is a cycle and fails the test, listed
with the lines that make it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clade_jax"


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    """{dotted module name: file} of every module of the package (packages as their __init__)."""
    out = {}
    for path in package.rglob("*.py"):
        rel = path.relative_to(package.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Import nodes of a module, skipping `if TYPE_CHECKING:` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(package: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """{module: {imported clade_jax module: first line number}}."""
    modules = module_names(package)
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        for node in _imports(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the module's package upwards
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for t in targets:
                while t and t not in modules:  # `import clade_jax.a.b.c` of a non-module tail
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].setdefault(t, node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _describe(comp: list[str], graph, modules) -> str:
    members = set(comp)
    lines = [
        f"  {a} -> {b}  ({modules[a].relative_to(ROOT)}:{line})"
        for a in comp
        for b, line in sorted(graph[a].items())
        if b in members
    ]
    return "cycle among " + ", ".join(comp) + ":\n" + "\n".join(lines)


def test_no_import_cycles():
    graph = import_graph()
    modules = module_names()
    found = cycles(graph)
    assert not found, "\n".join(_describe(c, graph, modules) for c in found)


def test_the_analysis_sees_function_level_and_relative_imports(tmp_path):
    """A cycle hidden in a function and one through a relative import are both found."""
    pkg = tmp_path / "clade_jax"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from clade_jax import b\n")
    (pkg / "b.py").write_text("import clade_jax.a\n")
    (pkg / "sub" / "__init__.py").write_text("from .x import y\n")
    (pkg / "sub" / "x.py").write_text("from clade_jax import sub\ny = 1\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from clade_jax import d\n"
    )
    (pkg / "d.py").write_text("from clade_jax import c\n")
    found = cycles(import_graph(pkg))
    assert sorted(found) == [["clade_jax.a", "clade_jax.b"], ["clade_jax.sub", "clade_jax.sub.x"]]


@pytest.mark.parametrize("module", ["clade_jax", "clade_jax.layers", "clade_jax.models"])
def test_import_leaves_the_environment_alone(module):
    """A library must not change its host's process state on import (e.g. XLA_FLAGS)."""
    code = (
        "import json, os, sys\n"
        "before = dict(os.environ)\n"
        f"import {module}\n"
        "print(json.dumps(dict(os.environ) == before))\n"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("CLADE_JAX_KEEP_XLA_FLAGS", "XLA_FLAGS")
    }
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # no backend choice in it
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "true", out.stdout + out.stderr


def test_entry_points_set_the_cpu_flags_unless_told_not_to():
    from clade_jax.backend import SCHEDULER_FLAG, YNN_FLAG, configure_cpu_backend

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert configure_cpu_backend(env)
    assert env["XLA_FLAGS"] == (
        f"--xla_force_host_platform_device_count=8 {YNN_FLAG}= {SCHEDULER_FLAG}=false"
    )
    assert not configure_cpu_backend(env)  # idempotent
    mine = {"XLA_FLAGS": f"{YNN_FLAG}=default"}
    assert configure_cpu_backend(mine)  # the user's choice of one flag is kept, the other added
    assert mine["XLA_FLAGS"] == f"{YNN_FLAG}=default {SCHEDULER_FLAG}=false"
    both = {"XLA_FLAGS": f"{YNN_FLAG}=default {SCHEDULER_FLAG}=true"}
    assert not configure_cpu_backend(both) and both["XLA_FLAGS"].endswith("=true")
    keep = {"CLADE_JAX_KEEP_XLA_FLAGS": "1"}
    assert not configure_cpu_backend(keep) and "XLA_FLAGS" not in keep
