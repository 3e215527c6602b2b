"""The package's layers import downwards only, and the pure-torch layers import no Lightning, Hydra or FAISS.

Layers, lowest first (docs/ARCHITECTURE.md): ``errors`` and ``metrics``; ``core``; ``io``; ``search``;
``lightning``; ``app``. Imports are read from the source (every ``import`` statement, lazy ones inside functions
included), so a test fails the moment a lower module reaches up.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_fastif"

RANK = {"errors": 0, "metrics": 0, "_moved": 0, "core": 1, "io": 2, "search": 3, "lightning": 4, "app": 5}
"""Layer of each top-level module or folder of the package; ``__init__``/``__main__`` sit above them all."""

FORBIDDEN = {
    "errors": {"lightning", "pytorch_lightning", "hydra", "omegaconf", "faiss", "lightning_utilities"},
    "metrics": {"lightning", "pytorch_lightning", "hydra", "omegaconf", "faiss"},
    "core": {"lightning", "pytorch_lightning", "hydra", "omegaconf", "faiss", "lightning_utilities"},
    "io": {"lightning", "pytorch_lightning", "hydra", "omegaconf", "faiss"},
    "search": {"lightning", "pytorch_lightning", "hydra", "omegaconf"},
    "lightning": {"hydra", "omegaconf", "pytorch_lightning"},
}


def _layer(path: Path) -> str | None:
    rel = path.relative_to(PACKAGE)
    head = rel.parts[0].removesuffix(".py")
    return head if head in RANK else None


def _imports(source: str) -> list[tuple[int, str]]:
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            if node.module == "lightning_fastif":  # ``from lightning_fastif import core`` names a submodule
                found += [(node.lineno, f"lightning_fastif.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if _layer(p) is not None)


def test_every_module_has_a_layer():
    unplaced = [
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*.py")
        if _layer(p) is None and p.name not in ("__init__.py", "__main__.py")
    ]
    assert unplaced == []


def _problems(layer: str, source: str) -> list[str]:
    problems = []
    for line, name in sorted(_imports(source)):
        if name.startswith("."):
            problems.append(f"line {line}: relative import {name} (the package uses absolute imports)")
            continue
        top = name.split(".")[0]
        if top in FORBIDDEN.get(layer, set()):
            problems.append(f"line {line}: {layer} imports {name}")
        if top == "lightning_fastif":
            parts = name.split(".")
            if len(parts) == 1:
                problems.append(f"line {line}: imports the package root (import the module that defines the name)")
                continue
            target = parts[1]
            if target in RANK and RANK[target] > RANK[layer]:
                problems.append(f"line {line}: {layer} (layer {RANK[layer]}) imports {name} (layer {RANK[target]})")
    return problems


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_imports_point_down(path):
    assert _problems(_layer(path), path.read_text()) == []


def test_the_rule_catches_an_upward_import():
    source = (
        "import torch\n"
        "def f():\n"
        "    import lightning.pytorch\n"
        "    from lightning_fastif.lightning.module import InfluenceModule\n"
        "    from lightning_fastif.errors import ArgumentError\n"
        "from . import x\n"
    )
    assert _problems("core", source) == [
        "line 3: core imports lightning.pytorch",
        "line 4: core (layer 1) imports lightning_fastif.lightning.module (layer 4)",
        "line 6: relative import . (the package uses absolute imports)",
    ]


def test_import_pulls_in_neither_hydra_nor_faiss():
    code = (
        "import sys, lightning_fastif\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf', 'faiss'))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
