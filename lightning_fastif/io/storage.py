"""The old module ``lightning_fastif.storage``, split: import from :mod:`lightning_fastif.io.atomic` (atomic writes,
safetensors, manifests) and :mod:`lightning_fastif.io.snapshot_store` (the snapshot layout) instead.

Kept only so that code written against the flat package (``from lightning_fastif.storage import ...``, still routed
here by ``lightning_fastif._moved``) keeps importing; it warns once with the new homes.
"""

import warnings

from lightning_fastif.errors import SnapshotError, SnapshotNotFoundError
from lightning_fastif.io.atomic import (
    MANIFEST_NAME,
    PathLike,
    atomic_path,
    atomic_write_bytes,
    load_tensors,
    manifest_path,
    read_manifest,
    read_tensor_metadata,
    save_tensors,
    write_manifest,
)
from lightning_fastif.io.snapshot_store import (
    CHECKPOINTS_DIR,
    FEATURES_DIR,
    SNAPSHOT_FORMAT,
    SNAPSHOT_FORMAT_VERSION,
    apply_checkpoint,
    checkpoint_file,
    empty_snapshot_manifest,
    feature_file,
    load_checkpoint,
    read_feature_snapshot,
    read_snapshot_manifest,
    resolve_version,
    snapshot_versions,
)

warnings.warn(
    "lightning_fastif.io.storage is split into lightning_fastif.io.atomic and lightning_fastif.io.snapshot_store; "
    "import from those (this module will be removed)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "CHECKPOINTS_DIR",
    "FEATURES_DIR",
    "MANIFEST_NAME",
    "SNAPSHOT_FORMAT",
    "SNAPSHOT_FORMAT_VERSION",
    "PathLike",
    "SnapshotError",
    "SnapshotNotFoundError",
    "apply_checkpoint",
    "atomic_path",
    "atomic_write_bytes",
    "checkpoint_file",
    "empty_snapshot_manifest",
    "feature_file",
    "load_checkpoint",
    "load_tensors",
    "manifest_path",
    "read_feature_snapshot",
    "read_manifest",
    "read_snapshot_manifest",
    "read_tensor_metadata",
    "resolve_version",
    "save_tensors",
    "snapshot_versions",
    "write_manifest",
]
