"""Faults of the data, the model and the numerics: every one raises an error of its own type that names the
training and/or test indices involved (or the setting to change); nothing non-finite is ranked or returned."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fastif import (
    ArgumentError,
    ConjugateGradient,
    ConvergenceError,
    ExactInverse,
    HessianOperator,
    Identity,
    LiSSA,
    LiSSADivergenceError,
    NonFiniteError,
    influence_scores,
    inverse_hvp_of_test,
    self_influence,
)
from lightning_fastif.core.batches import IndexedData
from lightning_fastif.core.grads import FunctionalLoss
from lightning_fastif.core.influence import score_candidates
from tests.helpers.exact import cross_entropy_loss, tiny_mlp_problem
from tests.reliability.problems import quadratic_problem


def quadratic_loss(model, batch):
    return model.per_example_loss(batch)


@pytest.fixture
def mlp():
    model, data = tiny_mlp_problem(n=20)
    return model, data


def with_nan_row(data: TensorDataset, row: int, value: float = float("nan")) -> TensorDataset:
    x, y = (t.clone() for t in data.tensors)
    x[row, 1] = value
    return TensorDataset(x, y)


def test_a_nan_weight_makes_every_loss_nan_and_says_so(mlp):
    model, data = mlp
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"test points all 3 \[0, 1, 2\] are not finite.*parameters hold NaN"):
        influence_scores(model, cross_entropy_loss, tuple(t[:3] for t in data.tensors), data, ihvp=Identity())


@pytest.mark.parametrize(
    "make",
    [lambda: ExactInverse(0.05), lambda: ConjugateGradient(0.05), lambda: Identity()],
    ids=["exact", "cg", "identity"],
)
def test_a_nan_training_input_is_named_and_never_ranked(mlp, make):
    """On main the NaN row came out most helpful (NaN sorts first); now the solve or the scoring names it."""
    model, data = mlp
    bad = with_nan_row(data, 13)
    with pytest.raises(NonFiniteError, match=r"training examples \[13\]"):
        influence_scores(model, cross_entropy_loss, tuple(t[:2] for t in data.tensors), bad, ihvp=make())


def test_a_nan_training_input_met_by_lissa_minibatches_is_named(mlp):
    model, data = mlp
    bad = with_nan_row(data, 6)
    with pytest.raises(NonFiniteError, match=r"training examples \[6\] have a NaN or infinite loss"):
        influence_scores(
            model, cross_entropy_loss, tuple(t[:2] for t in data.tensors), bad, ihvp=LiSSA(0.05, recursion_depth=50)
        )


def test_a_nan_row_outside_the_candidates_does_not_stop_the_others(mlp):
    model, data = mlp
    bad = with_nan_row(data, 13)
    scores = influence_scores(
        model,
        cross_entropy_loss,
        tuple(t[:2] for t in data.tensors),
        bad,
        ihvp=Identity(),
        candidates=torch.tensor([[0, 1], [2, 3]]),
    )
    assert bool(torch.isfinite(scores).all())
    with pytest.raises(NonFiniteError, match=r"influence scores are not finite for training examples \[13\] \(against"):
        influence_scores(
            model,
            cross_entropy_loss,
            tuple(t[:2] for t in data.tensors),
            bad,
            ihvp=Identity(),
            candidates=torch.tensor([[0, 13], [2, 3]]),
        )


def test_a_nan_test_input_is_named(mlp):
    model, data = mlp
    x, y = (t[:4].clone() for t in data.tensors)
    x[2, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"the loss gradients of test points \[2\] are not finite"):
        influence_scores(model, cross_entropy_loss, (x, y), data, ihvp=ExactInverse(0.05))
    with pytest.raises(NonFiniteError, match=r"test points \[2\]"):
        inverse_hvp_of_test(model, cross_entropy_loss, (x, y), data, ihvp=ExactInverse(0.05))


def test_an_infinite_gradient_is_named():
    """``sqrt`` of a loss that is exactly zero for one example: a finite loss with an infinite gradient."""
    net = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, -1.0]], dtype=torch.float64))
    x = torch.tensor([[1.0, 2.0], [3.0, 3.0], [2.0, 5.0]], dtype=torch.float64)  # row 1: wᵀx = 0

    def root_loss(m, batch):
        return m(batch[0]).squeeze(-1).pow(2).sqrt()

    data = TensorDataset(x)
    with pytest.raises(NonFiniteError, match=r"training examples \[1\]"):
        influence_scores(net, root_loss, (x[[0]],), data, ihvp=Identity())


def test_an_overflowing_loss_is_named():
    net = nn.Linear(2, 1, bias=False).double()
    x = torch.tensor([[0.1, 0.1], [800.0, 800.0], [0.2, 0.0]], dtype=torch.float64)
    with torch.no_grad():
        net.weight.fill_(1.0)

    def exp_loss(m, batch):
        return m(batch[0]).squeeze(-1).exp()

    with pytest.raises(NonFiniteError, match=r"the loss gradients of examples \[1\] are not finite"):
        self_influence(net, exp_loss, TensorDataset(x), ihvp=Identity())
    with pytest.raises(NonFiniteError, match=r"training examples \[1\]"):
        influence_scores(net, exp_loss, (x[[0]],), TensorDataset(x), ihvp=Identity())


def test_self_influence_names_the_row_of_its_own_data(mlp):
    model, data = mlp
    with pytest.raises(NonFiniteError, match=r"examples \[11\]"):
        self_influence(model, cross_entropy_loss, with_nan_row(data, 11), ihvp=Identity(), batch_size=4)


def test_non_finite_s_test_and_vectors_are_refused(mlp):
    model, data = mlp
    f = FunctionalLoss(model, cross_entropy_loss)
    s_test = torch.zeros(3, f.num_params, dtype=torch.float64)
    s_test[1, 5] = float("inf")
    with pytest.raises(NonFiniteError, match=r"s_test of test points \[1\] are not finite"):
        score_candidates(f, IndexedData(data), s_test)
    op = HessianOperator(model, cross_entropy_loss, data)
    with pytest.raises(NonFiniteError, match=r"the vectors of rows \[1\] are not finite"):
        ExactInverse(0.05).solve(op, s_test)


def test_lissa_with_damping_below_lambda_min_names_damping_and_a_value_that_works():
    model, data = quadratic_problem([-0.2, 0.5, 1.0])
    op = HessianOperator(model, quadratic_loss, data)
    with pytest.raises(
        LiSSADivergenceError, match=r"damping: expected a value above 0\.2 .*-0\.2.*got 0\.01; damping=0\.4"
    ):
        LiSSA(0.01, recursion_depth=300).solve(op, torch.ones(3, dtype=torch.float64))


def test_cg_with_damping_below_lambda_min_names_damping():
    model, data = quadratic_problem([-0.2, 0.5, 1.0])
    op = HessianOperator(model, quadratic_loss, data)
    with pytest.raises(
        ArgumentError, match=r"^damping: expected a value above 0\.2 .*got 0\.01; damping=0\.4 would work"
    ):
        ConjugateGradient(0.01).solve(op, torch.ones(3, dtype=torch.float64))


def test_exact_with_damping_below_lambda_min_warns_or_raises_when_strict():
    model, data = quadratic_problem([-0.2, 0.5, 1.0])
    op = HessianOperator(model, quadratic_loss, data)
    with pytest.warns(UserWarning, match=r"ExactInverse: H \+ damping·I is indefinite.*damping=0\.4 would work"):
        ExactInverse(0.01).solve(op, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ArgumentError, match=r"damping: expected a value above 0\.2"):
        ExactInverse(0.01, strict=True).solve(op, torch.ones(3, dtype=torch.float64))


def test_exact_on_a_singular_system_names_damping():
    model, data = quadratic_problem([0.0, 0.5, 1.0])
    with pytest.raises(ArgumentError, match=r"^damping: expected a value that makes H \+ damping·I invertible"):
        ExactInverse(0.0).solve(HessianOperator(model, quadratic_loss, data), torch.ones(3, dtype=torch.float64))


def test_slow_geometric_divergence_is_an_error_not_a_number():
    """1.01x per step along one direction that starts 100x smaller than the rest (see test_ihvp_auto)."""
    model, data = quadratic_problem([-0.03, 0.5, 1.0])
    op = HessianOperator(model, quadratic_loss, data)
    v = model.q @ torch.tensor([0.01, 1.0, 1.0], dtype=torch.float64)
    with pytest.raises(LiSSADivergenceError, match=r"diverged at step [0-9]+ \(norm grew .*damping=0\.06 would work"):
        LiSSA(0.01, scale=2.0, recursion_depth=3000).solve(op, v)


def test_scale_below_the_top_eigenvalue_names_scale():
    model, data = quadratic_problem([0.1, 0.5, 4.0])
    op = HessianOperator(model, quadratic_loss, data)
    with pytest.raises(LiSSADivergenceError, match=r"scale=1, .*raise scale to at least 6\.01"):
        LiSSA(0.01, scale=1.0, recursion_depth=200).solve(op, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (LiSSA, {"recursion_depth": 3}, r"^LiSSA: .* > tol=0\.2 .*raise recursion_depth \(now 3\)"),
        (ConjugateGradient, {"max_iter": 1}, r"^ConjugateGradient: .*raise max_iter \(now 1\)"),
    ],
    ids=["lissa", "cg"],
)
def test_a_solve_short_of_tol_warns_once_or_raises_when_strict(mlp, cls, kwargs, match):
    model, data = mlp
    op = HessianOperator(model, cross_entropy_loss, data)
    v = op.function.per_example_gradients(tuple(t[:2] for t in data.tensors))
    with pytest.raises(ConvergenceError, match=match):
        cls(0.05, strict=True, **kwargs).solve(op, v)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        x = cls(0.05, **kwargs).solve(op, v)
    assert bool(torch.isfinite(x).all())
    assert [str(w.message).split(":")[0] for w in record] == [cls.__name__]  # one warning, naming the estimator
