"""FastIF's influence computation as a LightningModule: ``trainer.predict(InfluenceModule(...), test_loader)``.

For each test point of a predict batch: its features (``model.features(batch)`` or a hooked layer), its ``k``
nearest training points in the snapshot's feature index (the *candidates*), ``s_test = (H + λI)⁻¹ g_test`` for all
test points of the batch in one inverse-HVP solve, and each candidate's score ``g_candidateᵀ s_test`` by forward-mode
AD (the engine's JVP path). **Positive = helpful.** ``num_candidates=None`` scores every training point (the original
influence functions, no snapshot needed). Weights are the live model's, or those of one or several
``CheckpointSnapshot`` versions whose scores are summed (TracIn-style, :mod:`~lightning_fastif.lightning.weights`).

Parallel, under any DDP strategy (``"ddp"``, ``"ddp_spawn"``; gloo on CPU or NCCL):

* ``parallel="test"``: the Trainer splits the test points across ranks (``trainer.predict`` does not pad, so every
  test point is on exactly one rank); each rank scores its own; the results are gathered to rank 0.
* ``parallel="repeats"`` (FastIF's parallel variant, for few test points): every rank sees all test points; LiSSA's
  repeats and the candidates are split across ranks (:mod:`~lightning_fastif.lightning.repeats`). The computation
  runs in ``on_predict_epoch_end``, when every rank knows the whole test set; the test loader must be a
  ``DataLoader`` over a map-style dataset.

Both give one process's scores (within float tolerance). The results are collected, written as resumable shards
(with ``output_dir``) and merged by an :class:`~lightning_fastif.lightning.writer.InfluenceWriter`, which the module
attaches to the Trainer itself. The snapshot directory, the output directory (under several nodes) and the test data
must be visible to every rank.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any, Literal

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning_utilities import apply_to_collection
from torch import Tensor, nn
from typing_extensions import override

from lightning_fastif.core.batches import Batch, IndexedData, batch_size_of, move_batch
from lightning_fastif.core.ekfac import EKFAC
from lightning_fastif.core.fingerprint import (
    data_fingerprint,
    estimator_fingerprint,
    function_fingerprint,
    params_fingerprint,
    weights_fingerprint,
)
from lightning_fastif.core.grads import FunctionalLoss, LossFn, evaluating
from lightning_fastif.core.hessian import HessianOperator
from lightning_fastif.core.ihvp import AutoInverse, InverseHVP
from lightning_fastif.core.memory import measure_example_cost, parse_memory, plan_chunks
from lightning_fastif.core.params import ParamSpec, select_parameters
from lightning_fastif.errors import ArgumentError, SnapshotNotFoundError, check_bool, check_int, check_path
from lightning_fastif.io.results import BatchInfluence, jsonable
from lightning_fastif.lightning.arguments import ComputeArguments, SearchArguments, fold_legacy_arguments
from lightning_fastif.lightning.candidates import (
    CandidatePool,
    QuerySource,
    check_num_candidates,
    resolve_query_source,
)
from lightning_fastif.lightning.distributed import rank, world_size
from lightning_fastif.lightning.predict_loop import PredictLoop
from lightning_fastif.lightning.repeats import score_split, solve_split
from lightning_fastif.lightning.scoring import Stages, check_loss, score_columns
from lightning_fastif.lightning.snapshots.curvature import CurvatureReuse
from lightning_fastif.lightning.weights import CheckpointSpec, CheckpointWeights
from lightning_fastif.search.knn import KNNIndex
from lightning_fastif.search.preconditioner import KNN_DAMPING_FLOOR

__all__ = ["KNN_DAMPING_FLOOR", "CandidatePool", "InfluenceModule"]

_STOCHASTIC = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


class InfluenceModule(PredictLoop):
    """Influence of training points on test points through ``trainer.predict``. **Positive = helpful.**

    Wraps the trained model (an ``nn.Module`` or a ``LightningModule``, stored as the submodule ``model`` so the
    Trainer moves it to the device) and a snapshot directory written by ``FeatureSnapshot`` (and
    ``CheckpointSnapshot`` for ``checkpoints``). ``trainer.predict(module, test_loader)`` returns one
    :class:`~lightning_fastif.io.results.BatchInfluence` per batch; the whole run is :attr:`result` (rank 0) and, with
    ``output_dir``, on disk (:meth:`InfluenceResult.load <lightning_fastif.io.results.InfluenceResult.load>`).

    The model must provide a per-example loss: ``loss_fn(model, batch) -> Tensor[B]``, or a method
    ``model.per_example_loss(batch) -> Tensor[B]`` (no reduction). Test batches must have the training batches'
    structure (labels included). For kNN candidates it must also provide features: ``model.features(batch) ->
    Tensor[B, D]``, or ``search.feature_layer`` (a hooked submodule; default: the layer the snapshot was taken from).
    With a ``FeatureSnapshot(features="loss_gradient")`` the queries are the test points' loss gradients over the
    snapshot layer's parameters, preconditioned by ``(H_last + λI)⁻¹`` when the snapshot stored ``H_last``
    (:meth:`precondition_query`), and the index is searched towards likely helpful and likely harmful points.

    Args:
        model: the trained model (switched to eval mode, with a warning, when it is in train mode with dropout or
            batch norm).
        train_dataset: the training set as a map-style dataset (or a ``DataLoader`` over one, whose
            ``collate_fn`` is used), in the order the snapshot indexed it.
        loss_fn: per-example loss; default ``model.per_example_loss``.
        snapshot: the snapshot directory (needed for kNN candidates and for ``checkpoints``).
        ihvp: the inverse-HVP estimator (default ``AutoInverse()``: the exact inverse when the selected parameters
            fit, factorised once per weights, else a certified LiSSA; its choice and residual go to the manifest).
        params: which parameters influence is taken over (name patterns like ``"classifier.*"``, submodules, or a
            list; default: all trainable).
        num_candidates: ``k`` nearest training points scored per test point; ``None`` scores all ``N`` (the
            original influence functions).
        top_k: how many helpful/harmful points the result shows by default.
        checkpoints: ``None`` (the live weights), or ``CheckpointSnapshot`` versions whose scores are summed:
            ``"latest"``, ``"all"``, a version name or position, or a list of those.
        candidates_pool: score candidates from this :class:`CandidatePool` instead of the training set.
        output_dir: where shards and the merged result are written (resumable); ``None`` keeps results in memory.
            The directory records a fingerprint of everything the scores depend on (weights, parameters,
            estimator, training data, loss function; each test batch's content with its shard). A rerun whose
            fingerprint differs raises an error naming what changed; finished shards are reused only when
            everything matches.
        overwrite: with ``output_dir``, start fresh instead: earlier shards, result and manifest are deleted.
        max_memory: a memory budget (``"4GB"``, ``"512MiB"`` or bytes): chunk sizes for scoring and HVPs are derived
            from it and the measured cost of one example, per test batch (``compute.batch_size`` and
            ``compute.hessian_batch_size`` are then ignored); too small a budget raises ``MemoryBudgetError`` naming
            the smallest one that works.
        search: how candidates are found (features, kNN query, sign, preconditioner damping): a
            :class:`~lightning_fastif.SearchArguments`, a mapping of its fields, or ``None`` for the defaults.
        compute: how the work is cut and spread (``parallel``, chunk sizes, scoring method, progress bars): a
            :class:`~lightning_fastif.ComputeArguments`, a mapping of its fields, or ``None`` for the defaults.
        **legacy: the flat arguments of versions before 0.2 (``feature_layer=``, ``parallel=``, ``batch_size=``,
            ...), folded into ``search``/``compute`` with a ``DeprecationWarning``.

    Attributes:
        compute: the compute arguments (:attr:`search` holds the search arguments, resolved against the snapshot).
        queries: how test points query the kNN index (:class:`~lightning_fastif.lightning.candidates.QuerySource`).
        checkpoint_weights: the checkpoint versions summed over
            (:class:`~lightning_fastif.lightning.weights.CheckpointWeights`).

    Raises:
        ArgumentError: an argument outside its accepted values (the message names it, the value and what is
            accepted), ``num_candidates`` larger than the candidates, a flat argument that belongs to no group.
        ValueError: a snapshot built for a training set of another size.
        SnapshotNotFoundError: the snapshot directory, its features or a checkpoint version is missing.

    Example::

        >>> module = InfluenceModule(model, train_dataset=train, snapshot="runs/fastif_snapshot",  # doctest: +SKIP
        ...                          ihvp=LiSSA(damping=0.01, recursion_depth=200), num_candidates=100,
        ...                          compute=ComputeArguments(batch_size=64))
        >>> Trainer(logger=False).predict(module, test_loader)  # doctest: +SKIP
        >>> module.result.top_helpful(0, 5)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        train_dataset: Any,
        loss_fn: LossFn | None = None,
        snapshot: str | os.PathLike | None = None,
        ihvp: InverseHVP | None = None,
        params: ParamSpec = None,
        num_candidates: int | None = 100,
        top_k: int = 10,
        checkpoints: CheckpointSpec = None,
        candidates_pool: CandidatePool | None = None,
        output_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
        max_memory: str | int | None = None,
        search: SearchArguments | Mapping[str, Any] | None = None,
        compute: ComputeArguments | Mapping[str, Any] | None = None,
        **legacy: Any,
    ) -> None:
        super().__init__()
        groups = fold_legacy_arguments(
            "InfluenceModule", legacy, {"search": (search, SearchArguments), "compute": (compute, ComputeArguments)}
        )
        self.compute: ComputeArguments = groups["compute"]
        if not isinstance(model, nn.Module):
            raise ArgumentError(f"model: expected an nn.Module or LightningModule, got {type(model).__name__}")
        self.model = model
        self.train_data = IndexedData(train_dataset, name="train_dataset")
        if loss_fn is not None and not callable(loss_fn):
            raise ArgumentError(
                f"loss_fn: expected None or a callable loss_fn(model, batch) -> Tensor[B], got {loss_fn!r}"
            )
        if loss_fn is None:
            FunctionalLoss(model, None, params)  # raises naming loss_fn when the model has no per_example_loss
        self.loss_fn = loss_fn
        self.ihvp: InverseHVP = AutoInverse() if ihvp is None else ihvp
        if not isinstance(self.ihvp, InverseHVP):
            raise ArgumentError(
                "ihvp: expected an InverseHVP estimator (AutoInverse, LiSSA, ConjugateGradient, ExactInverse, EKFAC, "
                f"Identity), got {type(ihvp).__name__}"
            )
        self.params = self._normalise_params(model, params)
        self.top_k = check_int("top_k", top_k)
        # A budget replaces the fixed chunk sizes by ones derived per test batch (memory.plan_chunks).
        self.max_memory = parse_memory(max_memory)
        self._example_cost: Any = None
        self._chunk: int | None = None
        self.output_dir = check_path("output_dir", output_dir, allow_none=True)
        self.overwrite = check_bool("overwrite", overwrite)
        self._train_fingerprint: str | None = None
        if candidates_pool is not None and not isinstance(candidates_pool, CandidatePool):
            raise ArgumentError(
                f"candidates_pool: expected None or a CandidatePool (build one with CandidatePool.from_snapshot("
                f"dataset, snapshot, name)), got {type(candidates_pool).__name__}"
            )
        self.candidates_pool = candidates_pool
        self.snapshot = check_path("snapshot", snapshot, allow_none=True)
        self._curvature = CurvatureReuse(self.snapshot)
        self.num_candidates = check_num_candidates(num_candidates, candidates_pool, len(self.train_data), self.snapshot)
        if self.snapshot is not None and not os.path.isdir(self.snapshot):
            raise SnapshotNotFoundError(
                f"snapshot: directory {self.snapshot!r} does not exist; pass the dirpath of a FeatureSnapshot "
                "(default <trainer.default_root_dir>/fastif_snapshot)"
            )
        if self.num_candidates is None:  # every training point is a candidate: no features version applies
            self.queries = QuerySource(dataclasses.replace(groups["search"], feature_version=None), self.snapshot)
        else:
            self.queries = resolve_query_source(
                model,
                self.snapshot,
                len(self.train_data),
                groups["search"],
                from_snapshot=candidates_pool is None,
                pool=candidates_pool,
            )
        self._search_given: SearchArguments = groups["search"]
        self._pool_queries: dict[tuple[Any, ...], QuerySource] = {}
        self.checkpoints = checkpoints
        self.checkpoint_weights = CheckpointWeights(model, self.snapshot, checkpoints)
        version = self.search.feature_version
        self._feature_checkpoint = version if version in self.checkpoint_weights.names else None
        self._switch_to_eval(model)

        self._init_predict_loop(self.compute.batch_size)

    # ------------------------------------------------------------------------------------------------ validation
    @staticmethod
    def _normalise_params(model: nn.Module, params: ParamSpec) -> list[str] | None:
        """Patterns as given, submodules as their parameter names: a module object would not survive pickling to
        spawned processes as a part of *this* model."""
        selected = select_parameters(model, params)
        if params is None:
            return None
        specs = [params] if isinstance(params, (str, nn.Module)) else list(params)
        if all(isinstance(s, str) for s in specs):
            return [str(s) for s in specs]
        return list(selected)

    @staticmethod
    def _switch_to_eval(model: nn.Module) -> None:
        trainer = getattr(model, "_trainer", None)
        if not model.training or (trainer is not None and getattr(trainer, "training", False)):
            # Inside a fit (ErrorCorrection) the Trainer owns the modes; every computation here runs in eval mode
            # and restores them afterwards anyway.
            return
        stochastic = sorted(
            {
                type(m).__name__
                for m in model.modules()
                if m.training and isinstance(m, _STOCHASTIC) and getattr(m, "p", 1) > 0
            }
        )
        if stochastic:
            rank_zero_warn(
                f"model: {type(model).__name__} is in train mode with {stochastic}; influence treats the loss as a "
                "deterministic function of the weights, so the model is switched to eval mode (model.eval())"
            )
        model.eval()

    # ---------------------------------------------------------------------------------------------------- helpers
    @property
    def search(self) -> SearchArguments:
        """The search arguments in effect: ``feature_version``, ``feature_layer``, ``feature_hook`` and ``knn_sign``
        resolved against the snapshot."""
        return self.queries.search

    @property
    def feature_kind(self) -> str:
        """``"activations"`` or ``"loss_gradient"``: the snapshot's features, which the queries match."""
        return self.queries.kind

    @property
    def knn_index(self) -> KNNIndex:
        """The training set's kNN index from the snapshot (loaded on first use)."""
        return self.queries.index

    @property
    def knn_preconditioned(self) -> bool:
        """True when kNN queries are preconditioned by the snapshot's ``(H_last + λI)⁻¹``."""
        return self.queries.preconditioner is not None

    def _align_queries(self) -> None:
        """Under EK-FAC, precondition loss-gradient queries with the scores' own factors (the estimator's, or a
        ``CurvatureSnapshot``'s for the weights now): the search then ranks by the snapshot layer's exact share of
        the scores (:meth:`QuerySource.use_scoring_factors`). Other estimators keep the snapshot's ``H_last``."""
        ihvp, factors, label = self.ihvp, None, ""
        if isinstance(ihvp, EKFAC) and self.num_candidates is not None and not self.checkpoint_weights.names:
            if ihvp.factors is not None:
                factors, label = ihvp.factors, "ekfac: the estimator's factors"
            else:
                factors, info = self._curvature.factors(self.model, self.params)
                label = f"ekfac: curvature snapshot {info.get('version')}"
            if factors is not None and not factors.corrected and ihvp.correct:
                factors = None  # the solve corrects them first: the stored eigenvalues are not the scores'
        self.queries.use_scoring_factors(factors, label)

    def _knn_lambda(self) -> float:
        damping = self.search.knn_damping
        return float(self.ihvp.damping) if damping is None else damping

    def precondition_query(self, queries: Tensor) -> Tensor:
        """``(H_last + λI)⁻¹ g`` for each row ``g`` of ``queries`` (float32 on CPU); rows unchanged without ``H_last``.

        ``H_last`` is the Hessian of the mean training loss over the snapshot layer's parameters, stored by
        ``FeatureSnapshot(features="loss_gradient")``; λ is ``search.knn_damping`` (default ``ihvp.damping``), at
        least ``KNN_DAMPING_FLOOR · tr(H_last) / P`` (see :mod:`lightning_fastif.search.preconditioner`). With an
        :class:`~lightning_fastif.core.ekfac.EKFAC` estimator whose factors (given, or a ``CurvatureSnapshot``'s for
        these weights) cover the snapshot layer, ``H_last`` is that layer's block of those factors: the scores' own
        curvature (``settings()["knn_preconditioner"]["curvature"]`` says so).

        Args:
            queries: ``[Q, P]`` (or ``[P]``) loss gradients of the snapshot layer's parameters.

        Raises:
            ArgumentError: ``queries`` do not have ``P`` columns.

        Example::

            >>> q = module.precondition_query(g_test)  # doctest: +SKIP
            >>> torch.testing.assert_close(q, torch.linalg.solve(h + lam * torch.eye(p), g_test.T).T)  # doctest: +SKIP
        """
        self._align_queries()
        return self.queries.precondition(queries, self._knn_lambda())

    def _function(self) -> FunctionalLoss:
        return FunctionalLoss(self.model, self.loss_fn, self.params)

    def _progress_enabled(self) -> bool:
        trainer = self._trainer
        return bool(
            self.compute.progress and trainer is not None and trainer.progress_bar_callback is not None and rank() == 0
        )

    def settings(self) -> dict[str, Any]:
        """Everything that changes the scores, as plain values (a resumed run must match them)."""
        pool, search = self.candidates_pool, self.search
        self._align_queries()
        curvature = self.queries.scoring_curvature
        return jsonable(
            {
                "model": type(self.model).__name__,
                "loss_fn": getattr(self.loss_fn, "__qualname__", None) or "per_example_loss",
                "params": self.params,
                "num_train": len(self.train_data),
                "candidates_from": "train" if pool is None else f"pool:{pool.name}",
                "num_pool": None if pool is None else len(pool),
                "num_candidates": self.num_candidates,
                "snapshot": None if self.snapshot is None else os.path.abspath(self.snapshot),
                "feature_version": search.feature_version,
                "feature_layer": search.feature_layer,
                "feature_hook": search.feature_hook if search.feature_layer is not None else None,
                "knn_query": search.knn_query,
                "feature_kind": self.feature_kind,
                "knn_sign": search.knn_sign,
                "knn_preconditioner": (
                    {
                        "hessian_params": self.queries.hessian_params,
                        "damping": self._knn_lambda(),
                        **({"curvature": curvature} if curvature is not None else {}),
                    }
                    if self.knn_preconditioned
                    else None
                ),
                "checkpoints": self.checkpoint_weights.names or None,
                "ihvp": {"estimator": self.ihvp.name, **self.ihvp.settings()},
                "score_method": self.compute.score_method,
            }
        )

    def fingerprint(self) -> dict[str, str]:
        """Digests of everything the scores depend on besides the test data (:mod:`lightning_fastif.core.fingerprint`).

        The training data's digest is one streamed pass over it, computed once per module.
        """
        if self._train_fingerprint is None:
            self._train_fingerprint = data_fingerprint(self.train_data)
        selected = select_parameters(self.model, self.params).items()
        return {
            "weights": weights_fingerprint(self.model),
            "params": params_fingerprint(selected),
            "estimator": estimator_fingerprint({"estimator": self.ihvp.name, **self.ihvp.settings()}),
            "train_data": self._train_fingerprint,
            "loss_fn": function_fingerprint(self.loss_fn),
        }

    # ----------------------------------------------------------------------------------------------- public API
    def score_batch(
        self,
        batch: Batch,
        *,
        combine: bool = False,
        num_candidates: int | Literal["all"] | None = None,
        candidates_pool: CandidatePool | None = None,
    ) -> BatchInfluence:
        """Score the candidates of one batch of test (or anchor) points, outside of ``trainer.predict``.

        Used by ``ErrorCorrection``. Runs in eval mode with gradients enabled and restores the model's modes. With
        ``compute.parallel="repeats"`` inside an initialised process group, the repeats and candidates are split
        across ranks and **every rank must call it with the same batch**; otherwise it is local.

        Args:
            batch: ``T`` examples in the training batches' structure.
            combine: treat the batch as one query (FastIF's anchor batch): the gradient of the batch's *mean*
                loss, and the kNN neighbours of its mean feature. Returns ``T = 1``.
            num_candidates: ``None`` for the module's ``num_candidates``; ``"all"`` or an integer.
            candidates_pool: candidates from this pool (default: the module's ``candidates_pool``, else the
                training set).

        Returns:
            A :class:`~lightning_fastif.io.results.BatchInfluence` with ``candidates [T, K]``, ``scores [T, K]`` and
            ``diagnostics`` (seconds per stage, inverse-HVP diagnostics).

        Raises:
            ArgumentError: ``num_candidates`` or ``candidates_pool`` outside their accepted values.

        Example::

            >>> out = module.score_batch(anchor_batch, combine=True)  # doctest: +SKIP
            >>> out.top_helpful(0, 10).indices  # the 10 most helpful training points for the anchors  # doctest: +SKIP
        """
        pool = candidates_pool if candidates_pool is not None else self.candidates_pool
        if pool is not None and not isinstance(pool, CandidatePool):
            raise ArgumentError(f"candidates_pool: expected None or a CandidatePool, got {type(pool).__name__}")
        k = self.num_candidates if num_candidates is None else None if num_candidates == "all" else num_candidates
        if k is not None:
            k = check_num_candidates(k, pool, len(self.train_data), self.snapshot)
        split = self.compute.parallel == "repeats" and world_size() > 1
        return self._compute(batch, combine=bool(combine), num_candidates=k, pool=pool, split=split)

    @override
    def forward(self, batch: Batch) -> BatchInfluence:
        """Same as :meth:`score_batch` with the module's settings."""
        return self.score_batch(batch)

    # ----------------------------------------------------------------------------------------------- computation
    def _candidates(
        self, batch: Batch, rows: int, k: int, pool: CandidatePool | None, combine: bool, stages: Stages
    ) -> Tensor:
        self._align_queries()
        source = self._queries_for(pool)
        with stages("features"):
            if self._feature_checkpoint is not None:
                self.checkpoint_weights.apply(self._feature_checkpoint)
            feats = source.embed(self.model, batch, self.loss_fn, self._knn_lambda())
            queries = feats.mean(0, keepdim=True) if combine or self.search.knn_query == "mean" else feats
        index = pool.index if pool is not None else self.knn_index
        assert index is not None
        with stages("knn"):
            ids = source.nearest(index, queries, k, progress=self._progress_enabled())
        return ids.expand(rows, ids.shape[1]).contiguous() if ids.shape[0] != rows else ids

    def _queries_for(self, pool: CandidatePool | None) -> QuerySource:
        """How queries meet ``pool``'s index: a pool passed to :meth:`score_batch` that came from a snapshot is
        queried as that snapshot's features were made (resolved once per pool); otherwise the module's queries."""
        if pool is None or pool is self.candidates_pool or pool.snapshot is None:
            return self.queries
        key = (pool.snapshot, pool.version, pool.name, len(pool))
        if key not in self._pool_queries:
            self._pool_queries[key] = resolve_query_source(
                self.model, self.snapshot, len(self.train_data), self._search_given, from_snapshot=False, pool=pool
            )
        return self._pool_queries[key]

    def _compute(
        self,
        batch: Batch,
        *,
        combine: bool,
        num_candidates: int | None,
        pool: CandidatePool | None,
        split: bool,
        test_indices: Tensor | None = None,
    ) -> BatchInfluence:
        stages = Stages()
        data = pool.data if pool is not None else self.train_data
        # no_grad: torch.func transforms and the HVPs manage their own graphs; parameters outside `params` that
        # require grad would otherwise tie every gradient to a graph nobody uses.
        with torch.inference_mode(False), torch.no_grad(), evaluating(self.model), self.checkpoint_weights.restored():
            first = next(iter(select_parameters(self.model, self.params).values()))
            device = stages.device = first.device
            # The Trainer fetches predict batches under torch.inference_mode, and autograd refuses such tensors.
            batch = apply_to_collection(
                move_batch(batch, device, first.dtype), Tensor, lambda t: t.clone() if t.is_inference() else t
            )
            rows = 1 if combine else batch_size_of(batch)
            check_loss(self._function(), batch)
            candidates = None
            if num_candidates is not None:
                candidates = self._candidates(batch, rows, num_candidates, pool, combine, stages)
            total: Tensor | None = None
            diagnostics = []
            for version, weights in self.checkpoint_weights.states():
                if weights is not None:
                    self.checkpoint_weights.apply(version)
                function = self._function()
                hessian_chunk = self.compute.hessian_batch_size
                gradient_chunk = None
                if self.max_memory is not None:
                    if self._example_cost is None:
                        self._example_cost = measure_example_cost(function, self.train_data)
                    plan = plan_chunks(
                        self._example_cost,
                        self.max_memory,
                        num_vectors=rows,
                        score_directions=1 if candidates is not None else rows,
                    )
                    hessian_chunk, self._chunk, gradient_chunk = (
                        plan.hessian_chunk,
                        plan.score_chunk,
                        plan.gradient_chunk,
                    )
                    stages.memory["plan"] = plan.as_dict()
                operator = HessianOperator(
                    self.model, None, self.train_data, batch_size=hessian_chunk, function=function
                )
                with stages("test_gradients"):
                    g_test = function.per_example_gradients(batch)
                    if combine:
                        g_test = g_test.mean(0, keepdim=True)
                with stages("s_test"):
                    self.ihvp.progress = self._progress_enabled()  # iterations and residual on the Trainer's console
                    reused = self._curvature.offer(self.ihvp, self.model, self.params)  # a CurvatureSnapshot's factors
                    if split:
                        s_test, diag = solve_split(self.ihvp, operator, g_test)
                    else:
                        s_test, diag = self.ihvp.solve(operator, g_test), dict(self.ihvp.diagnostics)
                width = len(data) if candidates is None else candidates.shape[1]
                score = functools.partial(
                    score_columns,
                    function,
                    data,
                    s_test,
                    candidates,
                    chunk_size=self._chunk or self.compute.batch_size,
                    gradient_chunk_size=gradient_chunk,
                    method=self.compute.score_method,
                    progress=self._progress_enabled(),
                )
                with stages("scoring"):
                    scores = score_split(score, width, s_test) if split else score(0, width)
                total = scores if total is None else total + scores
                diagnostics.append({"checkpoint": version, **diag, **reused})
        assert total is not None
        if candidates is None:
            candidates = torch.arange(len(data)).expand(rows, len(data))
        if test_indices is None and combine:
            test_indices = torch.full((1,), -1, dtype=torch.long)
        return BatchInfluence(
            candidates=candidates.detach().cpu().long().contiguous(),
            scores=total.detach().cpu(),
            diagnostics=jsonable(
                {
                    "num_test": rows,
                    "combined": combine,
                    "candidates_from": "train" if pool is None else f"pool:{pool.name}",
                    "seconds": stages.seconds,
                    "memory": stages.memory,
                    "ihvp": diagnostics,
                }
            ),
            test_indices=None if test_indices is None else test_indices.detach().cpu().long(),
        )
