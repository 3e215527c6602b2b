"""search/preconditioner.py: q = (H_last + λI)⁻¹ g by Cholesky or LU, the damping floor, lazy loading, pickling."""

from __future__ import annotations

import pickle

import pytest
import torch

from lightning_fastif.errors import ArgumentError, SnapshotError
from lightning_fastif.io.atomic import save_tensors
from lightning_fastif.search.preconditioner import HESSIAN_TENSOR, KNN_DAMPING_FLOOR, QueryPreconditioner


def _spd(p: int = 5, seed: int = 0) -> torch.Tensor:
    a = torch.randn(p, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T + 0.5 * torch.eye(p, dtype=torch.float64)


def test_solves_each_row_by_cholesky_and_caches_per_damping():
    h, g = _spd(), torch.randn(3, 5, dtype=torch.float64)
    pre = QueryPreconditioner(h, layer="classifier")
    q = pre(g, damping=0.1)
    expected = torch.linalg.solve(h + 0.1 * torch.eye(5, dtype=torch.float64), g.T).T
    assert q.dtype == torch.float32
    assert q.device.type == "cpu"
    torch.testing.assert_close(q, expected.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pre(g[1], damping=0.1), expected[1].float(), rtol=1e-6, atol=1e-7)  # one row, [P]
    first = pre.factorisation
    assert (first.kind, first.requested, first.damping) == ("cholesky", 0.1, 0.1)
    pre(g, damping=0.1)
    assert pre.factorisation is first  # same λ: the factorisation is kept
    pre(g, damping=1.0)
    assert pre.factorisation is not first
    assert pre.factorisation.damping == 1.0


def test_zero_damping_on_a_singular_matrix_uses_the_floor():
    v = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    h = v.T @ v  # rank 2 of 3
    g = torch.tensor([[1.0, 0.5, -1.0]], dtype=torch.float64)
    pre = QueryPreconditioner(h)
    q = pre(g, damping=0.0)
    floor = KNN_DAMPING_FLOOR * float(h.diagonal().abs().mean())
    assert pre.factorisation.damping == pytest.approx(floor)
    expected = torch.linalg.solve(h + floor * torch.eye(3, dtype=torch.float64), g.T).T
    torch.testing.assert_close(q, expected.float(), rtol=1e-5, atol=0)


def test_indefinite_matrix_is_solved_by_lu_and_a_singular_shift_names_knn_damping():
    h = torch.diag(torch.tensor([-0.5, 1.0, 2.0], dtype=torch.float64))
    g = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    pre = QueryPreconditioner(h)
    torch.testing.assert_close(pre(g, damping=0.25), torch.tensor([[-4.0, 0.8, 1.0 / 2.25]]), rtol=1e-6, atol=0)
    assert pre.factorisation.kind == "lu"
    with pytest.raises(ArgumentError, match=r"knn_damping: expected a λ for which H_last \+ λ·I is invertible"):
        pre(g, damping=0.5)  # H + 0.5 I has the eigenvalue 0


def test_reads_the_matrix_from_its_file_on_first_use_and_is_pickled_without_factors(tmp_path):
    h = _spd(4, seed=1)
    path = save_tensors(tmp_path / "h.safetensors", {HESSIAN_TENSOR: h})
    pre = QueryPreconditioner(path, layer="head")
    g = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(pre(g, 0.2), torch.linalg.solve(h + 0.2 * torch.eye(4, dtype=h.dtype), g.T).T.float())
    clone = pickle.loads(pickle.dumps(pre))
    assert pre.factorisation is not None
    assert clone.factorisation is None
    torch.testing.assert_close(clone(g, 0.2), pre(g, 0.2))
    with pytest.raises(ArgumentError, match=r"queries: expected \[Q, 4\] loss gradients of layer 'head', got \[2, 3\]"):
        pre(torch.zeros(2, 3), 0.2)
    other = save_tensors(tmp_path / "other.safetensors", {"weights": h})
    with pytest.raises(SnapshotError, match="holds no 'last_layer_hessian' tensor"):
        QueryPreconditioner(other)(g, 0.2)
    with pytest.raises(ArgumentError, match="hessian: expected a"):
        QueryPreconditioner([[1.0]])
