"""Lightning callbacks that capture, while the user trains, what influence is later computed from.

* :class:`FeatureSnapshot` (``features.py``) embeds the training set (and any extra named datasets) into one feature
  vector per example and stores them with their dataset indices, ready for
  :class:`~lightning_fastif.search.knn.KNNIndex`.
* :class:`CheckpointSnapshot` (``checkpoints.py``) stores the weights (selected parameters, or the whole model) at
  chosen epochs or steps, so influence can be computed at any of them or summed over several (TracIn-style).
* :class:`CurvatureSnapshot` (``curvature.py``) fits K-FAC/EK-FAC factors over the training set (sums reduced across
  DDP ranks) and stores them with the weights' fingerprint; the influence module's K-FAC estimators reuse them
  (:func:`load_curvature`, :class:`CurvatureReuse`) instead of fitting again, for the same weights only.
* ``base.py``: what the callbacks share (the directory, the run, rank-0 writes, resume state, logging).

All write into one snapshot directory, :attr:`~SnapshotCallback.snapshot_dir` after ``setup`` (``dirpath``, or
:func:`default_snapshot_dir`: ``<trainer.default_root_dir>/fastif_snapshot``), laid out as
:mod:`lightning_fastif.io.snapshot_store` describes. Versions are named ``epoch=<E>-step=<S>`` (Lightning's 0-based
``current_epoch`` of the epoch the weights come from, and ``global_step``); a second fit into a directory that holds
another run's snapshots starts a new run there, whose versions end in ``-run=<K>``, and readers see the current run.
Each file is written by rank 0 to a temporary name and renamed, then the manifest is updated the same way, while the
other ranks wait; a crash loses at most the file in flight. Read the directory back with
:func:`~lightning_fastif.io.snapshot_store.read_feature_snapshot`, :meth:`KNNIndex.from_snapshot` and
:func:`~lightning_fastif.io.snapshot_store.load_checkpoint` (none of which need Lightning).
"""

from lightning_fastif.errors import SnapshotError, SnapshotNotFoundError
from lightning_fastif.io.snapshot_store import (
    LAST_LAYER_HESSIAN,
    LAST_LAYER_KFAC,
    apply_checkpoint,
    load_checkpoint,
    read_feature_snapshot,
)
from lightning_fastif.lightning.snapshots.base import DEFAULT_SUBDIR, SnapshotCallback, default_snapshot_dir
from lightning_fastif.lightning.snapshots.checkpoints import CheckpointSnapshot
from lightning_fastif.lightning.snapshots.curvature import CurvatureReuse, CurvatureSnapshot, load_curvature
from lightning_fastif.lightning.snapshots.features import FeatureSnapshot

__all__ = [
    "DEFAULT_SUBDIR",
    "LAST_LAYER_HESSIAN",
    "LAST_LAYER_KFAC",
    "CheckpointSnapshot",
    "CurvatureReuse",
    "CurvatureSnapshot",
    "FeatureSnapshot",
    "SnapshotCallback",
    "SnapshotError",
    "SnapshotNotFoundError",
    "apply_checkpoint",
    "default_snapshot_dir",
    "load_curvature",
    "load_checkpoint",
    "read_feature_snapshot",
]
