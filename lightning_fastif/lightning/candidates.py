"""Where the candidates of a test point come from: a :class:`CandidatePool`, and how queries meet the kNN index.

:func:`resolve_query_source` reads a ``FeatureSnapshot``'s manifest once, at construction, and says how test points
are embedded so that their queries live in the index's feature space: which snapshot version, which layer and hook,
activations or loss gradients, which search direction (``knn_sign``), and whether a last-layer Hessian preconditions
the queries. Every mismatch between the snapshot, the model and the training set is raised there, before any work.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_fastif.core.batches import Batch, IndexedData
from lightning_fastif.core.curvature import KFACFactors
from lightning_fastif.core.grads import LossFn
from lightning_fastif.errors import ArgumentError, SnapshotError, SnapshotNotFoundError
from lightning_fastif.io.atomic import PathLike
from lightning_fastif.io.snapshot_store import LAST_LAYER_HESSIAN, last_layer_hessian_file, resolve_version
from lightning_fastif.lightning.arguments import SearchArguments
from lightning_fastif.search.features import check_kind, features_of_batch, has_features_method, resolve_layer
from lightning_fastif.search.knn import KNNIndex, Sign
from lightning_fastif.search.preconditioner import QueryPreconditioner

__all__ = [
    "CandidatePool",
    "QuerySource",
    "check_num_candidates",
    "embed_pool",
    "layer_block",
    "resolve_query_source",
]

_SEARCH_SIGN: dict[str, Sign] = {"both": "both", "helpful": "positive", "harmful": "negative"}
HESSIAN_ENTRY = LAST_LAYER_HESSIAN
"""FeatureSnapshot's manifest key of ``H_last`` in a features version."""


@dataclass
class CandidatePool:
    """A dataset the candidates come from instead of the training set (FastIF's data augmentation).

    The Hessian stays the training set's; only the scored candidates change. With kNN candidates the pool needs
    an ``index`` over its features (in the same feature space as the test features): take it from a
    ``FeatureSnapshot(datasets={"pool": pool_dataset})`` with :meth:`from_snapshot`, which also records the
    snapshot and version, so that queries are made as that version's features were: activations of its layer, or
    loss gradients (preconditioned by its ``H_last`` when stored, searched towards helpful and harmful pool
    examples). Candidate indices in the results then index the pool dataset, and the results' settings and
    diagnostics say ``candidates_from="pool:<name>"``.

    Args:
        dataset: a map-style dataset (or a ``DataLoader`` over one, whose ``collate_fn`` is used).
        index: a :class:`~lightning_fastif.KNNIndex` whose ids are dataset indices of the pool (``None``: only
            ``num_candidates=None`` works, every pool example is a candidate). An index built by hand is queried
            with the influence module's own query source (the training snapshot's features).
        name: recorded in the results' settings; the dataset's name in the snapshot for :meth:`from_snapshot`.
        snapshot: the ``FeatureSnapshot`` directory the index comes from (set by :meth:`from_snapshot`).
        version: its features version (set by :meth:`from_snapshot`).

    Raises:
        ArgumentError: ``index`` is not a ``KNNIndex``, or its ids do not fit the dataset.

    Example::

        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> pool = CandidatePool(TensorDataset(torch.randn(5, 2), torch.zeros(5)))
        >>> len(pool)
        5
    """

    dataset: Any
    index: KNNIndex | None = None
    name: str = "pool"
    snapshot: str | None = None
    version: str | None = None
    data: IndexedData = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.data = IndexedData(self.dataset, name="candidates_pool.dataset")
        if self.index is not None:
            if not isinstance(self.index, KNNIndex):
                raise ArgumentError(
                    f"candidates_pool.index: expected a KNNIndex or None, got {type(self.index).__name__}"
                )
            ids = self.index.ids
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self.data)):
                raise ArgumentError(
                    f"candidates_pool.index: expected ids in 0..{len(self.data) - 1} (the pool dataset's "
                    f"{len(self.data)} examples), got ids {int(ids.min())}..{int(ids.max())}; was it built for another "
                    "dataset?"
                )

    def __len__(self) -> int:
        return len(self.data)

    @classmethod
    def from_snapshot(
        cls, dataset: Any, snapshot: PathLike, name: str = "pool", version: str | int | None = None, **knn: Any
    ) -> CandidatePool:
        """A pool whose kNN index is the snapshot's features of dataset ``name`` (``FeatureSnapshot(datasets=...)``).

        Args:
            dataset: the pool dataset, in the order the snapshot embedded it.
            snapshot: the ``FeatureSnapshot`` directory.
            name: the pool's name in ``FeatureSnapshot(datasets={name: dataset})``.
            version: the features version (``None``: the latest).
            **knn: overrides passed to :meth:`KNNIndex.load` (``nprobe``, ``use_gpu``, ...).

        Raises:
            SnapshotNotFoundError: the snapshot or version is missing, or the version holds no features of ``name``
                (the message names ``name`` and the datasets it holds).
            ValueError: the snapshot's features were built for a dataset of another size.

        Example::

            >>> pool = CandidatePool.from_snapshot(pool_data, "runs/fastif_snapshot", name="pool")  # doctest: +SKIP
        """
        try:
            entry = resolve_version(snapshot, "features", version)
        except SnapshotNotFoundError as err:
            raise SnapshotNotFoundError(f"snapshot: {err}; was it written by FeatureSnapshot?") from err
        held = sorted(entry.get("datasets", {}))
        if name not in held:
            raise SnapshotNotFoundError(
                f"name: expected a dataset the features version {entry['version']!r} of {snapshot} holds, one of "
                f"{held}, got {name!r}; embed the pool with FeatureSnapshot(datasets={{{name!r}: pool_dataset}})"
            )
        index = KNNIndex.from_snapshot(snapshot, dataset=name, version=entry["version"], **knn)
        size = len(IndexedData(dataset, name="candidates_pool.dataset"))
        if index.ntotal != size:
            raise ValueError(
                f"candidates_pool: the snapshot's features of {name!r} hold {index.ntotal} examples, but the pool "
                f"dataset has {size}; embed this pool with FeatureSnapshot(datasets={{{name!r}: ...}})"
            )
        return cls(dataset, index, name, os.path.abspath(snapshot), str(entry["version"]))


