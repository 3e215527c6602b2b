"""Certified solves, fixed costs paid once, divergence detection and the defaults (LiSSA's, AutoInverse), against
exact solves on models small enough to invert."""

import warnings

import pytest
import torch

from lightning_fastif import (
    ArgumentError,
    AutoInverse,
    ConjugateGradient,
    ConvergenceError,
    ExactInverse,
    HessianOperator,
    LiSSA,
    LiSSADivergenceError,
    verify,
)
from lightning_fastif.core.verify import pearson
from tests.helpers.exact import breast_cancer, cross_entropy_loss, explicit_hessian, fit_logreg, tiny_mlp_problem
from tests.reliability.problems import cnn_problem, quadratic_problem
from tests.test_ihvp import count_matvecs

MLP_DAMPING = 0.05
L2 = 0.03


def logreg_loss(model, batch):
    return model.per_example_loss(batch)


def quadratic_loss(model, batch):
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
    hess = explicit_hessian(model, logreg_loss, train)
    return op, grads, v, ExactInverse(L2).solve(op, v), hess


def score_pearson(x, exact, grads) -> float:
    """Pearson of the influence scores g_trainᵀ s_test over all (test, train) pairs, estimate against exact."""
    return pearson(x @ grads.T, exact @ grads.T)


def true_residual(hess, x, v, damping) -> float:
    """‖(H + λI)x − v‖/‖v‖ with the explicit Hessian: independent of the engine's products."""
    a = hess + damping * torch.eye(hess.shape[0], dtype=hess.dtype)
    return float(((x @ a - v).norm(dim=-1) / v.norm(dim=-1)).max())


def test_auto_scale_converges_where_a_fixed_small_scale_diverges(mlp):
    op, grads, v, exact = mlp
    with pytest.raises(LiSSADivergenceError, match=r"scale=0\.5.*raise scale to at least [0-9.]+, or use scale='auto'"):
        LiSSA(MLP_DAMPING, scale=0.5, recursion_depth=1000, batch_size=8).solve(op, v)
    est = LiSSA(MLP_DAMPING, recursion_depth=1000, batch_size=8)
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


def test_converged_means_the_true_residual_is_below_tol(logreg):
    """The certificate is the residual with the Hessian over the stated examples: here all 200, so it is exact."""
    op, grads, v, exact, hess = logreg
    est = LiSSA(L2)  # every setting at its default: scale and depth "auto", tail_fraction 0.5, tol 0.2
    x = est.solve(op, v)
    d = est.diagnostics
    assert (d["converged"], d["stopped_by"], d["residual_examples"], d["residual_from"]) == (
        True,
        "tol",
        200,
        "this solve",
    )
    assert d["residual"] == pytest.approx(true_residual(hess, x, v, L2), rel=1e-9)
    assert d["residual"] <= 0.2
    assert d["checks"][-1] == (d["iterations"][0], d["residual"])
    assert all(r > 0.2 for _, r in d["checks"][:-1])  # it stopped at the first check below tol
    assert score_pearson(x, exact, grads) >= 0.98  # measured 0.984


def test_a_solve_short_of_tol_warns_or_raises_and_never_says_converged(logreg):
    """The failure on main: a depth stopped by a settled norm said converged at residual 0.89."""
    op, _, v, _, hess = logreg
    est = LiSSA(L2, tol=0.01, max_depth=64)
    with pytest.warns(UserWarning, match="LiSSA: the solve did not converge") as record:
        x = est.solve(op, v)
    [message] = [str(w.message) for w in record]  # one warning
    residual = est.diagnostics["residual"]
    assert f"relative residual ‖(H + λI)x − v‖/‖v‖ = {residual:.3g} > tol=0.01 over 200 training examples" in message
    assert "raise max_depth (now 64)" in message
    assert est.diagnostics["converged"] is False
    assert est.diagnostics["stopped_by"] == "max_depth"
    assert residual == pytest.approx(true_residual(hess, x, v, L2), rel=1e-9)
    with pytest.raises(ConvergenceError, match=r"LiSSA: the solve did not converge: .* > tol=0\.01"):
        LiSSA(L2, tol=0.01, max_depth=64, strict=True).solve(op, v)


