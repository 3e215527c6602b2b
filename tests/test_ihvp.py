"""Inverse-HVP estimators against a dense Hessian built by hand and solved (float64, tiny models)."""

import warnings

import pytest
import torch

from lightning_fastif import ArgumentError, ConvergenceError
from lightning_fastif.core.hessian import HessianOperator
from lightning_fastif.core.ihvp import ConjugateGradient, ExactInverse, Identity, LiSSA, LiSSADivergenceError
from lightning_fastif.metrics import pearson
from tests.helpers.exact import breast_cancer, cross_entropy_loss, explicit_hessian, fit_logreg, tiny_mlp_problem
from tests.reliability.problems import quadratic_problem

DAMPING = 0.05


def quadratic_loss(model, batch):
    return model.per_example_loss(batch)


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


def count_matvecs(monkeypatch) -> list[int]:
    """Count HessianOperator.matvec calls and the vectors they carry (full-data and residual products)."""
    calls: list[int] = []
    real = HessianOperator.matvec

    def counted(self, vectors, indices=None):
        calls.append(1 if vectors.dim() == 1 else vectors.shape[0])
        return real(self, vectors, indices)

    monkeypatch.setattr(HessianOperator, "matvec", counted)
    return calls


def test_exact_inverse_equals_hand_built_solve(mlp):
    op, v, expected = mlp
    est = ExactInverse(DAMPING)
    torch.testing.assert_close(est.solve(op, v), expected, rtol=1e-9, atol=1e-10)
    d = est.diagnostics
    assert d["residual"] < 1e-12
    assert d["estimator"] == "exact"
    assert (d["converged"], d["residual_examples"], d["residual_from"]) == (True, 60, "this solve")
    assert (d["factorisation"], d["factorised"], d["tol"]) == ("cholesky", True, 1e-6)


def test_exact_factorises_once_per_weights_and_damping(mlp, monkeypatch):
    """New operators over the same weights reuse the factor and the certificate: no product at all."""
    op, v, expected = mlp
    est = ExactInverse(DAMPING)
    est.solve(op, v)
    calls = count_matvecs(monkeypatch)
    other = HessianOperator(op.function.model, cross_entropy_loss, op.data)  # a new test batch, a new operator
    torch.testing.assert_close(est.solve(other, v[:2]), expected[:2], rtol=1e-9, atol=1e-10)
    assert calls == []
    assert (est.diagnostics["factorised"], est.diagnostics["residual_from"]) == (False, "first solve")
    model = op.function.model
    with torch.no_grad():
        model[0].bias.add_(0.1)  # an in-place update bumps the version counter
    try:
        est.solve(HessianOperator(model, cross_entropy_loss, op.data), v)
        assert est.diagnostics["factorised"] is True
        assert sum(calls) == 44 + 5  # the Hessian's 44 columns, then the 5 vectors of the new certificate
        calls.clear()
        model[0].bias.data.sub_(0.1)  # a write through .data bypasses the version counter; the checksum sees it
        torch.testing.assert_close(est.solve(HessianOperator(model, cross_entropy_loss, op.data), v), expected)
        assert est.diagnostics["factorised"] is True
    finally:
        with torch.no_grad():
            model[0].bias.copy_(op.function.primals["0.bias"])


