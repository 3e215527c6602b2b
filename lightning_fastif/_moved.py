"""Old module paths keep importing: ``lightning_fastif.ihvp`` is ``lightning_fastif.core.ihvp`` (and so on).

The package was one flat folder until version 0.2; its modules now live in layer folders. A user's
``from lightning_fastif.data import DigitsDataModule`` still works and warns once with the new path. The names
exported from ``lightning_fastif`` itself never moved.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED_MODULES: dict[str, str | tuple[str, ...]] = {
    "batches": "core.batches",
    "params": "core.params",
    "grads": "core.grads",
    "hessian": "core.hessian",
    "ihvp": "core.ihvp",
    "influence": "core.influence",
    "memory": "core.memory",
    "verify": "core.verify",
    "features": "search.features",
    "knn": "search.knn",
    "storage": ("io.atomic", "io.snapshot_store"),  # split in two: the old path gets both namespaces
    "results": "io.results",
    "distributed": "lightning.distributed",
    "module": "lightning.module",
    "snapshots": "lightning.snapshots",
    "correction": "lightning.correction",
    "config": "app.config",
    "report": "app.report",
    "viz": ("app.plots", "app.text_explanations", "metrics"),  # split: plots, text explanations, metrics
    "data": "app.data",
    "models": "app.models",
}
"""Old module name (under ``lightning_fastif``) -> its path now."""

_PACKAGE = "lightning_fastif"


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, targets: tuple[str, ...]) -> None:
        self._targets = targets

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {' and '.join(self._targets)}; import it from there (the old path will be removed)",
            DeprecationWarning,
            stacklevel=2,
        )
        modules = [importlib.import_module(target) for target in self._targets]
        if len(modules) == 1:
            return modules[0]
        combined = ModuleType(spec.name, f"Names of {' and '.join(self._targets)} (the module was split).")
        for module in modules:
            combined.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
        return combined

    def exec_module(self, module: ModuleType) -> None:
        """The target module is already executed by ``import_module``."""


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        prefix, _, name = fullname.rpartition(".")
        if prefix != _PACKAGE or name not in MOVED_MODULES:
            return None
        moved = MOVED_MODULES[name]
        targets = (moved,) if isinstance(moved, str) else moved
        return importlib.machinery.ModuleSpec(fullname, _MovedModuleLoader(tuple(f"{_PACKAGE}.{t}" for t in targets)))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (after the real finders, so real modules always win)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