def test_fixed_costs_are_paid_once_per_system(logreg, monkeypatch):
    """Scale, depth and certificate are reused across operators (test batches) while the weights stay the same."""
    op, _, v, _, _ = logreg
    est = LiSSA(L2)
    est.solve(op, v)
    first = dict(est.diagnostics)
    assert first["scale_estimate"]["cached"] is False
    calls = count_matvecs(monkeypatch)
    scale_calls = []
    real = LiSSA.estimate_top_eigenvalue
    monkeypatch.setattr(LiSSA, "estimate_top_eigenvalue", lambda self, o: scale_calls.append(1) or real(self, o))
    other = HessianOperator(op.function.model, logreg_loss, op.data)  # the next test batch builds a new operator
    est.solve(other, v[:2])
    d = est.diagnostics
    assert (calls, scale_calls) == ([], [])  # no residual check, no power iteration
    assert d["scale_estimate"]["cached"] is True
    assert (d["scale"], d["iterations"], d["depth_from"]) == (first["scale"], first["iterations"], "first solve")
    assert (d["residual"], d["residual_from"], d["converged"]) == (first["residual"], "first solve", True)
    every = LiSSA(L2, certify="every")
    every.solve(op, v)
    searched = len(every.diagnostics["checks"])
    every.solve(other, v[:2])
    assert every.diagnostics["residual_from"] == "this solve"
    assert calls == [4] * searched + [2]  # the search's checks of the first solve, then one check of the second
    model = op.function.model
    scale_calls.clear()
    with torch.no_grad():
        model.linear.bias.add_(1e-3)
    try:
        est.solve(HessianOperator(model, logreg_loss, op.data), v)
        assert est.diagnostics["scale_estimate"]["cached"] is False
        assert est.diagnostics["depth_from"] == "search"
        assert scale_calls == [1]
    finally:
        with torch.no_grad():
            model.linear.bias.sub_(1e-3)


def test_slow_geometric_divergence_is_caught_and_names_damping():
    """H has eigenvalue -0.03 below -damping: at scale 2 the recursion grows 1.01x per step along it.

    The linear bound ``1.5·(j + 1)·‖v‖`` alone would pass it until about step 700; the block-norm ratio catches it
    within 400 steps, and the message names damping, λ_min and a damping that works.
    """
    model, data = quadratic_problem([-0.03, 0.5, 1.0])
    op = HessianOperator(model, quadratic_loss, data)
    # Mostly along the stable directions: the growing part starts 100 times smaller than the rest.
    v = (model.q @ torch.tensor([0.01, 1.0, 1.0], dtype=torch.float64)).expand(2, 3)
    with pytest.raises(LiSSADivergenceError) as caught:
        LiSSA(0.01, scale=2.0, recursion_depth=5000, batch_size=4).solve(op, v)
    message = str(caught.value)
    step = int(message.split("diverged at step ")[1].split()[0])
    assert step <= 400, message
    assert "norm grew" in message
    assert "damping: expected a value above 0.03 (the estimated most negative eigenvalue of the Hessian is -0.03" in (
        message
    )
    assert message.endswith("got 0.01; damping=0.06 would work")
    x = LiSSA(0.06, scale=2.0, recursion_depth=2000, batch_size=4).solve(op, v)  # the value named works
    torch.testing.assert_close(x, torch.linalg.solve(model.a + 0.06 * torch.eye(3, dtype=torch.float64), v.T).T)


def test_damping_below_lambda_min_with_growth_too_slow_to_see_fails_the_certificate():
    """Growth 1.0001x per step: finite after 300 steps, and wrong; the failed certificate names damping."""
    model, data = quadratic_problem([-0.0102, 0.5, 1.0])
    op = HessianOperator(model, quadratic_loss, data)
    match = r"cannot converge .*damping: expected a value above 0\.0102 .*got 0\.01"
    with pytest.raises(LiSSADivergenceError, match=match):
        LiSSA(0.01, scale=2.0, recursion_depth=300).solve(op, torch.ones(3, dtype=torch.float64))


def test_tail_averaging_lowers_noise_at_the_same_cost(logreg):
    op, grads, v, exact, _ = logreg
    last = LiSSA(L2, recursion_depth=400, tail_fraction=0.0, residual_examples=0)
    mean = LiSSA(L2, recursion_depth=400, tail_fraction=0.5, residual_examples=0)
    x_last, x_mean = last.solve(op, v), mean.solve(op, v)
    assert mean.diagnostics["iterations"] == last.diagnostics["iterations"] == [400]
    res_last, res_mean = (float(r) for r in (last_res(op, x_last, v), last_res(op, x_mean, v)))
    assert res_mean < 0.5 * res_last
    assert score_pearson(x_mean, exact, grads) > score_pearson(x_last, exact, grads)


def last_res(op, x, v):
    from lightning_fastif import relative_residual

    return relative_residual(op, x, v, L2).max()


def test_divergence_on_a_concave_loss_asks_for_damping():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1).double()
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.randn(40, 3, dtype=torch.float64))
    op = HessianOperator(lin, lambda m, b: -(m(b[0]).squeeze(-1) ** 2), data)
    with pytest.raises(LiSSADivergenceError, match=r"damping: expected a value above [0-9.]+ .*got 0\.1; damping="):
        LiSSA(0.1, recursion_depth=200).solve(op, torch.randn(2, 4, dtype=torch.float64))


@pytest.fixture(scope="module")
def cnn():
    return cnn_problem()


