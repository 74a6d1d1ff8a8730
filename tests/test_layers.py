"""The import structure (docs/architecture.md): each layer imports only the layers below it, and SGLang only where
the code runs inside SGLang's processes. Read from the source with ``ast``, so a new import that breaks the layering
fails here, not in a review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

# layer -> its files, and the layers (and outside packages of note) it may import
LAYERS: dict[str, tuple[list[Path], set[str]]] = {
    "kernels": ([ROOT / "kernels"], set()),
    "core": ([ROOT / "sglang_mezo/core"], {"kernels"}),
    "engines": ([ROOT / "sglang_mezo/engines"], {"core", "kernels"}),
    "checkpoint": ([ROOT / "sglang_mezo/checkpoint.py"], {"core", "kernels"}),
    "protocol": ([ROOT / "sglang_mezo/protocol.py"], {"core", "kernels"}),
    "options": ([ROOT / "sglang_mezo/options.py"], {"core", "kernels"}),
    "jobs": ([ROOT / "sglang_mezo/jobs"], {"core", "kernels", "protocol"}),
    "scheduler": ([ROOT / "sglang_mezo/scheduler"], {"core", "kernels", "protocol", "checkpoint", "sglang"}),
    "server": ([ROOT / "server"], {"core", "kernels", "protocol", "jobs", "options", "scheduler", "sglang"}),
    "plugin": ([ROOT / "sglang_mezo/plugin"], {"options", "scheduler", "server", "sglang"}),
    "client": ([ROOT / "sglang_mezo/client.py"], set()),
}
PACKAGE_OF = {"sglang_mezo.kernels": "kernels", "sglang_mezo.core": "core", "sglang_mezo.engines": "engines",
              "sglang_mezo.checkpoint": "checkpoint", "sglang_mezo.protocol": "protocol",
              "sglang_mezo.options": "options", "sglang_mezo.jobs": "jobs", "sglang_mezo.scheduler": "scheduler",
              "sglang_mezo.server": "server", "sglang_mezo.plugin": "plugin", "sglang_mezo.client": "client",
              "sglang_mezo.cli": "cli", "sglang_mezo.launch": "launch", "sglang_mezo.cpu_stub": "cpu_stub",
              "sglang_mezo.default_model": "default_model", "sglang": "sglang"}


def _files(paths: list[Path]) -> list[Path]:
    return [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*.py")))]


def _imported_layers(path: Path, layer: str) -> set[str]:
    """The layers a file imports (relative imports stay in its own layer)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        modules = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        for module in modules:
            owners = [p for p in PACKAGE_OF if module == p or module.startswith(p + ".")]
            if owners:
                found.add(PACKAGE_OF[max(owners, key=len)])
    return found - {layer}


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_imports_only_the_layers_below_it(layer):
    paths, allowed = LAYERS[layer]
    wrong = {str(f.relative_to(ROOT)): sorted(_imported_layers(f, layer) - allowed) for f in _files(paths)}
    assert not {f: w for f, w in wrong.items() if w}, f"{layer} may import only {sorted(allowed)}"
