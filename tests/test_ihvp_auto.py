"""Automatic LiSSA settings and convergence diagnostics, against exact solves on models small enough to invert."""

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_fastif import ConjugateGradient, ExactInverse, HessianOperator, LiSSA, LiSSADivergenceError
from lightning_fastif.core.verify import pearson
from tests.helpers.exact import breast_cancer, cross_entropy_loss, fit_logreg, tiny_mlp_problem

MLP_DAMPING = 0.05
L2 = 0.03


def logreg_loss(model, batch):
    return model.per_example_loss(batch)


@pytest.fixture(scope="module")
def mlp():
    """A non-convex 44-parameter MLP: minibatch (8) Hessians reach eigenvalue ~2.9, the full one ~1.05."""
    model, data = tiny_mlp_problem()
    op = HessianOperator(model, cross_entropy_loss, data)
    grads = op.function.per_example_gradients(data.tensors)
    v = grads[:4]
    return op, grads, v, ExactInverse(MLP_DAMPING).solve(op, v)


@pytest.fixture(scope="module")
def logreg():
    """Logistic regression trained with L2 = damping = 0.03 to its exact optimum (Newton)."""
    train, test = breast_cancer(n_train=200, n_test=10)
    model = fit_logreg(train, l2=L2)
    op = HessianOperator(model, logreg_loss, train)
    grads = op.function.per_example_gradients(train.tensors)
    v = op.function.per_example_gradients(tuple(t[:4] for t in test.tensors))
    return op, grads, v, ExactInverse(L2).solve(op, v)


def score_pearson(x, exact, grads) -> float:
    """Pearson of the influence scores g_trainᵀ s_test over all (test, train) pairs, estimate against exact."""
    return pearson(x @ grads.T, exact @ grads.T)


def test_auto_scale_converges_where_a_fixed_small_scale_diverges(mlp):
    op, grads, v, exact = mlp
    with pytest.raises(LiSSADivergenceError, match=r"scale=0\.5.*raise scale to at least [0-9.]+, or use scale='auto'"):
        LiSSA(MLP_DAMPING, scale=0.5, recursion_depth=1000, batch_size=8).solve(op, v)
    est = LiSSA(MLP_DAMPING, scale="auto", recursion_depth=1000, batch_size=8, tail_fraction=0.5)
    x = est.solve(op, v)
    r = score_pearson(x, exact, grads)
    assert r >= 0.99, r  # measured 0.9997
    d = est.diagnostics
    assert d["auto"] == ["scale"]
    # The minibatch Hessian's top eigenvalue exceeds the full Hessian's (~1.05): that is why 0.5 diverged.
    full_top = float(torch.linalg.eigvalsh(op.dense()).max())
    assert d["scale_estimate"]["eigenvalue"] > full_top
    assert d["scale"] == pytest.approx(1.5 * (d["scale_estimate"]["eigenvalue"] + MLP_DAMPING))
    assert d["scale_estimate"]["batches"] == 8
    assert len(d["scale_estimate"]["per_batch"]) == 8
    assert d["scale_estimate"]["seconds"] > 0


def test_auto_depth_reaches_exact_in_fewer_steps_than_a_fixed_depth(logreg):
    op, grads, v, exact = logreg
    fixed = LiSSA(L2, recursion_depth=1000, batch_size=16, tail_fraction=0.5)
    auto = LiSSA(L2, recursion_depth="auto", batch_size=16, tail_fraction=0.5)
    r_fixed = score_pearson(fixed.solve(op, v), exact, grads)
    r_auto = score_pearson(auto.solve(op, v), exact, grads)
    steps = auto.diagnostics["iterations"][0]
    assert r_fixed >= 0.99, r_fixed  # measured 0.9995
    assert r_auto >= 0.99, r_auto  # measured 0.998
    assert steps < 1000, steps  # measured 280
    assert auto.diagnostics["converged"] == [True]
    assert auto.diagnostics["stopped_by"][0] in ("tol", "noise")
    assert auto.diagnostics["window"] >= auto.window
    # A depth far below what auto chose does not reach it: auto stopped for a reason.
    short = LiSSA(L2, recursion_depth=10, batch_size=16)
    assert score_pearson(short.solve(op, v), exact, grads) < 0.99


