"""The static import graph of the package: layering and no cycles.

Every module of the package (``edgekv/``, and ``export/``, ``runtime/``, ``devices/`` under
their ``edgekv.*`` names, as pyproject.toml's package-dir maps them) is parsed with ``ast``;
every ``import`` / ``from ... import`` anywhere in it (top level, inside functions, under
``if``) is an edge to the module it names:

* ``import edgekv.x.y`` and ``from edgekv.x import y`` (``y`` a module) -> ``edgekv.x.y``;
* ``from edgekv.x import name`` (``name`` not a module) -> ``edgekv.x`` (its ``__init__``);
* relative imports are resolved against the importing module's package.

Checked: the method (``edgekv.induce``) and the host model layer (``edgekv.host``) never
import the exporter (``edgekv.export``); the device runtime never imports the host side;
and there is no import cycle except the CLI's command registration (``edgekv.cli`` imports
``edgekv.commands``, whose modules import ``edgekv.cli`` for its ``command`` decorator).
"""

from __future__ import annotations

import ast
import os
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# import name -> source folder, as pyproject.toml's package-dir maps them
ROOTS = {"edgekv": "edgekv", "edgekv.export": "export", "edgekv.runtime": "runtime", "edgekv.devices": "devices"}


def discover(root: str = ROOT, roots: dict[str, str] = ROOTS) -> dict[str, tuple[str, bool]]:
    """Module name -> (source path, is a package) for every .py file of the package."""
    modules: dict[str, tuple[str, bool]] = {}
    for name, folder in roots.items():
        base = os.path.join(root, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if os.path.isfile(os.path.join(dirpath, d, "__init__.py")))
            if "__init__.py" not in filenames:
                continue
            rel = os.path.relpath(dirpath, base)
            pkg = name if rel == "." else name + "." + rel.replace(os.sep, ".")
            for f in sorted(filenames):
                if f.endswith(".py"):
                    mod = pkg if f == "__init__.py" else f"{pkg}.{f[:-3]}"
                    modules[mod] = (os.path.join(dirpath, f), f == "__init__.py")
    return modules


def _owner(name: str, modules: dict) -> str | None:
    """The longest prefix of the dotted ``name`` that is a module of the package."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in modules:
            return cand
    return None


def imports_of(mod: str, source: str, is_pkg: bool, modules: dict) -> set[str]:
    """The package's modules that ``mod`` (its code ``source``) imports, anywhere in the file."""
    out: set[str] = set()
    package = mod if is_pkg else mod.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _owner(alias.name, modules)
                if target is not None:
                    out.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                full = f"{base}.{alias.name}"
                target = full if full in modules else _owner(base, modules)
                if target is not None:
                    out.add(target)
    out.discard(mod)
    return out


def import_graph(root: str = ROOT, roots: dict[str, str] = ROOTS) -> dict[str, set[str]]:
    modules = discover(root, roots)
    graph = {}
    for mod, (path, is_pkg) in modules.items():
        with open(path, encoding="utf-8") as f:
            graph[mod] = imports_of(mod, f.read(), is_pkg, modules)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                sccs.append(sorted(comp))
    return sccs


def _cli_registration(name: str) -> bool:
    return name == "edgekv.cli" or name == "edgekv.commands" or name.startswith("edgekv.commands.")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles (strongly connected components of more than one module) besides the CLI's."""
    return [c for c in strongly_connected(graph) if len(c) > 1 and not all(_cli_registration(m) for m in c)]


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def imports_into(graph: dict[str, set[str]], importers: str, imported: str) -> dict[str, list[str]]:
    """Modules under ``importers`` that import something under ``imported``, with what."""
    return {m: sorted(t for t in deps if _under(t, imported))
            for m, deps in sorted(graph.items())
            if _under(m, importers) and any(_under(t, imported) for t in deps)}


# --- the checks ---------------------------------------------------------------------------------
def test_the_graph_covers_every_package():
    graph = import_graph()
    for mod in ("edgekv.cli", "edgekv.host.models", "edgekv.induce.adapt", "edgekv.export.pipeline",
                "edgekv.runtime.runtime", "edgekv.devices.profiles"):
        assert mod in graph
    assert "edgekv.host.models" in graph["edgekv.induce.torch_induction"]


def test_the_method_and_the_host_model_layer_do_not_import_the_exporter():
    graph = import_graph()
    assert imports_into(graph, "edgekv.induce", "edgekv.export") == {}
    assert imports_into(graph, "edgekv.host", "edgekv.export") == {}


def test_the_device_runtime_does_not_import_the_host_side():
    graph = import_graph()
    for host in ("edgekv.host", "edgekv.induce", "edgekv.export", "edgekv.bench"):
        assert imports_into(graph, "edgekv.runtime", host) == {}


def test_no_import_cycles_besides_the_cli_registration():
    graph = import_graph()
    found = cycles(graph)
    assert found == [], f"import cycles (move the shared piece to the lower module): {found}"
    # the CLI's registration is the one cycle, and it is found (so the search works)
    assert any("edgekv.cli" in c and len(c) > 1 for c in strongly_connected(graph))


# --- the checker itself ---------------------------------------------------------------------------
def _tree(tmp_path, files: dict[str, str]) -> str:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return str(tmp_path)


def test_the_checker_finds_cycles_through_function_level_and_relative_imports(tmp_path):
    root = _tree(tmp_path, {
        "edgekv/__init__.py": "",
        "edgekv/a.py": "from edgekv.b import thing\n",
        "edgekv/b.py": "def f():\n    from . import c\n",
        "edgekv/c.py": "def g():\n    import edgekv.a\n",
        "edgekv/cli.py": "from edgekv import commands\n",
        "edgekv/commands/__init__.py": "from edgekv.commands import run\n",
        "edgekv/commands/run.py": "from edgekv.cli import command\n",
        "export/__init__.py": "",
        "export/p.py": "from .q import X\n",
        "export/q.py": "from edgekv.export import p\n",
        "edgekv/induce/__init__.py": "",
        "edgekv/induce/m.py": "def h():\n    from edgekv.export.p import y\n",
    })
    graph = import_graph(root, {"edgekv": "edgekv", "edgekv.export": "export"})
    assert graph["edgekv.a"] == {"edgekv.b"}
    assert graph["edgekv.b"] == {"edgekv.c"}
    assert graph["edgekv.export.p"] == {"edgekv.export.q"}
    assert cycles(graph) == [["edgekv.a", "edgekv.b", "edgekv.c"], ["edgekv.export.p", "edgekv.export.q"]]
    assert imports_into(graph, "edgekv.induce", "edgekv.export") == {"edgekv.induce.m": ["edgekv.export.p"]}
