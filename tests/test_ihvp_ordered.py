"""Full-data products over size-ordered chunks (core/ihvp/ordered.py): less padding, the same solution."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fastif.core.batches import IndexedData
from lightning_fastif.core.hessian import HessianOperator
from lightning_fastif.core.ihvp import AutoInverse, ConjugateGradient, ExactInverse
from lightning_fastif.core.ihvp.ordered import SizeOrdered, example_sizes, size_order
from lightning_fastif.errors import ArgumentError

LENGTHS = [5, 1, 4, 2, 6, 1, 3, 2]
"""In dataset order, chunks of 4 pad to 5 and 6 (44 positions); sorted by size, to 2 and 6 (32 positions)."""


def pad(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad each batch to its longest sequence (zeros), like a text collate."""
    longest = max(item["x"].shape[0] for item in items)
    x = torch.zeros(len(items), longest, items[0]["x"].shape[1], dtype=items[0]["x"].dtype)
    for i, item in enumerate(items):
        x[i, : item["x"].shape[0]] = item["x"]
    return {"x": x, "y": torch.stack([item["y"] for item in items])}


class SumPooled(nn.Module):
    """A linear map of the summed positions (a convex squared loss): zero padding changes nothing, as in a masked
    text model."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(3, 1).double()
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.shape[1])
        return self.out(x.sum(1)).squeeze(-1)


def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (model(batch["x"]) - batch["y"]) ** 2


@pytest.fixture
def padded() -> tuple[SumPooled, list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    items = [
        {
            "x": torch.randn(n, 3, generator=g, dtype=torch.float64),
            "y": torch.randn((), generator=g, dtype=torch.float64),
        }
        for n in LENGTHS
    ]
    torch.manual_seed(0)
    return SumPooled(), items


def test_size_order_sorts_by_the_collated_size_and_keeps_fixed_sizes_in_place(padded):
    _, items = padded
    data = IndexedData(items, collate_fn=pad)
    # x: length·3 numbers, y: 1.
    assert example_sizes(data).tolist() == [3 * n + 1 for n in LENGTHS]
    order, sizes = size_order(data)
    assert order.tolist() == [1, 5, 3, 7, 6, 2, 0, 4]  # stable: equal lengths keep their dataset order
    assert sizes.tolist() == [3 * n + 1 for n in LENGTHS]
    same = IndexedData(TensorDataset(torch.zeros(5, 2), torch.zeros(5)))
    assert example_sizes(same) is None
    assert size_order(same) == (None, None)
    assert size_order(IndexedData([torch.zeros(2)] * 3, collate_fn=torch.stack)) == (None, None)


def test_products_run_over_size_ordered_chunks_with_the_same_mean(padded):
    model, items = padded
    op = HessianOperator(model, loss, IndexedData(items, collate_fn=pad), batch_size=4)
    v = torch.randn(2, op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model.seen.clear()
    plain = op.matvec(v)
    assert model.seen == [5, 6]  # one forward per chunk, padded to its longest
    ordered = SizeOrdered(op, *size_order(op.data))
    model.seen.clear()
    torch.testing.assert_close(ordered.matvec(v), plain, rtol=1e-12, atol=1e-14)
    assert model.seen == [2, 6]
    model.seen.clear()
    sample = torch.tensor([4, 1, 0, 3])  # lengths 6, 1, 5, 2: sorted, one chunk padded to 6 either way
    torch.testing.assert_close(ordered.matvec(v, sample), op.matvec(v, sample), rtol=1e-12, atol=1e-14)
    assert ordered.num_params == op.num_params
    assert ordered.operator is op


def test_cg_solves_over_size_ordered_chunks_and_certifies_over_them(padded):
    model, items = padded
    data = IndexedData(items, collate_fn=pad)
    damping = 0.1
    exact = ExactInverse(damping, residual_examples=0).solve(
        HessianOperator(model, loss, data), torch.eye(4)[:2].double()
    )
    cg = ConjugateGradient(damping, max_iter=100)
    op = HessianOperator(model, loss, data, batch_size=4)
    model.seen.clear()
    x = cg.solve(op, torch.eye(4)[:2].double())
    torch.testing.assert_close(x, exact, rtol=1e-6, atol=1e-8)
    d = cg.diagnostics
    assert d["chunks"] == "by example size"
    assert set(model.seen) == {2, 6}  # every product, the certificate's included, pads to 2 and 6
    assert d["converged"]
    assert d["residual_from"] == "this solve"
    assert d["residual_examples"] == len(LENGTHS)
    assert d["residual"] <= d["tol"]
    iterations = d["iterations"]
    model.seen.clear()
    cg.solve(HessianOperator(model, loss, data, batch_size=4), torch.eye(4)[:2].double())
    # The same system: the first certificate and this solve's recurrence, no extra product (one per iteration).
    assert cg.diagnostics["residual_from"] == "first solve and this solve's recurrence"
    assert len(model.seen) == 2 * iterations


def test_auto_inverse_cg_route_orders_chunks_and_tensor_data_keeps_its_order(padded):
    model, items = padded
    data = IndexedData(items, collate_fn=pad)
    damping = 0.1
    v = torch.eye(4)[:2].double()
    exact = ExactInverse(damping, residual_examples=0).solve(HessianOperator(model, loss, data), v)
    auto = AutoInverse(damping, max_params=2)
    x = auto.solve(HessianOperator(model, loss, data, batch_size=4), v)
    assert auto.diagnostics["chose"] == "cg"
    assert auto.diagnostics["chunks"] == "by example size"
    torch.testing.assert_close(x, exact, rtol=1e-5, atol=1e-7)
    net = nn.Linear(3, 1).double()
    tensors = TensorDataset(torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64))
    cg = ConjugateGradient(0.1)
    cg.solve(HessianOperator(net, lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2, tensors), torch.ones(1, 4).double())
    assert cg.diagnostics["chunks"] == "dataset order"


class RowCounter:
    """The operator, recording how many vectors each full-data product takes."""

    def __init__(self, operator: HessianOperator) -> None:
        self.operator = operator
        self.rows: list[int] = []

    def matvec(self, vectors: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        self.rows.append(vectors.shape[0])
        return self.operator.matvec(vectors, indices)

    def __getattr__(self, name: str) -> object:
        return getattr(self.operator, name)


@pytest.mark.parametrize("preconditioner", [None, "ekfac"])
def test_rows_that_converged_take_no_more_products(padded, preconditioner):
    model, items = padded
    data = IndexedData(items, collate_fn=pad)
    damping = 0.1
    h = HessianOperator(model, loss, data).dense()
    # An eigenvector of H converges in one plain CG step; the other row takes more.
    v = torch.stack([torch.linalg.eigh(h).eigenvectors[:, -1], torch.tensor([1.0, -2.0, 0.5, 1.0]).double()])
    exact = torch.linalg.solve(h + damping * torch.eye(4, dtype=torch.float64), v.T).T
    cg = ConjugateGradient(damping, max_iter=100, tol=1e-10, preconditioner=preconditioner)
    counter = RowCounter(HessianOperator(model, loss, data, batch_size=4))
    x = cg.solve(counter, v)
    torch.testing.assert_close(x, exact, rtol=1e-8, atol=1e-10)
    iterations = cg.diagnostics["iterations"]
    assert cg.diagnostics["converged"]
    assert iterations >= 2
    # Iteration 1 takes both rows, later ones the unconverged row only (EK-FAC is exact on the eigenvector here as
    # well: measured 4 iterations); then the certificate takes both.
    assert counter.rows == [2] + [1] * (iterations - 1) + [2]


def test_preconditioned_cg_on_an_indefinite_system_names_a_bound_and_a_damping_to_try():
    import re

    from lightning_fastif.core.ihvp.base import suggest_damping

    torch.manual_seed(0)
    lin = nn.Linear(3, 1).double()
    data = TensorDataset(torch.randn(40, 3, dtype=torch.float64))
    op = HessianOperator(lin, lambda m, b: -(m(b[0]).squeeze(-1) ** 2), data)  # concave: H = -2·E[x̃ x̃ᵀ]
    eigenvalues = torch.linalg.eigvalsh(op.dense())
    cg = ConjugateGradient(0.01, preconditioner="ekfac")
    with pytest.raises(ArgumentError, match="damping: expected a damping that makes H") as err:
        cg.solve(op, torch.randn(2, 4, dtype=torch.float64))
    found = re.search(r"eigenvalue at most (\S+), .*damping must exceed (\S+); try damping=(\S+) \(", str(err.value))
    rayleigh, bound, suggested = float(found[1]), float(found[2]), float(found[3])
    # A Rayleigh quotient of H lies within its spectrum, so it bounds λ_min from above.
    assert float(eigenvalues.min()) - 1e-3 <= rayleigh <= float(eigenvalues.max()) + 1e-3
    assert rayleigh < -0.01
    assert bound == pytest.approx(-rayleigh, rel=1e-2)
    assert suggested == pytest.approx(suggest_damping(rayleigh), rel=1e-2)
