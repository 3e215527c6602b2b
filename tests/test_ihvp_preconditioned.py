"""Preconditioned solvers (LiSSA and CG with EK-FAC factors) and factors handed over by ``use_factors``, against
exact answers on tiny float64 models."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_fastif import EKFAC
from lightning_fastif.core.curvature import fit_kfac
from lightning_fastif.core.hessian import HessianOperator
from lightning_fastif.core.ihvp import AutoInverse, ConjugateGradient, ExactInverse, Identity, LiSSA
from lightning_fastif.core.ihvp.factored import factors_for_operator
from lightning_fastif.errors import ArgumentError
from tests.test_curvature import mse, per_example, teacher_student_regression


def relative_error(x: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((x - exact).norm(dim=-1) / exact.norm(dim=-1)).max())


@pytest.fixture(scope="module")
def system():
    model, data = teacher_student_regression()
    v = per_example(model, mse, TensorDataset(*(t[:3] for t in data.tensors)))
    return model, data, v


def test_preconditioned_lissa_is_closer_to_exact_in_fewer_steps(system):
    model, data, v = system
    op = HessianOperator(model, mse, data)
    damping = 0.01
    exact = ExactInverse(damping, residual_examples=0).solve(op, v)
    plain = LiSSA(damping, tol=0.05, batch_size=8)
    fast = LiSSA(damping, tol=0.05, batch_size=64, preconditioner="ekfac")
    x_plain, x_fast = plain.solve(op, v), fast.solve(op, v)
    # Measured (seeded): plain 512 steps, error 0.37 (its minibatch noise); preconditioned 256 steps, error 0.08.
    assert plain.diagnostics["iterations"] == [512]
    assert fast.diagnostics["iterations"] == [256]
    assert fast.diagnostics["converged"]
    assert fast.diagnostics["residual"] <= 0.05
    assert relative_error(x_fast, exact) < 0.1 < 0.3 < relative_error(x_plain, exact)
    assert fast.diagnostics["factors_from"] == "fitted"
    assert fast.settings()["preconditioner"] == "ekfac"
    # The scale includes the damping and is that of the preconditioned minibatch system (a few tens here).
    assert 10 < fast.diagnostics["scale"] < 100
    fast.solve(HessianOperator(model, mse, data), v)  # the same system: the factors and depth are reused
    assert fast.diagnostics["factors_from"] == "cached"
    assert fast.diagnostics["depth_from"] == "first solve"
    with pytest.raises(ArgumentError, match="damping: expected a number > 0 with preconditioner='kfac'"):
        LiSSA(0.0, preconditioner="kfac")
    with pytest.raises(ArgumentError, match="preconditioner: expected one of"):
        LiSSA(0.1, preconditioner="diag")


def test_use_factors_serves_the_next_system_instead_of_a_fit(system):
    model, data, v = system
    op = HessianOperator(model, mse, data)
    damping = 1e-3
    exact = ExactInverse(damping, residual_examples=0).solve(op, v)
    fitted = factors_for_operator(op)
    # Without the EK-FAC correction: the preconditioned CG corrects them at the solve (one pass), EKFAC too.
    kfac_only = fit_kfac(model, mse, data)
    cg = ConjugateGradient(damping, max_iter=1000, tol=1e-9, residual_examples=0, preconditioner="ekfac")
    assert cg.use_factors(kfac_only) is True
    x = cg.solve(op, v)
    assert relative_error(x, exact) < 1e-6
    assert cg.diagnostics["factors_from"] == "given"
    assert cg.diagnostics["iterations"] <= 30  # as with factors it fits itself (tests/test_curvature.py)
    cg.solve(HessianOperator(model, mse, data), v)
    assert cg.diagnostics["factors_from"] == "cached"

    ekfac = EKFAC(damping, residual_examples=0)
    assert ekfac.use_factors(fitted) is True
    torch.testing.assert_close(ekfac.solve(op, v), fitted.inverse_apply(v, damping))
    assert ekfac.diagnostics["factors_from"] == "given"
    assert ekfac.diagnostics["fit_seconds"] == 0.0
    ekfac.solve(op, v)
    assert ekfac.diagnostics["factors_from"] == "cached"

    assert Identity().use_factors(fitted) is False
    assert ConjugateGradient(damping).use_factors(fitted) is False
    assert LiSSA(damping).use_factors(fitted) is False
    assert AutoInverse(damping, preconditioner=None).use_factors(fitted) is False
    with pytest.raises(ArgumentError, match="factors: expected KFACFactors"):
        EKFAC(damping).use_factors("factors")


def test_inverse_sqrt_apply_squares_to_inverse_apply(system):
    model, data, v = system
    factors = factors_for_operator(HessianOperator(model, mse, data))
    twice = factors.inverse_sqrt_apply(factors.inverse_sqrt_apply(v, 0.1), 0.1)
    torch.testing.assert_close(twice, factors.inverse_apply(v, 0.1))


def test_progress_bars_show_the_residual_and_change_nothing(system, capsys):
    model, data, v = system
    op = HessianOperator(model, mse, data)
    results = {}
    for progress in (False, True):
        cg = ConjugateGradient(1e-3, max_iter=1000, tol=1e-9, residual_examples=0, preconditioner="kfac")
        lissa = LiSSA(0.01, recursion_depth=64, batch_size=64, residual_examples=0, preconditioner="kfac")
        cg.progress = lissa.progress = progress
        results[progress] = (cg.solve(op, v), lissa.solve(op, v))
    err = capsys.readouterr().err
    assert "fastif: preconditioned CG" in err
    assert "residual=" in err
    assert "fastif: LiSSA" in err
    for quiet, shown in zip(results[False], results[True], strict=True):
        torch.testing.assert_close(shown, quiet, rtol=0, atol=0)
