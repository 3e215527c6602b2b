"""``FeatureSnapshot``: embed the training set (and extra datasets) during a fit, for kNN candidates.

Each version is ``features/<version>/<dataset>.safetensors`` (streamed to disk as it is embedded; the kNN index over
it is built at its first search and cached next to it as ``<dataset>.faiss``) plus, for loss-gradient features, the
last layer's curvature for the query preconditioner: the dense Hessian ``last_layer_hessian.safetensors`` or its
EK-FAC/K-FAC factors ``last_layer_kfac/``; :mod:`lightning_fastif.io.snapshot_store` names the files and records the
version.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from typing_extensions import override

from lightning_fastif.core.batches import IndexedData
from lightning_fastif.core.factored_grads import FactoredGradients, extract_gradient_factors
from lightning_fastif.core.grads import default_loss_fn
from lightning_fastif.errors import ArgumentError, SnapshotError, check_bool, check_choice, check_int
from lightning_fastif.io.atomic import TensorFileWriter
from lightning_fastif.io.snapshot_store import (
    FAISS_SUFFIX,
    FEATURES_DIR,
    LAST_LAYER_HESSIAN,
    dataset_record,
    feature_file,
)
from lightning_fastif.lightning.distributed import gather_uneven
from lightning_fastif.lightning.snapshots.base import EpochSnapshotCallback
from lightning_fastif.lightning.snapshots.query_curvature import write_query_curvature
from lightning_fastif.search.features import (
    FEATURE_KINDS,
    extract_features,
    has_features_method,
    last_layer_name,
    resolve_layer,
)
from lightning_fastif.search.index_files import FACTOR_TENSORS, factored_layout, factored_metadata
from lightning_fastif.search.ivf import AUTO_IVF_MIN_SIZE, default_nlist, faiss_available
from lightning_fastif.search.knn import features_layout, features_metadata

_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_METRICS = ("l2", "cosine", "ip")
_INDEXES = ("auto", "flat", "ivf")
_QUERY_CURVATURES = ("auto", "kfac", "ekfac", "hessian")
_ROUND_BATCHES = 64
"""Batches each rank embeds per round before rank 0 writes them: memory holds one round's rows, not the set."""


