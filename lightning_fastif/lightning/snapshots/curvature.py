"""``CurvatureSnapshot``: fit K-FAC (EK-FAC) factors once during a fit, for the influence module to reuse.

Each version is ``curvature/<version>/`` (:meth:`~lightning_fastif.core.curvature.KFACFactors.save`: safetensors and
its own manifest) plus an entry in the snapshot manifest with the weights' fingerprint, so a reader can refuse factors
of other weights (:func:`load_curvature`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from typing_extensions import override

from lightning_fastif.core.batches import IndexedData
from lightning_fastif.core.curvature import KFACFactors, KFACLayer, ekfac_correct, fit_kfac
from lightning_fastif.core.fingerprint import params_fingerprint, weights_fingerprint
from lightning_fastif.core.params import ParamSpec, select_parameters
from lightning_fastif.errors import ArgumentError, SnapshotError, check_bool, check_int
from lightning_fastif.io.snapshot_store import CURVATURE_DIR, curvature_dir, resolve_version
from lightning_fastif.lightning.snapshots.base import EpochSnapshotCallback

__all__ = ["CurvatureSnapshot", "load_curvature"]


class CurvatureSnapshot(EpochSnapshotCallback):
    """Fit K-FAC factors of the empirical Fisher (and EK-FAC's eigenvalues) over the training set during a fit.

    One streaming pass of :func:`~lightning_fastif.core.curvature.fit_kfac` over the training loader's dataset (in
    index order, eval mode; a second pass for :func:`~lightning_fastif.core.curvature.ekfac_correct` when ``ekfac``).
    Under DDP each rank takes one contiguous share of the examples; the factors' sums (``Σ a aᵀ``, ``Σ g gᵀ``, the
    position and example counts, the diagonal fallback) are summed across ranks with ``trainer.strategy.reduce`` and
    every rank eigendecomposes the same totals, so the factors equal one process's up to rounding (tested). Rank 0
    writes ``curvature/<version>/`` and the manifest entry (``weights_fingerprint``, ``params_fingerprint``,
    ``params``, ``layers``, ``unsupported``, ``num_examples``, ``corrected``); the other ranks wait. Versions are named
    like the other snapshots' (``epoch=<E>-step=<S>``).

    Args:
        params: the parameters (:func:`~lightning_fastif.core.params.select_parameters`; default all trainable).
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]`` (default ``pl_module.per_example_loss``); use the loss
            influence is computed with.
        on_fit_end: fit when training ends (skipped when that step was already taken).
        every_n_epochs: also fit after every n-th epoch.
        examples: fit over a seeded random sample of this many training examples (``None``: all of them). The
            factors are means over examples, so a sample of tens of thousands estimates them well at a fraction of
            the passes over a large set; the sample is the same at every snapshot and on every rank.
        ekfac: also correct the eigenvalues (EK-FAC, a second pass).
        dirpath: snapshot directory (default ``<trainer.default_root_dir>/fastif_snapshot``).
        batch_size: examples per forward/backward pass.

    Raises:
        ArgumentError: an argument outside its accepted values (at construction), or ``params`` matching no
            parameter (in ``setup``).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> curvature = CurvatureSnapshot(params="classifier.*")
        >>> Trainer(callbacks=[curvature], max_epochs=3).fit(model, datamodule)  # doctest: +SKIP
        >>> factors, entry = load_curvature(curvature.snapshot_dir, model, "classifier.*")  # doctest: +SKIP
    """

    _kind = CURVATURE_DIR  # type: ignore[assignment]

    def __init__(
        self,
        *,
        params: ParamSpec = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        on_fit_end: bool = True,
        every_n_epochs: int | None = None,
        examples: int | None = None,
        ekfac: bool = True,
        dirpath: str | os.PathLike | None = None,
        batch_size: int = 64,
    ) -> None:
        super().__init__(dirpath, on_fit_end)
        if loss_fn is not None and not callable(loss_fn):
            raise ArgumentError(
                f"loss_fn: expected None or a callable loss_fn(model, batch) -> Tensor[B], got {loss_fn!r}"
            )
        check_int("every_n_epochs", every_n_epochs, allow_none=True)
        if every_n_epochs is None and not on_fit_end:
            raise ArgumentError(
                "on_fit_end: expected True when every_n_epochs is None (otherwise nothing is ever fitted), got False"
            )
        check_int("examples", examples, allow_none=True)
        check_bool("ekfac", ekfac)
        check_int("batch_size", batch_size)
        self.params, self.loss_fn, self.every_n_epochs = params, loss_fn, every_n_epochs
        self.examples, self.ekfac, self.batch_size = examples, ekfac, batch_size

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self.dirpath, params=repr(self.params))

    @override
    def _check_module(self, pl_module: pl.LightningModule) -> None:
        try:
            select_parameters(pl_module, self.params)
        except ValueError as err:
            raise ArgumentError(str(err)) from err
        if self.loss_fn is None and not callable(getattr(pl_module, "per_example_loss", None)):
            raise ArgumentError(
                f"loss_fn: expected a callable loss_fn(model, batch) -> Tensor[B] ({type(pl_module).__name__} defines "
                "no per_example_loss(batch)), got None"
            )

    # ------------------------------------------------------------------------------------------------------- fitting
    def _train(self, trainer: pl.Trainer) -> IndexedData:
        loader = trainer.train_dataloader
        if loader is None and trainer.datamodule is not None:
            loader = trainer.datamodule.train_dataloader()
        if not isinstance(loader, DataLoader):
            raise MisconfigurationException(
                f"CurvatureSnapshot: the training data is {type(loader).__name__}, expected one DataLoader"
            )
        return IndexedData(loader)

    def fit_factors(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> KFACFactors:
        """The factors over the training set, each rank fitting its share and the sums reduced across ranks."""
        train = self._train(trainer)
        n = len(train) if self.examples is None else min(self.examples, len(train))
        world, rank = trainer.world_size, trainer.global_rank
        if n < world:
            raise SnapshotError(f"CurvatureSnapshot: {n} training examples cannot be shared by {world} ranks")
        if n < len(train):  # a seeded sample, in index order: the same on every rank and at every snapshot
            sample = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n].sort().values.tolist()
        else:
            sample = list(range(n))
        share = sample[rank * n // world : (rank + 1) * n // world]
        data = DataLoader(Subset(train.dataset, share), collate_fn=train.collate_fn)
        progress = _progress(trainer, n)
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if world > 1 else (lambda t: t)
        with torch.inference_mode(False):
            local = fit_kfac(pl_module, self.loss_fn, data, self.params, batch_size=self.batch_size, progress=progress)
            factors = _reduce_factors(local, reduce)
            if self.ekfac:
                part = ekfac_correct(factors, pl_module, self.loss_fn, data, batch_size=self.batch_size)
                factors = _reduce_corrected(factors, part, reduce)
        return factors

    def _snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, in_epoch: bool) -> None:
        if self._should_skip(trainer):
            return
        start = time.perf_counter()
        epoch = self._epoch(trainer, at_fit_end=not in_epoch)
        version = self._version(trainer, at_fit_end=not in_epoch)
        factors = self.fit_factors(trainer, pl_module)
        error: str | None = None
        if trainer.is_global_zero:
            try:
                path = factors.save(curvature_dir(self._directory(), version))
                selected = select_parameters(pl_module, self.params)
                self._record(
                    version,
                    {
                        "file": path.name,
                        "epoch": epoch,
                        "global_step": trainer.global_step,
                        "created": time.time(),
                        "seconds": round(time.perf_counter() - start, 4),
                        "run_id": self._run_id,
                        "weights_fingerprint": weights_fingerprint(pl_module),
                        "params_fingerprint": params_fingerprint(selected.items()),
                        "params": factors.names,
                        "layers": [layer.spec.name for layer in factors.layers],
                        "unsupported": sorted(factors.unsupported),
                        "num_examples": factors.num_examples,
                        "corrected": factors.corrected,
                        "world_size": trainer.world_size,
                    },
                )
            except Exception as err:  # reported on every rank by _finish
                error = f"{type(err).__name__}: {err}"
        self._finish(trainer, version, error)


def _progress(trainer: pl.Trainer, total: int) -> Callable[[int, int], Any] | None:
    """A progress bar over rank 0's share (``tqdm``, when the Trainer shows one)."""
    if not (trainer.is_global_zero and trainer.progress_bar_callback is not None):
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=None, desc="fastif curvature", leave=False, unit="ex")

    def update(done: int, share: int) -> None:
        bar.total = share
        bar.n = done
        bar.refresh()
        if done >= share:
            bar.close()

    return update


