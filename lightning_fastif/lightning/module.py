"""FastIF's influence computation as a LightningModule: ``trainer.predict(InfluenceModule(...), test_loader)``.

For each test point of a predict batch: its features (``model.features(batch)`` or a hooked layer), its ``k``
nearest training points in the snapshot's feature index (the *candidates*), ``s_test = (H + λI)⁻¹ g_test`` for all
test points of the batch in one inverse-HVP solve, and each candidate's score ``g_candidateᵀ s_test`` by forward-mode
AD (the engine's JVP path). **Positive = helpful.** ``num_candidates=None`` scores every training point (the original
influence functions, no snapshot needed). Weights are the live model's, or those of one or several
``CheckpointSnapshot`` versions whose scores are summed (TracIn-style).

Parallel, under any DDP strategy (``"ddp"``, ``"ddp_spawn"``; gloo on CPU or NCCL):

* ``parallel="test"``: the Trainer splits the test points across ranks (``trainer.predict`` does not pad, so every
  test point is on exactly one rank); each rank scores its own; the results are gathered to rank 0.
* ``parallel="repeats"`` (FastIF's parallel variant, for few test points): every rank sees all test points; LiSSA's
  repeats are split across ranks (repeat ``r`` on rank ``r % world``, always with seed ``seed + r``) and combined by
  an all-reduce; the candidates are cut into contiguous chunks, one per rank, scored and gathered, every
  (test, candidate) pair exactly once. The computation runs in ``on_predict_epoch_end``, when every rank knows the
  whole test set; the test loader must be a ``DataLoader`` over a map-style dataset.

Both give one process's scores (within float tolerance). With ``output_dir`` each batch of test points is written as
a shard as soon as it is done; a run killed midway and restarted with the same ``output_dir`` (and the same
settings) skips the finished shards, and rank 0 merges them into the final result::

    <output_dir>/manifest.json                 settings, status, and (when complete) timings and diagnostics
    <output_dir>/shards/shard-<first>-<key>.safetensors    one batch: test_indices, candidate_indices, scores
    <output_dir>/result.safetensors            the merged result (read with InfluenceResult.load(output_dir))

The snapshot directory, the output directory (under several nodes) and the test data must be visible to every rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_fastif.core.batches import Batch, IndexedData, batch_size_of, map_tensors, move_batch
from lightning_fastif.core.grads import FunctionalLoss, LossFn, evaluating
from lightning_fastif.core.hessian import HessianOperator
from lightning_fastif.core.ihvp import InverseHVP, LiSSA, relative_residual
from lightning_fastif.core.influence import GRADS_MIN_TEST_POINTS, score_candidates
from lightning_fastif.core.memory import measure_example_cost, measure_stage, parse_memory, plan_chunks
from lightning_fastif.core.params import ParamSpec, select_parameters
from lightning_fastif.errors import SnapshotError, SnapshotNotFoundError
from lightning_fastif.io.atomic import (
    PathLike,
    load_tensors,
    manifest_path,
    read_manifest,
    read_tensor_metadata,
    save_tensors,
    write_manifest,
)
from lightning_fastif.io.results import RESULT_FORMAT, RESULT_FORMAT_VERSION, BatchInfluence, InfluenceResult, jsonable
from lightning_fastif.io.snapshot_store import (
    LAST_LAYER_HESSIAN,
    apply_checkpoint,
    last_layer_hessian_file,
    load_checkpoint,
    resolve_version,
)
from lightning_fastif.lightning.distributed import (
    all_reduce_sum,
    barrier,
    broadcast_object,
    gather_uneven,
    rank,
    world_size,
)
from lightning_fastif.search.features import check_kind, features_of_batch, has_features_method, resolve_layer
from lightning_fastif.search.knn import KNNIndex, Sign

__all__ = ["CandidatePool", "InfluenceModule"]

STAGES = ("features", "knn", "test_gradients", "s_test", "scoring")
"""Stages timed per batch (seconds in the manifest, ``fastif/time_<stage>`` in the loggers)."""

SHARDS_DIR = "shards"
_SHARD_FORMAT = "lightning_fastif.influence.shard"
_PARALLEL = ("test", "repeats")
_KNN_QUERY = ("each", "mean")
_KNN_SIGN = ("both", "helpful", "harmful")
_SEARCH_SIGN: dict[str, Sign] = {"both": "both", "helpful": "positive", "harmful": "negative"}
_METHODS = ("auto", "jvp", "grads")
_HOOKS = ("input", "output")
_DROPOUT = nn.modules.dropout._DropoutNd
_HESSIAN_KEY = LAST_LAYER_HESSIAN  # FeatureSnapshot's manifest key, file stem and tensor name
KNN_DAMPING_FLOOR = 1e-6
"""The kNN preconditioner's damping is at least this times ``tr(H_last) / P`` (see ``knn_damping``)."""


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


def _choice(name: str, value: Any, accepted: Sequence[Any]) -> Any:
    if value not in accepted:
        raise ValueError(f"{name}: expected one of {list(accepted)}, got {value!r}")
    return value


def _describe(batch: Batch) -> str:
    """A short description of a batch's structure, for error messages."""
    if isinstance(batch, Tensor):
        return f"Tensor{list(batch.shape)}"
    if isinstance(batch, Mapping):
        return "dict(" + ", ".join(f"{k}={_describe(v)}" for k, v in batch.items()) + ")"
    if isinstance(batch, (tuple, list)):
        return f"{type(batch).__name__}(" + ", ".join(_describe(v) for v in batch) + ")"
    return type(batch).__name__


def _normal_tensors(batch: Batch) -> Batch:
    """Copies of inference-mode tensors (the Trainer fetches predict batches under ``torch.inference_mode``, and
    autograd refuses such tensors)."""
    return map_tensors(batch, lambda t: t.clone() if t.is_inference() else t)


def _shard_key(test_indices: Tensor) -> tuple[int, int]:
    """``(first test index, 60-bit hash of all of them)``: a shard name that does not depend on rank or world size."""
    data = test_indices.detach().cpu().long().contiguous().numpy().tobytes()
    return int(test_indices[0]), int(hashlib.sha1(data).hexdigest()[:15], 16)  # noqa: S324 - a name, not security


def _shard_name(first: int, key: int) -> str:
    return f"shard-{first:09d}-{key:015x}.safetensors"


def _gather_json(obj: Any) -> list[Any]:
    """Every rank's JSON-serialisable ``obj``, in rank order (a collective; ``[obj]`` without a process group)."""
    data = torch.tensor(list(json.dumps(jsonable(obj)).encode("utf-8")), dtype=torch.uint8)
    sizes = gather_uneven(torch.tensor([data.numel()], dtype=torch.long)).tolist()
    blob = gather_uneven(data)
    out, offset = [], 0
    for size in sizes:
        out.append(json.loads(bytes(blob[offset : offset + size].tolist()).decode("utf-8")))
        offset += size
    return out


def _fail_together(error: BaseException | None, what: str) -> None:
    """A collective: every rank learns whether any rank failed, and all raise, so none is left waiting."""
    failed = float(all_reduce_sum(torch.tensor([0.0 if error is None else 1.0]))[0])
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"parallel='repeats': {what} failed on another rank (its error is in that rank's log)")