def test_exact_warns_on_an_indefinite_system_and_names_the_damping():
    model, data = quadratic_problem([-0.03, 0.5, 1.0])
    op = HessianOperator(model, quadratic_loss, data)
    v = torch.ones(1, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"indefinite.*damping: expected a value above 0\.03 .*-0\.03.*damping=0\.06"):
        x = ExactInverse(0.01).solve(op, v)
    torch.testing.assert_close(x, torch.linalg.solve(model.a + 0.01 * torch.eye(3, dtype=torch.float64), v.T).T)
    with pytest.raises(ArgumentError, match=r"damping: expected a value above 0\.03"):
        ExactInverse(0.01, strict=True).solve(op, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the value the message names works
        ExactInverse(0.06).solve(op, v)


def test_exact_refuses_a_singular_system():
    model, data = quadratic_problem([0.0, 0.5, 1.0])
    op = HessianOperator(model, quadratic_loss, data)
    with pytest.raises(ArgumentError, match=r"damping: expected a value that makes H \+ damping·I invertible.*got 0"):
        ExactInverse(0.0).solve(op, torch.ones(3, dtype=torch.float64))


def test_conjugate_gradient_matches_exact(mlp):
    op, v, expected = mlp
    est = ConjugateGradient(DAMPING, max_iter=200, tol=1e-10)
    got = est.solve(op, v)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    d = est.diagnostics
    assert d["converged"] is True
    assert d["residual"] <= 1e-10
    assert d["recurrence_residual"] <= 1e-10
    assert d["residual_examples"] == 60
    assert d["iterations"] <= 44 + 5  # P in exact arithmetic, a few more in floating point


def test_conjugate_gradient_on_an_indefinite_hessian_names_damping_and_lambda_min():
    model, data = quadratic_problem([-0.03, 0.5, 1.0])
    op = HessianOperator(model, quadratic_loss, data)
    with pytest.raises(ArgumentError, match=r"damping: expected a value above 0\.03 .*is -0\.03.*got 0\.01; damping="):
        ConjugateGradient(0.01).solve(op, torch.ones(3, dtype=torch.float64))


def test_conjugate_gradient_that_runs_out_of_iterations_warns_or_raises(mlp):
    op, v, _ = mlp
    with pytest.warns(UserWarning, match=r"ConjugateGradient: .* > tol=1e-10 over 60 .*raise max_iter \(now 2\)"):
        ConjugateGradient(DAMPING, max_iter=2, tol=1e-10).solve(op, v)
    with pytest.raises(ConvergenceError, match=r"ConjugateGradient: .*raise max_iter"):
        ConjugateGradient(DAMPING, max_iter=2, tol=1e-10, strict=True).solve(op, v)


def test_lissa_matches_exact_with_suitable_settings(mlp):
    op, v, expected = mlp
    est = LiSSA(damping=DAMPING, recursion_depth=1500, batch_size=60)
    got = est.solve(op, v)
    assert pearson(got, expected) >= 0.999
    assert est.diagnostics["scale"] > est.diagnostics["scale_estimate"]["eigenvalue"]
    assert est.diagnostics["converged"] is True


def test_lissa_repeats_split_equals_all_repeats(mlp):
    op, v, _ = mlp
    est = LiSSA(DAMPING, scale=5.0, recursion_depth=50, batch_size=4, num_repeats=4, seed=3, residual_examples=0)
    together = est.solve(op, v)
    parts = est.solve(op, v, repeats=[0, 2]) * 2 + est.solve(op, v, repeats=[1, 3]) * 2
    torch.testing.assert_close(parts / 4, together, rtol=1e-12, atol=1e-12)
    assert (est.diagnostics["converged"], est.diagnostics["residual"]) == (None, None)  # the check was off


def test_lissa_scale_too_small_diverges_with_guidance(mlp):
    op, v, _ = mlp
    with pytest.raises(LiSSADivergenceError, match=r"scale=0\.01.*raise scale to at least .*scale='auto'"):
        LiSSA(damping=DAMPING, scale=0.01, recursion_depth=200, batch_size=8).solve(op, v)


def test_lissa_auto_depth_stops_early_on_logreg(logreg):
    op, v, expected = logreg
    est = LiSSA(damping=0.01, batch_size=50, max_depth=5000, tol=0.05)
    got = est.solve(op, v)
    assert pearson(got, expected) >= 0.999
    d = est.diagnostics
    assert (d["stopped_by"], d["converged"]) == ("tol", True)
    assert [step for step, _ in d["checks"]] == [32, 64, 128, 256, 512, 1024]  # doubling from 32
    assert d["iterations"] == [1024]
    assert d["checks"][-1][1] == d["residual"] <= 0.05


def test_identity_is_plain_dot_product(mlp):
    op, v, _ = mlp
    assert torch.equal(Identity().solve(op, v), v)
    assert (Identity().diagnostics.get("converged"), Identity().name) == (None, "identity")


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: LiSSA(scale=-1.0), r"scale: expected a finite number > 0 or 'auto', got -1\.0"),
        (lambda: LiSSA(recursion_depth=0), r"recursion_depth: expected an integer >= 1 or 'auto', got 0"),
        (lambda: LiSSA(batch_size=0), r"batch_size: expected an integer >= 1, got 0"),
        (lambda: LiSSA(damping=float("nan")), r"damping: expected a finite number >= 0, got nan"),
        (lambda: ConjugateGradient(max_iter=0), r"max_iter: expected an integer >= 1, got 0"),
        (lambda: ExactInverse(max_params=0), r"max_params: expected an integer >= 1, got 0"),
    ],
)
def test_bad_settings(make, match):
    with pytest.raises(ArgumentError, match=match):
        make()


