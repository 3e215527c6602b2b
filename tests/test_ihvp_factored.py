"""AutoInverse beyond the exact solve: EK-FAC-preconditioned CG and its caches across test batches, factors handed
over by ``use_factors`` (also to EKFAC and CG), LiSSA where no layer is factored; against exact solves."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_fastif import EKFAC, AutoInverse, ConjugateGradient, ExactInverse, HessianOperator, fit_kfac
from lightning_fastif.core.curvature import ekfac_correct
from lightning_fastif.errors import ArgumentError
from tests.test_curvature import mse, per_example, teacher_student_regression

D = torch.float64
DAMPING = 0.01


@pytest.fixture(scope="module")
def problem():
    """The well-specified tanh MLP of test_curvature (83 parameters), three test vectors and their exact solve."""
    model, data = teacher_student_regression()
    v = per_example(model, mse, TensorDataset(*(t[:3] for t in data.tensors)))
    exact = ExactInverse(DAMPING, residual_examples=0).solve(HessianOperator(model, mse, data), v)
    return model, data, v, exact


def relative_error(x: Tensor, exact: Tensor) -> float:
    return float(((x - exact).norm(dim=-1) / exact.norm(dim=-1)).max())


@pytest.mark.parametrize(
    "make",
    [
        lambda: EKFAC(DAMPING, residual_examples=0),
        lambda: ConjugateGradient(DAMPING, tol=1e-9, max_iter=500, residual_examples=0, preconditioner="ekfac"),
        lambda: AutoInverse(DAMPING, max_params=10, tol=1e-9, residual_examples=0),
    ],
    ids=["ekfac", "cg", "auto"],
)
def test_given_factors_replace_the_fit_for_the_next_system_then_are_cached(problem, make):
    model, data, v, exact = problem
    # Factors from half the data: different from what the estimator would fit, so their use shows in the answer.
    half = TensorDataset(*(t[:128] for t in data.tensors))
    given = ekfac_correct(fit_kfac(model, mse, half), model, mse, half)
    estimator = make()
    assert estimator.use_factors(given) is True
    x = estimator.solve(HessianOperator(model, mse, data), v)
    assert estimator.diagnostics["factors_from"] == "given"
    if isinstance(estimator, EKFAC):
        torch.testing.assert_close(x, given.inverse_apply(v, DAMPING))
        fitted = EKFAC(DAMPING, residual_examples=0).solve(HessianOperator(model, mse, data), v)
        assert relative_error(fitted, x) > 1e-3  # the given factors were used, not a fit
    else:
        assert relative_error(x, exact) < 1e-6  # CG solves the true system whatever the preconditioner
    again = estimator.solve(HessianOperator(model, mse, data), v)  # a new operator over the same system
    assert estimator.diagnostics["factors_from"] == "cached"
    torch.testing.assert_close(again, x)
    with pytest.raises(ArgumentError, match=r"factors: expected KFACFactors \(from fit_kfac or KFACFactors.load\)"):
        estimator.use_factors("factors")


def test_auto_inverse_uses_preconditioned_cg_beyond_the_exact_solve_and_caches_per_system(problem):
    model, data, v, exact = problem
    plain = ConjugateGradient(DAMPING, tol=1e-6, max_iter=500)
    plain.solve(HessianOperator(model, mse, data), v)
    auto = AutoInverse(DAMPING, max_params=50, tol=1e-6, residual_examples=100)
    x = auto.solve(HessianOperator(model, mse, data), v)
    d = auto.diagnostics
    assert (d["chose"], d["preconditioner"], d["factors_from"], d["converged"]) == ("cg", "ekfac", "fitted", True)
    assert d["residual_examples"] == 256  # all N: CG solves the full-data system
    assert d["why"] == "P=83 > max_params=50: ekfac-preconditioned CG (2 factored layers cover 83 of 83 parameters)"
    assert relative_error(x, exact) < 1e-5
    assert d["iterations"] * 2 < plain.diagnostics["iterations"], (d["iterations"], plain.diagnostics["iterations"])
    # The next test batch over the same weights: no fit, no residual check beyond CG's own recurrence.
    w = per_example(model, mse, TensorDataset(*(t[3:8] for t in data.tensors)))
    y = auto.solve(HessianOperator(model, mse, data), w)
    d = auto.diagnostics
    assert (d["factors_from"], d["preconditioner_fit_seconds"]) == ("cached", 0.0)
    assert d["residual_from"] == "first solve and this solve's recurrence"
    want = ExactInverse(DAMPING, residual_examples=0).solve(HessianOperator(model, mse, data), w)
    assert relative_error(y, want) < 1e-5
    # New weights: a new system, so the factors are fitted again.
    with torch.no_grad():
        model[2].bias.add_(1e-4)
    try:
        auto.solve(HessianOperator(model, mse, data), w)
        assert auto.diagnostics["factors_from"] == "fitted"
    finally:
        with torch.no_grad():
            model[2].bias.sub_(1e-4)


class Bilinear(nn.Module):
    """``y = xᵀ W x'`` with a bare parameter matrix: no layer K-FAC factors."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3, dtype=D) * 0.3)

    def forward(self, x: Tensor) -> Tensor:
        return ((x @ self.weight) * x.flip(-1)).sum(-1, keepdim=True)


def test_auto_inverse_keeps_lissa_without_a_factored_layer():
    torch.manual_seed(0)
    model = Bilinear()
    x = torch.randn(64, 3, dtype=D)
    data = TensorDataset(x, torch.randn(64, 1, dtype=D))
    op = HessianOperator(model, mse, data)
    auto = AutoInverse(0.5, max_params=4, tol=0.05)
    estimator, why = auto.choose(op)
    assert estimator.name == "lissa"
    assert why == "P=9 > max_params=4: LiSSA (no selected layer K-FAC factors: Linear, Conv2d, Embedding)"
    # Beyond cg_max_train examples a CG iteration (a pass over all N) costs more than LiSSA's minibatch steps.
    few = AutoInverse(0.5, max_params=3, cg_max_train=10)
    lin = HessianOperator(nn.Linear(3, 1).double(), mse, data)
    assert few.choose(lin)[1] == (
        "P=4 > max_params=3: LiSSA (N=64 > cg_max_train=10: a CG iteration is a pass over all N examples)"
    )
    v = per_example(model, mse, TensorDataset(x[:2], data.tensors[1][:2]))
    got = auto.solve(op, v)
    assert auto.diagnostics["converged"] is True
    exact = ExactInverse(0.5, residual_examples=0).solve(op, v)
    assert relative_error(got, exact) < 0.1
