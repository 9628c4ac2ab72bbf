"""The package's layers, read from the source with ast (nothing is imported): no module imports a private name of
another, each layer imports only itself and the layers below it, and no chain of imports comes back to where it
started (module-level and function-level imports alike)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# Bottom to top; a layer imports itself and the layers before it. files.py writes files for everyone; theory is the
# mathematics (specert/__init__.py re-exports it); decoding knows the Drafter interface, not the drafters; served
# talks to inference servers; study measures; train (specert distill) reads its prompts and checks its inputs with
# study's modules (study.prompts, study.inputs); the CLI (and __main__) sits on top.
LAYERS = ["files", "theory", "decoding", "drafters", "served", "study", "train", "cli"]


def _modules() -> dict[str, ast.Module]:
    """Every module under src/specert by its dotted name (a package by its own name), parsed."""
    out = {}
    for path in sorted((SRC / "specert").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = ast.parse(path.read_text(), str(path))
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return (SRC / Path(*name.split(".")) / "__init__.py").is_file()


def _imports(name: str, tree: ast.Module):
    """``(module imported, names taken from it, line)`` for every import of specert in ``tree``, at any depth;
    ``from package import submodule`` counts as an import of the submodule, relative imports are resolved."""
    package = name if _is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, [], node.lineno) for alias in node.names if alias.name.split(".")[0] == "specert")
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                base = package.split(".")[: package.count(".") + 2 - node.level]
                source = ".".join(base + ([source] if source else []))
            if source.split(".")[0] != "specert":
                continue
            names = [alias.name for alias in node.names]
            yield from ((f"{source}.{n}", [], node.lineno) for n in names if f"{source}.{n}" in MODULES)
            taken = [n for n in names if f"{source}.{n}" not in MODULES]
            if taken:
                yield source, taken, node.lineno


def _layer(name: str) -> str:
    """A module's layer: its package under specert, or itself (files, cli). The package's own __init__ re-exports
    the mathematics: theory; __main__ runs the CLI: cli."""
    parts = name.split(".")
    if len(parts) == 1:
        return "theory"
    return {"__main__": "cli"}.get(parts[1], parts[1])


EDGES = [(name, target, taken, line) for name, tree in MODULES.items() for target, taken, line in _imports(name, tree)]


def test_every_module_has_a_layer():
    unknown = sorted({name for name in MODULES if _layer(name) not in LAYERS})
    assert not unknown, f"modules outside the layers {LAYERS}: {unknown}; add their layer to LAYERS"


def test_no_private_name_is_imported_from_another_module():
    private = [f"{name}:{line} takes {n} from {target}" for name, target, taken, line in EDGES for n in taken
               if n.startswith("_") and target != name]
    private += [f"{name}:{line} imports the private module {target}" for name, target, _, line in EDGES
                if any(part.startswith("_") and part != "__main__" for part in target.split(".")) and target != name]
    assert not private, "\n".join(private)


def test_layers_import_only_downward():
    upward = [f"{name}:{line} ({_layer(name)}) imports {target} ({_layer(target)})" for name, target, _, line in EDGES
              if LAYERS.index(_layer(target)) > LAYERS.index(_layer(name))]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = {name: sorted({target for source, target, _, _ in EDGES if source == name and target != name})
             for name in MODULES}
    unknown = sorted({t for targets in graph.values() for t in targets if t not in MODULES})
    assert not unknown, f"imports of modules that do not exist: {unknown}"
    done, on_path = set(), []

    def visit(name):
        if name in on_path:
            cycle = on_path[on_path.index(name):] + [name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        on_path.append(name)
        for target in graph[name]:
            visit(target)
        on_path.pop()
        done.add(name)

    for name in graph:
        visit(name)


def test_the_theory_stays_on_the_device_of_its_input():
    """No ``.cpu()``, ``.to("cpu")`` or CPU device in specert.theory: certificates are computed where the logits live
    (the numpy shortcuts are taken only after checking ``device.type == "cpu"``, and numpy input is CPU already)."""
    for name, tree in MODULES.items():
        if not name.startswith("specert.theory"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                assert node.func.attr != "cpu", f"{name}:{node.lineno} moves a tensor to the CPU"
                args = [*node.args, *(k.value for k in node.keywords)]
                assert not any(isinstance(a, ast.Constant) and a.value == "cpu" for a in args), \
                    f"{name}:{node.lineno} names the CPU device"
