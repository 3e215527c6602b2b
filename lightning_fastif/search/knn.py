"""Nearest-neighbour candidates: FAISS (CPU or GPU) when installed, an exact plain-torch search otherwise.

FastIF scores only a test point's k nearest training points in feature space (k = 1000 in the paper, out of
~390k). :class:`KNNIndex` holds the training features with their *dataset* indices and answers
``search(queries, k) -> (distances, ids)``:

* ``metric="l2"``: distances are **squared** Euclidean distances (FAISS's convention);
* ``metric="cosine"``: distances are **cosine distances** ``1 - cos(q, x)`` (features are L2-normalised);
* ``metric="ip"``: distances are **negated inner products** ``-<q, x>`` (maximum inner-product search, for
  loss-gradient embeddings whose norms matter: see :mod:`lightning_fastif.search.features`);

all sorted ascending, nearest first. ``search_signed(..., sign="negative")`` searches ``-q`` instead of ``q``,
and ``sign="both"`` returns the ``k`` nearest of ``q`` followed by the ``k`` nearest of ``-q`` (no id twice), so that
with a gradient embedding the most helpful *and* the most harmful training points are found.

``kind="flat"`` is exact; ``kind="ivf"`` (FAISS only) is an inverted file index, approximate, for large N
(``nlist`` clusters, ``nprobe`` of them searched per query). ``kind="auto"`` (the default) is flat below
``AUTO_IVF_MIN_SIZE`` examples (or without FAISS) and IVF above it, with ``nprobe`` raised until the recall of the
exact ``k`` nearest neighbours of sampled indexed examples, each searched as if held out (its own row dropped),
reaches ``target_recall`` (:meth:`KNNIndex.tune`); the measured recall is kept in :attr:`KNNIndex.tuning` and saved
with the index, so a snapshot says how approximate its search is.

**One copy of the features.** The index keeps the features tensor it is given (a snapshot's is memory-mapped from
the file, :mod:`lightning_fastif.search.index_files`): on CPU the exact search runs in torch over it, chunked (a
FAISS flat index would copy it and search no faster), and an IVF index adds it to FAISS's lists chunk by chunk.

FAISS is detected once, lazily (``import lightning_fastif`` does not import it). With FAISS a GPU index is used
when CUDA and a FAISS GPU build are present (``faiss.get_num_gpus() > 0``). Without FAISS the exact search runs
in torch, chunked so that memory stays bounded (``backend="torch", use_gpu=True`` gives an exact GPU search
without a FAISS GPU build). This module imports no Lightning.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from lightning_fastif.core.factored_grads import FactoredGradients
from lightning_fastif.errors import check_choice, check_number
from lightning_fastif.metrics import knn_recall as knn_recall  # moved to metrics; this path still imports it
from lightning_fastif.search.exact import DB_CHUNK as _DB_CHUNK
from lightning_fastif.search.exact import exact_search
from lightning_fastif.search.index_files import KNN_FORMAT as KNN_FORMAT
from lightning_fastif.search.index_files import IndexFiles
from lightning_fastif.search.index_files import features_layout as features_layout
from lightning_fastif.search.index_files import features_metadata as features_metadata
from lightning_fastif.search.ivf import (
    AUTO_IVF_MIN_SIZE,
    IVF_TRAIN_POINTS_PER_LIST,
    TUNE_K,
    TUNE_QUERIES,
    default_nlist,
    faiss_available,
    faiss_gpu_available,
    tune_nprobe,
)

Metric = Literal["l2", "cosine", "ip"]
Sign = Literal["positive", "negative", "both"]
IndexKind = Literal["flat", "ivf", "auto"]
Backend = Literal["auto", "faiss", "torch"]

_GPU_MAX_K = 2048  # FAISS GPU indices select at most 2048 neighbours (and probe at most 2048 lists)


def _rowwise_isin(values: Tensor, found: Tensor) -> Tensor:
    """``[Q, M]`` mask: whether ``values[q, m]`` is among ``found[q]`` (``[Q, K]``), in O(Q·(M+K)·log K) memory-light
    steps (a sorted search per row, never a ``[Q, M, K]`` comparison)."""
    if found.shape[1] == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    ordered = found.sort(dim=1).values
    pos = torch.searchsorted(ordered, values.contiguous()).clamp_max(found.shape[1] - 1)
    return ordered.gather(1, pos) == values


def _progress_bar(progress: bool | str, total: int, default: str) -> Any:
    """A tqdm bar when ``progress`` is truthy (a string is its description), else ``None``."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=progress if isinstance(progress, str) else default, leave=False)