def _reduce_factors(local: KFACFactors, reduce: Callable[[Tensor], Tensor]) -> KFACFactors:
    """Sum each rank's ``Σ a aᵀ``, ``Σ g gᵀ``, positions, examples and diagonal sums; eigendecompose the totals."""
    count = reduce(torch.tensor([float(local.num_examples)], dtype=torch.float64, device=local.device))
    total = int(count.item())
    layers = []
    for layer in local.layers:
        a_sum = reduce(layer.A * local.num_examples)
        s_sum = reduce(layer.S * layer.num_positions)
        positions = int(reduce(torch.tensor([float(layer.num_positions)], dtype=torch.float64, device=a_sum.device)))
        A, S = a_sum / total, s_sum / max(positions, 1)
        s_values, s_basis = torch.linalg.eigh((S + S.T) / 2)
        if layer.spec.diagonal_input:
            a_values, a_basis = A, None
        else:
            a_values, a_basis = torch.linalg.eigh((A + A.T) / 2)
            a_basis = a_basis.contiguous()
        # As fit_kfac: PSD factors, rounding-level negative eigenvalues clamped to 0.
        layers.append(
            KFACLayer(
                layer.spec, A, S, a_values.clamp_min(0), a_basis, s_values.clamp_min(0), s_basis.contiguous(), positions
            )  # fmt: skip
        )
    diagonal = {name: reduce(d * local.num_examples) / total for name, d in local.diagonal.items()}
    return KFACFactors(local.names, local.shapes, layers, diagonal, local.unsupported, total)


