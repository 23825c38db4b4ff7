"""The package's import graph: no cycles, and the math layers (`ops`, `kernels`) import nothing
above them. Every module's AST is read, so imports inside functions (the lazy ones) count too.

The layering, bottom up: `kernels` (Triton twins and the shared argument checks) <- `ops` (the
torch reference, which dispatches to `kernels`) <- everything else.
"""

import ast
import sys
from pathlib import Path

import pytest

import sparsetrain

PKG = Path(sparsetrain.__file__).resolve().parent
ROOT = "sparsetrain"
# The math layers, each allowed to import only the layers listed (and itself).
ALLOWED = {
    "sparsetrain.kernels": ("sparsetrain.kernels",),
    "sparsetrain.ops": ("sparsetrain.ops", "sparsetrain.kernels"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules():
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(name: str, modules) -> str:
    """The longest prefix of ``name`` that is a module of the package ("" if none)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def imports_of(mod: str, path: Path, modules) -> set:
    """The package modules ``mod`` imports anywhere in its file (lazy imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import sub` imports the submodule `pkg.sub` when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            if t == ROOT or t.startswith(ROOT + "."):
                r = _resolve(t, modules)
                if r and r != mod:
                    out.add(r)
    return out


def import_graph():
    modules = _modules()
    return {mod: imports_of(mod, path, modules) for mod, path in modules.items()}


def find_cycles(graph) -> list:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def _layer(mod: str):
    for layer in ALLOWED:
        if mod == layer or mod.startswith(layer + "."):
            return layer
    return None


def upward_imports(graph) -> list:
    """``"a -> b"`` for every import from a math layer into a module it may not import."""
    bad = []
    for a, targets in sorted(graph.items()):
        layer = _layer(a)
        if layer is None:
            continue
        for b in sorted(targets):
            if _layer(b) not in ALLOWED[layer]:
                bad.append(f"{a} -> {b}")
    return bad


def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_math_layers_import_nothing_above_them():
    assert upward_imports(import_graph()) == []


def test_the_walk_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The checker itself, on a made-up package: a lazy import inside a function closes a cycle,
    and a relative import from the math layer reaches upward; both are reported."""
    pkg = tmp_path / "sparsetrain"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "kernels").mkdir()
    files = {
        "__init__.py": "",
        "a.py": "from . import b\n",
        "b.py": "def f():\n    from .a import x  # lazy\n",
        "kernels/__init__.py": "",
        "kernels/k.py": "from ..ops import nm\n",  # kernels may not import ops
        "ops/__init__.py": "",
        "ops/nm.py": "import torch\nfrom .. import kernels\nfrom ..kernels.k import g\n",
        "ops/up.py": "def f():\n    import sparsetrain.a.thing\n",  # upward, lazily, absolute
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    graph = import_graph()
    assert graph["sparsetrain.ops.nm"] == {"sparsetrain.kernels", "sparsetrain.kernels.k"}
    assert find_cycles(graph) == [["sparsetrain.a", "sparsetrain.b"], ["sparsetrain.kernels.k", "sparsetrain.ops.nm"]]
    assert upward_imports(graph) == ["sparsetrain.kernels.k -> sparsetrain.ops.nm", "sparsetrain.ops.up -> sparsetrain.a"]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_math_layers_exist(layer):
    """Guards the walk against a rename that would make the checks above vacuous."""
    graph = import_graph()
    assert any(m == layer or m.startswith(layer + ".") for m in graph)
