"""Lightning callbacks that capture, while the user trains, what influence is later computed from.

* :class:`FeatureSnapshot` embeds the training set (and any extra named datasets) into one feature vector per
  example and stores them with their dataset indices, ready for :class:`~lightning_fastif.search.knn.KNNIndex`.
* :class:`CheckpointSnapshot` stores the weights (selected parameters, or the whole model) at chosen epochs
  or steps, so influence can be computed at any of them or summed over several (TracIn-style).

Both write into one snapshot directory (default ``<trainer.default_root_dir>/fastif_snapshot``)::

    manifest.json                              {"features": {"latest", "versions"}, "checkpoints": {...}}
    features/<version>/<dataset>.safetensors   "features" [N, D] float32, "indices" [N] int64 (sorted)
    features/<version>/<dataset>.faiss         a trained FAISS IVF index (index="ivf" only)
    features/<version>/last_layer_hessian.safetensors   "last_layer_hessian" [P, P] (features="loss_gradient")
    checkpoints/<version>.safetensors          parameter name -> tensor

Versions are named ``epoch=<E>-step=<S>`` (``trainer.current_epoch`` and ``trainer.global_step`` at that
moment). Each file is written by rank 0 to a temporary name and renamed, then the manifest is updated the same
way, while the other ranks wait; a crash loses at most the file in flight. Read the directory back with
:func:`~lightning_fastif.io.storage.read_feature_snapshot`, :meth:`KNNIndex.from_snapshot` and
:func:`load_checkpoint` (none of which need Lightning).
"""

from __future__ import annotations

import fnmatch
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_fastif.core.batches import IndexedData
from lightning_fastif.core.grads import evaluating
from lightning_fastif.core.hessian import HessianOperator
from lightning_fastif.io.storage import (
    CHECKPOINTS_DIR,
    FEATURES_DIR,
    SnapshotError,
    SnapshotNotFoundError,
    apply_checkpoint,
    checkpoint_file,
    feature_file,
    load_checkpoint,
    read_feature_snapshot,
    read_snapshot_manifest,
    save_tensors,
    write_manifest,
)
from lightning_fastif.lightning.distributed import gather_uneven
from lightning_fastif.search.features import (
    FEATURE_KINDS,
    extract_features,
    has_features_method,
    last_layer_name,
    resolve_layer,
)
from lightning_fastif.search.knn import KNNIndex

__all__ = [
    "CheckpointSnapshot",
    "FeatureSnapshot",
    "SnapshotError",
    "SnapshotNotFoundError",
    "apply_checkpoint",
    "default_snapshot_dir",
    "load_checkpoint",
    "read_feature_snapshot",
]

DEFAULT_SUBDIR = "fastif_snapshot"
LAST_LAYER_HESSIAN = "last_layer_hessian"
"""Manifest key, file stem and tensor name of the Hessian stored with loss-gradient features."""
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
_SHARDED = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


def default_snapshot_dir(trainer: pl.Trainer) -> str:
    """``<trainer.default_root_dir>/fastif_snapshot``: where the snapshot callbacks write by default."""
    return os.path.join(trainer.default_root_dir, DEFAULT_SUBDIR)


