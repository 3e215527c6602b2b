"""The one implementation of each metric: correlations agree with scipy (ties included), counts are exact."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

import lightning_fastif
from lightning_fastif.errors import ArgumentError
from lightning_fastif.metrics import (
    average_ranks,
    flagged_mask,
    knn_recall,
    mislabel_detection,
    pearson,
    spearman,
    top_k_overlap,
)

# Ties of several lengths on both sides, and a tie that spans the two sides' orders differently.
TIES_A = [1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.5, 2.0, 7.0]
TIES_B = [3.0, 1.0, 1.0, 4.0, 6.0, 5.0, 7.0, 3.0, 1.0, 0.0]


def test_correlations_match_scipy_with_and_without_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, generator=g, dtype=torch.float64)
    b = a + 0.5 * torch.randn(50, generator=g, dtype=torch.float64)
    assert pearson(a, b) == pytest.approx(stats.pearsonr(a.numpy(), b.numpy())[0], abs=1e-12)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a.numpy(), b.numpy())[0], abs=1e-12)
    expected = stats.spearmanr(TIES_A, TIES_B)[0]
    assert spearman(TIES_A, TIES_B) == pytest.approx(expected, abs=1e-12)
    # Ranking without averaging ties (argsort of argsort) gives another number: the test can tell them apart.
    ordinal = pearson(torch.tensor(TIES_A).argsort().argsort(), torch.tensor(TIES_B).argsort().argsort())
    assert abs(ordinal - expected) > 0.01
    # Integer scores, float32 and numpy inputs go through the same float64 computation.
    ints = torch.randint(0, 4, (40,), generator=g)
    other = torch.randint(0, 3, (40,), generator=g)
    assert spearman(ints, other) == pytest.approx(stats.spearmanr(ints.numpy(), other.numpy())[0], abs=1e-12)
    assert spearman(a.float(), b.numpy()) == pytest.approx(spearman(a, b), abs=1e-6)


def test_average_ranks_match_rankdata():
    stats = pytest.importorskip("scipy.stats")
    assert average_ranks(TIES_A).tolist() == stats.rankdata(TIES_A).tolist()
    assert average_ranks([10.0, 20.0, 20.0, 5.0]).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_correlation_edge_cases():
    assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(spearman([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]))
    assert math.isnan(pearson([1.0], [2.0]))
    assert math.isnan(spearman([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0]))  # as scipy's nan_policy="propagate"
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # 2-D scores are flattened pairwise (the pooled correlation over test points).
    assert pearson(torch.tensor([[1.0, 2.0], [3.0, 5.0]]), np.array([[2.0, 4.0], [6.0, 10.0]])) == pytest.approx(1.0)
    with pytest.raises(ArgumentError, match=r"b: expected the shape of a \(2,\), got \(3,\)"):
        pearson([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ArgumentError, match=r"b: expected the shape of a \(2, 2\), got \(4,\)"):
        spearman(torch.zeros(2, 2), torch.zeros(4))


def test_top_k_overlap():
    assert top_k_overlap(torch.arange(20.0), torch.arange(20.0), k=10) == 1.0
    assert top_k_overlap(torch.arange(20.0), -torch.arange(20.0), k=10) == 0.0
    assert top_k_overlap([0.9, 0.1, 0.5, 0.2], [0.8, 0.3, 0.1, 0.7], k=2) == 0.5
    assert top_k_overlap([0.9, 0.1, 0.5, 0.2], [0.8, 0.3, 0.1, 0.7], k=3) == pytest.approx(2 / 3)
    assert top_k_overlap([1.0, 2.0], [2.0, 1.0], k=10) == 1.0  # k above the length: everything overlaps
    with pytest.raises(ArgumentError, match="k: expected an integer >= 1, got 0"):
        top_k_overlap([1.0], [1.0], k=0)


def test_knn_recall_and_its_old_paths():
    assert knn_recall(torch.tensor([[1, 2, 3]]), torch.tensor([[3, 2, 1]])) == 1.0
    assert knn_recall(torch.tensor([[1, 2], [5, 6]]), torch.tensor([[1, 9], [7, 8]])) == 0.25
    assert knn_recall(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[2, 1], [3, 5]])) == 0.75
    with pytest.raises(ArgumentError, match="found, exact"):
        knn_recall(torch.tensor([1, 2]), torch.tensor([[1, 2]]))
    from lightning_fastif.search import knn

    assert lightning_fastif.knn_recall is knn_recall
    assert knn.knn_recall is knn_recall


def test_mislabel_detection_counts():
    scores = torch.tensor([9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 0.5, 0.1, 0.2, 0.3])
    flipped = [0, 2, 7]  # two of them rank first and second; 7 ranks last
    stats = mislabel_detection(scores, flipped, top_fraction=0.3)
    assert stats == {
        "inspected": 3,
        "flagged": 3,
        "found": 2,
        "precision": pytest.approx(2 / 3),
        "recall": pytest.approx(2 / 3),
        "random_recall": pytest.approx(0.3),
    }
    mask = torch.zeros(10, dtype=torch.bool)
    mask[flipped] = True
    assert mislabel_detection(scores, mask, top_fraction=0.3) == stats
    assert math.isnan(mislabel_detection(scores, [], top_fraction=0.3)["recall"])
    with pytest.raises(ArgumentError, match="flagged"):
        mislabel_detection(scores, [10])
    with pytest.raises(ArgumentError, match="flagged"):
        mislabel_detection(scores, torch.ones(9, dtype=torch.bool))
    with pytest.raises(ArgumentError, match="top_fraction"):
        mislabel_detection(scores, flipped, top_fraction=0)
    with pytest.raises(ArgumentError, match="scores"):
        mislabel_detection(torch.tensor([1.0, float("nan")]), [0])
    with pytest.raises(ArgumentError, match="scores"):
        mislabel_detection(torch.zeros(2, 2), [0])


def test_flagged_mask():
    assert flagged_mask([0, 3], 4).tolist() == [True, False, False, True]
    assert flagged_mask(torch.tensor([2.0]), 3).tolist() == [False, False, True]
    with pytest.raises(ArgumentError, match="non-integer"):
        flagged_mask([0.5], 3)


def test_old_homes_import_the_same_functions():
    from benchmarks import common
    from lightning_fastif.core import verify

    assert (verify.pearson, verify.spearman, verify.top_k_overlap) == (pearson, spearman, top_k_overlap)
    assert (common.pearson, common.spearman) == (pearson, spearman)
    sys.modules.pop("lightning_fastif.viz", None)  # imported fresh, so the moved path warns in any test order
    with pytest.warns(DeprecationWarning, match="lightning_fastif.viz moved"):
        from lightning_fastif.viz import mislabel_detection as old

    assert old is mislabel_detection
