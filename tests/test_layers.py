"""The package's import layering: the allowed order of its rooms, written in one place.

A room is a subpackage or a module at the package root. A module may import from its own
room and from rooms of lower layers only (eager or lazy imports alike: every ``import``
statement counts, wherever it is), so rooms cannot import each other in a cycle; and no
two modules may import each other in a cycle inside a room either. There is no list of
exceptions.
"""

from __future__ import annotations

import ast
import os

from helpers import REPO

PACKAGE = "jaxrepro"

# Bottom to top. A room imports only its own modules and rooms of lower layers.
LAYERS = (
    ("errors", "plumbing"),  # exceptions; process environment, signals, JSON and hashes
    ("machine", "rng", "stats", "trajectory", "parallel"),  # pure facts and functions
    ("data", "models", "dropoff"),  # datasets, networks, the drop-off detector
    ("config", "ported"),  # the config schema, checked against the above; ported weights
    ("workdir", "checkpoints", "tbevents"),  # what a run writes
    ("status",),  # reading a run's or study's state
    ("train", "report"),  # the engine; figures and reports of what runs wrote
    ("replay", "audit", "compare"),  # runs of runs
    ("diagnose",),  # replays as an experiment
    ("study",),  # many runs, their analysis, their diagnoses
    ("results",),  # a study's results as pandas frames
    ("bench",),  # measurements of all of the above
    ("__main__",),  # the command line
)


def _modules(root: str) -> dict[str, str]:
    """Module name -> source of every module of the package under ``root``."""
    out = {}
    base = os.path.join(root, PACKAGE)
    for dirpath, _, files in os.walk(base):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                name = name.removesuffix(".__init__")
                with open(path) as fh:
                    out[name] = fh.read()
    return out


def _resolve(name: str, modules) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports(modules: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (every import statement)."""
    edges = {}
    for name, source in modules.items():
        is_pkg = any(m.startswith(name + ".") for m in modules)
        pkg = name if is_pkg else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(source)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                # `from pkg import sub` imports the module pkg.sub; `from mod import name`, mod
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            for t in targets:
                if t.split(".")[0] == PACKAGE:
                    r = _resolve(t, modules)
                    if r and r != name:
                        found.add(r)
        edges[name] = found
    return edges


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer_of() -> dict[str, int]:
    return {r: i for i, rooms in enumerate(LAYERS) for r in rooms}


def violations(modules: dict[str, str]) -> list[str]:
    """Every upward import, unknown room and module cycle of ``modules``."""
    layer = _layer_of()
    edges = imports(modules)
    out = []
    for a, targets in sorted(edges.items()):
        ra = room(a)
        if ra != "__init__" and ra not in layer:
            out.append(f"{a}: room {ra!r} has no layer")
            continue
        for b in sorted(targets):
            rb = room(b)
            if ra == rb or rb == "__init__" or ra == "__init__":
                continue
            if rb not in layer:
                out.append(f"{a} -> {b}: room {rb!r} has no layer")
            elif layer[rb] >= layer[ra]:
                out.append(f"{a} -> {b}: {ra} (layer {layer[ra]}) imports {rb} (layer {layer[rb]})")
    out += [f"cycle: {' -> '.join(c)}" for c in _cycles(edges)]
    return out


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The module cycles (strongly connected components of more than one module)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_package_follows_its_layers():
    assert violations(_modules(REPO)) == []


def test_every_room_has_a_layer():
    rooms = {room(m) for m in _modules(REPO)} - {"__init__"}
    assert rooms == set(_layer_of())


def test_a_planted_upward_import_is_caught():
    modules = _modules(REPO)
    modules["jaxrepro.rng"] += "\n\ndef _late():\n    from jaxrepro import study  # noqa\n"
    found = violations(modules)
    assert found[0] == "jaxrepro.rng -> jaxrepro.study: rng (layer 1) imports study (layer 9)"
    assert all(f.startswith("cycle: ") for f in found[1:])  # it closes cycles too


def test_a_planted_cycle_inside_a_room_is_caught():
    modules = _modules(REPO)
    planted = "\n\ndef _late():\n    from jaxrepro.train import loop  # noqa\n"
    modules["jaxrepro.train.step"] += planted
    found = violations(modules)
    assert len(found) == 1 and found[0].startswith("cycle: ")
    assert "jaxrepro.train.loop" in found[0] and "jaxrepro.train.step" in found[0]


def design_tree(text: str) -> set[str]:
    """The module paths that docs/design.md's package tree names (two spaces a level)."""
    block = text.split("## The package, one module a line", 1)[1].split("```")[1]
    dirs, out = [], set()
    for line in block.strip("\n").splitlines():
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        del dirs[depth:]
        if name.endswith("/"):
            dirs.append(name)
        else:
            out.add("".join(dirs) + name)
    return out


def test_the_design_tree_names_every_module_and_nothing_else():
    with open(os.path.join(REPO, "docs", "design.md")) as f:
        listed = design_tree(f.read())
    modules = _modules(REPO)
    files = {}
    for name, source in modules.items():
        is_pkg = any(m.startswith(name + ".") for m in modules)
        path = name.replace(".", "/") + ("/__init__.py" if is_pkg else ".py")
        files[path] = source
    defining = {
        path
        for path, source in files.items()
        if any(
            isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            for n in ast.walk(ast.parse(source))
        )
    }
    assert sorted(listed - set(files)) == []  # named in the tree, not in the package
    assert sorted(defining - listed) == []  # in the package, missing from the tree


def test_the_design_tree_parser_reads_nesting():
    text = "## The package, one module a line\n```\njaxrepro/\n  a.py  x\n  sub/  y\n" + (
        "    b.py  z\n  c.py\n```\n"
    )
    assert design_tree(text) == {"jaxrepro/a.py", "jaxrepro/sub/b.py", "jaxrepro/c.py"}


def test_loading_a_ported_directory_does_not_need_torch():
    """The layering's practical point: training from a ported dir imports no torch."""
    edges = imports(_modules(REPO))
    seen, todo = set(), ["jaxrepro.train.loop"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += edges.get(m, ())
    assert not any(room(m) == "compare" for m in seen)
