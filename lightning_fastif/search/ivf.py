"""IVF support of the kNN index: FAISS detection, list counts, ``nprobe`` tuned to a measured recall, and the file
an IVF index is cached in next to its features.

FAISS is detected once, lazily (``import lightning_fastif`` does not import it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from lightning_utilities.core.imports import RequirementCache
from torch import Tensor

from lightning_fastif.errors import SnapshotError, check_number
from lightning_fastif.io.atomic import PathLike, atomic_path
from lightning_fastif.metrics import knn_recall

_FAISS_AVAILABLE = RequirementCache(module="faiss")
"""Truthy when ``import faiss`` works; evaluated on first use only."""

AUTO_IVF_MIN_SIZE = 1_000_000
"""``kind="auto"`` uses an IVF index from this many examples on (with FAISS); below it the exact search.

Chosen from a measurement at N = 200k (1290-d loss gradients of an MLP's last layer, one thread): the exact torch
search took 15 ms per query and sign, while the IVF index needed ``nprobe`` 256 of 894 lists to find 0.99 of the exact
neighbours of held-out-like queries and then took 36 ms per query and sign, after 90 s of training, adding and
tuning. The exact search's cost grows with N (about 75 ms per query and sign at 1M, 1290-d); above that an IVF index
can pay back its build when the features cluster well enough for a small ``nprobe``."""
TUNE_K = 100
"""Neighbours whose recall ``kind="auto"`` tunes ``nprobe`` for (FastIF's candidate counts are 100-1000)."""
TUNE_QUERIES = 256
"""Sampled indexed examples used as queries when measuring recall."""
IVF_TRAIN_POINTS_PER_LIST = 64
"""IVF centroids are trained on a seeded sample of this many examples per list (FAISS needs at least 39)."""


def faiss_available() -> bool:
    """True when the ``faiss`` module can be imported (checked once)."""
    return bool(_FAISS_AVAILABLE)


def faiss_gpu_available() -> bool:
    """True when FAISS is a GPU build that sees at least one GPU, and torch sees CUDA."""
    if not faiss_available() or not torch.cuda.is_available():
        return False
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def default_nlist(n: int) -> int:
    """Default number of IVF lists: ``2 * sqrt(n)``, between 1 and ``n``.

    Fewer lists than FAISS's billion-scale guideline (4-16 sqrt(n)): at the 1e5-1e6 examples of a training set the
    lists stay large enough that a few probes reach a recall of 0.99, and training stays a small part of a snapshot.

    Example::

        >>> default_nlist(10_000)
        200
    """
    return max(1, min(n, int(round(2 * math.sqrt(n)))))


def _without_self(ids: Tensor, own: Tensor, k: int) -> Tensor:
    """The first ``k`` of each row of ``ids`` (``[Q, k+1]``) other than the row's own id ``own[q]``."""
    keep = ids != own[:, None]
    # A stable sort puts the kept ids first, in their order; a row without its own id drops its last one.
    order = (~keep).to(torch.int8).argsort(dim=1, stable=True)[:, :k]
    return ids.gather(1, order)


def tune_nprobe(
    index: Any, k: int, *, target_recall: float = 0.99, num_queries: int = TUNE_QUERIES, seed: int = 0
) -> dict[str, Any]:
    """Raise an IVF index's ``nprobe`` (doubling) until it finds ``target_recall`` of the exact ``k`` neighbours.

    Queries are ``num_queries`` indexed examples drawn with ``seed`` (and their negations for similarity metrics,
    which the "both" search also asks), searched as if they were held out: ``k + 1`` neighbours are searched and the
    query's own row is dropped from the exact and the IVF answer alike. An indexed example always finds itself
    (it lies in the list its own centroid heads), so counting it would report a recall that real queries, which
    are not in the index, do not reach. The exact neighbours come from a chunked exact torch search over the same
    vectors. An index that is not a FAISS IVF is exact: its recall is 1 without measuring.

    Args:
        index: a :class:`~lightning_fastif.search.knn.KNNIndex` (its ``nprobe`` is set in place).
        k: neighbours per query.
        target_recall: in (0, 1].
        num_queries: sampled indexed examples used as queries.
        seed: the sample's seed.

    Returns:
        ``{"k", "nprobe", "nlist", "recall", "queries", "target", "self_excluded": True}`` (``{"k", "recall": 1.0,
        "exact": True}`` for an exact index).
    """
    check_number("target_recall", target_recall, low=0, high=1, low_open=True)
    if index.kind != "ivf" or index.backend != "faiss" or index.ntotal < 2:
        # Exact, or a single example, which its one list always returns.
        return {"k": k, "recall": 1.0, "exact": True}
    k = min(k, index.ntotal - 1)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(index.ntotal, generator=generator)[: min(num_queries, index.ntotal)]
    queries, own = index.features[rows], index.ids[rows]
    if index.metric != "l2":
        queries, own = torch.cat([queries, -queries]), torch.cat([own, own])
    exact = type(index)(index.features, index.ids, metric=index.metric, kind="flat", backend="torch", use_gpu=False)
    truth = _without_self(exact.search(queries, k + 1)[1], own, k)
    nlist = index.nlist or 1
    while True:
        found = _without_self(index.search(queries, k + 1)[1], own, k)
        recall = knn_recall(found, truth)
        if recall >= target_recall or index.nprobe >= nlist:
            break
        index.nprobe = min(2 * index.nprobe, nlist)
    return {
        "k": k,
        "nprobe": index.nprobe,
        "nlist": index.nlist,
        "recall": recall,
        "queries": int(queries.shape[0]),
        "target": target_recall,
        "self_excluded": True,
    }


_CACHE_MAGIC = b"lightning_fastif.ivf\n"


def write_ivf_cache(path: PathLike, cpu_index: Any, info: dict[str, Any]) -> Path:
    """Write a FAISS CPU index to ``path`` atomically, after a JSON header ``info`` (e.g. the fingerprint of the
    features it was built from); the index is streamed to the file, never serialised into memory first.

    Returns:
        The path written.
    """
    import faiss

    head = json.dumps(info).encode("utf-8")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(_CACHE_MAGIC + len(head).to_bytes(8, "little") + head)
        faiss.write_index(cpu_index, faiss.PyCallbackIOWriter(f.write))
    return Path(path)


def read_ivf_cache_info(path: PathLike) -> dict[str, Any] | None:
    """The JSON header of a cache file written by :func:`write_ivf_cache`; ``None`` for a bare FAISS index file
    (as snapshots written before the cache existed hold).

    Raises:
        SnapshotError: if the header is unreadable.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(len(_CACHE_MAGIC)) != _CACHE_MAGIC:
                return None
            info = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    except (OSError, ValueError) as err:
        raise SnapshotError(f"FAISS index file is corrupted: {path} ({err})") from err
    if not isinstance(info, dict):
        raise SnapshotError(f"FAISS index file is corrupted: {path} (its header is not a JSON object)")
    return info


def read_ivf_cache_index(path: PathLike) -> Any:
    """The FAISS CPU index of a file written by :func:`write_ivf_cache` (or a bare FAISS index file).

    Raises:
        SnapshotError: if the file cannot be read as one.
    """
    import faiss

    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(len(_CACHE_MAGIC)) == _CACHE_MAGIC:
                f.seek(int.from_bytes(f.read(8), "little"), 1)
            else:
                f.seek(0)
            return faiss.read_index(faiss.PyCallbackIOReader(f.read))
    except (RuntimeError, OSError, ValueError) as err:
        raise SnapshotError(f"FAISS index file is corrupted: {path} ({err})") from err