def _weights_fingerprint(model: nn.Module) -> str:
    """SHA-1 of the model's state (names, shapes, bytes): a resumed run must use the same weights."""
    digest = hashlib.sha1()  # noqa: S324 - a fingerprint, not security
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass
class CandidatePool:
    """A dataset the candidates come from instead of the training set (FastIF's data augmentation).

    The Hessian stays the training set's; only the scored candidates change. With kNN candidates the pool needs
    an ``index`` over its features (in the same feature space as the test features): take it from a
    ``FeatureSnapshot(datasets={"pool": pool_dataset})`` with :meth:`from_snapshot`. Candidate indices in the
    results then index the pool dataset.

    Args:
        dataset: a map-style dataset (or a ``DataLoader`` over one, whose ``collate_fn`` is used).
        index: a :class:`~lightning_fastif.KNNIndex` whose ids are dataset indices of the pool (``None``: only
            ``num_candidates=None`` works, every pool example is a candidate).
        name: recorded in the results' settings.

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> pool = CandidatePool(TensorDataset(torch.randn(5, 2), torch.zeros(5)))
        >>> len(pool)
        5
    """

    dataset: Any
    index: KNNIndex | None = None
    name: str = "pool"
    data: IndexedData = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.data = IndexedData(self.dataset, name="candidates_pool.dataset")
        if self.index is not None:
            if not isinstance(self.index, KNNIndex):
                raise TypeError(f"candidates_pool.index: expected a KNNIndex or None, got {type(self.index).__name__}")
            ids = self.index.ids
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self.data)):
                raise ValueError(
                    f"candidates_pool.index: its ids span {int(ids.min())}..{int(ids.max())}, but the pool dataset "
                    f"has {len(self.data)} examples (accepted: 0..{len(self.data) - 1}); was it built for another "
                    "dataset?"
                )

    def __len__(self) -> int:
        return len(self.data)

    @classmethod
    def from_snapshot(
        cls, dataset: Any, snapshot: PathLike, name: str = "pool", version: str | int | None = None, **knn: Any
    ) -> CandidatePool:
        """A pool whose kNN index is the snapshot's features of dataset ``name`` (``FeatureSnapshot(datasets=...)``).

        Raises:
            SnapshotNotFoundError: the snapshot, version or dataset is missing.
            ValueError: the snapshot's features were built for a dataset of another size.
        """
        index = KNNIndex.from_snapshot(snapshot, dataset=name, version=version, **knn)
        if index.ntotal != len(IndexedData(dataset, name="candidates_pool.dataset")):
            raise ValueError(
                f"candidates_pool: the snapshot's features of {name!r} hold {index.ntotal} examples, but the pool "
                f"dataset has {len(IndexedData(dataset))}; embed this pool with FeatureSnapshot(datasets={{{name!r}: "
                "...}})"
            )
        return cls(dataset, index, name)


