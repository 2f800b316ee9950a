"""The house's law, checked on the source: arrows point down. Every import of every module of lowbit
(module level and inside functions alike) is read from the source; there is no import cycle, and
every import across packages goes to a lower layer of :data:`LAYERS` (the README's layout, in folder
order): core and io import nothing above them, the kernels nothing of lowbit at all."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: bottom to top; a module may import its own package and anything in a lower layer
LAYERS = (
    ("lowbit.faults", "lowbit.progress", "lowbit.plots"),
    ("lowbit.kernels",),
    ("lowbit.core",),
    ("lowbit.dist",),
    ("lowbit.ops",),
    ("lowbit.io",),
    ("lowbit.data",),
    ("lowbit.models",),
    ("lowbit.eval",),
    ("lowbit.train",),
    ("lowbit.calib",),
    ("lowbit.methods",),
    ("lowbit.alloc",),
    ("lowbit.pipeline",),
    ("lowbit.interop",),
    ("lowbit.runner",),
    ("lowbit.cli",),
    ("lowbit",),          # the package's own __init__: the public surface, above everything
)


def modules(pkg_dir: str, pkg: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """``{module name: file}`` of a package directory (``extra``: more ``{package: directory}``)."""
    out = {}
    for name, top in [(pkg, pkg_dir), *(extra or {}).items()]:
        for dp, _, files in os.walk(top):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dp, f), top)[:-3].replace(os.sep, ".")
                    mod = name if rel == "__init__" else f"{name}.{rel.removesuffix('.__init__')}"
                    out[mod] = os.path.join(dp, f)
    return out


def import_graph(mods: dict[str, str]) -> dict[str, set[str]]:
    """``{module: modules it imports}`` among ``mods`` (absolute and relative imports, anywhere in the file)."""
    def resolve(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(open(path).read(), path)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            for n in names:
                t = resolve(n)
                if t is not None and t != mod and not mod.startswith(t + "."):   # a package's own __init__ runs first
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _layer(mod: str) -> int:
    best = None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (mod == n or mod.startswith(n + ".")) and (best is None or len(n) > len(best[1])):
                best = (i, n)
    assert best is not None, f"{mod} is in no layer of LAYERS"
    return best


@pytest.fixture(scope="module")
def graph():
    # lowbit/kernels is a symlink to kernels/ (os.walk does not follow it): walked as its own tree
    return import_graph(modules(os.path.join(ROOT, "lowbit"), "lowbit", {"lowbit.kernels": os.path.join(ROOT, "kernels")}))


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_every_import_goes_down(graph):
    upward = []
    for mod, targets in graph.items():
        (i, own) = _layer(mod)
        for t in targets:
            (j, theirs) = _layer(t)
            if theirs != own and j >= i:
                upward.append(f"{mod} -> {t}")
    assert not upward, "imports that do not go to a lower layer:\n" + "\n".join(sorted(upward))


def test_kernels_import_nothing_of_lowbit(graph):
    assert not {t for m, ts in graph.items() if m.startswith("lowbit.kernels") for t in ts
                if not t.startswith("lowbit.kernels")}


def test_the_walk_finds_a_cycle_and_a_function_local_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n    return a\n")
    (pkg / "c.py").write_text("import pkg.sub.b\n")
    g = import_graph(modules(str(pkg), "pkg"))
    assert g["pkg.sub.b"] == {"pkg.a"} and g["pkg.c"] == {"pkg.sub.b"}
    assert cycles(g) == [["pkg.a", "pkg.sub.b"]]
