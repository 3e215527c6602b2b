"""Inverse-HVP estimators against a dense Hessian built by hand and solved (float64, tiny models)."""

import pytest
import torch

from lightning_fastif.core.hessian import HessianOperator
from lightning_fastif.core.ihvp import ConjugateGradient, ExactInverse, Identity, LiSSA, LiSSADivergenceError
from lightning_fastif.metrics import pearson
from tests.helpers.exact import breast_cancer, cross_entropy_loss, explicit_hessian, fit_logreg, tiny_mlp_problem

DAMPING = 0.05


@pytest.fixture(scope="module")
def mlp():
    model, data = tiny_mlp_problem()
    op = HessianOperator(model, cross_entropy_loss, data)
    hess = explicit_hessian(model, cross_entropy_loss, data)
    exact = torch.linalg.solve(
        hess + DAMPING * torch.eye(hess.shape[0], dtype=hess.dtype), torch.eye(hess.shape[0]).double()
    )
    vectors = torch.randn(5, op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return op, vectors, vectors @ exact.T


@pytest.fixture(scope="module")
def logreg():
    train, _ = breast_cancer(n_train=150)
    model = fit_logreg(train, l2=0.01)
    op = HessianOperator(model, lambda m, b: m.per_example_loss(b), train)
    hess = explicit_hessian(model, lambda m, b: m.per_example_loss(b), train)
    vectors = torch.randn(4, op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return op, vectors, torch.linalg.solve(hess + 0.01 * torch.eye(hess.shape[0], dtype=hess.dtype), vectors.T).T


def test_exact_inverse_equals_hand_built_solve(mlp):
    op, v, expected = mlp
    est = ExactInverse(DAMPING)
    torch.testing.assert_close(est.solve(op, v), expected, rtol=1e-9, atol=1e-10)
    assert est.diagnostics["residual"] < 1e-8
    assert est.diagnostics["estimator"] == "exact"


def test_conjugate_gradient_matches_exact(mlp):
    op, v, expected = mlp
    est = ConjugateGradient(DAMPING, max_iter=200, tol=1e-10)
    got = est.solve(op, v)
    assert pearson(got, expected) >= 0.999
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert est.diagnostics["iterations"] <= 200


def test_lissa_matches_exact_with_suitable_settings(mlp):
    op, v, expected = mlp
    est = LiSSA(damping=DAMPING, scale="auto", recursion_depth=1500, batch_size=60, num_repeats=1, seed=0)
    got = est.solve(op, v)
    assert pearson(got, expected) >= 0.99
    assert est.diagnostics["scale"] > est.diagnostics["scale_estimate"]["eigenvalue"]


def test_lissa_repeats_split_equals_all_repeats(mlp):
    op, v, _ = mlp
    est = LiSSA(damping=DAMPING, scale=5.0, recursion_depth=50, batch_size=4, num_repeats=4, seed=3)
    together = est.solve(op, v)
    parts = est.solve(op, v, repeats=[0, 2]) * 2 + est.solve(op, v, repeats=[1, 3]) * 2
    torch.testing.assert_close(parts / 4, together, rtol=1e-12, atol=1e-12)


def test_lissa_scale_too_small_diverges_with_guidance(mlp):
    op, v, _ = mlp
    with pytest.raises(LiSSADivergenceError, match=r"scale=0\.01.*raise scale to at least .*scale='auto'"):
        LiSSA(damping=DAMPING, scale=0.01, recursion_depth=200, batch_size=8).solve(op, v)


def test_lissa_auto_depth_stops_early_on_logreg(logreg):
    op, v, expected = logreg
    est = LiSSA(damping=0.01, scale="auto", recursion_depth="auto", batch_size=150, max_depth=5000)
    got = est.solve(op, v)
    assert pearson(got, expected) >= 0.99
    assert est.diagnostics["iterations"][0] < 5000


def test_identity_is_plain_dot_product(mlp):
    op, v, _ = mlp
    assert torch.equal(Identity().solve(op, v), v)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: LiSSA(scale=-1.0), "scale: must be a number > 0 or 'auto'"),
        (lambda: LiSSA(recursion_depth=0), "recursion_depth: must be a positive integer or 'auto'"),
        (lambda: LiSSA(batch_size=0), "batch_size: must be a positive integer, got 0"),
        (lambda: LiSSA(damping=float("nan")), "damping: must be a finite number >= 0"),
        (lambda: ConjugateGradient(max_iter=0), "max_iter: must be a positive integer"),
        (lambda: ExactInverse(max_params=0), "max_params: must be a positive integer"),
    ],
)
def test_bad_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_exact_refuses_too_many_parameters(mlp):
    op, v, _ = mlp
    with pytest.raises(ValueError, match=r"max_params: an explicit Hessian over 44 parameters exceeds the limit 10"):
        ExactInverse(DAMPING, max_params=10).solve(HessianOperator(op.function.model, cross_entropy_loss, op.data), v)


def test_wrong_vector_size(mlp):
    op, _, _ = mlp
    with pytest.raises(ValueError, match="vectors: last dimension 3 does not match the 44 selected parameters"):
        ExactInverse(DAMPING).solve(op, torch.zeros(2, 3, dtype=torch.float64))


def test_auto_scale_doubles_after_a_divergence(mlp, monkeypatch):
    """An auto estimate far too low (a tenth of the truth) diverges, is doubled until stable, and still converges."""
    op, v, expected = mlp
    est = LiSSA(damping=DAMPING, scale="auto", recursion_depth=1500, batch_size=60, scale_safety=1.0)
    true_top = est.estimate_top_eigenvalue(op)["eigenvalue"]
    real = LiSSA.estimate_top_eigenvalue

    def too_low(self, operator):
        out = real(self, operator)
        return {**out, "eigenvalue": 0.1 * out["eigenvalue"]}

    monkeypatch.setattr(LiSSA, "estimate_top_eigenvalue", too_low)
    got = est.solve(op, v)
    assert pearson(got, expected) >= 0.98  # measured 0.986: the doubled scale sits near the stability edge
    assert len(est.diagnostics["scale_per_repeat"]) == 1
    assert est.diagnostics["scale"] >= 0.5 * true_top  # doubled from 0.1x at least twice
    fixed = LiSSA(damping=DAMPING, scale=0.1 * true_top, recursion_depth=300, batch_size=60)
    with pytest.raises(LiSSADivergenceError):  # a fixed scale is never changed behind the user's back
        fixed.solve(op, v)