class FeatureSnapshot(EpochSnapshotCallback):
    """Embed the training set (and extra named datasets) at chosen moments of a fit, for kNN candidates.

    Features come from the forward hook on ``layer`` (its output, or its first input with ``hook="input"``),
    or from ``pl_module.features(batch)`` when ``layer`` is None. With ``features="loss_gradient"`` they are
    instead each example's loss gradient with respect to the parameters of ``layer`` (default: the last
    submodule with parameters, usually the classifier), ``C·(D+1)`` numbers for a linear classifier (stored as their
    two factors, ``∂ℓ/∂z`` and the layer's input, ``C + D`` numbers: 138 instead of 1290 for a 128 -> 10 head, see
    :mod:`lightning_fastif.core.factored_grads`; other layers are stored dense), indexed for
    maximum inner-product search (``metric="ip"``): the training points with the largest ``|<g_test, g_train>|``
    are the likely most influential ones (see :mod:`lightning_fastif.search.features`; on the digits CNN this raised
    the recall of the true top-10 helpful points among 1% kNN candidates from 0.04 to 0.79, and to 0.95 with the
    query preconditioned by the dense last-layer Hessian, ``query_curvature="hessian"`` below). The
    :class:`~lightning_fastif.lightning.module.InfluenceModule` reads the kind from the manifest and embeds its test
    points the same way. Extraction runs in eval mode without gradients
    on the training set's dataset in index order (unshuffled, with the training loader's ``collate_fn``).

    **Streaming.** Features go to disk as they are embedded, in rounds of 64 batches per rank: each round's rows are
    written at their dataset index into a temporary file, which is flushed and renamed into place once every row is
    there (a failure leaves no file and no manifest entry). Memory holds one round, never the whole set (no
    concatenation, no reordering copy), and readers memory-map the file. Under DDP every rank embeds every
    ``world_size``-th batch of a round (the dataset is split here, not by the training sampler, which pads with
    repeated examples), the round's parts are gathered, and rank 0 writes each dataset index exactly once. A progress
    bar shows the rows embedded when the trainer's progress bar is enabled. The time each snapshot took is logged as
    ``fastif/snapshot/seconds``.

    **The kNN index is not built during fit.** Its kind is decided from ``index`` and N and recorded in the
    manifest (``datasets[name]["index"]``); an IVF index is trained, tuned (``index="auto"``) and written next to
    the features at its first search (:meth:`~lightning_fastif.search.knn.KNNIndex.from_snapshot`,
    which the influence module uses), with the fingerprint of the features file it was built from, and recorded
    in the manifest (``index_file``, the tuned ``nprobe`` and recall); a cache whose fingerprint differs from the
    features file's is never reused. At N = 200k (1290-d loss gradients of an MLP) an IVF index took 90 s to train
    and tune, outside a 10 s fit; ``index="auto"`` searches exactly there (flat below ``AUTO_IVF_MIN_SIZE`` = 1M
    examples), which was faster per query than the tuned IVF index.

    With ``features="loss_gradient"`` each version also stores a curvature of the *mean training loss* with respect
    to ``layer``'s parameters only, ``H_last`` (computed by rank 0 over a sample of the training set in eval mode,
    the other ranks wait): the dense ``[P, P]`` Hessian (``last_layer_hessian.safetensors``) when the layer is small
    enough, else its EK-FAC factors (``last_layer_kfac/``, ``O(C² + D²)`` numbers, passes of activations and output
    gradients); ``query_curvature`` chooses. The manifest entry records it under ``"last_layer_hessian"`` (``file``,
    ``curvature``, ``layer``, ``num_params``, ``params``). The influence module preconditions its queries with it,
    ``q = (H_last + λI)⁻¹ g_test``, which brings the inner product closer to the influence score itself
    (:mod:`lightning_fastif.search.preconditioner`; snapshots written before K-FAC, with a dense ``H_last``, still
    load). A dense Hessian of a layer with more than ``max_hessian_params`` parameters (or ``include_train=False``) is
    skipped: the entry then has ``file: null`` and a ``note`` saying why, and queries stay raw gradients.

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
        index: ``"auto"`` (flat below ``AUTO_IVF_MIN_SIZE`` = 1M examples, without FAISS or for factored loss
            gradients (measured at 1M: the IVF index held them dense, 8 GB, and took minutes to build), else a FAISS IVF
            index whose
            ``nprobe`` is tuned to a recall of 0.99 of the exact neighbours of held-out-like queries; the measured
            recall goes into the manifest when the index is built, at its first search), ``"flat"`` (exact) or
            ``"ivf"`` (FAISS IVF, built at the first search and cached next to the features).
        nlist: IVF lists (default ~2 sqrt(N)).
        nprobe: IVF lists searched per query.
        query_curvature: with ``features="loss_gradient"``, what ``H_last`` is: ``"auto"`` (the default: the dense
            Hessian when the layer has at most ``max_hessian_params`` parameters, else EK-FAC: the dense one is exact
            and, on the digits classifier, found every exact top-10 among 10 neighbours where K-FAC found 0.73 and
            EK-FAC 0.74; the factored ones fit any layer size), ``"kfac"`` (the layer's K-FAC factors, ``A``
            ``(D+1)²`` and ``S`` ``C²`` with their eigendecompositions, one pass of
            activations and output gradients; ``O(C² + D²)`` numbers, any layer size), ``"ekfac"`` (the same with
            EK-FAC's corrected eigenvalues, a second pass over the sample) or ``"hessian"`` (the dense ``[P, P]``
            Hessian: in closed form for a ``Linear`` layer, one pass, else ``P`` HVPs per example; only up to
            ``max_hessian_params``). The manifest records which (and ``method``: ``closed_form`` or ``hvp``) as
            ``last_layer_hessian.curvature``; see :mod:`lightning_fastif.search.preconditioner`.
        max_hessian_params: with ``query_curvature="hessian"``, store ``H_last`` only when ``layer`` has at most this
            many parameters (``P²`` numbers on disk).
        hessian_examples: ``H_last`` is taken over a seeded random sample of this many training examples (all
            of them when ``None`` or when the set is smaller). It only preconditions kNN queries, so a sample keeps
            the snapshot's cost flat in N; the manifest records the number used.

    Versions are named ``epoch=<E>-step=<S>`` with Lightning's 0-based epoch (a snapshot at the end of fit names
    the last epoch that ran) and listed in the manifest (see :mod:`lightning_fastif.io.snapshot_store`, which also
    describes how a second fit into the same directory is kept apart as a new run). After ``setup``,
    :attr:`snapshot_dir` is the directory written to. A fit resumed with ``ckpt_path`` continues the same run; each
    version it writes records ``resumed_from_step``. Resumed at an epoch boundary, the snapshots equal those of an
    uninterrupted fit (tested); after a mid-epoch resume with a shuffled loader they can differ, because Lightning
    restores the loop's position but not the loader's order within the epoch.

    Raises:
        ArgumentError: an argument outside its accepted values (the message names it; at construction), or, in
            ``setup``, a ``layer`` the model does not have, or no ``layer`` and no ``features`` method.
        MisconfigurationException: a strategy that shards the model (FSDP, DeepSpeed).

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
        index: Literal["auto", "flat", "ivf"] = "auto",
        nlist: int | None = None,
        nprobe: int = 8,
        features: Literal["activations", "loss_gradient"] = "activations",
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        max_hessian_params: int = 5000,
        hessian_examples: int | None = 8192,
        query_curvature: Literal["auto", "kfac", "ekfac", "hessian"] = "auto",
    ) -> None:
        super().__init__(dirpath, on_fit_end)
        check_bool("include_train", include_train)
        if datasets is not None and not isinstance(datasets, Mapping):
            raise ArgumentError(f"datasets: expected None or a mapping of name -> Dataset, got {datasets!r}")
        datasets = dict(datasets or {})
        for name, dataset in datasets.items():
            # Found here, not after hours of fit: an extra dataset is embedded only at the first snapshot.
            if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
                raise ArgumentError(f"datasets[{name!r}]: expected a map-style Dataset, got {type(dataset).__name__}")
            if len(dataset) == 0:
                raise ArgumentError(f"datasets[{name!r}]: expected a non-empty Dataset, got one with 0 examples")
        for name, data in datasets.items():
            if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
                raise ArgumentError(
                    f"datasets: expected names of letters, digits, '_', '.', '-' (not starting with '.' or '-': a "
                    f"name becomes a file name), got {name!r}"
                )
            if name == "train" and include_train:
                raise ArgumentError(
                    "datasets: expected names other than 'train' (taken by the training set; rename it or set "
                    f"include_train=False), got {name!r}"
                )
            if name == LAST_LAYER_HESSIAN:
                raise ArgumentError(
                    f"datasets: expected names other than {LAST_LAYER_HESSIAN!r} (taken by the Hessian file of "
                    f"loss-gradient snapshots), got {name!r}"
                )
            target = data.dataset if isinstance(data, DataLoader) else data
            if not (hasattr(target, "__getitem__") and hasattr(target, "__len__")):
                raise ArgumentError(
                    f"datasets[{name!r}]: expected a map-style Dataset (or a DataLoader over one), got {target!r}"
                )
        if not include_train and not datasets:
            raise ArgumentError(
                "include_train: expected True when no datasets are given (otherwise there is nothing to embed), got "
                "False"
            )
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise ArgumentError(f"layer: expected None or a submodule name, got {layer!r}")
        check_choice("hook", hook, ("input", "output"))
        check_int("every_n_epochs", every_n_epochs, allow_none=True)
        if every_n_epochs is None and not on_fit_end:
            raise ArgumentError(
                "on_fit_end: expected True when every_n_epochs is None (otherwise no snapshot is ever taken), got False"
            )
        check_int("batch_size", batch_size)
        check_choice("features", features, FEATURE_KINDS)
        if metric is None:
            metric = "ip" if features == "loss_gradient" else "l2"
        check_choice("metric", metric, _METRICS)
        if features == "loss_gradient" and metric == "l2":
            raise ArgumentError(
                "metric: expected 'ip' (the default for loss gradients) or 'cosine' with features='loss_gradient' "
                "('l2' would prefer the training points with the smallest loss gradients, the least influential "
                "ones), got 'l2'"
            )
        if loss_fn is not None and not callable(loss_fn):
            raise ArgumentError(
                f"loss_fn: expected None or a callable loss_fn(model, batch) -> Tensor[B], got {loss_fn!r}"
            )
        check_choice("index", index, _INDEXES)
        check_int("nlist", nlist, allow_none=True)
        check_int("nprobe", nprobe)
        check_int("max_hessian_params", max_hessian_params)
        check_int("hessian_examples", hessian_examples, allow_none=True)
        check_choice("query_curvature", query_curvature, _QUERY_CURVATURES)

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
        self.hessian_examples = hessian_examples
        self.query_curvature = query_curvature
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
                raise ArgumentError(str(err)) from err
            if self.loss_fn is None and not callable(getattr(pl_module, "per_example_loss", None)):
                raise ArgumentError(
                    f"loss_fn: expected a callable loss_fn(model, batch) -> Tensor[B] (features='loss_gradient' needs "
                    f"one, and {type(pl_module).__name__} defines no per_example_loss(batch)), got None"
                )
            return
        if self.layer is not None:
            try:
                resolve_layer(pl_module, self.layer)
            except ValueError as err:
                raise ArgumentError(str(err)) from err
        elif not has_features_method(pl_module):
            names = [n for n, _ in pl_module.named_modules() if n][:60]
            raise ArgumentError(
                f"layer: expected one of the submodules {names} (e.g. the classifier with hook='input'), since "
                f"{type(pl_module).__name__} defines no features(batch) method, got None"
            )

    # ---------------------------------------------------------------------------------------------------- snapshot
    def _sources(self, trainer: pl.Trainer) -> dict[str, IndexedData]:
        sources: dict[str, IndexedData] = {}
        if self.include_train:
            loader = trainer.train_dataloader
            if loader is None and trainer.datamodule is not None:
                loader = trainer.datamodule.train_dataloader()
            if not isinstance(loader, DataLoader):
                raise MisconfigurationException(
                    f"FeatureSnapshot(include_train=True): the training data is {type(loader).__name__}, expected "
                    "one DataLoader; with several training loaders pass them as datasets={name: loader} and "
                    "include_train=False"
                )
            try:
                sources["train"] = IndexedData(loader)
            except (TypeError, ValueError) as err:
                raise MisconfigurationException(
                    "FeatureSnapshot(include_train=True): the training loader's dataset cannot be embedded by index "
                    f"({err})"
                ) from err
        for name, data in self.datasets.items():
            sources[name] = IndexedData(data)
        return sources

    def _stream(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        dirpath: str,
        version: str,
        name: str,
        data: IndexedData,
    ) -> tuple[dict[str, Any] | None, str | None]:
        """Embed one dataset and write its features file as the rows come; return (manifest record, write error).

        Rounds of ``_ROUND_BATCHES`` batches per rank: under DDP every rank embeds every ``world_size``-th batch of
        ``batch_size`` of the round (whole batches, as one process would form them, so the features match a
        single-process snapshot), the round's parts are gathered, and rank 0 writes each row at its dataset index.
        Memory holds one round, never the whole set. An embedding error on any rank is raised on every rank; a
        write error (rank 0) stops the writing, leaves no file, and is returned to be reported by ``_finish``.
        """
        world, rank = trainer.world_size, trainer.global_rank
        n = len(data)
        per_round = self.batch_size * _ROUND_BATCHES * world
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        bar = tqdm(total=n, desc=f"fastif snapshot: {name}", leave=False) if show else None
        meta = features_metadata(self.metric, self.index, self.nlist, self.nprobe)
        path = feature_file(dirpath, version, name)
        # Loss gradients of a Linear layer are written as their two factors (C + D numbers a row, not C·(D+1));
        # every rank probes the same first example, so all agree on the layout.
        probe = self._factored_rows(pl_module, data, torch.tensor([0])) if self.features == "loss_gradient" else None
        writer: TensorFileWriter | None = None
        write_error: str | None = None
        dim = 0
        try:
            for begin in range(0, n, per_round):
                rows = torch.arange(begin, min(n, begin + per_round))
                local = rows[((rows - begin) // self.batch_size) % world == rank]
                feats: Tensor | FactoredGradients = torch.zeros(0, 0)
                error = None
                try:
                    feats = self._extract(pl_module, data, local, probe)
                except Exception as err:  # re-raised below, after every rank knows, so none waits in the gather
                    error = err
                if trainer.strategy.reduce_boolean_decision(error is not None, all=False):
                    if error is not None:
                        raise error
                    raise SnapshotError(f"FeatureSnapshot: embedding {name!r} failed on another rank")
                if world > 1:
                    local = gather_uneven(local)
                    if isinstance(feats, FactoredGradients):
                        feats = FactoredGradients(
                            gather_uneven(feats.out_grads), gather_uneven(feats.inputs), bias=feats.bias
                        )
                    else:
                        feats = gather_uneven(feats)
                if trainer.is_global_zero and write_error is None:
                    try:
                        if writer is None:
                            dim = int(feats.shape[1])
                            if isinstance(feats, FactoredGradients):
                                layout = factored_layout(n, feats.num_outputs, feats.num_inputs)
                                meta = factored_metadata(meta, feats.bias)
                            else:
                                layout = features_layout(n, dim)
                            writer = TensorFileWriter(path, layout, meta).__enter__()
                        self._write_rows(writer, name, feats, local)
                    except Exception as err:  # the others keep embedding: they wait for rank 0 in the gathers
                        write_error = f"{type(err).__name__}: {err}"
                        if writer is not None:
                            writer.__exit__(type(err), err, None)  # removes the temporary file
                            writer = None
                if bar is not None:
                    bar.update(rows.numel())
            if writer is not None:
                finished, writer = writer, None
                try:
                    finished.__exit__(None, None, None)  # every row written: flushed to disk and renamed into place
                except ValueError as err:
                    write_error = (
                        f"SnapshotError: dataset {name!r}: gathered indices are not each of 0..{n - 1} ({err})"
                    )
        except BaseException as err:
            if writer is not None:
                writer.__exit__(type(err), err, None)
            raise
        finally:
            if bar is not None:
                bar.close()
        if not trainer.is_global_zero or write_error is not None:
            return None, write_error
        record = self._dataset_record(dirpath, version, name, n, dim, meta["fingerprint"], factored=probe is not None)
        return record, None

    def _loss_fn(self, pl_module: pl.LightningModule) -> Callable[[Any, Any], Tensor]:
        return self.loss_fn if self.loss_fn is not None else default_loss_fn(pl_module)

    def _factored_rows(
        self, pl_module: pl.LightningModule, data: IndexedData, indices: Tensor
    ) -> FactoredGradients | None:
        """The loss gradients of ``indices`` as factors, or None when the layer's gradients do not factor."""
        assert self._layer is not None
        module = resolve_layer(pl_module, self._layer)
        return extract_gradient_factors(
            pl_module,
            data,
            module,
            self._loss_fn(pl_module),
            indices=indices,
            batch_size=self.batch_size,
            device=pl_module.device,
        )

    def _extract(
        self, pl_module: pl.LightningModule, data: IndexedData, indices: Tensor, probe: FactoredGradients | None
    ) -> Tensor | FactoredGradients:
        if probe is not None:
            if indices.numel() == 0:
                return FactoredGradients(probe.out_grads[:0], probe.inputs[:0], bias=probe.bias)
            rows = self._factored_rows(pl_module, data, indices)
            if rows is None:
                raise SnapshotError(f"FeatureSnapshot: the gradients of layer {self._layer!r} stopped factoring")
            return rows
        return extract_features(
            pl_module,
            data,
            layer=self._layer,
            hook=self.hook,
            batch_size=self.batch_size,
            device=pl_module.device,
            indices=indices,
            kind=self.features,  # type: ignore[arg-type]
            loss_fn=self.loss_fn,
        )

    @staticmethod
    def _write_rows(writer: TensorFileWriter, name: str, features: Tensor | FactoredGradients, indices: Tensor) -> None:
        """Write gathered rows at their dataset indices: one write per run of consecutive indices, no reordering."""
        if indices.numel() == 0:
            return
        finite = features.is_finite() if isinstance(features, FactoredGradients) else torch.isfinite(features).all()
        if not bool(finite):
            raise SnapshotError(f"features of dataset {name!r} contain NaN or infinite values")
        if isinstance(features, FactoredGradients):
            parts = dict(zip(FACTOR_TENSORS, (features.out_grads, features.inputs), strict=True))
        else:
            parts = {"features": features}
        indices = indices.cpu()
        breaks = (torch.nonzero(indices[1:] != indices[:-1] + 1).flatten() + 1).tolist()
        for lo, hi in zip([0, *breaks], [*breaks, indices.numel()], strict=True):
            row = int(indices[lo])
            try:
                for tensor, values in parts.items():
                    writer.write(tensor, values[lo:hi], row=row)
                writer.write("indices", indices[lo:hi], row=row)
            except ValueError as err:
                raise SnapshotError(
                    f"dataset {name!r}: gathered indices are not each of 0..N-1 exactly once ({err})"
                ) from err

    def _dataset_record(
        self, dirpath: str, version: str, name: str, n: int, dim: int, fingerprint: str, *, factored: bool
    ) -> dict[str, Any]:
        """The manifest record of a features file just written; its kNN index is built at the first search."""
        stale = feature_file(dirpath, version, name).with_suffix(FAISS_SUFFIX)
        if stale.exists():
            stale.unlink()  # an index cached from an earlier file under this name (it would be refused anyway)
        auto_ivf = self.index == "auto" and n >= AUTO_IVF_MIN_SIZE and not factored
        ivf = faiss_available() and (self.index == "ivf" or auto_ivf)
        record = dataset_record(dirpath, version, name, n, dim)
        record["fingerprint"] = fingerprint
        nlist = min(self.nlist or default_nlist(n), n) if ivf else None
        nprobe = min(self.nprobe, nlist) if nlist is not None else self.nprobe
        record["index"] = {"kind": "ivf" if ivf else "flat", "nlist": nlist, "nprobe": nprobe, "tuning": None}
        return record

    def _snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, in_epoch: bool) -> None:
        if self._should_skip(trainer):
            return
        start = time.perf_counter()
        epoch = self._epoch(trainer, at_fit_end=not in_epoch)
        version = self._version(trainer, at_fit_end=not in_epoch)
        dirpath = self._directory()
        sources = self._sources(trainer)
        files: dict[str, Any] = {}
        error: str | None = None
        for name, data in sources.items():
            record, failed = self._stream(trainer, pl_module, str(dirpath), version, name, data)
            error = error or failed
            if record is not None:
                files[name] = record
        seconds = 0.0
        if trainer.is_global_zero and error is None:
            try:
                entry = self._entry(trainer, epoch, files)
                if self.features == "loss_gradient":
                    # Rank 0 alone, no collective inside: the Hessian is a deterministic function of the weights
                    # and the whole training set, identical to what any rank (or one process) would compute.
                    assert self._layer is not None
                    entry[LAST_LAYER_HESSIAN] = write_query_curvature(
                        pl_module,
                        self._layer,
                        self._loss_fn(pl_module),
                        str(dirpath),
                        version,
                        sources.get("train"),
                        curvature=self.query_curvature,
                        max_hessian_params=self.max_hessian_params,
                        hessian_examples=self.hessian_examples,
                        batch_size=self.batch_size,
                    )
                seconds = time.perf_counter() - start
                entry["seconds"] = round(seconds, 4)
                self._record(version, entry)
            except Exception as err:  # reported on every rank by _finish
                error = f"{type(err).__name__}: {err}"
        self._finish(trainer, version, error)
        self._log_seconds(trainer, pl_module, seconds or time.perf_counter() - start, in_epoch)

    def _entry(self, trainer: pl.Trainer, epoch: int, files: dict[str, Any]) -> dict[str, Any]:
        first = next(iter(files.values()))
        return {
            "epoch": epoch,
            "global_step": trainer.global_step,
            "created": time.time(),
            "seconds": 0.0,
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
