"""The package's layers (``pipeline/__init__.py``): imports go downward only, no cycles, no stage
importing another stage, and no module using another module's private names.

The import graph is read from the source (every ``import`` and ``from ... import``, inside
functions too), so an import hidden in a function body counts like one at the top.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pipeline

PACKAGE = Path(pipeline.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def imports(tree: ast.Module, name: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import of a pipeline module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("pipeline")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: -node.level]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("pipeline"):
                found.append((target, [a.name for a in node.names], node.lineno))
    return found


def resolve(target: str, names: list[str], known: set[str]) -> list[tuple[str, list[str]]]:
    """``from pipeline.core import artifacts`` imports the module pipeline.core.artifacts."""
    out, rest = [], []
    for n in names:
        (out.append((f"{target}.{n}", [])) if f"{target}.{n}" in known else rest.append(n))
    if rest or not names:
        out.append((target, rest))
    return out


def layer_of(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def graph() -> dict[str, dict[str, tuple[list[str], int]]]:
    trees = modules()
    known = set(trees)
    edges: dict[str, dict[str, tuple[list[str], int]]] = {m: {} for m in trees}
    for name, tree in trees.items():
        for target, names, line in imports(tree, name):
            for module, taken in resolve(target, names, known):
                if module != name and module in known:
                    edges[name][module] = (taken, line)
    return edges


def test_layer_order_is_written_once_and_covers_every_subpackage():
    layers = pipeline.LAYERS
    present = {layer_of(m) for m in modules()} - {""}
    assert set(layers) == present, (f"pipeline.LAYERS {layers} must list every subpackage and top-level module "
                                    f"exactly once; the package has {sorted(present)}")


def test_imports_go_downward_only():
    rank = {layer: i for i, layer in enumerate(pipeline.LAYERS)}
    upward = []
    for source, targets in graph().items():
        if layer_of(source) == "":  # pipeline/__init__.py
            continue
        for target, (_, line) in targets.items():
            if layer_of(target) and rank[layer_of(target)] > rank[layer_of(source)]:
                upward.append(f"{source} (line {line}) imports {target}: {layer_of(source)} is below "
                              f"{layer_of(target)} in pipeline.LAYERS")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_stage_imports_another_stage():
    crossing = [f"{source} (line {line}) imports {target}"
                for source, targets in graph().items() if layer_of(source) == "stages"
                for target, (_, line) in targets.items()
                if layer_of(target) == "stages" and target != "pipeline.stages"]
    assert not crossing, ("a stage imports another stage; move what they share a layer down:\n"
                          + "\n".join(crossing))


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_uses_another_modules_private_names():
    trees = modules()
    private = []
    for source, targets in graph().items():
        for target, (names, line) in targets.items():
            private += [f"{source} (line {line}) imports {target}.{n}" for n in names if n.startswith("_")]
        aliases = {}  # module objects imported into this module: their private attributes
        for target, names, _ in imports(trees[source], source):
            aliases.update({n: f"{target}.{n}" for n in names if f"{target}.{n}" in trees})
        for node in ast.walk(trees[source]):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                private.append(f"{source} (line {node.lineno}) uses {aliases[node.value.id]}.{node.attr}")
    assert not private, "private names used across modules:\n" + "\n".join(private)


def test_no_private_attribute_of_another_object_is_used():
    """``trainer._loader(...)`` from a benchmark is a private name used across modules too: only
    ``self``/``cls`` (and third-party modules, whose privates are their business) may be reached
    through for a ``_name``."""
    found = []
    for source, tree in modules().items():
        outside = {(a.asname or a.name).split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for a in node.names if not a.name.startswith("pipeline")}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id not in {"self", "cls", *outside}):
                found.append(f"{source} (line {node.lineno}): {node.value.id}.{node.attr}")
    assert not found, "private attributes used from outside their object:\n" + "\n".join(found)
