"""``CheckpointSnapshot``: save the weights at chosen epochs or steps, for influence at several checkpoints.

Each version is ``checkpoints/<version>.safetensors`` (parameter name -> tensor); read them back with
:func:`~lightning_fastif.io.snapshot_store.load_checkpoint` and
:func:`~lightning_fastif.io.snapshot_store.apply_checkpoint`.
"""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_fastif.errors import ArgumentError, check_int
from lightning_fastif.io.atomic import save_tensors
from lightning_fastif.io.snapshot_store import CHECKPOINTS_DIR, checkpoint_file
from lightning_fastif.lightning.snapshots.base import SnapshotCallback


class CheckpointSnapshot(SnapshotCallback):
    """Save the weights at chosen epochs or steps, for influence at several checkpoints (TracIn-style sums).

    Saves the parameters whose names match ``params`` (``fnmatch`` patterns over
    ``pl_module.named_parameters()``), or the whole ``state_dict()`` when ``params`` is None, as
    ``<dirpath>/checkpoints/<version>.safetensors``, with the epoch, step and monitored metric in the manifest.
    Several triggers may be combined; one step is saved at most once. Read back with :func:`load_checkpoint`
    and :func:`apply_checkpoint`. The time each save took is logged as ``fastif/checkpoint/seconds``.

    One epoch numbering everywhere: Lightning's 0-based ``trainer.current_epoch`` of the epoch the weights come
    from, in ``epochs=``, in the manifest's ``"epoch"`` and in the version name ``epoch=<E>-step=<S>``. The save at
    the end of fit is numbered with the last epoch that ran (after 3 epochs: ``epoch=2``), so it is the same version
    as an ``epochs=[2]`` save of that step and is skipped as a duplicate. After ``setup``, :attr:`snapshot_dir` is
    the directory written to; a second fit into it starts a new run (see :mod:`lightning_fastif.io.snapshot_store`).

    Args:
        dirpath: snapshot directory (default ``<trainer.default_root_dir>/fastif_snapshot``).
        params: a pattern or patterns, e.g. ``"classifier.*"`` or ``["encoder.layer.11.*", "classifier.*"]``.
        every_n_epochs: save after every n-th epoch.
        every_n_train_steps: save every n optimizer steps (``on_train_batch_end``).
        epochs: save after these epochs (0-based ``trainer.current_epoch``), e.g. ``[0, 4, 9]``.
        on_fit_end: save when training ends (skipped when that step was already saved).
        monitor: a key of ``trainer.callback_metrics`` recorded with each save (e.g. ``"val_loss"``).

    Raises:
        ArgumentError: an argument outside its accepted values (at construction), or patterns that match no
            parameter (in ``setup``).
        MisconfigurationException: a strategy that shards the model (FSDP, DeepSpeed).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> saver = CheckpointSnapshot(params="classifier.*", epochs=[0, 2], monitor="val_loss")
        >>> Trainer(callbacks=[saver], max_epochs=3).fit(model)  # doctest: +SKIP
        >>> [entry["epoch"] for _, entry in load_checkpoint(saver.snapshot_dir, "all")]  # doctest: +SKIP
        [0, 2]
    """

    _kind = CHECKPOINTS_DIR

    def __init__(
        self,
        *,
        dirpath: str | os.PathLike | None = None,
        params: str | Sequence[str] | None = None,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        epochs: Sequence[int] | None = None,
        on_fit_end: bool = True,
        monitor: str | None = None,
    ) -> None:
        super().__init__(dirpath, on_fit_end)
        if isinstance(params, str):
            params = [params]
        if params is not None:
            params = list(params)
            if not params or not all(isinstance(p, str) and p for p in params):
                raise ArgumentError(
                    f"params: expected None, a name pattern or a non-empty list of patterns, got {params!r}"
                )
        check_int("every_n_epochs", every_n_epochs, allow_none=True)
        check_int("every_n_train_steps", every_n_train_steps, allow_none=True)
        if epochs is not None:
            epochs = list(epochs)
            for epoch in epochs:
                check_int("epochs", epoch, minimum=0)
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ArgumentError(f"monitor: expected None or a metric name, got {monitor!r}")
        if not (every_n_epochs or every_n_train_steps or epochs or on_fit_end):
            raise ArgumentError(
                "on_fit_end: expected True when every_n_epochs, every_n_train_steps and epochs are all unset "
                "(otherwise nothing would be saved), got False"
            )
        self.params = params
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self.epochs = sorted(set(epochs)) if epochs is not None else None
        self.monitor = monitor
        self._warned_monitor = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self.dirpath, params=self.params)

    @override
    def _check_module(self, pl_module: pl.LightningModule) -> None:
        if self.params is not None and not self._selected(pl_module):
            names = [n for n, _ in pl_module.named_parameters()][:60]
            raise ArgumentError(
                f"params: expected patterns matching parameters of {type(pl_module).__name__} (its parameters: "
                f"{names}), got {self.params!r}, which match none"
            )

    def _selected(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        if self.params is None:
            return dict(pl_module.state_dict())
        return {
            name: p.detach()
            for name, p in pl_module.named_parameters()
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.params)
        }

    # ----------------------------------------------------------------------------------------------------- hooks
    # The triggers are ModelCheckpoint's rules ((epoch + 1) % every_n_epochs, global_step % every_n_train_steps, at
    # most one save per global step) written out rather than inherited: its trigger checks are private methods tied
    # to its top-k/"last" bookkeeping and to trainer.save_checkpoint (a pickled full checkpoint), it moves epoch-end
    # saves to validation end when validation runs, and it has no epoch-list trigger.
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step > 0 and trainer.global_step % n == 0:
            self._save(trainer, pl_module, in_epoch=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        due = bool(self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0)
        if due or (self.epochs is not None and epoch in self.epochs):
            self._save(trainer, pl_module, in_epoch=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_fit_end:
            self._save(trainer, pl_module, in_epoch=False)

    def _monitored(self, trainer: pl.Trainer) -> float | None:
        if self.monitor is None:
            return None
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            if not self._warned_monitor:
                rank_zero_warn(
                    f"CheckpointSnapshot: monitor {self.monitor!r} is not in trainer.callback_metrics (available: "
                    f"{sorted(trainer.callback_metrics)}); it is recorded as null"
                )
                self._warned_monitor = True
            return None
        return float(value)

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, in_epoch: bool) -> None:
        if self._should_skip(trainer):
            return
        start = time.perf_counter()
        epoch = self._epoch(trainer, at_fit_end=not in_epoch)
        version = self._version(trainer, at_fit_end=not in_epoch)
        dirpath = self._directory()
        error: str | None = None
        # On every rank: reading trainer.callback_metrics computes synced torchmetrics, a collective (rank 0 alone
        # would wait forever in its barrier).
        monitored = self._monitored(trainer)
        if trainer.is_global_zero:
            try:
                weights = self._selected(pl_module)
                meta = {"epoch": str(epoch), "global_step": str(trainer.global_step)}
                if self.monitor is not None:
                    meta.update(monitor=self.monitor, monitor_value=repr(monitored))
                path = save_tensors(checkpoint_file(dirpath, version), weights, meta)
                seconds = time.perf_counter() - start
                self._record(
                    version,
                    {
                        "file": path.name,
                        "epoch": epoch,
                        "global_step": trainer.global_step,
                        "created": time.time(),
                        "seconds": round(seconds, 4),
                        "run_id": self._run_id,
                        "monitor": self.monitor,
                        "monitor_value": monitored,
                        "params": self.params,
                        "num_tensors": len(weights),
                        "numel": int(sum(t.numel() for t in weights.values())),
                    },
                )
            except Exception as err:  # reported on every rank by _finish
                error = f"{type(err).__name__}: {err}"
        self._finish(trainer, version, error)
        self._log_seconds(trainer, pl_module, time.perf_counter() - start, in_epoch)
