"""The numbers that say how good influence estimates are: correlations, top-k overlap, recall, mislabel detection.

One implementation of each, used by :func:`lightning_fastif.core.verify.verify`, the app's report, the benchmarks
and the examples:

* :func:`pearson`, :func:`spearman` (with :func:`average_ranks`): agreement of two score vectors; Spearman gives
  tied values their average rank, exactly as ``scipy.stats.spearmanr`` does.
* :func:`top_k_overlap`: how many of the ``k`` most helpful points two scorings share.
* :func:`knn_recall`: how many exact nearest neighbours an approximate search found.
* :func:`mislabel_detection`: how many known-flipped labels rank high by self-influence.

Everything is computed in float64 with torch on the inputs' device; inputs may be tensors, numpy arrays or lists.
This module imports only torch and :mod:`lightning_fastif.errors`, so every layer can use it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_fastif.errors import ArgumentError, check_int, check_number

__all__ = [
    "average_ranks",
    "flagged_mask",
    "knn_recall",
    "mislabel_detection",
    "pearson",
    "spearman",
    "top_k_overlap",
]


def _as_tensor(value: Any, name: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ArgumentError(
            f"{name}: expected a tensor, a numpy array or a (nested) list of numbers, got {type(value).__name__}"
        ) from err


def _float_pair(a: Any, b: Any) -> tuple[Tensor, Tensor]:
    """``a`` and ``b`` flattened to float64, after checking that they have one shape (so entries pair up)."""
    x, y = _as_tensor(a, "a"), _as_tensor(b, "b")
    if x.shape != y.shape:
        raise ArgumentError(f"b: expected the shape of a {tuple(x.shape)}, got {tuple(y.shape)}")
    return x.to(torch.float64).reshape(-1), y.to(device=x.device, dtype=torch.float64).reshape(-1)


def pearson(a: Any, b: Any) -> float:
    """Pearson's correlation of two equally shaped score arrays (flattened).

    Args:
        a: scores, any shape (a tensor, an array or a list).
        b: scores of the same shape.

    Returns:
        The correlation in ``[-1, 1]``; NaN when either side is constant (also for a single value) or holds NaN.

    Raises:
        ArgumentError: if the shapes differ.

    Example::

        >>> round(pearson([1, 2, 3], [2, 4, 7]), 3)
        0.993
        >>> pearson([1.0, 1.0], [1.0, 2.0])
        nan
    """
    x, y = _float_pair(a, b)
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 0 else math.nan


def average_ranks(x: Any) -> Tensor:
    """Ranks from 1 of the flattened values, ties given their average rank (as ``scipy.stats.rankdata``).

    Example::

        >>> average_ranks([10.0, 20.0, 20.0, 5.0]).tolist()
        [2.0, 3.5, 3.5, 1.0]
    """
    v = _as_tensor(x, "x").to(torch.float64).reshape(-1)
    _, inverse, counts = torch.unique(v, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)
    # A run of ``c`` equal values occupying ranks end-c+1 .. end gets their mean.
    return (ends - (counts.to(torch.float64) - 1) / 2)[inverse]


def spearman(a: Any, b: Any) -> float:
    """Spearman's rank correlation: Pearson's correlation of the :func:`average_ranks` of both sides.

    Matches ``scipy.stats.spearmanr`` (average ranks for ties, NaN for a constant side or a NaN value).

    Raises:
        ArgumentError: if the shapes differ.

    Example::

        >>> round(spearman([1, 2, 3, 4], [10, 20, 25, 100]), 12)
        1.0
        >>> round(spearman([1, 1, 2, 3], [0, 0, 5, 4]), 4)
        0.7778
    """
    x, y = _float_pair(a, b)
    if bool(torch.isnan(x).any()) or bool(torch.isnan(y).any()):
        return math.nan
    return pearson(average_ranks(x), average_ranks(y))


def top_k_overlap(estimate: Any, exact: Any, k: int = 10) -> float:
    """The share of the ``k`` highest entries of ``exact`` that are also among the ``k`` highest of ``estimate``.

    With scores of training points for one test point, this is the share of the ``k`` most helpful points that an
    estimate agrees on. ``k`` larger than the number of entries means all of them (the overlap is then 1).

    Raises:
        ArgumentError: if the shapes differ or ``k`` is not a positive integer.

    Example::

        >>> top_k_overlap([0.9, 0.1, 0.5, 0.2], [0.8, 0.3, 0.1, 0.7], k=2)
        0.5
    """
    k = check_int("k", k)
    x, y = _float_pair(estimate, exact)
    k = min(k, y.numel())
    if k == 0:
        return math.nan
    found = set(x.topk(k).indices.tolist())
    best = set(y.topk(k).indices.tolist())
    return len(found & best) / k


def knn_recall(found: Tensor, exact: Tensor) -> float:
    """Mean over queries of the fraction of the exact neighbours that were found.

    Args:
        found: ``[Q, k]`` ids returned by an approximate search.
        exact: ``[Q, k']`` ids of the exact neighbours.

    Raises:
        ArgumentError: if either is not 2-D or they have different numbers of queries.

    Example::

        >>> knn_recall(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[2, 1], [3, 5]]))
        0.75
    """
    found, exact = _as_tensor(found, "found"), _as_tensor(exact, "exact")
    if found.dim() != 2 or exact.dim() != 2 or found.shape[0] != exact.shape[0]:
        raise ArgumentError(
            f"found, exact: expected [Q, k] tensors with the same Q, got {tuple(found.shape)}, {tuple(exact.shape)}"
        )
    hits = [len(set(f.tolist()) & set(e.tolist())) / max(1, e.numel()) for f, e in zip(found, exact, strict=True)]
    return float(sum(hits) / max(1, len(hits)))


def flagged_mask(flagged: Any, n: int) -> Tensor:
    """A boolean ``[n]`` mask from a boolean mask or from indices (e.g. of the training points known mislabelled).

    Raises:
        ArgumentError: for a mask of another length, non-integer indices or indices outside ``[0, n)``.

    Example::

        >>> flagged_mask([0, 3], 4).tolist()
        [True, False, False, True]
    """
    f = _as_tensor(flagged, "flagged").cpu().reshape(-1)
    if f.dtype == torch.bool:
        if f.numel() != n:
            raise ArgumentError(f"flagged: a boolean mask needs {n} entries (one per score), got {f.numel()}")
        return f
    if f.is_floating_point() and not torch.equal(f, f.round()):
        raise ArgumentError("flagged: expected a boolean mask or integer indices, got non-integer values")
    f = f.long()
    if f.numel() and (int(f.min()) < 0 or int(f.max()) >= n):
        raise ArgumentError(f"flagged: indices must lie in [0, {n}), got values from {int(f.min())} to {int(f.max())}")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[f] = True
    return mask


def mislabel_detection(scores: Any, flagged: Any, *, top_fraction: float = 0.1) -> dict[str, float]:
    """How many known-flipped points rank in the top ``top_fraction`` by self-influence.

    Args:
        scores: ``[N]`` self-influence of each training point (higher = more suspicious).
        flagged: a boolean ``[N]`` mask or the indices of the points whose labels are known to be wrong.
        top_fraction: the share of the training set inspected, in ``(0, 1]``.

    Returns:
        ``{"inspected", "flagged", "found", "precision", "recall", "random_recall"}``: the number inspected
        (``ceil(top_fraction * N)``), the number flagged, how many flagged are among the inspected, ``found /
        inspected``, ``found / flagged`` (NaN without flagged points) and the recall expected at random.

    Raises:
        ArgumentError: for empty, multi-dimensional or non-finite scores, a bad ``flagged`` (see
            :func:`flagged_mask`) or ``top_fraction`` outside ``(0, 1]``.

    Example::

        >>> mislabel_detection([5.0, 0.1, 4.0, 0.2], [0, 3], top_fraction=0.5)
        {'inspected': 2, 'flagged': 2, 'found': 1, 'precision': 0.5, 'recall': 0.5, 'random_recall': 0.5}
    """
    values = _as_tensor(scores, "scores").cpu()
    if values.dim() > 1:
        raise ArgumentError(f"scores: expected a 1-D sequence of numbers, got shape {tuple(values.shape)}")
    values = values.reshape(-1).to(torch.float64)
    n = values.numel()
    if n == 0:
        raise ArgumentError("scores: empty; expected one self-influence score per training point")
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum())
        raise ArgumentError(f"scores: {bad} non-finite values; expected finite scores")
    check_number("top_fraction", top_fraction, low=0, low_open=True, high=1)
    mask = flagged_mask(flagged, n)
    inspected = max(1, math.ceil(top_fraction * n - 1e-9))
    order = torch.sort(values, descending=True, stable=True).indices
    found = int(mask[order[:inspected]].sum())
    num_flagged = int(mask.sum())
    return {
        "inspected": inspected,
        "flagged": num_flagged,
        "found": found,
        "precision": found / inspected,
        "recall": found / num_flagged if num_flagged else float("nan"),
        "random_recall": inspected / n,
    }
