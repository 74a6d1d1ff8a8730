"""The import structure (docs/architecture.md): each layer imports only the layers below it, SGLang only where the
code runs inside SGLang's processes, and no module imports itself through others (no cycles, lazy imports inside
functions included). Read from the source with ``ast``, so a new import that breaks the structure fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SOURCES = {"sglang_mezo": ROOT / "sglang_mezo", "sglang_mezo.kernels": ROOT / "kernels",
           "sglang_mezo.server": ROOT / "server"}

# layer -> the layers (and SGLang) it may import
ALLOWED: dict[str, set[str]] = {
    "kernels": set(),
    "core": {"kernels"},
    "engines": {"core", "kernels"},
    "checkpoint": {"core", "kernels"},
    "protocol": {"core", "kernels"},
    "options": {"core", "kernels"},
    "jobs": {"core", "kernels", "protocol"},
    "scheduler": {"core", "kernels", "protocol", "checkpoint", "sglang"},
    "server": {"core", "kernels", "protocol", "checkpoint", "jobs", "options", "scheduler", "sglang"},
    "plugin": {"options", "jobs", "scheduler", "server", "sglang"},
    "client": set(),
}


def _modules() -> dict[str, Path]:
    """Every module of the package, by its import path (``kernels/`` and ``server/`` install inside it)."""
    out: dict[str, Path] = {}
    for prefix, root in SOURCES.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([prefix, *parts])
            if prefix == "sglang_mezo" and name.startswith(("sglang_mezo.kernels", "sglang_mezo.server")):
                continue
            out[name] = path
    return out


MODULES = _modules()


def layer_of(module: str) -> str:
    if module.split(".")[0] == "sglang":
        return "sglang"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "sglang_mezo"


def imports_of(module: str) -> set[str]:
    """The modules ``module`` imports (relative imports resolved; ``from pkg import sub`` is ``pkg.sub``)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m.split(".")[0] in ("sglang_mezo", "sglang")}


@pytest.mark.parametrize("layer", ALLOWED)
def test_each_layer_imports_only_the_layers_below_it(layer):
    wrong = {}
    for module in (m for m in MODULES if layer_of(m) == layer):
        bad = {layer_of(i) for i in imports_of(module)} - ALLOWED[layer] - {layer}
        if bad:
            wrong[module] = sorted(bad)
    assert not wrong, f"{layer} may import only {sorted(ALLOWED[layer])}: {wrong}"


def test_no_module_imports_itself_through_others():
    graph = {m: {i for i in imports_of(m) if i in MODULES and i != m} for m in MODULES}
    # a package's __init__ importing its own submodules is how packages re-export: not a cycle of code
    graph = {m: {i for i in deps if not (MODULES[m].name == "__init__.py" and i.startswith(m + "."))}
             for m, deps in graph.items()}
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        if module in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(module):] + [module]))
        if module in done:
            return
        for dep in sorted(graph[module]):
            visit(dep, [*stack, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