def embed_pool(influence: Any, dataset: Any, name: str = "pool") -> CandidatePool:
    """A pool indexed by its features under the influence module's current weights, made as the module's snapshot
    features were: the same layer and hook, activations or loss gradients, the same metric (loss gradients are then
    searched towards helpful and harmful pool examples alike). For a pool no ``FeatureSnapshot`` embedded.

    Args:
        influence: an :class:`~lightning_fastif.InfluenceModule` with kNN candidates from a snapshot.
        dataset: the pool dataset.
        name: recorded in the results' settings.

    Returns:
        A :class:`CandidatePool` whose index ids are the dataset's indices.

    Example::

        >>> pool = embed_pool(influence, pool_dataset)  # doctest: +SKIP
    """
    from lightning_fastif.search.features import extract_features

    search, kind = influence.search, influence.feature_kind
    feats = extract_features(
        influence.model,
        dataset,
        layer=search.feature_layer,
        hook=search.feature_hook or "output",
        kind=kind,
        loss_fn=influence.loss_fn,
    )
    return CandidatePool(dataset, KNNIndex(feats, metric=influence.knn_index.metric), name)


def check_num_candidates(
    num_candidates: Any, pool: CandidatePool | None, num_train: int, snapshot: str | None
) -> int | None:
    """``num_candidates`` if the candidates can be found: at most all of them, and a kNN index to search.

    Args:
        num_candidates: ``None`` (every candidate) or the ``k`` nearest.
        pool: the candidate pool, or ``None`` for the training set.
        num_train: the training set's size.
        snapshot: the snapshot directory whose index the training set's candidates come from.

    Raises:
        ArgumentError: ``num_candidates`` is not ``None`` or an integer in ``1..`` the number of candidates, or there
            is no index to search (no snapshot, a pool without one).

    Example::

        >>> check_num_candidates(5, None, 60, "runs/snapshot")
        5
    """
    total = len(pool) if pool is not None else num_train
    where = "the candidate pool" if pool is not None else "the training set"
    if num_candidates is None:
        return None
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or not 1 <= num_candidates <= total:
        raise ArgumentError(
            f"num_candidates: expected None (all of {where}) or an integer in 1..{total} ({where} has {total} "
            f"examples), got {num_candidates!r}"
        )
    if snapshot is None and pool is None:
        raise ArgumentError(
            f"snapshot: expected the dirpath of a FeatureSnapshot, whose kNN index num_candidates={num_candidates} "
            "needs (or pass num_candidates=None to score every training point), got None"
        )
    if pool is not None and pool.index is None:
        raise ArgumentError(
            f"num_candidates: expected None (all {total} pool examples), since candidates_pool has no kNN index "
            f"(build it with CandidatePool.from_snapshot), got {num_candidates}"
        )
    return num_candidates


