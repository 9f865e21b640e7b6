"""Imports point one way: every module is placed in docs/architecture.md's layer table, imports nothing from a
higher layer, and takes part in no import cycle. Imports are read from the source (inside functions too), nothing
is imported."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Edges that break the rule and are known, each with why it stays: (importer, imported, reason). Empty: a new
# entry needs a reason a reviewer accepts, and the test still fails on every edge not listed.
KNOWN_EDGES: list[tuple[str, str, str]] = []


def layer_table() -> list[tuple[int, str]]:
    """(layer, path entry) rows of the table in docs/architecture.md: `qcjax/model.py`, or `qcjax/data/` for a
    whole package."""
    rows = []
    with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
        for line in f:
            m = re.match(r"\|\s*(\d+)\s*\|[^|]*\|([^|]*)\|", line)
            if m:
                rows += [(int(m.group(1)), p) for p in re.findall(r"`([^`]+)`", m.group(2))]
    assert rows, "no layer table in docs/architecture.md"
    return rows


def modules() -> dict[str, str]:
    """Module name -> file, for the package and the two top-level CLIs."""
    out = {"train": "train.py", "infer": "infer.py"}
    for dirpath, _, files in os.walk(os.path.join(ROOT, "qcjax")):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), ROOT)
                mod = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
                out[mod] = rel.replace(os.sep, "/")
    return out


def layer_of(path: str, table) -> int | None:
    """The layer of the most specific entry that names `path` (a file, or a package directory above it)."""
    hits = [(len(entry), layer) for layer, entry in table
            if path == entry or (entry.endswith("/") and path.startswith(entry))]
    return max(hits)[1] if hits else None


def imports(mods: dict[str, str]) -> set[tuple[str, str]]:
    """(importer, imported) module pairs inside the project. `from pkg import name` is the submodule pkg.name when
    there is one, else pkg; an import of pkg.a.b that is no module is its nearest enclosing module."""
    def nearest(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    edges = set()
    for mod, path in mods.items():
        package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        with open(os.path.join(ROOT, path)) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + [base] if base else parts)
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for name in names:
                target = nearest(name) if name.split(".")[0] in ("qcjax", "train", "infer") else None
                if target and target != mod:
                    edges.add((mod, target))
    return edges


def test_every_module_has_a_layer():
    table = layer_table()
    unplaced = sorted(p for p in modules().values() if layer_of(p, table) is None)
    assert not unplaced, f"modules missing from docs/architecture.md's layer table: {unplaced}"


def test_no_import_points_to_a_higher_layer():
    table, mods = layer_table(), modules()
    known = {(a, b) for a, b, _ in KNOWN_EDGES}
    up = sorted(f"{a} (layer {layer_of(mods[a], table)}) imports {b} (layer {layer_of(mods[b], table)})"
                for a, b in imports(mods) - known
                if (layer_of(mods[a], table) or 0) < (layer_of(mods[b], table) or 0))
    assert not up, "imports that point up (docs/architecture.md):\n" + "\n".join(up)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for a, b in imports(modules()):
        graph.setdefault(a, set()).add(b)
    # Tarjan's strongly connected components: a component of more than one module is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_console_scripts_are_the_command_lines_and_answer_help(capsys):
    """pyproject's [project.scripts] (qcjax-serve, qcjax-eval, ...) name each package command line's main, which
    prints its --help and exits 0, as `python -m ...` does."""
    import importlib
    import tomllib

    import pytest

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert {"qcjax-serve", "qcjax-eval", "qcjax-convert"} <= set(scripts)
    for name, target in scripts.items():
        module, _, func = target.partition(":")
        main = getattr(importlib.import_module(module), func)
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code == 0, name
        assert "usage:" in capsys.readouterr().out, name