@pytest.mark.parametrize("problem", ["logreg", "mlp", "cnn"])
def test_lissa_defaults_pass_verify(problem, cnn):
    """``LiSSA()`` as shipped (damping 0.01) against exact influence on three small models (whole models: the MLP
    and the CNN are non-convex, trained with L2 0.005 so that λ_min(H) >= -0.005)."""
    if problem == "logreg":
        train, test = breast_cancer(n_train=400, n_test=4)
        model, loss, data, batch = fit_logreg(train, l2=0.01), logreg_loss, train, test.tensors
    else:
        model, data = tiny_mlp_problem() if problem == "mlp" else cnn
        loss, batch = cross_entropy_loss, tuple(t[:4] for t in data.tensors)
    report = verify(model, loss, data, batch, ihvp=LiSSA())
    assert report.passed, str(report)
    assert report.settings["converged"] is True
    assert report.residual <= 0.2  # verify's own residual over the same examples agrees with the certificate
    assert report.pearson >= 0.99


def test_auto_inverse_chooses_and_says_why(mlp, logreg):
    op, _, v, exact = mlp
    auto = AutoInverse(MLP_DAMPING)
    torch.testing.assert_close(auto.solve(op, v), exact, rtol=1e-9, atol=1e-10)
    d = auto.diagnostics
    assert (d["estimator"], d["chose"], d["converged"]) == ("auto", "exact", True)
    assert d["why"].startswith("P=44 <= max_params=5000 and the factorisation (46.5KB) fits in half the available")
    small = AutoInverse(MLP_DAMPING, max_params=10, preconditioner=None)
    x = small.solve(op, v)
    assert (small.diagnostics["chose"], small.diagnostics["why"]) == (
        "lissa",
        "P=44 > max_params=10: LiSSA (preconditioner=None)",
    )
    assert small.diagnostics["converged"] is True
    assert pearson(x, exact) >= 0.99
    # Beyond max_params with Linear layers selected: EK-FAC-preconditioned CG, to the float64 tolerance.
    fast = AutoInverse(MLP_DAMPING, max_params=10)
    x = fast.solve(op, v)
    assert (fast.diagnostics["chose"], fast.diagnostics["why"]) == (
        "cg",
        "P=44 > max_params=10: ekfac-preconditioned CG (2 factored layers cover 44 of 44 parameters)",
    )
    assert fast.diagnostics["converged"] is True
    assert float(((x - exact).norm(dim=-1) / exact.norm(dim=-1)).max()) < 1e-4
    budgeted = AutoInverse(MLP_DAMPING)
    tight = HessianOperator(op.function.model, cross_entropy_loss, op.data, max_memory=60_000)
    assert budgeted.choose(tight)[0].name == "cg"
    assert "> half of max_memory=60KB (30KB): ekfac-preconditioned CG" in budgeted.choose(tight)[1]
    assert AutoInverse(0.0, max_params=10).choose(op)[1].endswith("LiSSA (damping=0: the ekfac inverse needs λ > 0)")


def test_settings_as_used_are_reported(logreg):
    op, _, v, _, _ = logreg
    est = LiSSA(L2, batch_size=32, max_depth=300, tol=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.solve(op, v)
    d = est.diagnostics
    for key in ("estimator", "damping", "scale", "recursion_depth", "batch_size", "num_repeats", "seed", "tol"):
        assert key in d
    assert isinstance(d["scale"], float)
    assert (d["recursion_depth"], d["tol"], d["max_depth"], d["tail_fraction"]) == ("auto", 0.05, 300, 0.5)
    assert d["auto"] == ["scale", "recursion_depth"]
    assert d["iterations"][0] <= 300
    assert [step for step, _ in d["checks"]][0] == 32  # max(32, 200 residual examples / 32 per batch)


def test_residual_exact_tiny_cg_tiny_and_five_lissa_steps_large(logreg, mlp):
    for op, v in ((logreg[0], logreg[2]), (mlp[0], mlp[2])):
        exact = ExactInverse(L2)
        exact.solve(op, v)
        assert exact.diagnostics["residual"] < 1e-12
        short = LiSSA(L2, recursion_depth=5)
        with pytest.warns(UserWarning, match="raise recursion_depth"):
            short.solve(op, v)
        assert short.diagnostics["residual"] > 0.5, short.diagnostics["residual"]
        cg = ConjugateGradient(L2, max_iter=200, tol=1e-10)
        cg.solve(op, v)
        assert cg.diagnostics["residual"] < 1e-9


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tail_fraction": 1.0}, r"tail_fraction: expected a finite number >= 0 and < 1, got 1\.0"),
        ({"tail_fraction": -0.1}, r"tail_fraction: expected a finite number >= 0 and < 1, got -0\.1"),
        ({"scale_safety": 0.5}, r"scale_safety: expected a finite number >= 1, got 0\.5"),
        ({"max_depth": 0}, r"max_depth: expected an integer >= 1, got 0"),
        ({"tol": 0.0}, r"tol: expected a finite number > 0 or None, got 0\.0"),
        ({"certify": "always"}, r"certify: expected one of \['first', 'every'\], got 'always'"),
    ],
)
def test_bad_auto_settings(kwargs, match):
    with pytest.raises(ArgumentError, match=match):
        LiSSA(**kwargs)