class QuerySource:
    """How test points query the kNN index, resolved against the snapshot by :func:`resolve_query_source`.

    Args:
        search: the :class:`~lightning_fastif.SearchArguments` with ``feature_version``, ``feature_layer``,
            ``feature_hook`` and ``knn_sign`` as they apply (the snapshot's version name, its layer and hook,
            ``"both"`` for loss gradients).
        snapshot: the snapshot directory whose ``train`` features are the index (``None``: none; a
            :class:`CandidatePool` brings its own).
        kind: ``"activations"`` or ``"loss_gradient"`` (the snapshot's features).
        preconditioner: ``(H_last + λI)⁻¹`` when the snapshot stored ``H_last``, else ``None``.
        hessian_params: ``P``, the size of ``H_last`` (``None`` without it).
        hessian_names: the parameters ``H_last`` is over, in the order of the features' columns.

    Attributes:
        preconditioner: the preconditioner in use: the snapshot's, or the scores' own curvature
            (:meth:`use_scoring_factors`).
        scoring_curvature: what the queries are preconditioned with while the scores' curvature is in use, else
            ``None``.

    Example::

        >>> QuerySource(SearchArguments()).kind
        'activations'
    """

    def __init__(
        self,
        search: SearchArguments,
        snapshot: str | None = None,
        kind: str = "activations",
        preconditioner: QueryPreconditioner | None = None,
        hessian_params: int | None = None,
        hessian_names: list[str] | None = None,
    ) -> None:
        self.search, self.snapshot, self.kind = search, snapshot, kind
        self.preconditioner, self.hessian_params = preconditioner, hessian_params
        self.hessian_names = hessian_names
        self.snapshot_preconditioner = preconditioner
        self.scoring_curvature: str | None = None
        self._scoring: tuple[KFACFactors | None, QueryPreconditioner | None] = (None, None)
        self._index: KNNIndex | None = None

    def use_scoring_factors(self, factors: KFACFactors | None, label: str) -> bool:
        """Precondition the queries with the block of ``factors`` over the snapshot layer instead of ``H_last``.

        When the scores are ``g_testᵀ (G + λI)⁻¹ g_train`` with block-diagonal (EK-FAC) factors ``G``, the block of
        the snapshot layer turns ``<q, g_train>`` into exactly that layer's share of the score, where ``H_last`` (a
        Hessian, not the Fisher ``G`` approximates) ranks by another quantity. ``None``, or factors without a block
        over exactly ``hessian_names``, restores the snapshot's preconditioner. The block's preconditioner is built
        once per ``factors`` object.

        Args:
            factors: the factors the scores are computed with, or ``None``.
            label: recorded as :attr:`scoring_curvature` while the block is in use.

        Returns:
            Whether the queries are now preconditioned with the scores' curvature.
        """
        if factors is not self._scoring[0]:
            block = layer_block(factors, self.search.feature_layer, self.hessian_names)
            aligned = None if block is None else QueryPreconditioner(block, layer=self.search.feature_layer)
            self._scoring = (factors, aligned)
        aligned = self._scoring[1] if self.kind == "loss_gradient" else None
        self.preconditioner = self.snapshot_preconditioner if aligned is None else aligned
        self.scoring_curvature = None if aligned is None else label
        return aligned is not None

    @property
    def index(self) -> KNNIndex:
        """The training set's kNN index from the snapshot (loaded on first use; not pickled, a FAISS index cannot be).

        Raises:
            ArgumentError: there is no snapshot.
        """
        if self._index is None:
            if self.snapshot is None:
                raise ArgumentError("snapshot: expected a FeatureSnapshot directory for kNN candidates, got None")
            self._index = KNNIndex.from_snapshot(self.snapshot, dataset="train", version=self.search.feature_version)
        return self._index

    def precondition(self, queries: Tensor, damping: float) -> Tensor:
        """``(H_last + λI)⁻¹ g`` for each row of ``queries`` (float32, CPU); the rows unchanged without ``H_last``."""
        if self.preconditioner is None:
            return queries.detach().float().cpu()
        return self.preconditioner(queries, damping)

    def embed(self, model: nn.Module, batch: Batch, loss_fn: LossFn | None, damping: float) -> Tensor:
        """The queries of a batch: its features, or its (preconditioned) loss gradients over the snapshot layer."""
        layer = self.search.feature_layer
        if self.kind == "loss_gradient":
            # The gradient of the influence loss itself: the query lives where g_test does; (H_last + λI)⁻¹ then
            # turns <q, g_train> into the last layer's share of the influence score.
            g_test = features_of_batch(model, batch, layer=layer, kind="loss_gradient", loss_fn=loss_fn)
            return self.precondition(g_test, damping)
        return features_of_batch(model, batch, layer=layer, hook=self.search.feature_hook)

    def nearest(self, index: KNNIndex, queries: Tensor, k: int, *, progress: bool = False) -> Tensor:
        """``[Q, k]`` (or ``[Q, 2k]`` for ``knn_sign="both"``) candidate ids of each query, nearest first.

        Args:
            index: the index searched (built here at its first search).
            queries: ``[Q, D]`` query features.
            k: neighbours per direction.
            progress: show a bar while the index is built (an IVF index is trained and tuned at its first search).

        Raises:
            RuntimeError: an approximate (IVF) index found fewer than ``k`` neighbours.
        """
        queries = queries.detach().float().cpu()
        index.build(progress="fastif: kNN index" if progress else False)
        if self.kind == "loss_gradient" and index.metric != "l2":
            _, ids = index.search_signed(queries, k, _SEARCH_SIGN[self.search.knn_sign or "both"])
        else:
            _, ids = index.search(queries, k)
        if bool((ids < 0).any()):
            raise RuntimeError(
                f"num_candidates: the approximate (IVF) index found fewer than {k} neighbours in its probed lists; "
                f"raise its nprobe (now {index.nprobe}) or lower num_candidates"
            )
        return ids

    def __getstate__(self) -> dict[str, Any]:
        # Every process reloads the index and takes up the scores' factors again (InfluenceModule offers them).
        restored = {"preconditioner": self.snapshot_preconditioner, "scoring_curvature": None}
        return {**self.__dict__, **restored, "_index": None, "_scoring": (None, None)}