class InfluenceModule(LightningModule):
    """Influence of training points on test points through ``trainer.predict``. **Positive = helpful.**

    Wraps the trained model (an ``nn.Module`` or a ``LightningModule``, stored as the submodule ``model`` so the
    Trainer moves it to the device) and a snapshot directory written by ``FeatureSnapshot`` (and
    ``CheckpointSnapshot`` for ``checkpoints``). ``trainer.predict(module, test_loader)`` returns one
    :class:`~lightning_fastif.io.results.BatchInfluence` per batch; the whole run is :attr:`result` (rank 0) and, with
    ``output_dir``, on disk (:meth:`InfluenceResult.load <lightning_fastif.io.results.InfluenceResult.load>`).

    The model must provide a per-example loss: ``loss_fn(model, batch) -> Tensor[B]``, or a method
    ``model.per_example_loss(batch) -> Tensor[B]`` (no reduction). Test batches must have the training batches'
    structure (labels included). For kNN candidates it must also provide features: ``model.features(batch) ->
    Tensor[B, D]``, or ``feature_layer`` (a hooked submodule; default: the layer the snapshot was taken from).
    Test points are embedded the way the snapshot's manifest says: with ``FeatureSnapshot(features=
    "loss_gradient")`` their query is their loss gradient with respect to the snapshot layer's parameters (computed
    with this module's ``loss_fn``), and the index is searched by inner product towards ``+g_test`` (likely helpful
    points) and ``-g_test`` (likely harmful points), ``num_candidates`` in each direction (``knn_sign``). When the
    snapshot also stored ``H_last``, the Hessian of the mean training loss over that layer's parameters, the query
    is preconditioned first, ``q = (H_last + λI)⁻¹ g_test`` (λ = ``knn_damping``), so that ``<q, g_train>`` is the
    influence score restricted to the last layer (:meth:`precondition_query`); without it queries are ``g_test``.

    Args:
        model: the trained model (switched to eval mode, with a warning, when it is in train mode with dropout or
            batch norm).
        train_dataset: the training set as a map-style dataset (or a ``DataLoader`` over one, whose
            ``collate_fn`` is used), in the order the snapshot indexed it.
        loss_fn: per-example loss; default ``model.per_example_loss``.
        snapshot: the snapshot directory (needed for kNN candidates and for ``checkpoints``).
        ihvp: the inverse-HVP estimator (default ``LiSSA()``).
        params: which parameters influence is taken over (name patterns like ``"classifier.*"``, submodules, or a
            list; default: all trainable).
        num_candidates: ``k`` nearest training points scored per test point; ``None`` scores all ``N`` (the
            original influence functions).
        top_k: how many helpful/harmful points the result shows by default.
        checkpoints: ``None`` (the live weights), or ``CheckpointSnapshot`` versions whose scores are summed:
            ``"latest"``, ``"all"``, a version name or position, or a list of those.
        feature_layer: submodule whose output (``feature_hook="output"``) or input (``"input"``) are the features;
            default: the snapshot's layer, else ``model.features``.
        feature_hook: ``"output"`` or ``"input"``.
        feature_version: the snapshot's features version (default: the latest). Query features are computed with
            the weights of the checkpoint of that version when it is among ``checkpoints``, else the live weights.
        parallel: ``"test"`` (test points split across ranks) or ``"repeats"`` (LiSSA repeats and candidates split
            across ranks; for few test points).
        output_dir: where shards and the merged result are written (resumable); ``None`` keeps results in memory.
        batch_size: candidates per forward pass.
        hessian_batch_size: examples per chunk of full-data Hessian products (CG, exact, residuals).
        knn_query: ``"each"`` (each test point's own neighbours) or ``"mean"`` (all test points of a batch share the
            neighbours of their mean feature).
        knn_sign: for a loss-gradient snapshot only: ``"both"`` (default: ``num_candidates`` likely helpful and
            ``num_candidates`` likely harmful points, up to ``2 * num_candidates`` distinct candidates), ``"helpful"``
            or ``"harmful"`` (``num_candidates`` in that direction). ``None``: ``"both"`` for loss gradients; must be
            ``None`` for activation features, whose distances have no sign.
        knn_damping: λ of the query preconditioner ``(H_last + λI)⁻¹`` (loss-gradient snapshots that stored
            ``H_last``); ``None``: the estimator's ``ihvp.damping``, the λ the scores use. It is raised to at least
            ``KNN_DAMPING_FLOOR · tr(H_last) / P`` (``1e-6`` of the mean eigenvalue): a last-layer Hessian is often
            singular (cross-entropy's always is: adding one vector to every class's weights leaves the loss
            unchanged), so ``λ = 0`` must still factorise; the floor only bounds the gain of such null directions,
            in which training gradients have no component anyway.
        score_method: ``"auto"``, ``"jvp"`` or ``"grads"`` (see :mod:`lightning_fastif.core.influence`).
        candidates_pool: score candidates from this :class:`CandidatePool` instead of the training set.
        progress: show a progress bar over the candidates (only when the Trainer's progress bar is on).
        max_memory: a memory budget (``"4GB"``, ``"512MiB"`` or bytes): chunk sizes for scoring and HVPs are derived
            from it and the measured cost of one example, per test batch (``batch_size``/``hessian_batch_size`` are
            then ignored); too small a budget raises ``MemoryBudgetError`` naming the smallest one that works.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``train_dataset`` is not indexable, ``ihvp`` is not an
            estimator.
        ValueError: an argument outside its accepted values (the message names it and what is accepted), a
            snapshot built for a training set of another size, ``num_candidates`` larger than the candidates.
        SnapshotNotFoundError: the snapshot directory, its features or a checkpoint version is missing.

    Example::

        >>> module = InfluenceModule(model, train_dataset=train, snapshot="runs/fastif_snapshot",  # doctest: +SKIP
        ...                          ihvp=LiSSA(damping=0.01, recursion_depth=200), num_candidates=100)
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
        checkpoints: str | int | Sequence[str | int] | None = None,
        feature_layer: str | None = None,
        feature_hook: Literal["input", "output"] = "output",
        feature_version: str | int | None = None,
        parallel: Literal["test", "repeats"] = "test",
        output_dir: str | os.PathLike | None = None,
        batch_size: int = 256,
        hessian_batch_size: int = 256,
        knn_query: Literal["each", "mean"] = "each",
        knn_sign: Literal["both", "helpful", "harmful"] | None = None,
        score_method: Literal["auto", "jvp", "grads"] = "auto",
        candidates_pool: CandidatePool | None = None,
        progress: bool = True,
        knn_damping: float | None = None,
        max_memory: str | int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module or LightningModule, got {type(model).__name__}")
        self.model = model
        self.train_data = IndexedData(train_dataset, name="train_dataset")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn: expected None or a callable loss_fn(model, batch) -> Tensor[B], got {loss_fn!r}")
        if loss_fn is None:
            FunctionalLoss(model, None, params)  # raises naming loss_fn when the model has no per_example_loss
        self.loss_fn = loss_fn
        self.ihvp: InverseHVP = LiSSA() if ihvp is None else ihvp
        if not isinstance(self.ihvp, InverseHVP):
            raise TypeError(
                f"ihvp: expected an InverseHVP estimator (LiSSA, ConjugateGradient, ExactInverse, Identity), got "
                f"{type(ihvp).__name__}"
            )
        self.params = self._normalise_params(model, params)
        self.top_k = _positive_int("top_k", top_k)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.hessian_batch_size = _positive_int("hessian_batch_size", hessian_batch_size)
        # A budget replaces batch_size/hessian_batch_size by chunk sizes derived per test batch (memory.plan_chunks).
        self.max_memory = parse_memory(max_memory)
        self._example_cost: Any = None
        self._chunk: int | None = None
        self.parallel = _choice("parallel", parallel, _PARALLEL)
        self.knn_query = _choice("knn_query", knn_query, _KNN_QUERY)
        self.knn_sign = None if knn_sign is None else _choice("knn_sign", knn_sign, _KNN_SIGN)
        ok = isinstance(knn_damping, (int, float)) and not isinstance(knn_damping, bool) and math.isfinite(knn_damping)
        if knn_damping is not None and not (ok and knn_damping >= 0):
            raise ValueError(
                f"knn_damping: expected None (the estimator's damping) or a finite number >= 0, got {knn_damping!r}"
            )
        self.knn_damping = None if knn_damping is None else float(knn_damping)
        self.feature_kind = "activations"
        self._hessian_entry: dict[str, Any] | None = None
        self._preconditioner: tuple[float, str, tuple[Tensor, ...]] | None = None
        self.score_method = _choice("score_method", score_method, _METHODS)
        self.feature_hook = _choice("feature_hook", feature_hook, _HOOKS)
        if not isinstance(progress, bool):
            raise ValueError(f"progress: expected True or False, got {progress!r}")
        self.progress = progress
        if output_dir is not None and (not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir)):
            raise ValueError(f"output_dir: expected None or a directory path, got {output_dir!r}")
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        if candidates_pool is not None and not isinstance(candidates_pool, CandidatePool):
            raise TypeError(
                f"candidates_pool: expected None or a CandidatePool, got {type(candidates_pool).__name__}; build one "
                "with CandidatePool.from_snapshot(dataset, snapshot, name)"
            )
        self.candidates_pool = candidates_pool
        self.snapshot = None if snapshot is None else os.fspath(snapshot)
        self.num_candidates = self._check_num_candidates(num_candidates, candidates_pool)
        if self.snapshot is not None and not Path(self.snapshot).is_dir():
            raise SnapshotNotFoundError(
                f"snapshot: directory {self.snapshot!r} does not exist; pass the dirpath of a FeatureSnapshot "
                "(default <trainer.default_root_dir>/fastif_snapshot)"
            )
        self.feature_layer, self.feature_version = feature_layer, None
        self._feature_entry: dict[str, Any] | None = None
        if self.num_candidates is not None and candidates_pool is None:
            self._feature_entry = self._check_feature_snapshot(feature_version)
            self.feature_version = self._feature_entry["version"]
        if self.num_candidates is not None:
            self._check_feature_source(feature_layer)
        self.checkpoints = checkpoints
        self._checkpoints = self._load_checkpoints(checkpoints)
        names = [v for v, _ in self._checkpoints]
        self._feature_checkpoint = names.index(self.feature_version) if self.feature_version in names else None
        self._switch_to_eval(model)

        self._knn_cache: KNNIndex | None = None
        self._result: InfluenceResult | None = None
        self._output: str | None = None
        self._settings: dict[str, Any] = {}
        self._local: list[BatchInfluence] = []
        self._shard_keys: list[tuple[int, int]] = []
        self._pending: list[Tensor] = []
        self._offsets: dict[int, int] = {}
        self._log_step = 0
        self._started: float | None = None
        self.computed_batches = 0
        """Batches computed by the last ``trainer.predict`` (on this rank)."""
        self.skipped_batches = 0
        """Batches whose shard was already on disk, skipped by the last ``trainer.predict`` (on this rank)."""

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

    def _check_num_candidates(self, num_candidates: Any, pool: CandidatePool | None) -> int | None:
        if num_candidates is None:
            return None
        total = len(pool) if pool is not None else len(self.train_data)
        where = "the candidate pool" if pool is not None else "the training set"
        if not isinstance(num_candidates, int) or isinstance(num_candidates, bool) or num_candidates < 1:
            raise ValueError(
                f"num_candidates: expected None (all {total} examples of {where}) or an integer in 1..{total}, got "
                f"{num_candidates!r}"
            )
        if num_candidates > total:
            raise ValueError(
                f"num_candidates: {num_candidates} is larger than {where} ({total} examples); accepted: 1..{total}, "
                "or None for all of them"
            )
        if self.snapshot is None and pool is None:
            raise ValueError(
                f"snapshot: None, but num_candidates={num_candidates} needs the kNN index of a FeatureSnapshot "
                "directory; pass snapshot=<its dirpath>, or num_candidates=None to score every training point"
            )
        if pool is not None and pool.index is None:
            raise ValueError(
                f"candidates_pool: has no kNN index, so num_candidates must be None (all {total} pool examples), got "
                f"{num_candidates}; build the pool with CandidatePool.from_snapshot"
            )
        return num_candidates

    def _check_feature_snapshot(self, version: str | int | None) -> dict[str, Any]:
        assert self.snapshot is not None
        try:
            entry = resolve_version(self.snapshot, "features", version)
        except SnapshotNotFoundError as err:
            raise SnapshotNotFoundError(f"snapshot: {err}; was it written by FeatureSnapshot?") from err
        datasets = entry.get("datasets", {})
        if "train" not in datasets:
            raise SnapshotNotFoundError(
                f"snapshot: features version {entry['version']!r} of {self.snapshot} holds no 'train' features "
                f"(datasets {sorted(datasets)}); use FeatureSnapshot(include_train=True)"
            )
        n, expected = int(datasets["train"].get("n", entry.get("n", -1))), len(self.train_data)
        if n != expected:
            raise ValueError(
                f"snapshot: {self.snapshot} (features version {entry['version']!r}) was built for a training set of "
                f"{n} examples, but train_dataset has {expected}; pass the training set the snapshot was taken on, "
                "in the same order"
            )
        return entry

    def _check_feature_source(self, feature_layer: str | None) -> None:
        entry = self._feature_entry or {}
        snap_layer = entry.get("layer")
        self.feature_kind = check_kind(entry.get("features") or "activations")
        if self.feature_kind == "loss_gradient":
            self._check_gradient_source(feature_layer, snap_layer)
            return
        if self.knn_sign is not None:
            raise ValueError(
                f"knn_sign: {self.knn_sign!r} needs a snapshot of loss-gradient features "
                "(FeatureSnapshot(features='loss_gradient')); activation distances have no sign, pass knn_sign=None"
            )
        if feature_layer is None and snap_layer is not None:
            self.feature_layer = snap_layer
            self.feature_hook = (self._feature_entry or {}).get("hook") or "output"
        elif feature_layer is not None and snap_layer is not None and feature_layer != snap_layer:
            rank_zero_warn(
                f"feature_layer: {feature_layer!r}, but the snapshot's features come from layer {snap_layer!r}; kNN "
                "distances are only meaningful when queries and index share one feature space"
            )
        if self.feature_layer is not None:
            if not isinstance(self.feature_layer, str):
                raise ValueError(f"feature_layer: expected None or a submodule name, got {self.feature_layer!r}")
            resolve_layer(self.model, self.feature_layer)
        elif not has_features_method(self.model):
            names = [n for n, _ in self.model.named_modules() if n][:40]
            raise ValueError(
                f"feature_layer: None, but {type(self.model).__name__} defines no features(batch) method and the "
                f"snapshot names no layer; pass feature_layer= one of {names} (e.g. the classifier with "
                "feature_hook='input'), or num_candidates=None"
            )

    def _check_gradient_source(self, feature_layer: str | None, snap_layer: str | None) -> None:
        if feature_layer is not None and feature_layer != snap_layer:
            raise ValueError(
                f"feature_layer: {feature_layer!r}, but the snapshot holds loss gradients of layer {snap_layer!r}; "
                "queries must be gradients of the same parameters, pass feature_layer=None"
            )
        if snap_layer is None or not isinstance(snap_layer, str):
            raise ValueError(f"snapshot: its loss-gradient features name no layer (manifest layer {snap_layer!r})")
        resolve_layer(self.model, snap_layer)
        self.feature_layer = snap_layer
        if self.knn_sign is None:
            self.knn_sign = "both"
        self._hessian_entry = self._check_hessian_entry(snap_layer)

    def _check_hessian_entry(self, snap_layer: str) -> dict[str, Any] | None:
        """The snapshot's ``H_last`` record when it stored the matrix (older or skipped versions: ``None``)."""
        entry = (self._feature_entry or {}).get(_HESSIAN_KEY)
        if not isinstance(entry, Mapping) or not entry.get("file"):
            return None
        assert self.snapshot is not None
        assert self._feature_entry is not None
        path = last_layer_hessian_file(self.snapshot, self._feature_entry)
        if path is None or not path.is_file():
            raise SnapshotNotFoundError(
                f"snapshot: features version {self.feature_version!r} lists the last-layer Hessian {path}, which does "
                "not exist; was the snapshot directory copied only in part?"
            )
        dim = (self._feature_entry or {}).get("dim")
        if entry.get("layer") != snap_layer or (dim is not None and int(entry.get("num_params", -1)) != int(dim)):
            raise SnapshotError(
                f"snapshot: the last-layer Hessian of version {self.feature_version!r} is over layer "
                f"{entry.get('layer')!r} ({entry.get('num_params')} parameters), but its features are the loss "
                f"gradients of layer {snap_layer!r} ({dim} numbers); the manifest is inconsistent"
            )
        return {**entry, "path": str(path)}

    def _load_checkpoints(self, which: Any) -> list[tuple[str, dict[str, Tensor]]]:
        if which is None:
            return []
        if self.snapshot is None:
            raise ValueError(
                f"checkpoints: {which!r} needs the snapshot directory of a CheckpointSnapshot; pass snapshot=<dirpath>"
            )
        accepted = "None, 'latest', 'all', a version name or position, or a list of those"
        items = list(which) if isinstance(which, (list, tuple)) else [which]
        if not items or not all(isinstance(w, (str, int)) and not isinstance(w, bool) for w in items):
            raise ValueError(f"checkpoints: expected {accepted}, got {which!r}")
        loaded = load_checkpoint(self.snapshot, which if not isinstance(which, tuple) else list(which))
        known = set(self.model.state_dict())
        out = []
        for weights, entry in loaded:
            unknown = sorted(set(weights) - known)
            if unknown:
                raise ValueError(
                    f"checkpoints: version {entry['version']!r} holds {unknown[:5]}, which {type(self.model).__name__} "
                    f"does not have; was the snapshot taken from another model? (its state has {sorted(known)[:5]} ...)"
                )
            out.append((str(entry["version"]), weights))
        versions = [v for v, _ in out]
        if len(set(versions)) != len(versions):
            raise ValueError(f"checkpoints: version listed twice in {versions}; each checkpoint is summed once")
        return out

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
                if m.training
                and (isinstance(m, nn.modules.batchnorm._BatchNorm) or (isinstance(m, _DROPOUT) and m.p > 0))
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
    def knn_index(self) -> KNNIndex:
        """The training set's kNN index from the snapshot (loaded on first use)."""
        if self._knn_cache is None:
            if self.snapshot is None:
                raise ValueError("snapshot: None; kNN candidates need a FeatureSnapshot directory")
            self._knn_cache = KNNIndex.from_snapshot(self.snapshot, dataset="train", version=self.feature_version)
        return self._knn_cache

    @property
    def knn_preconditioned(self) -> bool:
        """True when kNN queries are preconditioned by the snapshot's ``(H_last + λI)⁻¹``."""
        return self._hessian_entry is not None

    def _knn_lambda(self) -> float:
        return float(self.ihvp.damping) if self.knn_damping is None else self.knn_damping

    def _factor(self) -> tuple[float, str, tuple[Tensor, ...]]:
        """``(λ used, "cholesky" | "lu", factors)`` of ``H_last + λI`` in float64, computed once per λ."""
        requested = self._knn_lambda()
        if self._preconditioner is not None and self._preconditioner[0] == requested:
            return self._preconditioner
        assert self._hessian_entry is not None
        tensors = load_tensors(self._hessian_entry["path"])
        if _HESSIAN_KEY not in tensors:
            raise SnapshotError(f"snapshot: {self._hessian_entry['path']} holds no {_HESSIAN_KEY!r} tensor")
        h = tensors[_HESSIAN_KEY].double()
        scale = float(h.diagonal().abs().mean())
        lam = max(requested, KNN_DAMPING_FLOOR * (scale if scale > 0 else 1.0))
        a = h + lam * torch.eye(h.shape[0], dtype=h.dtype)
        factor, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            self._preconditioner = (requested, "cholesky", (factor,))
            return self._preconditioner
        # Not positive definite (a last layer whose Hessian is indefinite beyond λ): still (H + λI)⁻¹, by LU.
        lu, pivots, info = torch.linalg.lu_factor_ex(a)
        if int(info) != 0:
            raise ValueError(
                f"knn_damping: H_last + {lam:g}·I is singular (the snapshot's last-layer Hessian has an eigenvalue "
                f"-{lam:g}); choose another knn_damping"
            )
        self._preconditioner = (requested, "lu", (lu, pivots))
        return self._preconditioner

    def precondition_query(self, queries: Tensor) -> Tensor:
        """``(H_last + λI)⁻¹ g`` for each row ``g`` of ``queries`` (float32 on CPU); rows unchanged without ``H_last``.

        ``H_last`` is the Hessian of the mean training loss over the snapshot layer's parameters, stored by
        ``FeatureSnapshot(features="loss_gradient")``; λ is ``knn_damping`` (default ``ihvp.damping``), at least
        ``KNN_DAMPING_FLOOR · tr(H_last) / P``. The factorisation (float64 Cholesky, or LU when ``H_last + λI`` is
        not positive definite) is computed on first use and kept.

        Args:
            queries: ``[Q, P]`` (or ``[P]``) loss gradients of the snapshot layer's parameters.

        Raises:
            ValueError: ``queries`` do not have ``P`` columns.

        Example::

            >>> q = module.precondition_query(g_test)  # doctest: +SKIP
            >>> torch.testing.assert_close(q, torch.linalg.solve(h + lam * torch.eye(p), g_test.T).T)  # doctest: +SKIP
        """
        if self._hessian_entry is None:
            return queries.detach().float().cpu()
        _, kind, factors = self._factor()
        g = queries.detach().to("cpu", torch.float64)
        rows = g.unsqueeze(0) if g.dim() == 1 else g
        size = factors[0].shape[0]
        if rows.dim() != 2 or rows.shape[1] != size:
            raise ValueError(
                f"queries: expected [Q, {size}] loss gradients of layer {self._hessian_entry['layer']!r}, got "
                f"{list(queries.shape)}"
            )
        if kind == "cholesky":
            out = torch.cholesky_solve(rows.T, factors[0]).T
        else:
            out = torch.linalg.lu_solve(factors[0], factors[1], rows.T).T
        return (out[0] if g.dim() == 1 else out).float()

    @override
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_knn_cache"] = None  # a built FAISS index cannot be pickled; every process reloads it
        state["_preconditioner"] = None  # up to P² float64 numbers: cheaper to refactor than to send
        return state

    def _model_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        first = next(iter(select_parameters(self.model, self.params).values()))
        return first.dtype, first.device

    def _function(self) -> FunctionalLoss:
        return FunctionalLoss(self.model, self.loss_fn, self.params)

    def _progress_enabled(self) -> bool:
        trainer = self._trainer
        return bool(self.progress and trainer is not None and trainer.progress_bar_callback is not None and rank() == 0)

    def settings(self) -> dict[str, Any]:
        """Everything that changes the scores, as plain values (a resumed run must match them)."""
        pool = self.candidates_pool
        return jsonable(
            {
                "model": type(self.model).__name__,
                "weights_sha1": _weights_fingerprint(self.model),
                "loss_fn": getattr(self.loss_fn, "__qualname__", None) or "per_example_loss",
                "params": self.params,
                "num_train": len(self.train_data),
                "candidates_from": "train" if pool is None else f"pool:{pool.name}",
                "num_pool": None if pool is None else len(pool),
                "num_candidates": self.num_candidates,
                "snapshot": None if self.snapshot is None else os.path.abspath(self.snapshot),
                "feature_version": self.feature_version,
                "feature_layer": self.feature_layer,
                "feature_hook": self.feature_hook if self.feature_layer is not None else None,
                "knn_query": self.knn_query,
                "feature_kind": self.feature_kind,
                "knn_sign": self.knn_sign,
                "knn_preconditioner": (
                    {"hessian_params": self._hessian_entry["num_params"], "damping": self._knn_lambda()}
                    if self._hessian_entry is not None
                    else None
                ),
                "checkpoints": [v for v, _ in self._checkpoints] or None,
                "ihvp": {"estimator": self.ihvp.name, **self.ihvp.settings()},
                "score_method": self.score_method,
            }
        )

    # ----------------------------------------------------------------------------------------------- public API
    @property
    def result(self) -> InfluenceResult:
        """The merged result of the last ``trainer.predict`` (rank 0; under ``ddp_spawn`` load it from disk).

        Raises:
            RuntimeError: before a predict run, or on a rank that does not hold it.
        """
        if self._result is None:
            raise RuntimeError(
                "result: no result here; run trainer.predict(module, test_loader) first. Only rank 0 holds it; under "
                "strategy='ddp_spawn' the processes that computed it are gone: pass output_dir and read it with "
                "InfluenceResult.load(output_dir)"
            )
        return self._result

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
        ``parallel="repeats"`` inside an initialised process group, the repeats and candidates are split across
        ranks and **every rank must call it with the same batch**; otherwise it is local.

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

        Example::

            >>> out = module.score_batch(anchor_batch, combine=True)  # doctest: +SKIP
            >>> out.top_helpful(0, 10).indices  # the 10 most helpful training points for the anchors  # doctest: +SKIP
        """
        pool = candidates_pool if candidates_pool is not None else self.candidates_pool
        if pool is not None and not isinstance(pool, CandidatePool):
            raise TypeError(f"candidates_pool: expected None or a CandidatePool, got {type(pool).__name__}")
        if num_candidates is None:
            k = self.num_candidates
        elif num_candidates == "all":
            k = None
        else:
            k = num_candidates
        if k is not None:
            k = self._check_num_candidates(k, pool)
        split = self.parallel == "repeats" and world_size() > 1
        return self._compute(batch, combine=bool(combine), num_candidates=k, pool=pool, split=split)

    @override
    def forward(self, batch: Batch) -> BatchInfluence:
        """Same as :meth:`score_batch` with the module's settings."""
        return self.score_batch(batch)

    # ----------------------------------------------------------------------------------------------- computation
    @contextlib.contextmanager
    def _restored_weights(self) -> Iterator[None]:
        """Checkpoint weights are loaded into the model in turn; the live weights come back afterwards."""
        if not self._checkpoints:
            yield
            return
        touched = set().union(*(set(w) for _, w in self._checkpoints))
        state = self.model.state_dict()
        saved = {k: state[k].detach().clone() for k in touched}
        try:
            yield
        finally:
            apply_checkpoint(self.model, saved)

    def _weight_states(self) -> list[tuple[str, dict[str, Tensor] | None]]:
        return list(self._checkpoints) if self._checkpoints else [("live", None)]

    def _check_loss(self, function: FunctionalLoss, batch: Batch) -> None:
        try:
            function.losses(batch)
        except Exception as err:
            raise ValueError(
                f"batch: the loss function cannot take this test batch {_describe(batch)} "
                f"({type(err).__name__}: {err}); test batches must have the structure of the training batches, "
                "labels included (e.g. (x, y) or a dict with 'labels'), as loss_fn(model, batch) expects"
            ) from err

    def _query_features(self, batch: Batch) -> Tensor:
        if self._feature_checkpoint is not None:
            apply_checkpoint(self.model, self._checkpoints[self._feature_checkpoint][1])
        if self.feature_kind == "loss_gradient":
            # The gradient of the influence loss itself: the query lives where g_test does; (H_last + λI)⁻¹ then
            # turns <q, g_train> into the last layer's share of the influence score.
            g_test = features_of_batch(
                self.model, batch, layer=self.feature_layer, kind="loss_gradient", loss_fn=self.loss_fn
            )
            return self.precondition_query(g_test)
        return features_of_batch(self.model, batch, layer=self.feature_layer, hook=self.feature_hook)

    def _candidates(
        self,
        batch: Batch,
        rows: int,
        k: int,
        pool: CandidatePool | None,
        combine: bool,
        seconds: dict[str, float],
        memory: dict[str, dict[str, Any]],
    ) -> Tensor:
        start = time.perf_counter()
        with measure_stage("features", memory):
            feats = self._query_features(batch)
            queries = feats.mean(0, keepdim=True) if combine or self.knn_query == "mean" else feats
        seconds["features"] += time.perf_counter() - start
        start = time.perf_counter()
        index = pool.index if pool is not None else self.knn_index
        assert index is not None
        queries = queries.detach().float().cpu()
        with measure_stage("knn", memory):
            if self.feature_kind == "loss_gradient" and index.metric != "l2":
                _, ids = index.search_signed(queries, k, _SEARCH_SIGN[self.knn_sign or "both"])
            else:
                _, ids = index.search(queries, k)
        seconds["knn"] += time.perf_counter() - start
        if bool((ids < 0).any()):
            raise RuntimeError(
                f"num_candidates: the approximate (IVF) index found fewer than {k} neighbours in its probed lists; "
                f"raise its nprobe (now {index.nprobe}) or lower num_candidates"
            )
        return ids.expand(rows, ids.shape[1]).contiguous() if ids.shape[0] != rows else ids

    def _solve(self, operator: HessianOperator, g_test: Tensor, split: bool) -> tuple[Tensor, dict[str, Any]]:
        est = self.ihvp
        if not split:
            s_test = est.solve(operator, g_test)
            return s_test, dict(est.diagnostics)
        world, me = world_size(), rank()
        residual_examples = est.residual_examples
        est.residual_examples = 0  # measured once below, on the combined estimate
        error: BaseException | None = None
        partial = torch.zeros(g_test.shape, dtype=operator.dtype, device=operator.device)
        diag: dict[str, Any] = {"estimator": est.name, **est.settings()}
        try:
            if isinstance(est, LiSSA):
                mine = list(range(me, est.num_repeats, world))
                diag["repeats"] = mine
                if mine:
                    partial = est.solve(operator, g_test, repeats=mine) * len(mine)
                    diag = dict(est.diagnostics)
            elif me == 0:
                # A deterministic solver: rank 0 solves, the others receive its answer through the same all-reduce.
                partial = est.solve(operator, g_test)
                diag = dict(est.diagnostics)
        except Exception as err:  # raised below on every rank together, so none waits in the all-reduce
            error = err
        finally:
            est.residual_examples = residual_examples
        _fail_together(error, "the inverse-HVP solve")
        s_test = all_reduce_sum(partial)
        if isinstance(est, LiSSA):
            s_test = s_test / est.num_repeats
        diag["world_size"] = world
        if residual_examples != 0 and me == 0:
            v = g_test.to(operator.device, operator.dtype)
            diag["residual"] = float(
                relative_residual(operator, s_test, v, est.damping, num_examples=residual_examples).max()
            )
        return s_test, diag

    def _score_columns(
        self,
        function: FunctionalLoss,
        data: IndexedData,
        s_test: Tensor,
        candidates: Tensor | None,
        lo: int,
        hi: int,
    ) -> Tensor:
        rows = s_test.shape[0]
        bar = None
        if self._progress_enabled() and hi > lo:
            from tqdm.auto import tqdm

            bar = tqdm(total=(hi - lo) * rows, desc="fastif: candidates", leave=False, unit="pair")
        use_grads = self.score_method == "grads" or (
            candidates is None and self.score_method == "auto" and rows >= GRADS_MIN_TEST_POINTS
        )
        parts = []
        try:
            chunk_size = self._chunk or self.batch_size
            for start in range(lo, hi, chunk_size):
                stop = min(hi, start + chunk_size)
                if candidates is None:
                    chunk = data.gather(torch.arange(start, stop))
                    if use_grads:
                        parts.append(s_test @ function.per_example_gradients(chunk).T.to(s_test.dtype))
                    else:
                        parts.append(function.directional_derivatives(chunk, s_test))
                else:
                    parts.append(
                        score_candidates(
                            function,
                            data,
                            s_test,
                            candidates[:, start:stop],
                            batch_size=chunk_size,
                            method="grads" if use_grads else "jvp",
                        )
                    )
                if bar is not None:
                    bar.update((stop - start) * rows)
        finally:
            if bar is not None:
                bar.close()
        if not parts:
            return s_test.new_zeros(rows, 0)
        return torch.cat(parts, dim=1)

    def _memory_plan(self, function: FunctionalLoss, rows: int, knn: bool) -> Any:
        """Chunk sizes for this test batch from ``max_memory`` and the measured cost of one training example."""
        if self._example_cost is None:
            self._example_cost = measure_example_cost(function, self.train_data)
        return plan_chunks(self._example_cost, self.max_memory, num_vectors=rows, score_directions=1 if knn else rows)

    def _score(
        self, function: FunctionalLoss, data: IndexedData, s_test: Tensor, candidates: Tensor | None, split: bool
    ) -> Tensor:
        width = len(data) if candidates is None else candidates.shape[1]
        if not split:
            return self._score_columns(function, data, s_test, candidates, 0, width)
        world, me = world_size(), rank()
        bounds = [width * r // world for r in range(world + 1)]
        lo, hi = bounds[me], bounds[me + 1]
        error: BaseException | None = None
        part = s_test.new_zeros(s_test.shape[0], 0)
        try:
            part = self._score_columns(function, data, s_test, candidates, lo, hi)
        except Exception as err:  # raised below on every rank together
            error = err
        _fail_together(error, "scoring the candidates")
        columns = gather_uneven(torch.arange(lo, hi, device=s_test.device))
        ordered = columns.sort().values
        if ordered.numel() != width or not torch.equal(ordered.cpu(), torch.arange(width)):
            counts = torch.bincount(columns.cpu(), minlength=width)
            raise RuntimeError(
                f"parallel='repeats': candidate columns were not scored exactly once across {world} ranks "
                f"(duplicates at {(counts > 1).nonzero().reshape(-1)[:10].tolist()}, missing at "
                f"{(counts == 0).nonzero().reshape(-1)[:10].tolist()})"
            )
        gathered = gather_uneven(part.T.contiguous()).T  # [rows, width], columns in rank order
        return gathered[:, columns.argsort()]

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
        seconds = dict.fromkeys(STAGES, 0.0)
        memory: dict[str, dict[str, Any]] = {}  # peak memory per stage (memory.measure_stage)
        data = pool.data if pool is not None else self.train_data
        # no_grad: torch.func transforms and the HVPs manage their own graphs; parameters outside `params` that
        # require grad would otherwise tie every gradient to a graph nobody uses.
        with torch.inference_mode(False), torch.no_grad(), evaluating(self.model), self._restored_weights():
            dtype, device = self._model_dtype_device()
            batch = _normal_tensors(move_batch(batch, device, dtype))
            size = batch_size_of(batch)
            rows = 1 if combine else size
            function = self._function()
            self._check_loss(function, batch)
            candidates = None
            if num_candidates is not None:
                candidates = self._candidates(batch, rows, num_candidates, pool, combine, seconds, memory)
            total: Tensor | None = None
            diagnostics = []
            for version, weights in self._weight_states():
                if weights is not None:
                    apply_checkpoint(self.model, weights)
                function = self._function()
                hessian_chunk = self.hessian_batch_size
                if self.max_memory is not None:
                    plan = self._memory_plan(function, rows, candidates is not None)
                    hessian_chunk, self._chunk = plan.hessian_chunk, plan.score_chunk
                    memory["plan"] = plan.as_dict()
                operator = HessianOperator(
                    self.model, None, self.train_data, batch_size=hessian_chunk, function=function
                )
                start = time.perf_counter()
                with measure_stage("test_gradients", memory, device=device):
                    g_test = function.per_example_gradients(batch)
                    if combine:
                        g_test = g_test.mean(0, keepdim=True)
                seconds["test_gradients"] += time.perf_counter() - start
                start = time.perf_counter()
                with measure_stage("s_test", memory, device=device):
                    s_test, diag = self._solve(operator, g_test, split)
                seconds["s_test"] += time.perf_counter() - start
                start = time.perf_counter()
                with measure_stage("scoring", memory, device=device):
                    scores = self._score(function, data, s_test, candidates, split)
                seconds["scoring"] += time.perf_counter() - start
                total = scores if total is None else total + scores
                diagnostics.append({"checkpoint": version, **diag})
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
                    "seconds": seconds,
                    "memory": memory,
                    "ihvp": diagnostics,
                }
            ),
            test_indices=None if test_indices is None else test_indices.detach().cpu().long(),
        )

    # -------------------------------------------------------------------------------------------- Lightning hooks
    @override
    def setup(self, stage: str) -> None:
        if stage != "predict":
            return
        output = None if self.output_dir is None else os.path.abspath(self.output_dir)
        # Every rank writes into rank 0's directory (Hydra may give each rank its own working directory).
        self._output = self.trainer.strategy.broadcast(output)

    @override
    def on_predict_start(self) -> None:
        self._result = None
        self._local, self._shard_keys, self._pending, self._offsets = [], [], [], {}
        self.computed_batches = self.skipped_batches = 0
        loaders = self.trainer.predict_dataloaders
        if isinstance(loaders, (list, tuple)) and len(loaders) != 1:
            raise ValueError(
                f"dataloaders: InfluenceModule scores one test set per trainer.predict call, got {len(loaders)} "
                "loaders; call trainer.predict once per test set (with its own output_dir)"
            )
        self._settings = self.settings()
        if world_size() > 1 and self._output is None and "spawn" in type(self.trainer.strategy).__name__.lower():
            rank_zero_warn(
                "output_dir: None under a spawning strategy; the merged result lives in the spawned rank 0 only. Pass "
                "output_dir and read it with InfluenceResult.load(output_dir)"
            )
        if self._output is not None:
            error = None
            if self.trainer.is_global_zero:
                try:
                    self._start_output_dir(self._output)
                except Exception as err:  # re-raised on every rank below, so none waits in a collective
                    error = f"{type(err).__name__}: {err}"
            error = broadcast_object(error)
            if error is not None:
                raise ValueError(error)
        barrier()
        # After the barrier, so the wall clock in the manifest leaves out the ranks' start-up skew.
        self._started = time.perf_counter()

    def _start_output_dir(self, output: str) -> None:
        if manifest_path(output).exists():
            manifest = read_manifest(output)
            if manifest.get("format") != RESULT_FORMAT:
                raise ValueError(
                    f"output_dir: {output} holds a manifest of format {manifest.get('format')!r}, not an influence "
                    "run; use an empty directory"
                )
            before = manifest.get("settings", {})
            if before != self._settings:
                changed = sorted(k for k in set(before) | set(self._settings) if before.get(k) != self._settings.get(k))
                raise ValueError(
                    f"output_dir: {output} holds a run with other settings (differing: {changed}); its shards cannot "
                    "be reused. Use another output_dir or delete this one"
                )
            return
        Path(output, SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        write_manifest(
            output,
            {
                "format": RESULT_FORMAT,
                "format_version": RESULT_FORMAT_VERSION,
                "status": "running",
                "settings": self._settings,
            },
        )

    def _global_indices(self, batch: Batch, batch_idx: int, dataloader_idx: int) -> Tensor:
        """Test-dataset indices of this batch, from the index-recording batch sampler Lightning uses in predict."""
        size = batch_size_of(batch)
        loaders = self.trainer.predict_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        seen = getattr(getattr(loader, "batch_sampler", None), "seen_batch_indices", None)
        if seen is not None and batch_idx < len(seen) and len(seen[batch_idx]) == size:
            return torch.as_tensor(seen[batch_idx], dtype=torch.long)
        if world_size() > 1:
            raise ValueError(
                f"dataloaders: cannot tell which test points batch {batch_idx} holds (a {type(loader).__name__}, not "
                "a DataLoader over a map-style dataset); under DDP the test data must be such a DataLoader"
            )
        offset = self._offsets.get(dataloader_idx, 0)
        self._offsets[dataloader_idx] = offset + size
        return torch.arange(offset, offset + size)

    @override
    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> BatchInfluence | Tensor:
        indices = self._global_indices(batch, batch_idx, dataloader_idx)
        if self.parallel == "repeats":
            # Computed in on_predict_epoch_end, where every rank can take part in each batch's collectives.
            self._pending.append(indices)
            return indices
        return self._process(batch, indices, split=False)

    def _shard_path(self, key: tuple[int, int]) -> Path:
        assert self._output is not None
        return Path(self._output) / SHARDS_DIR / _shard_name(*key)

    def _read_shard(self, path: Path, expected: Tensor) -> BatchInfluence:
        tensors = load_tensors(path)
        meta = read_tensor_metadata(path)
        if not torch.equal(tensors["test_indices"], expected.cpu().long()):
            raise SnapshotError(f"shard {path} holds other test points than its name says; delete it and run again")
        return BatchInfluence(
            candidates=tensors["candidate_indices"],
            scores=tensors["scores"],
            diagnostics=json.loads(meta.get("diagnostics", "{}")),
            test_indices=tensors["test_indices"],
        )

    def _write_shard(self, path: Path, out: BatchInfluence) -> None:
        assert out.test_indices is not None
        save_tensors(
            path,
            {"test_indices": out.test_indices, "candidate_indices": out.candidates, "scores": out.scores},
            {"format": _SHARD_FORMAT, "diagnostics": json.dumps(out.diagnostics)},
        )

    def _process(self, batch: Batch | None, indices: Tensor, split: bool, fetch: Any = None) -> BatchInfluence:
        """One batch of test points: read its shard when finished earlier, else compute (and write) it."""
        key = _shard_key(indices)
        path = self._shard_path(key) if self._output is not None else None
        exists = path is not None and path.exists()
        if split:
            exists = broadcast_object(exists)  # rank 0 decides, so every rank takes the same branch
        if exists:
            assert path is not None
            out = self._read_shard(path, indices)
            self.skipped_batches += 1
        else:
            if batch is None:
                batch = fetch()
            out = self._compute(
                batch,
                combine=False,
                num_candidates=self.num_candidates,
                pool=self.candidates_pool,
                split=split,
                test_indices=indices,
            )
            if path is not None and (not split or rank() == 0):
                self._write_shard(path, out)
            self.computed_batches += 1
            self._log_batch(out)
        self._shard_keys.append(key)
        self._local.append(out)
        return out

    def _log_batch(self, out: BatchInfluence) -> None:
        trainer = self._trainer
        if trainer is None or not trainer.loggers:
            return
        metrics = {f"fastif/time_{stage}": float(s) for stage, s in out.diagnostics["seconds"].items()}
        for stage, record in out.diagnostics.get("memory", {}).items():
            if isinstance(record.get("cpu_peak_bytes"), (int, float)):
                metrics[f"fastif/peak_bytes_{stage}"] = float(record["cpu_peak_bytes"])
            if isinstance(record.get("cuda_peak_bytes"), (int, float)):
                metrics[f"fastif/cuda_peak_bytes_{stage}"] = float(record["cuda_peak_bytes"])
        diags = out.diagnostics["ihvp"]
        residuals = [d["residual"] for d in diags if isinstance(d.get("residual"), (int, float))]
        if residuals:
            metrics["fastif/ihvp_residual"] = max(residuals)
        iterations = [d.get("iterations") for d in diags]
        flat = [i for it in iterations for i in (it if isinstance(it, list) else [it]) if isinstance(i, (int, float))]
        if flat:
            metrics["fastif/ihvp_iterations"] = sum(flat) / len(flat)
        scales = [d["scale"] for d in diags if isinstance(d.get("scale"), (int, float))]
        if scales:
            metrics["fastif/ihvp_scale"] = max(scales)
        # self.log is not allowed in predict: write to the loggers directly (they write on rank 0 only).
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self._log_step)
        self._log_step += 1

    @override
    def on_predict_epoch_end(self) -> None:
        if self.parallel != "repeats":
            return
        local = torch.cat(self._pending) if self._pending else torch.zeros(0, dtype=torch.long)
        everything = gather_uneven(local).sort().values
        if bool((everything[1:] == everything[:-1]).any()):
            raise RuntimeError("parallel='repeats': the Trainer gave a test point to more than one rank")
        loaders = self.trainer.predict_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        try:
            test_data = IndexedData(loader, name="dataloaders")
        except TypeError as err:
            raise ValueError(
                f"parallel='repeats' needs the test data as a DataLoader over a map-style dataset ({err})"
            ) from err
        chunk = int(getattr(loader, "batch_size", None) or self.batch_size)
        for start in range(0, everything.numel(), chunk):
            indices = everything[start : start + chunk]
            self._process(None, indices, split=True, fetch=lambda idx=indices: test_data.gather(idx))

    @override
    def on_predict_end(self) -> None:
        error, result = None, None
        if self._output is not None:
            if self.parallel == "repeats":
                keys = torch.tensor(self._shard_keys if rank() == 0 else [], dtype=torch.long).reshape(-1, 2)
            else:
                keys = torch.tensor(self._shard_keys, dtype=torch.long).reshape(-1, 2)
            keys = gather_uneven(keys)
            if self.trainer.is_global_zero:
                try:
                    result = self._merge_shards([(int(a), int(b)) for a, b in keys.tolist()])
                    result.save(self._output)
                except Exception as err:  # re-raised on every rank below
                    error = f"{type(err).__name__}: {err}"
        else:
            parts = self._local if (self.parallel == "test" or rank() == 0) else []
            result, error = self._gather_in_memory(parts)
        error = broadcast_object(error)
        if error is not None:
            raise RuntimeError(f"InfluenceModule: merging the results failed: {error}")
        self._result = result
        barrier()

    def _manifest(self, parts: list[BatchInfluence]) -> dict[str, Any]:
        batches = sorted(
            (
                {"first_test_index": int(p.test_indices[0]), **p.diagnostics}
                for p in parts
                if p.test_indices is not None
            ),
            key=lambda d: d["first_test_index"],
        )
        totals = {stage: sum(float(b["seconds"].get(stage, 0.0)) for b in batches) for stage in STAGES}
        return {
            "format": RESULT_FORMAT,
            "format_version": RESULT_FORMAT_VERSION,
            "settings": self._settings or self.settings(),
            "top_k": self.top_k,
            "parallel": self.parallel,
            "world_size": world_size(),
            # rank 0's wall clock from on_predict_start to the merge: the parallel run time, without process start-up
            "wall_seconds": time.perf_counter() - self._started if self._started is not None else None,
            "timings": {
                "total_seconds": totals,
                "per_batch": [
                    {
                        "first_test_index": b["first_test_index"],
                        "num_test": b["num_test"],
                        "seconds": b["seconds"],
                        "memory": b.get("memory", {}),
                    }
                    for b in batches
                ],
            },
            "ihvp": [{"first_test_index": b["first_test_index"], "diagnostics": b["ihvp"]} for b in batches],
        }

    def _merge_shards(self, keys: list[tuple[int, int]]) -> InfluenceResult:
        if len(set(keys)) != len(keys):
            raise ValueError("shards: a batch of test points was scored twice (the same shard listed twice)")
        parts = []
        for key in keys:
            path = self._shard_path(key)
            tensors = load_tensors(path)
            parts.append(
                BatchInfluence(
                    tensors["candidate_indices"],
                    tensors["scores"],
                    json.loads(read_tensor_metadata(path).get("diagnostics", "{}")),
                    tensors["test_indices"],
                )
            )
        return self._to_result(parts)

    def _to_result(self, parts: list[BatchInfluence]) -> InfluenceResult:
        if not parts:
            raise ValueError("dataloaders: no test point was scored (an empty test set?)")
        return InfluenceResult.merge(
            [InfluenceResult(p.test_indices, p.candidates, p.scores) for p in parts], self._manifest(parts)
        )

    def _gather_in_memory(self, parts: list[BatchInfluence]) -> tuple[InfluenceResult | None, str | None]:
        if world_size() == 1:
            try:
                return self._to_result(parts), None
            except Exception as err:
                return None, f"{type(err).__name__}: {err}"
        empty = torch.zeros(0, dtype=torch.long)
        tests = gather_uneven(torch.cat([p.test_indices for p in parts]) if parts else empty)
        cands = gather_uneven(torch.cat([p.candidates for p in parts]) if parts else empty)
        scores = gather_uneven(torch.cat([p.scores for p in parts]) if parts else torch.zeros(0))
        diags = _gather_json([(int(p.test_indices[0]), p.diagnostics) for p in parts])
        if rank() != 0:
            return None, None
        try:
            manifest = self._manifest(
                [
                    BatchInfluence(torch.zeros(0, 0), torch.zeros(0, 0), d, torch.tensor([t]))
                    for r in diags
                    for t, d in r
                ]
            )
            return InfluenceResult(tests, cands, scores, manifest), None
        except Exception as err:
            return None, f"{type(err).__name__}: {err}"
