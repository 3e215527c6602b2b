"""IVF support of the kNN index: FAISS detection, list counts, and ``nprobe`` tuned to a measured recall.

FAISS is detected once, lazily (``import lightning_fastif`` does not import it).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning_utilities.core.imports import RequirementCache

from lightning_fastif.errors import check_number
from lightning_fastif.metrics import knn_recall

_FAISS_AVAILABLE = RequirementCache(module="faiss")
"""Truthy when ``import faiss`` works; evaluated on first use only."""

AUTO_IVF_MIN_SIZE = 100_000
"""``kind="auto"`` uses an IVF index from this many examples on (with FAISS); below it a flat search is fast."""
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


def tune_nprobe(
    index: Any, k: int, *, target_recall: float = 0.99, num_queries: int = TUNE_QUERIES, seed: int = 0
) -> dict[str, Any]:
    """Raise an IVF index's ``nprobe`` (doubling) until it finds ``target_recall`` of the exact ``k`` neighbours.

    Queries are ``num_queries`` indexed examples drawn with ``seed`` (and their negations for similarity metrics,
    which the "both" search also asks); the exact neighbours come from a chunked exact torch search over the same
    vectors. An index that is not a FAISS IVF is exact: its recall is 1 without measuring.

    Args:
        index: a :class:`~lightning_fastif.search.knn.KNNIndex` (its ``nprobe`` is set in place).
        k: neighbours per query.
        target_recall: in (0, 1].
        num_queries: sampled indexed examples used as queries.
        seed: the sample's seed.

    Returns:
        ``{"k", "nprobe", "nlist", "recall", "queries", "target"}`` (``{"k", "recall": 1.0, "exact": True}`` for
        an exact index).
    """
    check_number("target_recall", target_recall, low=0, high=1, low_open=True)
    if index.kind != "ivf" or index.backend != "faiss":
        return {"k": k, "recall": 1.0, "exact": True}
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(index.ntotal, generator=generator)[: min(num_queries, index.ntotal)]
    queries = index.features[rows]
    if index.metric != "l2":
        queries = torch.cat([queries, -queries])
    exact = type(index)(index.features, index.ids, metric=index.metric, kind="flat", backend="torch", use_gpu=False)
    _, truth = exact.search(queries, k)
    nlist = index.nlist or 1
    while True:
        _, found = index.search(queries, k)
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
    }