def layer_block(factors: KFACFactors | None, layer: str | None, names: list[str] | None) -> KFACFactors | None:
    """The block of ``factors`` over one layer: its parameters ``names`` (in that order), or ``None`` when the
    factors do not hold exactly that block.

    Example::

        >>> layer_block(None, "net.4", ["net.4.weight", "net.4.bias"]) is None
        True
    """
    if factors is None or layer is None or names is None:
        return None
    for item in factors.layers:
        own = [item.spec.weight] + ([item.spec.bias] if item.spec.bias is not None else [])
        if item.spec.name == layer and own == list(names):
            shapes = [factors.shapes[factors.names.index(name)] for name in own]
            return KFACFactors(own, shapes, [item], {}, {}, factors.num_examples)
    return None


def resolve_query_source(
    model: nn.Module,
    snapshot: str | None,
    num_train: int,
    search: SearchArguments,
    *,
    from_snapshot: bool,
    pool: CandidatePool | None = None,
) -> QuerySource:
    """Check the snapshot's features against the model and the training set; say how queries are made.

    Args:
        model: the model whose features (or loss gradients) the queries are.
        snapshot: the snapshot directory.
        num_train: the training set's size (the snapshot's ``train`` features must hold as many).
        search: the search arguments as given.
        from_snapshot: ``True`` when the index is the snapshot's ``train`` features; ``False`` for a
            :class:`CandidatePool`'s own index (the pool's snapshot manifest is read when it has one, else none).
        pool: the candidate pool; one made by :meth:`CandidatePool.from_snapshot` is queried as its features
            version was embedded (its kind, layer and ``H_last``).

    Raises:
        SnapshotNotFoundError: the snapshot holds no features version, no ``train`` features, or a listed
            ``H_last`` file is missing.
        SnapshotError: the manifest contradicts itself.
        ValueError: the snapshot was built for a training set of another size, or names no layer for its gradients.
        ArgumentError: ``feature_layer`` or ``knn_sign`` do not fit the snapshot's features.
    """
    entry: dict[str, Any] = {}
    if from_snapshot:
        assert snapshot is not None
        entry = _features_entry(snapshot, search.feature_version, num_train)
        search = dataclasses.replace(search, feature_version=entry["version"])
    elif pool is not None and pool.snapshot is not None:
        entry = _pool_entry(pool)
        snapshot = pool.snapshot  # its H_last preconditions the queries
        search = dataclasses.replace(search, feature_version=entry["version"])
    kind = check_kind(entry.get("features") or "activations")
    snap_layer = entry.get("layer")
    if kind == "loss_gradient":
        return _gradient_source(model, snapshot, entry, search, snap_layer)
    if search.knn_sign is not None:
        raise ArgumentError(
            f"knn_sign: expected None for activation features (their distances have no sign; signs need a snapshot "
            f"of FeatureSnapshot(features='loss_gradient')), got {search.knn_sign!r}"
        )
    layer = search.feature_layer
    if layer is None and snap_layer is not None:
        search = dataclasses.replace(search, feature_layer=snap_layer, feature_hook=entry.get("hook") or "output")
    elif layer is not None and snap_layer is not None and layer != snap_layer:
        rank_zero_warn(
            f"feature_layer: {layer!r}, but the snapshot's features come from layer {snap_layer!r}; kNN distances are "
            "only meaningful when queries and index share one feature space"
        )
    if search.feature_layer is not None:
        resolve_layer(model, search.feature_layer)
    elif not has_features_method(model):
        names = [n for n, _ in model.named_modules() if n][:40]
        raise ArgumentError(
            f"feature_layer: expected a submodule name, one of {names} (e.g. the classifier with feature_hook="
            f"'input'), since {type(model).__name__} defines no features(batch) method and the snapshot names no "
            "layer (or pass num_candidates=None), got None"
        )
    return QuerySource(search, snapshot, kind)