class KNNIndex(IndexFiles):
    """Exact or IVF nearest-neighbour search over features, returning dataset indices.

    Args:
        features: ``[N, D]`` features, one row per example (any float dtype; kept as float32 on CPU).
        ids: ``[N]`` dataset index of each row (default ``0..N-1``); distinct integers.
        metric: ``"l2"`` (squared Euclidean distances), ``"cosine"`` (distances ``1 - cos``) or ``"ip"``
            (distances ``-<q, x>``: maximum inner-product search).
        kind: ``"flat"`` (exact), ``"ivf"`` (approximate, FAISS ``IndexIVFFlat``; exact with the torch backend) or
            ``"auto"``: flat below ``AUTO_IVF_MIN_SIZE`` examples, without FAISS or for factored loss gradients, else
            IVF tuned at build time to ``target_recall`` (see :meth:`tune`).
        nlist: IVF lists (default :func:`default_nlist`, ~2 sqrt(N); trained on 64 sampled examples per list).
        nprobe: IVF lists searched per query (more: slower, better recall); at most ``nlist``.
        use_gpu: ``"auto"`` (a GPU when the backend can use one), ``True`` (require one) or ``False``.
        backend: ``"auto"`` (FAISS when installed, else torch), ``"faiss"`` or ``"torch"``.
        target_recall: the recall of the exact ``TUNE_K`` nearest neighbours an automatic IVF index is tuned to.
        check_finite: refuse features holding a NaN or an infinity (a pass over all N rows); ``False`` for features
            checked already, e.g. a features file whose writer checked every row (:meth:`load` reads that from it).

    Raises:
        ValueError: bad shapes, duplicate ids, or an argument outside the accepted values.
        ImportError: ``backend="faiss"`` without FAISS installed.
        RuntimeError: ``use_gpu=True`` where no GPU can be used.

    Example::

        >>> feats = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
        >>> index = KNNIndex(feats, ids=torch.tensor([10, 11, 12]), backend="torch")
        >>> distances, ids = index.search(torch.tensor([[0.9, 0.0]]), k=2)
        >>> ids.tolist(), [round(d, 4) for d in distances[0].tolist()]
        ([[11, 10]], [0.01, 0.81])
    """

    def __init__(
        self,
        features: Tensor,
        ids: Tensor | None = None,
        *,
        metric: Metric = "l2",
        kind: IndexKind = "auto",
        nlist: int | None = None,
        nprobe: int = 8,
        use_gpu: bool | Literal["auto"] = "auto",
        backend: Backend = "auto",
        target_recall: float = 0.99,
        check_finite: bool = True,
    ) -> None:
        check_choice("metric", metric, ("l2", "cosine", "ip"))
        check_choice("kind", kind, ("flat", "ivf", "auto"))
        self.target_recall = float(check_number("target_recall", target_recall, low=0, high=1, low_open=True))
        check_choice("backend", backend, ("auto", "faiss", "torch"))
        check_choice("use_gpu", use_gpu, ("auto", True, False))
        factored = isinstance(features, FactoredGradients)
        if not factored and (
            not isinstance(features, Tensor) or features.dim() != 2 or not features.is_floating_point()
        ):
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"features: expected a float tensor [N, D] or FactoredGradients, got {shape}")
        n, d = features.shape
        if n < 1 or d < 1:
            raise ValueError(f"features: expected at least one row and one column, got shape {(n, d)}")
        if not check_finite:
            pass  # checked when written (a snapshot's features file says so): a pass over N rows saved per load
        elif factored:
            if not features.is_finite():
                raise ValueError("features: contains NaN or infinite values")
        else:
            for start in range(0, n, _DB_CHUNK):  # in chunks: no [N, D] mask next to a large (memory-mapped) set
                if not bool(torch.isfinite(features[start : start + _DB_CHUNK]).all()):
                    raise ValueError("features: contains NaN or infinite values")
        if ids is None:
            ids = torch.arange(n)
        ids = torch.as_tensor(ids)
        if ids.dim() != 1 or ids.shape[0] != n or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"ids: expected an integer tensor [N={n}], got {ids.dtype} {tuple(ids.shape)}")
        ids = ids.to(device="cpu", dtype=torch.long)
        if torch.unique(ids).numel() != n:
            raise ValueError(f"ids: must be distinct dataset indices, got {n - torch.unique(ids).numel()} duplicates")
        for name, value in (("nlist", nlist), ("nprobe", nprobe)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")

        if backend == "auto":
            backend = "faiss" if faiss_available() else "torch"
        elif backend == "faiss" and not faiss_available():
            raise ImportError(
                "backend: 'faiss' needs the faiss module; install one build (pip install faiss-cpu, or faiss-gpu-cu12 "
                "— never both) or use backend='torch'"
            )
        self._auto = kind == "auto"
        if kind == "auto":
            # Factored rows stay exact: an IVF index would hold them dense (C·D floats a row, 5 GB at 1M x 1290)
            # and must be trained and tuned before the first answer; the exact search runs over the factors.
            kind = "ivf" if backend == "faiss" and n >= AUTO_IVF_MIN_SIZE and not factored else "flat"
        if backend == "torch" and kind == "ivf":
            warnings.warn(
                "kind='ivf' needs FAISS; the torch backend searches exactly instead", UserWarning, stacklevel=2
            )
        gpu_ok = faiss_gpu_available() if backend == "faiss" else torch.cuda.is_available()
        if use_gpu is True and not gpu_ok:
            what = "a FAISS GPU build with a visible GPU" if backend == "faiss" else "CUDA"
            raise RuntimeError(f"use_gpu: True, but {what} is not available; use use_gpu='auto' or False")

        # Float32 on CPU as given (a memory-mapped snapshot file stays mapped): the index holds no copy of its own.
        self._features: Tensor | FactoredGradients = (
            features.to("cpu") if factored else features.detach().to(device="cpu", dtype=torch.float32).contiguous()
        )
        self._ids = ids
        self._metric: Metric = metric
        self._kind: IndexKind = kind
        self._nlist = min(nlist or default_nlist(n), n) if kind == "ivf" else None
        self._nprobe = min(nprobe, self._nlist) if self._nlist is not None else nprobe
        self._backend: Literal["faiss", "torch"] = backend
        self._on_gpu = bool(gpu_ok) if use_gpu == "auto" else bool(use_gpu)
        self._index: Any = None  # the FAISS index (CPU or GPU), built on first use
        self._cpu_index: Any = None
        self._gpu_resources: Any = None
        self._quantizer: Any = None
        self._db: Tensor | FactoredGradients | None = None  # exact torch search: the features (a copy on a GPU)
        self._db_sq_norms: Tensor | None = None
        self._db_inv_norms: Tensor | None = None  # cosine on CPU: similarities are scaled instead of a normalised copy
        self._db_norm_order: tuple[Tensor, Tensor] | None = None  # factored rows by decreasing norm (ip search)
        self._cache: tuple[Path, str, Any] | None = None  # (file, features fingerprint, on_saved): see load()
        self.tuning: dict[str, Any] | None = None
        """How well an IVF search finds the exact neighbours (set by :meth:`tune`; ``None`` for exact indices)."""

    # ----------------------------------------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self._features.shape[1])

    @property
    def ntotal(self) -> int:
        """Number of indexed examples N."""
        return int(self._features.shape[0])

    def __len__(self) -> int:
        return self.ntotal

    @property
    def backend(self) -> str:
        """``"faiss"`` or ``"torch"``."""
        return self._backend

    @property
    def on_gpu(self) -> bool:
        """Whether searches run on a GPU."""
        return self._on_gpu

    @property
    def metric(self) -> str:
        """``"l2"``, ``"cosine"`` or ``"ip"``."""
        return self._metric

    @property
    def kind(self) -> str:
        """``"flat"`` or ``"ivf"``."""
        return self._kind

    @property
    def nlist(self) -> int | None:
        """IVF lists (``None`` for a flat index)."""
        return self._nlist

    @property
    def nprobe(self) -> int:
        """IVF lists searched per query; settable (more: slower, better recall), at most ``nlist``."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"nprobe: expected a positive integer, got {value!r}")
        self._nprobe = min(value, self._nlist) if self._nlist is not None else value
        if self._index is not None:
            self._set_nprobe(self._index)
        if self._cpu_index is not None and self._cpu_index is not self._index:
            import faiss

            faiss.ParameterSpace().set_index_parameter(self._cpu_index, "nprobe", self._nprobe)

    @property
    def ids(self) -> Tensor:
        """``[N]`` dataset indices of the indexed rows."""
        return self._ids

    @property
    def features(self) -> Tensor | FactoredGradients:
        """``[N, D]`` float32 features as given (not normalised): a tensor, or the factors of loss gradients."""
        return self._features

    def __repr__(self) -> str:
        where = "gpu" if self._on_gpu else "cpu"
        ivf = f", nlist={self._nlist}, nprobe={self._nprobe}" if self._kind == "ivf" else ""
        return (
            f"KNNIndex(ntotal={self.ntotal}, dim={self.dim}, metric={self._metric!r}, kind={self._kind!r}{ivf}, "
            f"backend={self._backend!r}, device={where!r})"
        )

    # ------------------------------------------------------------------------------------------------- building
    def _vectors(self) -> Tensor | FactoredGradients:
        if self._metric == "cosine":
            if isinstance(self._features, FactoredGradients):
                return self._features.scaled(1.0 / self._row_norms().clamp_min(1e-12))
            return torch.nn.functional.normalize(self._features, dim=1)
        return self._features

    def _faiss_metric(self) -> int:
        import faiss

        return faiss.METRIC_L2 if self._metric == "l2" else faiss.METRIC_INNER_PRODUCT

    def _to_gpu(self, cpu_index: Any) -> Any:
        import faiss

        if self._gpu_resources is None:
            self._gpu_resources = faiss.StandardGpuResources()
        device = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return faiss.index_cpu_to_gpu(self._gpu_resources, device, cpu_index)

    def _set_nprobe(self, index: Any) -> None:
        if self._kind != "ivf":
            return
        import faiss

        if self._on_gpu:
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", min(self._nprobe, _GPU_MAX_K))
        else:
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", self._nprobe)

    def _exact_in_torch(self) -> bool:
        """Exact searches run in torch (chunked matmul + top-k) over the features themselves, except on a FAISS GPU."""
        return self._backend == "torch" or (self._kind == "flat" and not self._on_gpu)

    def _row_norms(self) -> Tensor:
        return self._sq_norms(self._features).sqrt()

    @staticmethod
    def _sq_norms(db: Tensor | FactoredGradients) -> Tensor:
        if isinstance(db, FactoredGradients):
            return torch.cat([db.sq_norms(s, s + _DB_CHUNK) for s in range(0, len(db), _DB_CHUNK)])
        return torch.cat([(c * c).sum(1) for c in db.split(_DB_CHUNK)])

    def _vector_chunks(self) -> Any:
        """The vectors FAISS indexes, ``_DB_CHUNK`` rows at a time (normalised for cosine: one chunk at a time)."""
        for chunk in self._features.split(_DB_CHUNK):
            if self._metric == "cosine":
                chunk = torch.nn.functional.normalize(chunk, dim=1)
            yield np.ascontiguousarray(chunk.numpy())

    def _build(self, progress: bool | str = False) -> None:
        if self._exact_in_torch():
            if self._on_gpu:
                self._db = self._vectors().to("cuda")
            else:
                # No copy: a FAISS flat index would hold the features a second time, and searches no faster.
                self._db = self._features
                if self._metric == "cosine":
                    self._db_inv_norms = 1.0 / self._row_norms().clamp_min(1e-12)
            if self._metric == "l2":
                self._db_sq_norms = self._sq_norms(self._db)
            if self._metric == "ip" and isinstance(self._db, FactoredGradients):
                # Visited by decreasing norm, a search stops once no row left can beat its k-th best (exact).
                norms = self._sq_norms(self._db).sqrt()
                order = norms.argsort(descending=True)
                self._db_norm_order = (order.to(self._db.device), norms[order].to(self._db.device))
            return
        import faiss

        metric = self._faiss_metric()
        if self._kind == "flat":
            index = faiss.IndexFlat(self.dim, metric)
        else:
            quantizer = faiss.IndexFlat(self.dim, metric)
            index = faiss.IndexIVFFlat(quantizer, self.dim, self._nlist, metric)
            self._quantizer = quantizer  # the IVF index points into it: keep it alive as long as the index
            # FAISS warns (on stderr) below 39 points per list; the default nlist stays well above 1 per list.
            index.cp.min_points_per_centroid = 1
        if self._on_gpu:
            index = self._to_gpu(index)
        bar = _progress_bar(progress, self.ntotal, f"kNN index ({self._kind})")
        try:
            if self._kind == "ivf":
                # A sample trains the centroids as well as the whole set, at a fraction of the k-means cost.
                size = min(self.ntotal, IVF_TRAIN_POINTS_PER_LIST * (self._nlist or 1))
                sample = torch.randperm(self.ntotal, generator=torch.Generator().manual_seed(0))[:size].sort().values
                train = self._features[sample]
                if self._metric == "cosine":
                    train = torch.nn.functional.normalize(train, dim=1)
                if bar is not None:
                    bar.set_postfix_str(f"training {self._nlist} lists")
                index.train(np.ascontiguousarray(train.numpy()))
                del train
            if bar is not None:
                bar.set_postfix_str("adding")
            for chunk in self._vector_chunks():  # FAISS copies each chunk into its lists: no second [N, D] copy here
                index.add(chunk)
                if bar is not None:
                    bar.update(chunk.shape[0])
            self._set_nprobe(index)
            self._index = index
            self._cpu_index = None if self._on_gpu else index
            if self._auto and self._kind == "ivf" and self.tuning is None:
                if bar is not None:
                    bar.set_postfix_str("tuning nprobe")
                self.tune(max(1, min(TUNE_K, self.ntotal - 1)), target_recall=self.target_recall)
            if self._cache is not None:
                if bar is not None:
                    bar.set_postfix_str("caching")
                self._write_cache()
        finally:
            if bar is not None:
                bar.close()

    def _ensure_built(self, progress: bool | str = False) -> None:
        if self._index is None and self._db is None:
            self._build(progress)

    def build(self, progress: bool | str = False) -> KNNIndex:
        """Build the index now instead of at the first search or save; idempotent.

        A FAISS IVF index is trained, filled chunk by chunk, tuned (``kind="auto"``) and, when loaded from a
        snapshot, cached next to its features; an exact one only prepares norms over the features.

        Args:
            progress: show a tqdm bar over the vectors added (IVF with FAISS; a string is its description).

        Returns:
            ``self``.

        Example::

            >>> index = KNNIndex(torch.randn(20, 3), kind="flat", backend="torch").build()
            >>> index.search(index.features[:1], k=1)[1].tolist()
            [[0]]
        """
        self._ensure_built(progress)
        return self

    def _faiss_cpu_index(self) -> Any:
        import faiss

        self._ensure_built()
        if self._cpu_index is None:
            self._cpu_index = faiss.index_gpu_to_cpu(self._index)
            if self._kind == "ivf":
                faiss.ParameterSpace().set_index_parameter(self._cpu_index, "nprobe", self._nprobe)
        return self._cpu_index

    # ------------------------------------------------------------------------------------------------- searching
    def _check_queries(self, queries: Tensor) -> Tensor:
        q = torch.as_tensor(queries)
        if q.dim() == 1:
            q = q.unsqueeze(0)
        if q.dim() != 2:
            raise ValueError(f"queries: expected [Q, D={self.dim}] (or [D]), got shape {tuple(q.shape)}")
        if q.shape[1] != self.dim:
            raise ValueError(
                f"queries: expected feature dimension D={self.dim} (the index's), got {q.shape[1]} "
                f"(shape {tuple(q.shape)}); embed the queries with the same layer as the index"
            )
        if not q.is_floating_point():
            q = q.float()
        if not bool(torch.isfinite(q).all()):
            raise ValueError("queries: contains NaN or infinite values")
        return q.detach().float()

    def _check_k(self, k: int) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k: expected a positive integer, got {k!r}")
        if k > self.ntotal:
            raise ValueError(f"k: {k} is larger than the index ({self.ntotal} examples); accepted: 1..{self.ntotal}")

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Find the ``k`` nearest indexed examples of each query.

        Args:
            queries: ``[Q, D]`` (or ``[D]`` for one query) features in the same space as the index.
            k: neighbours per query, ``1 <= k <= ntotal``.

        Returns:
            ``(distances [Q, k] float32, ids [Q, k] int64)`` on CPU, nearest first. ``ids`` are dataset
            indices. Distances are squared L2 (``metric="l2"``), ``1 - cos`` (``"cosine"``) or ``-<q, x>``
            (``"ip"``). An IVF search
            that finds fewer than ``k`` examples in its probed lists pads with id ``-1`` and distance ``inf``.

        Raises:
            ValueError: a query of the wrong dimension (naming the expected D), or ``k`` outside ``1..ntotal``.
        """
        q = self._check_queries(queries)
        self._check_k(k)
        self._ensure_built()
        if q.shape[0] == 0:
            return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
        if self._db is not None:
            return self._torch_search(q, k)[:2]
        return self._faiss_search(q, k)

    def _faiss_search(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        if self._metric == "cosine":
            q = torch.nn.functional.normalize(q, dim=1)
        index = self._index
        if self._on_gpu and k > _GPU_MAX_K:
            # FAISS GPU indices cannot return more than 2048 neighbours: answer this query on a CPU copy.
            index = self._faiss_cpu_index()
        dist_np, pos_np = index.search(np.ascontiguousarray(q.cpu().numpy()), k)
        pos = torch.from_numpy(pos_np).long()
        scores = torch.from_numpy(dist_np).float()
        if self._metric == "cosine":
            distances = 1.0 - scores
        elif self._metric == "ip":
            distances = -scores
        else:
            distances = scores.clamp_min(0.0)
        missing = pos < 0
        ids = torch.where(missing, torch.full_like(pos, -1), self._ids[pos.clamp_min(0)])
        distances = distances.masked_fill(missing, math.inf)
        return distances, ids

    def _torch_search(self, q: Tensor, k: int, k_negated: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Exact search of ``q`` (``k``) and of ``-q`` (``k_negated``) in torch: see :func:`exact_search`."""
        if self._db is None:
            raise RuntimeError("KNNIndex: the torch index was not built")
        if self._metric == "cosine":
            q = torch.nn.functional.normalize(q, dim=1)
        d1, p1, d2, p2 = exact_search(
            self._db,
            q,
            k,
            k_negated,
            sq_norms=self._db_sq_norms,
            inv_norms=self._db_inv_norms,
            norm_order=self._db_norm_order,
        )
        if self._metric == "cosine":  # 1 - cos, from the negated similarity
            d1, d2 = d1 + 1.0, d2 + 1.0
        return d1, self._ids[p1], d2, self._ids[p2]

    def tune(
        self, k: int = TUNE_K, *, target_recall: float = 0.99, num_queries: int = TUNE_QUERIES, seed: int = 0
    ) -> dict[str, Any]:
        """Raise ``nprobe`` (doubling) until an IVF search finds ``target_recall`` of the exact ``k`` neighbours.

        Queries are ``num_queries`` indexed examples drawn with ``seed`` (and their negations for similarity
        metrics, which the "both" search also asks); the exact neighbours come from a chunked exact search over
        the same vectors. A flat index is exact: its recall is 1 without measuring. The result is kept in
        :attr:`tuning` (``k``, ``nprobe``, ``nlist``, ``recall``, ``queries``, ``target``) and saved with the index.

        Returns:
            :attr:`tuning`.

        Example::

            >>> index = KNNIndex(torch.randn(50, 4), kind="flat", backend="torch")
            >>> index.tune(5)["recall"]
            1.0
        """
        self._check_k(k)
        if self._kind == "ivf" and self._backend == "faiss":
            self._ensure_built()
        self.tuning = tune_nprobe(self, k, target_recall=target_recall, num_queries=num_queries, seed=seed)
        return self.tuning

    def search_signed(self, queries: Tensor, k: int, sign: Sign = "positive") -> tuple[Tensor, Tensor]:
        """Search ``q`` (``"positive"``), ``-q`` (``"negative"``) or both, for similarity metrics.

        With a loss-gradient embedding and ``metric="ip"``, ``<g_test, g_train>`` approximates the influence of a
        training point on the test point (positive = helpful), so ``q`` finds the most helpful and ``-q`` the most
        harmful points. ``"both"`` returns the ``k`` nearest of ``q`` then the ``k`` nearest of ``-q`` that are not
        among the first (fewer when ``2k > ntotal``): ``min(2k, ntotal)`` distinct ids per query.

        Args:
            queries: ``[Q, D]`` (or ``[D]``) queries.
            k: neighbours per direction, ``1 <= k <= ntotal``.
            sign: ``"positive"``, ``"negative"`` or ``"both"``.

        Returns:
            ``(distances, ids)``, ``[Q, k]`` (``[Q, min(2k, ntotal)]`` for ``"both"``); each half sorted nearest
            first, with the distances of its own search (``-<±q, x>`` for ``"ip"``). IVF misses are id ``-1``.

        Raises:
            ValueError: ``sign`` not accepted, or a sign other than ``"positive"`` on an ``"l2"`` index (the
                negated query has no meaning there).

        Example::

            >>> index = KNNIndex(torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.0, 1.0]]), metric="ip", backend="torch")
            >>> index.search_signed(torch.tensor([[1.0, 0.0]]), k=1, sign="both")[1].tolist()
            [[0, 1]]
        """
        check_choice("sign", sign, ("positive", "negative", "both"))
        if sign != "positive" and self._metric == "l2":
            raise ValueError(
                f"sign: {sign!r} needs a similarity index (metric 'ip' or 'cosine'), this one is 'l2'; use "
                "sign='positive'"
            )
        q = self._check_queries(queries)
        if sign == "positive":
            return self.search(q, k)
        if sign == "negative":
            return self.search(-q, k)
        self._check_k(k)
        rest = min(k, self.ntotal - k)
        # Search deeper than k from -q, so that dropping the ids already found (possible with ties, e.g. the
        # exactly-zero gradients of perfectly fitted examples) still leaves `rest` new ones.
        deeper = min(self.ntotal, k + rest) if rest else 0
        self._ensure_built()
        if self._db is not None and q.shape[0] > 0:
            # Exact search in torch: one pass of products answers both signs.
            first_d, first_ids, other_d, other_ids = self._torch_search(q, k, deeper)
        else:
            first_d, first_ids = self.search(q, k)
            other_d, other_ids = self.search(-q, deeper) if rest else (first_d[:, :0], first_ids[:, :0])
        if rest == 0:
            return first_d, first_ids
        taken = _rowwise_isin(other_ids, first_ids) & (other_ids >= 0)
        # A stable sort moves the new ids first, in their search order.
        order = taken.to(torch.int8).argsort(dim=1, stable=True)[:, :rest]
        second_ids = other_ids.gather(1, order)
        second_d = other_d.gather(1, order)
        missing = taken.gather(1, order)
        second_ids = second_ids.masked_fill(missing, -1)
        second_d = second_d.masked_fill(missing, math.inf)
        return torch.cat([first_d, second_d], 1), torch.cat([first_ids, second_ids], 1)

    # ---------------------------------------------------------------------------------------------- persistence
