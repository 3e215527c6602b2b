"""What both snapshot callbacks share: the directory, the run, rank-0 writes, resume state, dedupe and logging.

The directory layout, the manifest and the run bookkeeping belong to :mod:`lightning_fastif.io.snapshot_store`; the
callbacks here only decide *when* to write and *what*, and hand names and entries to it.
"""

from __future__ import annotations

import os
import uuid
from abc import abstractmethod
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_fastif.errors import SnapshotError, check_bool, check_path
from lightning_fastif.io.snapshot_store import FEATURES_DIR, record_version, start_run, version_name

DEFAULT_SUBDIR = "fastif_snapshot"
"""Folder under ``trainer.default_root_dir`` that the snapshot callbacks write to when given no ``dirpath``."""
_SHARDED = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


def default_snapshot_dir(trainer: pl.Trainer) -> str:
    """``<trainer.default_root_dir>/fastif_snapshot``: where the snapshot callbacks write by default.

    Example::

        >>> from types import SimpleNamespace
        >>> default_snapshot_dir(SimpleNamespace(default_root_dir="runs"))
        'runs/fastif_snapshot'
    """
    return os.path.join(trainer.default_root_dir, DEFAULT_SUBDIR)


class SnapshotCallback(Callback):
    """The shared machinery of :class:`FeatureSnapshot` and :class:`CheckpointSnapshot` (not used on its own).

    Args:
        dirpath: snapshot directory; ``None``: :func:`default_snapshot_dir` of the Trainer.
        on_fit_end: take a snapshot when training ends.

    Raises:
        ArgumentError: ``dirpath`` is not a path or ``on_fit_end`` not a bool.
    """

    _kind: Literal["features", "checkpoints"]

    def __init__(self, dirpath: str | os.PathLike | None, on_fit_end: bool) -> None:
        self.dirpath = check_path("dirpath", dirpath, allow_none=True)
        # Stored under another name: an attribute `on_fit_end` would shadow the Callback hook of that name.
        self.at_fit_end = check_bool("on_fit_end", on_fit_end)
        self._dirpath: str | None = None
        self._run_id: str | None = None
        self._run_index = 0
        self._last_step = -1
        self._versions: list[str] = []
        self._restarting = False

    @property
    def snapshot_dir(self) -> str | None:
        """The directory written to: ``dirpath``, or ``<default_root_dir>/fastif_snapshot`` when it was not given.

        Resolved (as an absolute path, rank 0's on every rank) in ``setup(stage="fit")``; ``None`` before. Other
        callbacks read it to find the snapshots of a Trainer that uses the defaults.
        """
        return self._dirpath

    @property
    def run_index(self) -> int:
        """Position of this fit's run in the snapshot directory (0 for the first run; versions of later runs end
        in ``-run=<K>``). Known from ``on_fit_start``."""
        return self._run_index

    # ------------------------------------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, _SHARDED):
            raise MisconfigurationException(
                f"{type(self).__name__}: strategy {type(trainer.strategy).__name__} shards the model across ranks, "
                f"which snapshots do not support; use a DDP or single-device strategy (e.g. strategy='ddp')"
            )
        self._check_module(pl_module)
        dirpath = self.dirpath or default_snapshot_dir(trainer)
        # Every rank must write to rank 0's directory (Hydra may give each rank its own working directory).
        self._dirpath = str(trainer.strategy.broadcast(os.path.abspath(dirpath)))

    def _check_module(self, pl_module: pl.LightningModule) -> None:
        """Raise ``ArgumentError`` early when the model cannot be snapshotted with these arguments."""

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The loops' state (global_step) is restored after on_fit_start and before this hook.
        if getattr(self, "_resumed", False):
            self._resumed_from_step = int(trainer.global_step)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        resumed = self._restarting
        self._restarting = False
        # A resumed fit is marked in every version it writes: Lightning restores the loop's position, not a shuffled
        # loader's order within an epoch, so after a mid-epoch resume the weights (and snapshots) can differ from an
        # uninterrupted fit. The features of a given set of weights never depend on the order (they are embedded
        # in dataset order).
        self._resumed = resumed
        self._resumed_from_step: int | None = None  # the restored global step, known from on_train_start on
        if not resumed or self._run_id is None:
            self._run_id = str(trainer.strategy.broadcast(uuid.uuid4().hex))
            self._last_step = -1
            self._versions = []
        index, error = self._run_index, None
        if trainer.is_global_zero:
            try:
                index = start_run(self._directory(), self._kind, str(self._run_id))
            except Exception as err:  # raised on every rank below, so no rank waits in the broadcast
                error = f"{type(err).__name__}: {err}"
        index, error = trainer.strategy.broadcast((index, error))
        if error is not None:
            raise SnapshotError(
                f"{type(self).__name__}: cannot start a run in {self._dirpath}: {error}; repair or delete that "
                "directory, or pass another dirpath"
            )
        if index and not resumed:
            rank_zero_info(
                f"{type(self).__name__}: {self._dirpath} holds {self._kind} of {index} earlier run(s); this fit is "
                f"run {index} (versions named '...-run={index}'), and 'latest'/'all' now read this run only"
            )
        if not resumed:  # a resumed run keeps the position its versions are named with
            self._run_index = int(index)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "dirpath": self._dirpath,
            "run_id": self._run_id,
            "run_index": self._run_index,
            "last_step": self._last_step,
            "versions": list(self._versions),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restarting = True
        self._run_id = state_dict.get("run_id")
        self._run_index = int(state_dict.get("run_index", 0))
        self._last_step = int(state_dict.get("last_step", -1))
        self._versions = list(state_dict.get("versions", []))
        saved = state_dict.get("dirpath")
        if saved and self._dirpath and os.path.abspath(saved) != self._dirpath:
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint's snapshots are in {saved}, this run writes to {self._dirpath}"
            )

    # ---------------------------------------------------------------------------------------------------- helpers
    def _directory(self) -> str:
        if self._dirpath is None:
            raise MisconfigurationException(f"{type(self).__name__}: used before setup(stage='fit') resolved dirpath")
        return self._dirpath

    def _should_skip(self, trainer: pl.Trainer) -> bool:
        """True when this step was already taken by this run: two triggers at one step, or the end of fit right
        after the last epoch. The same on every rank, since it depends on the step only.

        A step re-run after resuming from an earlier checkpoint is taken again (and overwrites the version of the
        same name): training continues from the re-run weights, so those are what the snapshot must hold.
        """
        return trainer.global_step == self._last_step

    @staticmethod
    def _epoch(trainer: pl.Trainer, at_fit_end: bool) -> int:
        """The 0-based epoch the weights come from, as Lightning's ``current_epoch`` names it inside that epoch.

        Lightning advances ``current_epoch`` after the epoch-end hooks, so in ``on_train_end`` it is one past the
        last epoch that ran (also when ``max_steps`` or early stopping ended that epoch part-way).
        """
        if at_fit_end:
            return max(trainer.current_epoch - 1, 0)
        return trainer.current_epoch

    def _version(self, trainer: pl.Trainer, at_fit_end: bool) -> str:
        return version_name(self._epoch(trainer, at_fit_end), trainer.global_step, self._run_index)

    def _record(self, version: str, entry: dict[str, Any]) -> None:
        """Add ``entry`` to the manifest (rank 0 only; no collectives here)."""
        entry = {**entry, "resumed_from_step": getattr(self, "_resumed_from_step", None)}
        record_version(self._directory(), self._kind, version, entry)

    def _finish(self, trainer: pl.Trainer, version: str, error: str | None) -> None:
        """Wait for rank 0's write and share its outcome, so no rank hangs or carries on after a failure."""
        error = trainer.strategy.broadcast(error)
        if error is not None:
            raise SnapshotError(f"{type(self).__name__}: writing {version} into {self._dirpath} failed: {error}")
        self._last_step = trainer.global_step
        if version not in self._versions:
            self._versions.append(version)

    def _log_seconds(self, trainer: pl.Trainer, pl_module: pl.LightningModule, seconds: float, in_epoch: bool) -> None:
        key = f"fastif/{'snapshot' if self._kind == FEATURES_DIR else 'checkpoint'}/seconds"
        if in_epoch:
            # Every rank logs; the slowest rank's time is the snapshot's wall time.
            pl_module.log(key, seconds, on_step=False, on_epoch=True, batch_size=1, sync_dist=True, reduce_fx="max")
            return
        # on_train_end does not allow self.log: write to the loggers directly (they are rank-zero only).
        for logger in trainer.loggers:
            logger.log_metrics({key: seconds}, step=trainer.global_step)


class EpochSnapshotCallback(SnapshotCallback):
    """A snapshot taken after every ``every_n_epochs``-th epoch and, with ``on_fit_end``, when training ends.

    Subclasses set ``every_n_epochs`` and define ``_snapshot(trainer, pl_module, in_epoch)``; the triggers live here
    once (``CheckpointSnapshot`` keeps ModelCheckpoint's own richer ones).
    """

    every_n_epochs: int | None = None

    @abstractmethod
    def _snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, in_epoch: bool) -> None:
        """Take one snapshot (``in_epoch``: after an epoch, else at the end of training)."""

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._snapshot(trainer, pl_module, in_epoch=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_fit_end:
            self._snapshot(trainer, pl_module, in_epoch=False)