def _positive_int_or_none(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise MisconfigurationException(f"{name}: expected None or a positive integer, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise MisconfigurationException(f"{name}: expected True or False, got {value!r}")


def _check_dirpath(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise MisconfigurationException(f"dirpath: expected None or a directory path, got {value!r}")
    return os.fspath(value)


class _SnapshotCallback(Callback):
    """What both snapshot callbacks share: directory, rank-0 writes, manifest, resume state, dedupe, logging."""

    _kind: Literal["features", "checkpoints"]

    def __init__(self, dirpath: str | os.PathLike | None, on_fit_end: bool) -> None:
        self.dirpath = _check_dirpath(dirpath)
        _check_bool("on_fit_end", on_fit_end)
        # Stored under another name: an attribute `on_fit_end` would shadow the Callback hook of that name.
        self.at_fit_end = on_fit_end
        self._dirpath: str | None = None
        self._run_id: str | None = None
        self._last_step = -1
        self._versions: list[str] = []
        self._restarting = False

    @property
    def snapshot_dir(self) -> str | None:
        """The directory written to (resolved in ``setup``; ``None`` before)."""
        return self._dirpath

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
        """Raise ``MisconfigurationException`` early when the model cannot be snapshotted."""

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restarting:
            self._restarting = False
            return
        self._run_id = str(trainer.strategy.broadcast(uuid.uuid4().hex))
        self._last_step = -1
        self._versions = []
        if trainer.is_global_zero and self._dirpath is not None:
            try:
                taken = read_snapshot_manifest(self._dirpath, missing_ok=True)[self._kind]["versions"]
            except SnapshotError:
                taken = {}
            if taken:
                rank_zero_warn(
                    f"{type(self).__name__}: {self._dirpath} already holds {len(taken)} {self._kind} versions from an "
                    f"earlier run; versions with the same name will be overwritten and 'latest' will point to this run"
                )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "dirpath": self._dirpath,
            "run_id": self._run_id,
            "last_step": self._last_step,
            "versions": list(self._versions),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restarting = True
        self._run_id = state_dict.get("run_id")
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

    def _version(self, trainer: pl.Trainer) -> str:
        return f"epoch={trainer.current_epoch}-step={trainer.global_step}"

    def _record(self, version: str, entry: dict[str, Any]) -> None:
        """Add ``entry`` to the manifest (rank 0 only; no collectives here)."""
        dirpath = self._directory()
        manifest = read_snapshot_manifest(dirpath, missing_ok=True)
        section = manifest[self._kind]
        section["versions"][version] = entry
        section["latest"] = version
        write_manifest(dirpath, manifest)

    def _finish(self, trainer: pl.Trainer, version: str, error: str | None) -> None:
        """Wait for rank 0's write and share its outcome, so no rank hangs or carries on after a failure."""
        error = trainer.strategy.broadcast(error)
        if error is not None:
            raise SnapshotError(f"{type(self).__name__}: writing {version} into {self._dirpath} failed: {error}")
        self._last_step = trainer.global_step
        if version not in self._versions:
            self._versions.append(version)

    def _log_seconds(self, trainer: pl.Trainer, pl_module: pl.LightningModule, seconds: float, in_epoch: bool) -> None:
        key = f"fastif/{'snapshot' if self._kind == FEATURES_DIR else 'checkpoint'}_seconds"
        if in_epoch:
            # Every rank logs; the slowest rank's time is the snapshot's wall time.
            pl_module.log(key, seconds, on_step=False, on_epoch=True, batch_size=1, sync_dist=True, reduce_fx="max")
            return
        # on_train_end does not allow self.log: write to the loggers directly (they are rank-zero only).
        for logger in trainer.loggers:
            logger.log_metrics({key: seconds}, step=trainer.global_step)


class FeatureSnapshot(_SnapshotCallback):
    """Embed the training set (and extra named datasets) at chosen moments of a fit, for kNN candidates.

    Features come from the forward hook on ``layer`` (its output, or its first input with ``hook="input"``),
    or from ``pl_module.features(batch)`` when ``layer`` is None. With ``features="loss_gradient"`` they are
    instead each example's loss gradient with respect to the parameters of ``layer`` (default: the last
    submodule with parameters, usually the classifier), ``C·(D+1)`` numbers for a linear classifier, indexed for
    maximum inner-product search (``metric="ip"``): the training points with the largest ``|<g_test, g_train>|``
    are the likely most influential ones (see :mod:`lightning_fastif.search.features`; on the digits CNN this raised
    the recall of the true top-10 helpful points among 1% kNN candidates from 0.04 to 0.79, and to 0.95 with the
    query preconditioned by the stored last-layer Hessian, below). The
    :class:`~lightning_fastif.lightning.module.InfluenceModule` reads the kind from the manifest and embeds its test
    points the same way. Extraction runs in eval mode without gradients
    on the training set's dataset in index order (unshuffled, with the training loader's ``collate_fn``).
    Under DDP every rank embeds every ``world_size``-th batch (the dataset is split here, not by the training
    sampler, which pads with repeated examples), the parts are gathered on every rank (``N x D`` float32 each),
    and rank 0 writes each dataset index exactly once (sorted) while the other ranks wait. The time each snapshot
    took is logged as ``fastif/snapshot_seconds``.

    With ``features="loss_gradient"`` each version also stores the Hessian of the *mean training loss* with respect
    to ``layer``'s parameters only, ``H_last`` (``[P, P]``, ``last_layer_hessian.safetensors``; computed by rank 0 from
    the whole training set in eval mode, the other ranks wait), and records it in the manifest entry under
    ``"last_layer_hessian"`` (``file``, ``layer``, ``num_params``, ``params``). The influence module preconditions its
    queries with it, ``q = (H_last + λI)⁻¹ g_test``, which brings the inner product closer to the influence score
    itself. A layer with more than ``max_hessian_params`` parameters (or ``include_train=False``) is skipped: the
    entry then has ``file: null`` and a ``note`` saying why, and queries stay raw gradients.

    Args:
        dirpath: snapshot directory (default ``<trainer.default_root_dir>/fastif_snapshot``).
        datasets: extra map-style datasets (or loaders over them) to embed, by name (e.g. ``"val"``,
            ``"challenge"``); names use letters, digits, ``_``, ``.``, ``-``.
        include_train: embed the training set (as dataset ``"train"``).
        layer: submodule name (``pl_module.named_modules()``) to hook; ``None`` uses ``pl_module.features``.
        hook: ``"output"`` or ``"input"`` of ``layer`` (``layer="classifier", hook="input"``: the classifier's input);
            activations only.
        features: ``"activations"`` (FastIF's: a layer's activations) or ``"loss_gradient"`` (per-example loss
            gradients of ``layer``'s parameters; the training batches must carry labels).
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]`` for ``features="loss_gradient"`` (default
            ``pl_module.per_example_loss``); use the loss influence is computed with.
        every_n_epochs: also snapshot after every n-th epoch (``on_train_epoch_end``); ``None``: never.
        on_fit_end: snapshot when training ends (``on_train_end``, before the strategy moves the model to CPU);
            skipped when a snapshot was already taken at that step.
        batch_size: examples per forward pass while embedding.
        metric: ``"l2"``, ``"cosine"`` or ``"ip"`` (inner product): the metric recorded for the kNN index;
            ``None``: ``"l2"`` for activations, ``"ip"`` for loss gradients (``"l2"`` is refused for loss
            gradients: it would prefer the examples with the *smallest* gradients).
        index: ``"flat"`` (exact) or ``"ivf"`` (FAISS IVF, trained and saved with the snapshot).
        nlist: IVF lists (default ~4 sqrt(N)).
        nprobe: IVF lists searched per query.
        max_hessian_params: with ``features="loss_gradient"``, store ``H_last`` only when ``layer`` has at most this
            many parameters (``P²`` numbers on disk, ``P`` Hessian-vector products over the training set).

    Raises:
        MisconfigurationException: an argument outside its accepted values (the message names it), a sharded
            strategy, a ``layer`` the model does not have, or no ``layer`` and no ``features`` method.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> snapshot = FeatureSnapshot(layer="classifier", hook="input", every_n_epochs=1)
        >>> trainer = Trainer(callbacks=[snapshot], max_epochs=3)  # doctest: +SKIP
        >>> trainer.fit(model, datamodule)  # doctest: +SKIP
        >>> index = KNNIndex.from_snapshot(snapshot.snapshot_dir)  # doctest: +SKIP
    """

    _kind = FEATURES_DIR

    def __init__(
        self,
        *,
        dirpath: str | os.PathLike | None = None,
        datasets: Mapping[str, Dataset | DataLoader] | None = None,
        include_train: bool = True,
        layer: str | None = None,
        hook: Literal["input", "output"] = "output",
        every_n_epochs: int | None = None,
        on_fit_end: bool = True,
        batch_size: int = 256,
        metric: Literal["l2", "cosine", "ip"] | None = None,
        index: Literal["flat", "ivf"] = "flat",
        nlist: int | None = None,
        nprobe: int = 8,
        features: Literal["activations", "loss_gradient"] = "activations",
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        max_hessian_params: int = 5000,
    ) -> None:
        super().__init__(dirpath, on_fit_end)
        _check_bool("include_train", include_train)
        if datasets is not None and not isinstance(datasets, Mapping):
            raise MisconfigurationException(
                f"datasets: expected None or a mapping of name -> Dataset, got {type(datasets).__name__}"
            )
        datasets = dict(datasets or {})
        for name, data in datasets.items():
            if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
                raise MisconfigurationException(
                    f"datasets: name {name!r} is not accepted; use letters, digits, '_', '.', '-' (it names a file)"
                )
            if name == "train" and include_train:
                raise MisconfigurationException(
                    "datasets: the name 'train' is taken by the training set; rename it or set include_train=False"
                )
            if name == LAST_LAYER_HESSIAN:
                raise MisconfigurationException(
                    f"datasets: the name {name!r} is taken by the Hessian file of loss-gradient snapshots; rename it"
                )
            target = data.dataset if isinstance(data, DataLoader) else data
            if not (hasattr(target, "__getitem__") and hasattr(target, "__len__")):
                raise MisconfigurationException(
                    f"datasets[{name!r}]: expected a map-style Dataset (or a DataLoader over one), got "
                    f"{type(target).__name__}"
                )
        if not include_train and not datasets:
            raise MisconfigurationException("include_train: False and no datasets given: there is nothing to embed")
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise MisconfigurationException(f"layer: expected None or a submodule name, got {layer!r}")
        if hook not in ("input", "output"):
            raise MisconfigurationException(f"hook: expected 'input' or 'output', got {hook!r}")
        _positive_int_or_none("every_n_epochs", every_n_epochs)
        if every_n_epochs is None and not on_fit_end:
            raise MisconfigurationException(
                "every_n_epochs: None and on_fit_end: False would never take a snapshot; set one of them"
            )
        _positive_int_or_none("batch_size", batch_size)
        if batch_size is None:
            raise MisconfigurationException("batch_size: expected a positive integer, got None")
        if features not in FEATURE_KINDS:
            raise MisconfigurationException(f"features: expected one of {list(FEATURE_KINDS)}, got {features!r}")
        if metric is None:
            metric = "ip" if features == "loss_gradient" else "l2"
        if metric not in ("l2", "cosine", "ip"):
            raise MisconfigurationException(f"metric: expected None, 'l2', 'cosine' or 'ip', got {metric!r}")
        if features == "loss_gradient" and metric == "l2":
            raise MisconfigurationException(
                "metric: 'l2' with features='loss_gradient' would prefer the training points with the smallest loss "
                "gradients, which are the least influential; use metric='ip' (inner product, the default for loss "
                "gradients) or 'cosine'"
            )
        if loss_fn is not None and not callable(loss_fn):
            raise MisconfigurationException(
                f"loss_fn: expected None or a callable loss_fn(model, batch) -> Tensor[B], got {loss_fn!r}"
            )
        if index not in ("flat", "ivf"):
            raise MisconfigurationException(f"index: expected 'flat' or 'ivf', got {index!r}")
        _positive_int_or_none("nlist", nlist)
        _positive_int_or_none("nprobe", nprobe)
        if nprobe is None:
            raise MisconfigurationException("nprobe: expected a positive integer, got None")
        _positive_int_or_none("max_hessian_params", max_hessian_params)
        if max_hessian_params is None:
            raise MisconfigurationException("max_hessian_params: expected a positive integer, got None")

        self.datasets = datasets
        self.include_train = include_train
        self.layer = layer
        self.hook = hook
        self.every_n_epochs = every_n_epochs
        self.batch_size = batch_size
        self.metric = metric
        self.index = index
        self.nlist = nlist
        self.nprobe = nprobe
        self.features = features
        self.loss_fn = loss_fn
        self.max_hessian_params = max_hessian_params
        self._layer = layer  # resolved in setup: the default layer of loss gradients is the model's last one

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            dirpath=self.dirpath,
            layer=self.layer,
            hook=self.hook,
            features=self.features,
            include_train=self.include_train,
            datasets=sorted(self.datasets),
        )

    @override
    def _check_module(self, pl_module: pl.LightningModule) -> None:
        if self.features == "loss_gradient":
            try:
                self._layer = self.layer if self.layer is not None else last_layer_name(pl_module)
                if not any(True for _ in resolve_layer(pl_module, self._layer).parameters()):
                    raise ValueError(f"layer: {self._layer!r} holds no parameters, so it has no loss gradient")
            except ValueError as err:
                raise MisconfigurationException(str(err)) from err
            if self.loss_fn is None and not callable(getattr(pl_module, "per_example_loss", None)):
                raise MisconfigurationException(
                    f"loss_fn: None, but {type(pl_module).__name__} defines no per_example_loss(batch) -> Tensor[B], "
                    "which features='loss_gradient' needs; pass loss_fn=(model, batch) -> per-example losses"
                )
            return
        if self.layer is not None:
            try:
                resolve_layer(pl_module, self.layer)
            except ValueError as err:
                raise MisconfigurationException(str(err)) from err
        elif not has_features_method(pl_module):
            names = [n for n, _ in pl_module.named_modules() if n][:60]
            raise MisconfigurationException(
                f"layer: None, but {type(pl_module).__name__} defines no features(batch) method; set layer= one of "
                f"its submodules {names} (e.g. the classifier with hook='input')"
            )

    # ----------------------------------------------------------------------------------------------------- hooks
    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._snapshot(trainer, pl_module, in_epoch=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_fit_end:
            self._snapshot(trainer, pl_module, in_epoch=False)

    # ---------------------------------------------------------------------------------------------------- snapshot
    def _sources(self, trainer: pl.Trainer) -> dict[str, IndexedData]:
        sources: dict[str, IndexedData] = {}
        if self.include_train:
            loader = trainer.train_dataloader
            if loader is None and trainer.datamodule is not None:
                loader = trainer.datamodule.train_dataloader()
            if not isinstance(loader, DataLoader):
                raise MisconfigurationException(
                    f"include_train: the training data is {type(loader).__name__}, expected one DataLoader; with "
                    f"several training loaders pass them as datasets={{name: loader}} and include_train=False"
                )
            try:
                sources["train"] = IndexedData(loader)
            except (TypeError, ValueError) as err:
                raise MisconfigurationException(
                    f"include_train: the training loader's dataset cannot be embedded by index ({err})"
                ) from err
        for name, data in self.datasets.items():
            sources[name] = IndexedData(data)
        return sources

    def _shard(self, n: int, world: int, rank: int) -> Tensor:
        """Every ``world``-th batch of ``batch_size``, from batch ``rank``: each index on exactly one rank.

        Whole batches, as one process would form them, so the features match a single-process snapshot.
        """
        idx = torch.arange(n)
        return idx[(idx // self.batch_size) % world == rank]

    def _embed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str, data: IndexedData) -> Any:
        world, rank = trainer.world_size, trainer.global_rank
        local = self._shard(len(data), world, rank)
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        error: Exception | None = None
        feats = torch.zeros(0, 0)
        try:
            feats = extract_features(
                pl_module,
                data,
                layer=self._layer,
                hook=self.hook,
                batch_size=self.batch_size,
                device=pl_module.device,
                indices=local,
                kind=self.features,  # type: ignore[arg-type]
                loss_fn=self.loss_fn,
                progress=f"fastif snapshot: {name}" if show else False,
            )
        except Exception as err:  # re-raised below, after every rank knows, so none waits in the gather
            error = err
        if trainer.strategy.reduce_boolean_decision(error is not None, all=False):
            if error is not None:
                raise error
            raise SnapshotError(f"FeatureSnapshot: embedding {name!r} failed on another rank")
        if world > 1:
            feats, local = gather_uneven(feats), gather_uneven(local)
        return feats, local

    def _snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, in_epoch: bool) -> None:
        if self._should_skip(trainer):
            return
        start = time.perf_counter()
        version = self._version(trainer)
        dirpath = self._directory()
        sources = self._sources(trainer)
        embedded = {name: self._embed(trainer, pl_module, name, data) for name, data in sources.items()}
        error: str | None = None
        seconds = 0.0
        if trainer.is_global_zero:
            try:
                files = {name: self._write(dirpath, version, name, f, i) for name, (f, i) in embedded.items()}
                entry = self._entry(trainer, files, 0.0)
                if self.features == "loss_gradient":
                    # Rank 0 alone, no collective inside: the Hessian is a deterministic function of the weights
                    # and the whole training set, identical to what any rank (or one process) would compute.
                    entry[LAST_LAYER_HESSIAN] = self._write_hessian(pl_module, dirpath, version, sources.get("train"))
                seconds = time.perf_counter() - start
                entry["seconds"] = round(seconds, 4)
                self._record(version, entry)
            except Exception as err:  # reported on every rank by _finish
                error = f"{type(err).__name__}: {err}"
        self._finish(trainer, version, error)
        self._log_seconds(trainer, pl_module, seconds or time.perf_counter() - start, in_epoch)

    def _write(self, dirpath: str, version: str, name: str, features: Tensor, indices: Tensor) -> dict[str, Any]:
        order = indices.argsort()
        indices, features = indices[order].cpu(), features[order].cpu()
        n = indices.numel()
        if not torch.equal(indices, torch.arange(n)):
            raise SnapshotError(f"dataset {name!r}: gathered indices are not each of 0..{n - 1} exactly once")
        path = feature_file(dirpath, version, name)
        index = KNNIndex(
            features, indices, metric=self.metric, kind=self.index, nlist=self.nlist, nprobe=self.nprobe, use_gpu=False
        )
        index.save(path.parent, name)
        relative = Path(FEATURES_DIR) / version / f"{name}.safetensors"
        faiss_file = path.with_suffix(".faiss")
        return {
            "file": relative.as_posix(),
            "index_file": (relative.with_suffix(".faiss").as_posix() if faiss_file.exists() else None),
            "n": n,
            "dim": int(features.shape[1]),
        }

    def _write_hessian(
        self, pl_module: pl.LightningModule, dirpath: str, version: str, train: IndexedData | None
    ) -> dict[str, Any]:
        """Write ``H_last`` (mean training loss, feature layer's parameters only); return its manifest entry."""
        assert self._layer is not None
        layer = resolve_layer(pl_module, self._layer)
        names = [f"{self._layer}.{n}" for n, _ in layer.named_parameters()]
        num_params = sum(p.numel() for p in layer.parameters())
        entry: dict[str, Any] = {"file": None, "layer": self._layer, "num_params": num_params, "params": names}
        if train is None:
            entry["note"] = "skipped: include_train=False, there is no training set to take the Hessian over"
            return entry
        if num_params > self.max_hessian_params:
            entry["note"] = (
                f"skipped: layer {self._layer!r} has {num_params} parameters, more than max_hessian_params="
                f"{self.max_hessian_params}; queries are raw loss gradients (raise max_hessian_params to store it)"
            )
            return entry
        with torch.inference_mode(False), evaluating(pl_module):
            operator = HessianOperator(pl_module, self.loss_fn, train, params=names, batch_size=self.batch_size)
            hessian = operator.dense(max_params=self.max_hessian_params).detach().cpu()
        meta = {"layer": self._layer, "num_params": str(num_params), "num_train": str(len(train))}
        save_tensors(feature_file(dirpath, version, LAST_LAYER_HESSIAN), {LAST_LAYER_HESSIAN: hessian}, meta)
        entry["file"] = (Path(FEATURES_DIR) / version / f"{LAST_LAYER_HESSIAN}.safetensors").as_posix()
        entry["num_train"] = len(train)
        return entry

    def _entry(self, trainer: pl.Trainer, files: dict[str, Any], seconds: float) -> dict[str, Any]:
        first = next(iter(files.values()))
        return {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "created": time.time(),
            "seconds": round(seconds, 4),
            "run_id": self._run_id,
            "n": first["n"],
            "dim": first["dim"],
            "metric": self.metric,
            "index": self.index,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "features": self.features,
            "layer": self._layer,
            "hook": self.hook if self._layer is not None and self.features == "activations" else None,
            "world_size": trainer.world_size,
            "datasets": files,
        }


class CheckpointSnapshot(_SnapshotCallback):
    """Save the weights at chosen epochs or steps, for influence at several checkpoints (TracIn-style sums).

    Saves the parameters whose names match ``params`` (``fnmatch`` patterns over
    ``pl_module.named_parameters()``), or the whole ``state_dict()`` when ``params`` is None, as
    ``<dirpath>/checkpoints/<version>.safetensors``, with the epoch, step and monitored metric in the manifest.
    Several triggers may be combined; one step is saved at most once. Read back with :func:`load_checkpoint`
    and :func:`apply_checkpoint`. The time each save took is logged as ``fastif/checkpoint_seconds``.

    Args:
        dirpath: snapshot directory (default ``<trainer.default_root_dir>/fastif_snapshot``).
        params: a pattern or patterns, e.g. ``"classifier.*"`` or ``["encoder.layer.11.*", "classifier.*"]``.
        every_n_epochs: save after every n-th epoch.
        every_n_train_steps: save every n optimizer steps (``on_train_batch_end``).
        epochs: save after these epochs (0-based ``trainer.current_epoch``), e.g. ``[0, 4, 9]``.
        on_fit_end: save when training ends (skipped when that step was already saved).
        monitor: a key of ``trainer.callback_metrics`` recorded with each save (e.g. ``"val_loss"``).

    Raises:
        MisconfigurationException: an argument outside its accepted values, a sharded strategy, or patterns
            that match no parameter.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> saver = CheckpointSnapshot(params="classifier.*", epochs=[0, 2], monitor="val_loss")
        >>> Trainer(callbacks=[saver], max_epochs=3).fit(model)  # doctest: +SKIP
        >>> [entry["epoch"] for _, entry in load_checkpoint(saver.snapshot_dir, "all")]  # doctest: +SKIP
        [0, 2, 3]
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
                raise MisconfigurationException(
                    f"params: expected None, a name pattern or a non-empty list of patterns, got {params!r}"
                )
        _positive_int_or_none("every_n_epochs", every_n_epochs)
        _positive_int_or_none("every_n_train_steps", every_n_train_steps)
        if epochs is not None:
            epochs = list(epochs)
            if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in epochs):
                raise MisconfigurationException(f"epochs: expected a list of epoch indices >= 0, got {epochs!r}")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise MisconfigurationException(f"monitor: expected None or a metric name, got {monitor!r}")
        if not (every_n_epochs or every_n_train_steps or epochs or on_fit_end):
            raise MisconfigurationException(
                "every_n_epochs, every_n_train_steps, epochs and on_fit_end are all unset: nothing would be saved"
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
            raise MisconfigurationException(
                f"params: {self.params} match no parameter of {type(pl_module).__name__}; its parameters: {names}"
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
        version = self._version(trainer)
        dirpath = self._directory()
        error: str | None = None
        # On every rank: reading trainer.callback_metrics computes synced torchmetrics, a collective (rank 0 alone
        # would wait forever in its barrier).
        monitored = self._monitored(trainer)
        if trainer.is_global_zero:
            try:
                weights = self._selected(pl_module)
                meta = {"epoch": str(trainer.current_epoch), "global_step": str(trainer.global_step)}
                if self.monitor is not None:
                    meta.update(monitor=self.monitor, monitor_value=repr(monitored))
                save_tensors(checkpoint_file(dirpath, version), weights, meta)
                seconds = time.perf_counter() - start
                self._record(
                    version,
                    {
                        "file": f"{CHECKPOINTS_DIR}/{version}.safetensors",
                        "epoch": trainer.current_epoch,
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