def _features_entry(snapshot: str, version: str | int | None, num_train: int) -> dict[str, Any]:
    try:
        entry = resolve_version(snapshot, "features", version)
    except SnapshotNotFoundError as err:
        raise SnapshotNotFoundError(f"snapshot: {err}; was it written by FeatureSnapshot?") from err
    datasets = entry.get("datasets", {})
    if "train" not in datasets:
        raise SnapshotNotFoundError(
            f"snapshot: features version {entry['version']!r} of {snapshot} holds no 'train' features "
            f"(datasets {sorted(datasets)}); use FeatureSnapshot(include_train=True)"
        )
    n = int(datasets["train"].get("n", entry.get("n", -1)))
    if n != num_train:
        raise ValueError(
            f"snapshot: {snapshot} (features version {entry['version']!r}) was built for a training set of "
            f"{n} examples, but train_dataset has {num_train}; pass the training set the snapshot was taken on, "
            "in the same order"
        )
    return entry


def _pool_entry(pool: CandidatePool) -> dict[str, Any]:
    assert pool.snapshot is not None
    try:
        entry = resolve_version(pool.snapshot, "features", pool.version)
    except SnapshotNotFoundError as err:
        raise SnapshotNotFoundError(f"candidates_pool: {err}; was its snapshot directory moved?") from err
    record = entry.get("datasets", {}).get(pool.name)
    if record is None or int(record.get("n", -1)) != len(pool):
        raise ValueError(
            f"candidates_pool: features version {entry['version']!r} of {pool.snapshot} holds "
            f"{'no' if record is None else record.get('n')} features of {pool.name!r}, but the pool has {len(pool)} "
            "examples; rebuild it with CandidatePool.from_snapshot"
        )
    return entry


def _gradient_source(
    model: nn.Module,
    snapshot: str | None,
    entry: dict[str, Any],
    search: SearchArguments,
    snap_layer: Any,
) -> QuerySource:
    if search.feature_layer is not None and search.feature_layer != snap_layer:
        raise ArgumentError(
            f"feature_layer: expected None (the snapshot holds loss gradients of layer {snap_layer!r}, and queries "
            f"must be gradients of the same parameters), got {search.feature_layer!r}"
        )
    if snap_layer is None or not isinstance(snap_layer, str):
        raise ValueError(f"snapshot: its loss-gradient features name no layer (manifest layer {snap_layer!r})")
    resolve_layer(model, snap_layer)
    search = dataclasses.replace(search, feature_layer=snap_layer, knn_sign=search.knn_sign or "both")
    record = entry.get(HESSIAN_ENTRY)
    if not isinstance(record, Mapping) or not record.get("file"):
        # An older version, or H_last skipped as too large: the raw gradients are the queries.
        return QuerySource(search, snapshot, "loss_gradient")
    assert snapshot is not None
    path = last_layer_hessian_file(snapshot, entry)  # the one reader of the layout; refuses paths outside it
    if path is None or not path.exists():
        raise SnapshotNotFoundError(
            f"snapshot: features version {search.feature_version!r} lists the last-layer Hessian {path}, which does "
            "not exist; was the snapshot directory copied only in part?"
        )
    dim = entry.get("dim")
    if record.get("layer") != snap_layer or (dim is not None and int(record.get("num_params", -1)) != int(dim)):
        raise SnapshotError(
            f"snapshot: the last-layer Hessian of version {search.feature_version!r} is over layer "
            f"{record.get('layer')!r} ({record.get('num_params')} parameters), but its features are the loss "
            f"gradients of layer {snap_layer!r} ({dim} numbers); the manifest is inconsistent"
        )
    preconditioner = QueryPreconditioner(path, layer=snap_layer)
    names = record.get("params")
    names = [str(name) for name in names] if isinstance(names, list) else None
    return QuerySource(search, snapshot, "loss_gradient", preconditioner, int(record["num_params"]), names)