def test_exact_refuses_too_many_parameters(mlp):
    op, v, _ = mlp
    with pytest.raises(ArgumentError, match=r"max_params: expected at least the 44 selected parameters.*got 10"):
        ExactInverse(DAMPING, max_params=10).solve(HessianOperator(op.function.model, cross_entropy_loss, op.data), v)


def test_wrong_vector_size(mlp):
    op, _, _ = mlp
    with pytest.raises(ArgumentError, match=r"vectors: expected a last dimension of 44 .*got 3"):
        ExactInverse(DAMPING).solve(op, torch.zeros(2, 3, dtype=torch.float64))


def test_auto_scale_doubles_after_a_divergence(mlp, monkeypatch):
    """An auto estimate far too low (a tenth of the truth) diverges, is doubled until stable, and still converges."""
    op, v, expected = mlp
    est = LiSSA(damping=DAMPING, recursion_depth=1500, batch_size=60, scale_safety=1.0, tail_fraction=0.0)
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


def test_progress_bars_follow_the_iterations_without_changing_the_answer(capsys):
    from lightning_fastif import ConjugateGradient

    problem = _progress_problem()
    quiet = ConjugateGradient(0.1, max_iter=50, residual_examples=0).solve(*problem)
    loud_cg = ConjugateGradient(0.1, max_iter=50, residual_examples=0)
    loud_cg.progress = True
    torch.testing.assert_close(loud_cg.solve(*problem), quiet)
    assert "fastif: CG" in capsys.readouterr().err
    lissa = LiSSA(damping=0.1, scale=10.0, recursion_depth=20, residual_examples=0, seed=1)
    quiet_lissa = lissa.solve(*problem)
    lissa.progress = True
    torch.testing.assert_close(lissa.solve(*problem), quiet_lissa)
    assert "fastif: LiSSA (repeat 0)" in capsys.readouterr().err


def _progress_problem():
    from torch.utils.data import TensorDataset

    from lightning_fastif.core.hessian import HessianOperator

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1).double()
    data = TensorDataset(torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64))
    operator = HessianOperator(net, lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2, data)
    return operator, torch.randn(2, operator.num_params, dtype=torch.float64)


def test_certificate_measures_evenly_spaced_rows_of_a_large_solve(mlp, monkeypatch):
    """20 vectors: the residual check carries 8 of them (rows 0, 3, 5, ..., 19), and its residual is theirs;
    residual_vectors=None measures all 20."""
    from lightning_fastif.core.ihvp import relative_residual
    from lightning_fastif.core.ihvp.base import residual_rows

    op, _, _ = mlp
    v = torch.randn(20, op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    calls = count_matvecs(monkeypatch)
    est = Identity()  # x = v: a residual far from 0, different per row
    est.residual_examples = None
    x = est.solve(op, v)
    assert calls == [8]
    rows = residual_rows(20, 8)
    assert rows.tolist() == [0, 3, 5, 8, 11, 14, 16, 19]
    expected = relative_residual(op, x[rows], v[rows], est.damping, num_examples=None).max()
    assert est.diagnostics["residual"] == pytest.approx(float(expected), rel=1e-12)
    assert est.diagnostics["residual_vectors"] == 8
    calls.clear()
    every = Identity()
    every.residual_examples, every.residual_vectors = None, None
    every.solve(op, v)
    assert calls == [20]
    full = relative_residual(op, x, v, 0.0, num_examples=None).max()
    assert every.diagnostics["residual"] == pytest.approx(float(full), rel=1e-12)
    assert every.diagnostics["residual_vectors"] == 20


def test_residual_vectors_is_checked():
    from lightning_fastif.core.ekfac import EKFAC

    with pytest.raises(ArgumentError, match="residual_vectors: expected an integer >= 1 or None, got 0"):
        EKFAC(0.1, residual_vectors=0)
