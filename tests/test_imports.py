"""Imports point one way: no circle between the files of llmshearing/, callbacks/ and data_prep/, counting imports
at module level and inside functions (a function-level import hides a circle from Python, not from a reader).

The graph is read from the source (AST), never by importing it: `import a.b.c` and `from a.b import c` are edges to
`a.b.c` and to the packages above it (their __init__ runs too); `importlib.import_module("literal")` counts as well."""
from __future__ import annotations

import ast
import os

from conftest import REPO

# folder of the repository -> the package name it installs as (pyproject's package-dir)
PACKAGES = {"llmshearing": "llmshearing", "callbacks": "llmshearing.callbacks", "data_prep": "llmshearing.data_prep"}


def modules(root: str, packages=PACKAGES) -> dict[str, str]:
    """Dotted module name -> file, for every .py file under the given folders of `root` (a tuple: each folder is its
    own package name; a mapping: folder -> the name it installs as)."""
    found = {}
    for package in packages:
        for folder, _, files in os.walk(os.path.join(root, package)):
            for name in sorted(files):
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, name), os.path.join(root, package))[:-3]
                    dotted = ".".join([packages[package] if isinstance(packages, dict) else package,
                                       *rel.split(os.sep)])
                    found[dotted.removesuffix(".__init__")] = os.path.join(folder, name)
    return found


def _targets(module: str, is_package: bool, node: ast.AST, known: dict) -> list[str]:
    """The known modules one import statement (or import_module call) names."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the package of `module`, `level - 1` packages up
            parts = module.split(".") if is_package else module.split(".")[:-1]
            parts = parts[:len(parts) - (node.level - 1)]
            base = ".".join(parts + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
          and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        names = [node.args[0].value]
    else:
        return []
    out = []
    for name in names:
        while name and name not in known:  # `from pkg.mod import function` names pkg.mod
            name = name.rpartition(".")[0]
        while name:
            out.append(name)  # the module and every package above it (their __init__ runs first)
            name = name.rpartition(".")[0]
    return out


def import_graph(root: str, packages=PACKAGES) -> dict[str, dict[str, int]]:
    """module -> {imported module: first line}, both module-level and function-level imports. A module's own
    packages are left out (importing a submodule of your own package is not a circle through its __init__)."""
    known = modules(root, packages)
    graph = {}
    for module, path in known.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        edges = graph.setdefault(module, {})
        for node in ast.walk(tree):
            for target in _targets(module, path.endswith("__init__.py"), node, known):
                if target != module and not module.startswith(target + "."):
                    edges.setdefault(target, node.lineno)
    return graph


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as one closed path through it,
    e.g. ['a', 'b', 'a']."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_path(graph, set(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _path(graph: dict, component: set[str]) -> list[str]:
    """A shortest circle through the component's first module (breadth first inside the component)."""
    start = min(component)
    came = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while came[path[-1]] is not None:
                    path.append(came[path[-1]])
                return path[::-1] + [start]
            if w in component and w not in came:
                came[w] = v
                queue.append(w)
    raise AssertionError("a strongly connected component without a circle")  # pragma: no cover


def describe(graph: dict, path: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(path, path[1:])) + f" -> {path[-1]}"


def test_the_package_has_no_import_circle():
    graph = import_graph(REPO)
    assert {"llmshearing.train.config", "llmshearing.callbacks.run_guard", "llmshearing.data_prep.shards"} <= set(graph)
    assert "llmshearing.train.config" in graph["llmshearing.train.builders"]  # the walk sees real edges
    found = circles(graph)
    assert not found, "import circles:\n" + "\n".join(describe(graph, c) for c in found)


# The stages, lowest first: a module imports only from its own stage or a lower one (README: "Imports point one
# way"). Modules not named here (errors, io, checks, compat, checkpoint_files, devices, plots, fake_device) are the
# base every stage may use, and they import no stage.
STAGES = ("model", "data", "data_prep", "pruning", "eval", "callbacks", "registry", "train", "experiments", "cli")


def stage(module: str) -> int:
    """The module's rank in STAGES; -1 for the base."""
    parts = module.split(".")
    return STAGES.index(parts[1]) if len(parts) > 1 and parts[1] in STAGES else -1


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    return [f"{a} (line {line}) imports {b}: {STAGES[stage(b)]} is above {STAGES[stage(a)] if stage(a) >= 0 else 'the base'}"
            for a, edges in sorted(graph.items()) for b, line in sorted(edges.items())
            if b != "llmshearing" and stage(b) > stage(a)]