def test_auto_depth_does_not_stop_early_when_scale_is_too_large(logreg):
    """FastIF-like scale with small damping: a short window would see the slow growth as converged."""
    op, grads, v, exact = logreg
    est = LiSSA(L2, scale=100.0, recursion_depth="auto", batch_size=16, max_depth=400)
    with pytest.warns(UserWarning, match=r"reached max_depth=400.*raise max_depth"):
        x = est.solve(op, v)
    assert est.diagnostics["converged"] == [False]
    assert est.diagnostics["stopped_by"] == ["max_depth"]
    assert est.diagnostics["iterations"] == [400]
    assert est.diagnostics["residual"] > 0.3  # and the residual says so too
    assert score_pearson(x, exact, grads) < 0.99


def test_residual_exact_tiny_and_five_lissa_steps_large(logreg, mlp):
    for op, _, v, _ in (logreg, mlp):
        exact = ExactInverse(L2)
        exact.solve(op, v)
        assert exact.diagnostics["residual"] < 1e-8
        short = LiSSA(L2, recursion_depth=5)
        short.solve(op, v)
        assert short.diagnostics["residual"] > 0.5, short.diagnostics["residual"]
        cg = ConjugateGradient(L2, max_iter=200, tol=1e-10)
        cg.solve(op, v)
        assert cg.diagnostics["residual"] < 1e-6


def test_tail_averaging_lowers_noise_at_the_same_cost(logreg):
    op, grads, v, exact = logreg
    last = LiSSA(L2, recursion_depth=400, batch_size=8)
    mean = LiSSA(L2, recursion_depth=400, batch_size=8, tail_fraction=0.5)
    x_last, x_mean = last.solve(op, v), mean.solve(op, v)
    assert mean.diagnostics["iterations"] == last.diagnostics["iterations"] == [400]
    assert mean.diagnostics["residual"] < 0.5 * last.diagnostics["residual"]
    assert score_pearson(x_mean, exact, grads) > score_pearson(x_last, exact, grads)


def test_scale_estimate_is_cached_per_operator(logreg):
    op, _, v, _ = logreg
    est = LiSSA(L2, recursion_depth=3)
    est.solve(op, v)
    first = est.diagnostics["scale"]
    assert est.diagnostics["scale_estimate"]["cached"] is False
    est.solve(op, v)
    assert est.diagnostics["scale_estimate"]["cached"] is True
    assert est.diagnostics["scale"] == first
    other = HessianOperator(op.function.model, None, op.data, function=op.function)
    est.solve(other, v)
    assert est.diagnostics["scale_estimate"]["cached"] is False


def test_divergence_on_a_concave_loss_asks_for_damping():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1).double()
    data = TensorDataset(torch.randn(40, 3, dtype=torch.float64))
    op = HessianOperator(lin, lambda m, b: -(m(b[0]).squeeze(-1) ** 2), data)
    with pytest.raises(LiSSADivergenceError, match=r"eigenvalues near -[0-9.]+, below -damping.*raise damping above"):
        LiSSA(0.1, recursion_depth=200).solve(op, torch.randn(2, 4, dtype=torch.float64))


def test_settings_as_used_are_reported(logreg):
    op, _, v, _ = logreg
    est = LiSSA(L2, recursion_depth="auto", batch_size=32, max_depth=300, tol=0.05, window=10)
    est.solve(op, v)
    d = est.diagnostics
    for key in ("estimator", "damping", "scale", "recursion_depth", "batch_size", "num_repeats", "seed", "tol"):
        assert key in d
    assert isinstance(d["scale"], float)
    assert d["recursion_depth"] == "auto"
    assert d["auto"] == ["scale", "recursion_depth"]
    assert d["iterations"][0] <= 300
    assert d["seconds"] > 0
    assert d["residual"] >= 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tail_fraction": 1.0}, r"tail_fraction: must be a number in \[0, 1\), got 1.0"),
        ({"tail_fraction": -0.1}, r"tail_fraction: must be a number in \[0, 1\)"),
        ({"scale_safety": 0.5}, "scale_safety: must be >= 1"),
        ({"window": 0}, "window: must be a positive integer"),
        ({"tol": 0.0}, "tol: must be > 0"),
    ],
)
def test_bad_auto_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LiSSA(**kwargs)
