"""Every estimator argument refuses strings, NaN, negatives and bools with an ArgumentError that names it, and the
core functions name their bad arguments too."""

import math
import re

import pytest
import torch

from lightning_fastif import (
    ArgumentError,
    AutoInverse,
    ConjugateGradient,
    ExactInverse,
    Identity,
    LiSSA,
    MemoryBudgetError,
    influence_scores,
    inverse_hvp_of_test,
    self_influence,
    verify,
)
from lightning_fastif.core.batches import IndexedData
from lightning_fastif.core.grads import FunctionalLoss
from lightning_fastif.core.influence import score_candidates
from tests.helpers.exact import cross_entropy_loss, tiny_mlp_problem

NAN = math.nan
COMMON = {
    "damping": ["0.1", NAN, -1.0, True, None],
    "tol": ["1e-3", NAN, 0.0, -0.1, True],
    "residual_examples": [-1, "all", 2.5, True],
    "strict": ["yes", 1, None],
    "certify": ["never", None, 1],
}
BAD = {
    LiSSA: {
        **COMMON,
        "tol": ["1e-3", NAN, 0.0, -0.1, True, None],
        "scale": ["big", NAN, -1.0, 0, None],
        "recursion_depth": ["10", 0, -3, 2.5, None, True],
        "num_repeats": [0, "2", 1.5],
        "batch_size": [0, "8", -4],
        "seed": [-1, "0", 0.5],
        "max_depth": [0, "100"],
        "tail_fraction": [1.0, -0.1, NAN, "half"],
        "scale_safety": [0.5, NAN, "2"],
        "scale_retries": [-1, 1.5],
        "scale_batches": [0, "8"],
        "power_iterations": [0, None],
    },
    ExactInverse: {**COMMON, "max_params": [0, "5000", 10.0]},
    ConjugateGradient: {**COMMON, "max_iter": [0, "100", -1]},
    AutoInverse: {**COMMON, "max_params": [0, "5000"], "seed": [-1, "0"]},
}
CASES = [(cls, name, value) for cls, args in BAD.items() for name, values in args.items() for value in values]


@pytest.mark.parametrize(("cls", "name", "value"), CASES, ids=[f"{c.__name__}-{n}-{v!r}" for c, n, v in CASES])
def test_every_estimator_argument_is_checked(cls, name, value):
    with pytest.raises(ArgumentError, match=rf"^{name}: expected .*, got {re.escape(repr(value))}$"):
        cls(**{name: value})


@pytest.fixture(scope="module")
def mlp():
    model, data = tiny_mlp_problem(n=20)
    return model, data, tuple(t[:2] for t in data.tensors)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"^batch_size: expected an integer >= 1, got 0"),
        ({"batch_size": "64"}, r"^batch_size: expected an integer >= 1, got '64'"),
        ({"hessian_batch_size": -1}, r"^hessian_batch_size: expected an integer >= 1, got -1"),
        ({"method": "fast"}, r"^method: expected one of \['auto', 'jvp', 'grads'\], got 'fast'"),
        ({"ihvp": "lissa"}, r"^ihvp: expected an InverseHVP estimator"),
        ({"candidates": torch.zeros(2, 3)}, r"^candidates: expected an integer tensor of training indices"),
        ({"candidates": torch.tensor([[0], [20]])}, r"^candidates: indices \[20\] are out of range"),
        ({"candidates": torch.zeros(3, 4).long()}, r"^candidates: expected shape \[T=2, K\]"),
        ({"candidates": "0,1"}, r"^candidates: expected"),
    ],
)
def test_influence_scores_names_its_bad_arguments(mlp, kwargs, match):
    model, data, test = mlp
    with pytest.raises(ArgumentError, match=match):
        influence_scores(model, cross_entropy_loss, test, data, **{"ihvp": Identity(), **kwargs})


def test_self_influence_and_inverse_hvp_of_test_name_their_bad_arguments(mlp):
    model, data, test = mlp
    with pytest.raises(ArgumentError, match=r"^batch_size: expected an integer >= 1, got 0"):
        self_influence(model, cross_entropy_loss, data, ihvp=Identity(), batch_size=0)
    with pytest.raises(ArgumentError, match=r"^ihvp: expected an InverseHVP estimator"):
        inverse_hvp_of_test(model, cross_entropy_loss, test, data, ihvp=None)
    f = FunctionalLoss(model, cross_entropy_loss)
    with pytest.raises(ArgumentError, match=r"^batch_size: expected an integer >= 1, got 0"):
        score_candidates(f, IndexedData(data), torch.zeros(2, f.num_params, dtype=torch.float64), batch_size=0)


def test_a_budget_too_small_and_an_unreadable_budget_name_max_memory(mlp):
    model, data, test = mlp
    with pytest.raises(MemoryBudgetError, match=r"^max_memory: '2KB' .*smallest max_memory that works is"):
        influence_scores(model, cross_entropy_loss, test, data, ihvp=Identity(), max_memory="2KB")
    with pytest.raises(ValueError, match=r"^max_memory: cannot read '4 parsecs'"):
        influence_scores(model, cross_entropy_loss, test, data, ihvp=Identity(), max_memory="4 parsecs")


def test_lissa_solve_and_reuse_name_their_arguments(mlp):
    model, data, _ = mlp
    from lightning_fastif import HessianOperator

    op = HessianOperator(model, cross_entropy_loss, data)
    with pytest.raises(ArgumentError, match=r"^repeats: expected at least one repeat id, got \[\]"):
        LiSSA(0.1, recursion_depth=5).solve(op, torch.ones(op.num_params, dtype=torch.float64), repeats=[])
    with pytest.raises(ArgumentError, match=r"^scale: expected a finite number > 0, got -1"):
        LiSSA().reusing_scale(-1)
    with pytest.raises(ArgumentError, match=r"^vectors: expected a last dimension of 44"):
        LiSSA(0.1, recursion_depth=5).solve(op, torch.ones(3, dtype=torch.float64))


def test_verify_names_a_bad_estimator(mlp):
    model, data, test = mlp
    with pytest.raises(ArgumentError, match=r"^ihvp: expected an InverseHVP estimator"):
        verify(model, cross_entropy_loss, data, test, ihvp=LiSSA)