def test_imports_point_down_the_stages():
    graph = import_graph(REPO)
    assert not upward_imports(graph), "imports that point up:\n" + "\n".join(upward_imports(graph))
    assert {stage(m) for m in graph} >= set(range(-1, len(STAGES)))  # every stage names modules that exist


def test_an_upward_import_is_caught():
    graph = {"llmshearing.callbacks.run_guard": {"llmshearing.train.builders": 18},
             "llmshearing.train.builders": {"llmshearing.callbacks": 3}, "llmshearing.io": {"llmshearing.model.hf": 5}}
    assert upward_imports(graph) == [
        "llmshearing.callbacks.run_guard (line 18) imports llmshearing.train.builders: train is above callbacks",
        "llmshearing.io (line 5) imports llmshearing.model.hf: model is above the base"]


def _write(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_graph_counts_every_kind_of_import_and_names_the_circle(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import os\nfrom pkg import b\n",  # module level, `from package import module`
        "pkg/b.py": "def f():\n    from .sub.c import g  # hidden in a function, relative\n    return g\n",
        "pkg/sub/__init__.py": "from pkg.sub.d import X\n",
        "pkg/sub/c.py": "import importlib\n\ndef g():\n    return importlib.import_module('pkg.a')\n",
        "pkg/sub/d.py": "X = 1\n",
        "other/__init__.py": "",
        "other/e.py": "import pkg.sub.d\n",  # the submodule and the packages above it
    })
    graph = import_graph(str(tmp_path), ("pkg", "other"))
    assert graph["pkg.a"] == {"pkg.b": 2}
    assert graph["pkg.b"] == {"pkg.sub.c": 2, "pkg.sub": 2}
    assert graph["pkg.sub.c"] == {"pkg.a": 4}
    assert graph["pkg.sub"] == {"pkg.sub.d": 1}  # its own package is not an edge
    assert graph["other.e"] == {"pkg.sub.d": 1, "pkg.sub": 1, "pkg": 1}
    (found,) = circles(graph)
    assert found == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    assert describe(graph, found) == "pkg.a (line 2) -> pkg.b (line 2) -> pkg.sub.c (line 4) -> pkg.a"
    (tmp_path / "pkg/sub/c.py").write_text("def g():\n    return 1\n")  # the circle broken: none left
    assert circles(import_graph(str(tmp_path), ("pkg", "other"))) == []


def unexplained_local_imports(root: str, packages=PACKAGES) -> list[str]:
    """Imports inside functions without a comment (on the statement or the line above) saying what they defer:
    a heavy or optional package, or a private API imported where it is checked. Anything else belongs at the top."""
    found = []
    for module, path in modules(root, packages).items():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        lines = text.splitlines()
        for function in ast.walk(ast.parse(text, path)):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    said = lines[node.lineno - 1:node.end_lineno] + [lines[node.lineno - 2].strip()[:1]]
                    if not any("#" in line for line in said):
                        found.append(f"{os.path.relpath(path, root)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return found


def test_every_import_inside_a_function_says_why():
    found = unexplained_local_imports(REPO)
    assert not found, ("imports inside functions with no comment saying which heavy or optional package they defer "
                       "(move them to the top otherwise):\n" + "\n".join(found))


def test_an_unexplained_import_inside_a_function_is_caught(tmp_path):
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": (
        "import os\n\n\ndef f():\n    import json\n    import torch  # heavy: torch\n"
        "    # optional: the gguf extra\n    import gguf\n    return os, json, torch, gguf\n")})
    assert unexplained_local_imports(str(tmp_path), ("pkg",)) == [os.path.join("pkg", "a.py") + ":5: import json"]


def test_no_code_imports_the_folders_by_their_checkout_names():
    """`callbacks` and `data_prep` install as llmshearing.callbacks / llmshearing.data_prep; importing them as
    `callbacks.x` works only in a checkout and loads a second copy of the module beside the installed one (so an
    `except Preempted` would not match the Preempted raised). The package, benchmarks, tests and train.py use the
    installed names."""
    found = []
    for folder in ("llmshearing", "callbacks", "data_prep", "bench", "tests"):
        for path, _, files in os.walk(os.path.join(REPO, folder)):
            for name in (f for f in files if f.endswith(".py")):
                file = os.path.join(path, name)
                with open(file) as f:
                    tree = ast.parse(f.read(), file)
                for node in ast.walk(tree):
                    names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                             [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                    found += [f"{os.path.relpath(file, REPO)}:{node.lineno}: {n}" for n in names
                              if n.split(".")[0] in ("callbacks", "data_prep")]
    assert not found, "use llmshearing.callbacks / llmshearing.data_prep:\n" + "\n".join(found)