def _reduce_corrected(factors: KFACFactors, part: KFACFactors, reduce: Callable[[Tensor], Tensor]) -> KFACFactors:
    """EK-FAC eigenvalues: each rank's ``Σ_i (Q_Sᵀ G_i Q_A)²`` over its share, summed, over all examples."""
    layers = []
    for layer, mine in zip(factors.layers, part.layers):
        corrected = reduce(mine.corrected * part.num_examples) / factors.num_examples
        layers.append(KFACLayer(**{**layer.__dict__, "corrected": corrected.contiguous()}))
    return KFACFactors(
        factors.names, factors.shapes, layers, factors.diagonal, factors.unsupported, factors.num_examples
    )


def load_curvature(
    dirpath: str | os.PathLike, model: torch.nn.Module, params: ParamSpec = None, version: str | int | None = None
) -> tuple[KFACFactors | None, dict[str, Any]]:
    """The latest (or ``version``'s) curvature factors of a snapshot directory, if they belong to ``model`` now.

    Never returns stale factors: the entry's weights fingerprint must equal :func:`weights_fingerprint` of ``model``
    and its parameter fingerprint that of ``params``' selection.

    Args:
        dirpath: snapshot directory.
        model: the model whose weights are used.
        params: the parameter selection the factors must be over.
        version: see :func:`~lightning_fastif.io.snapshot_store.resolve_version`.

    Returns:
        ``(factors, info)``: ``factors`` is ``None`` when there are none or they do not match; ``info`` says which
        version was found (``"version"``) and, when refused, why (``"refused"``).

    Raises:
        SnapshotError: the manifest or the factors' files are corrupted.

    Example::

        >>> load_curvature("no/such/dir", torch.nn.Linear(2, 1))[1]["refused"]  # doctest: +ELLIPSIS
        'no curvature snapshot: ...'
    """
    from lightning_fastif.errors import SnapshotNotFoundError

    try:
        entry = resolve_version(dirpath, CURVATURE_DIR, version)
    except SnapshotNotFoundError as err:
        return None, {"version": None, "refused": f"no curvature snapshot: {err}"}
    info: dict[str, Any] = {"version": entry["version"], "source": "snapshot"}
    selected = select_parameters(model, params)
    if entry.get("params_fingerprint") != params_fingerprint(selected.items()):
        return None, {**info, "refused": f"the factors are over other parameters ({entry.get('params')})"}
    if entry.get("weights_fingerprint") != weights_fingerprint(model):
        return None, {**info, "refused": "the factors were fitted on other weights (the weights fingerprint differs)"}
    factors = KFACFactors.load(curvature_dir(dirpath, entry["version"]))
    return factors, info


class CurvatureReuse:
    """Offer an estimator the snapshot's curvature factors before each solve, when they belong to the weights now.

    Used by :class:`~lightning_fastif.lightning.module.InfluenceModule`: an estimator with
    ``use_factors(factors) -> bool`` (K-FAC-based ones) gets the factors of the latest
    :class:`CurvatureSnapshot` of ``snapshot`` instead of fitting its own, when the weights and parameter fingerprints
    match (:func:`load_curvature`); otherwise it fits as usual, and the diagnostics say why the factors were refused.
    The result of the fingerprint check is cached until a selected parameter is replaced or modified in place.

    Args:
        snapshot: the snapshot directory (``None``: nothing is ever offered).

    Example::

        >>> CurvatureReuse(None).offer(object(), torch.nn.Linear(2, 1), None)
        {}
    """

    def __init__(self, snapshot: str | os.PathLike | None) -> None:
        self.snapshot = snapshot
        self._cache: tuple[Any, KFACFactors | None, dict[str, Any]] | None = None

    def offer(self, estimator: Any, model: torch.nn.Module, params: ParamSpec) -> dict[str, Any]:
        """Pass matching factors to ``estimator.use_factors``; return ``{"curvature": {...}}`` for the diagnostics
        (``{}`` when there is no snapshot, no curvature version in it, or the estimator takes no factors)."""
        use = getattr(estimator, "use_factors", None)
        if self.snapshot is None or not callable(use):
            return {}
        factors, info = self.factors(model, params)
        if info["version"] is None:
            return {}
        if factors is None:
            return {"curvature": {**info, "source": "fitted"}}
        if not use(factors.to(next(model.parameters()).device)):
            return {"curvature": {**info, "source": "not used", "note": "the estimator does not use K-FAC factors"}}
        return {"curvature": info}

    def factors(self, model: torch.nn.Module, params: ParamSpec) -> tuple[KFACFactors | None, dict[str, Any]]:
        """:func:`load_curvature`'s answer for the weights now, cached until a selected parameter is replaced or
        modified in place; ``(None, {"version": None})`` without a snapshot."""
        if self.snapshot is None:
            return None, {"version": None}
        key = (id(model), tuple((p.data_ptr(), p._version) for p in model.parameters()), repr(params))
        if self._cache is None or self._cache[0] != key:
            factors, info = load_curvature(self.snapshot, model, params)
            self._cache = (key, factors, info)
        return self._cache[1], self._cache[2]

    def __getstate__(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot, "_cache": None}
