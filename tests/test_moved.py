"""Code written against the flat package of version 0.1 keeps importing, with a warning that names the new home."""

from __future__ import annotations

import importlib
import sys

import pytest

from lightning_fastif._moved import MOVED_MODULES


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_old_module_path_imports_and_warns(old):
    name = f"lightning_fastif.{old}"
    sys.modules.pop(name, None)
    with pytest.warns(DeprecationWarning, match=rf"lightning_fastif\.{old} moved to lightning_fastif\."):
        module = importlib.import_module(name)
    targets = MOVED_MODULES[old]
    for target in (targets,) if isinstance(targets, str) else targets:
        new = importlib.import_module(f"lightning_fastif.{target}")
        public = [k for k in vars(new) if not k.startswith("_")]
        assert public
        assert all(getattr(module, k) is getattr(new, k) for k in public)


def test_the_split_storage_module_has_both_halves():
    sys.modules.pop("lightning_fastif.storage", None)
    with pytest.warns(DeprecationWarning, match="io.atomic and lightning_fastif.io.snapshot_store"):
        from lightning_fastif.storage import atomic_write_bytes, read_feature_snapshot
    from lightning_fastif.io.atomic import atomic_write_bytes as new_write
    from lightning_fastif.io.snapshot_store import read_feature_snapshot as new_read

    assert atomic_write_bytes is new_write
    assert read_feature_snapshot is new_read


def test_unknown_old_names_still_fail():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("lightning_fastif.no_such_module")
