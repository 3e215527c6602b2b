"""Memory budgets: parsing, per-stage peaks, chunk planning, and budgeted runs equal to unbudgeted ones."""

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fastif import (
    ConjugateGradient,
    ExactInverse,
    FunctionalLoss,
    HessianOperator,
    Identity,
    LiSSA,
    influence_scores,
    self_influence,
)
from lightning_fastif.core.influence import _gradients_in_chunks, diagnostic_metrics
from lightning_fastif.core.memory import (
    RUNTIME_OVERHEAD,
    ExampleCost,
    MemoryBudgetError,
    _round_up,
    format_bytes,
    measure_example_cost,
    measure_stage,
    parse_memory,
    plan_chunks,
)
from tests.helpers.exact import cross_entropy_loss, tiny_mlp_problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GB", 4 * 10**9),
        ("4 gb", 4 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5G", 1_500_000_000),
        ("100kb", 100_000),
        ("2KiB", 2048),
        ("1e3", 1000),
        (1024, 1024),
        (2.5e6, 2_500_000),
        (None, None),
    ],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("4 parsecs", r"max_memory: cannot read '4 parsecs' as a memory size; expected .*'4GB'"),
        ("GB", r"max_memory: cannot read 'GB'"),
        ("-1GB", r"max_memory: cannot read '-1GB'"),
        (0, r"max_memory: must be at least 1 byte, got 0"),
        (float("nan"), r"max_memory: must be at least 1 byte"),
        (True, r"max_memory: expected a positive number of bytes"),
        ([4], r"max_memory: expected .* got list"),
    ],
)
def test_parse_memory_errors(value, match):
    with pytest.raises(ValueError, match=match):
        parse_memory(value)


def test_format_bytes_reads_back():
    for size in (999, 1500, 2_345_678, 7 * 10**9):
        assert parse_memory(format_bytes(size)) == pytest.approx(size, rel=0.01)
    for size in (1, 999, 1001, 4_100_001, 4_200_000, 99_999_999, 12_345_678_901):
        text = _round_up(size)
        assert size <= parse_memory(text) <= 1.1 * size + 1, (size, text)
    assert _round_up(4_104_000) == "4.2MB"


def test_measure_stage_records_nested_peaks():
    stages = {}
    with measure_stage("outer", stages):
        big = torch.ones(10_000_000)  # 40 MB
        with measure_stage("inner", stages):
            small = torch.ones(2_500_000)  # 10 MB
            del small
        del big
    with measure_stage("inner", stages):
        pass
    outer, inner = stages["outer"], stages["inner"]
    assert inner["calls"] == 2
    assert outer["calls"] == 1
    assert outer["seconds"] >= 0
    assert inner["seconds"] >= 0
    if outer["cpu_peak_scope"] == "stage":  # Linux: the kernel's peak counter is reset per stage
        assert outer["cpu_extra_bytes"] >= 45e6  # 40 MB + the inner 10 MB
        assert 8e6 <= inner["cpu_extra_bytes"] < 40e6
    assert outer["cpu_peak_bytes"] >= inner["cpu_peak_bytes"] - 1e6
    json.dumps(stages)


def test_measured_activation_bytes_of_a_linear_model():
    """Linear(d, 1) + squared error saves x (d floats) and the residual (1 float) per example."""
    for d in (100, 1000):
        f = FunctionalLoss(nn.Linear(d, 1), lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2)
        cost = measure_example_cost(f, TensorDataset(torch.randn(16, d), torch.randn(16)))
        assert cost.activation_bytes == 4 * (d + 1)
        assert (cost.num_params, cost.itemsize, cost.param_bytes) == (d + 1, 4, 4 * (d + 1))


def test_plan_chunks_follows_the_budget():
    cost = ExampleCost(activation_bytes=4000, num_params=1000, itemsize=4, examples=8)
    small, large = plan_chunks(cost, "5MB", num_vectors=2), plan_chunks(cost, "50MB", num_vectors=2)
    assert small.gradient_chunk < large.gradient_chunk
    assert small.hessian_chunk < large.hessian_chunk
    assert small.score_chunk < large.score_chunk
    for plan in (small, large):
        for work, chunk in (("gradients", plan.gradient_chunk), ("hvp", plan.hessian_chunk)):
            assert plan.fixed[work] + chunk * plan.per_example[work] <= plan.max_memory
    assert plan_chunks(cost, "100GB").gradient_chunk == 4096  # capped: bigger chunks only raise the peak
    json.dumps(large.as_dict())


def test_budget_too_small_names_the_setting_and_the_smallest_value():
    cost = ExampleCost(activation_bytes=4000, num_params=1000, itemsize=4, examples=8)
    with pytest.raises(
        MemoryBudgetError, match=r"max_memory: '10KB' \(10KB\) cannot hold the work of one example"
    ) as e:
        plan_chunks(cost, "10KB", num_vectors=4)
    message = str(e.value)
    assert "Hessian-vector products need" in message
    smallest = message.split("the smallest max_memory that works is '")[1].split("'")[0]
    plan = plan_chunks(cost, smallest, num_vectors=4)  # the value it names works...
    assert plan.hessian_chunk >= 1
    assert parse_memory(smallest) < 1.1 * plan.minimum  # ...and is not far above the true minimum
    with pytest.raises(MemoryBudgetError):
        plan_chunks(cost, plan.minimum - 1, num_vectors=4)


@pytest.fixture(scope="module")
def problem():
    model, data = tiny_mlp_problem(n=60)
    return model, data, tuple(t[:3] for t in data.tensors)


def test_influence_scores_with_too_small_a_budget_raises(problem):
    model, data, test = problem
    with pytest.raises(MemoryBudgetError, match=r"max_memory: '2KB' .*smallest max_memory that works is '4\.[0-9]MB'"):
        influence_scores(model, cross_entropy_loss, test, data, ihvp=Identity(), max_memory="2KB")


@pytest.mark.parametrize(
    "make",
    [
        lambda: ExactInverse(0.05),
        lambda: ConjugateGradient(0.05, max_iter=100, tol=1e-10),
        # minibatches larger than the Hessian chunk
        lambda: LiSSA(0.05, recursion_depth=10, batch_size=24, scale_batches=2, power_iterations=5),
    ],
)
@pytest.mark.parametrize("method", ["jvp", "grads"])
def test_budgeted_scores_equal_unbudgeted(problem, make, method):
    model, data, test = problem
    test = tuple(t[:8] for t in data.tensors)
    free = influence_scores(model, cross_entropy_loss, test, data, ihvp=make(), method=method)
    # A budget small enough to force chunks of a few examples everywhere.
    cost = measure_example_cost(FunctionalLoss(model, cross_entropy_loss), data)
    plan = plan_chunks(cost, 10**12, num_vectors=8)
    budget = max(plan.minimum, plan.fixed["hvp"] + 5 * plan.per_example["hvp"])  # Hessian chunks of ~5 examples
    info = {}
    budgeted = influence_scores(
        model, cross_entropy_loss, test, data, ihvp=make(), method=method, max_memory=budget, diagnostics=info
    )
    # Summation order changes with the chunks: float64 rounding, amplified a little by CG's iterations.
    torch.testing.assert_close(budgeted, free, rtol=1e-7, atol=1e-9)
    chunks = info["chunks"]
    assert chunks["hessian"] < 24, chunks
    assert chunks["scoring"] < len(data), chunks
    assert info["memory_plan"]["max_memory"] == budget


def test_budgeted_candidates_and_self_influence_equal_unbudgeted(problem):
    model, data, test = problem
    candidates = torch.tensor([[0, 5, 59, 7], [1, 1, 2, 3], [3, 4, 7, 8]])
    kwargs = {"ihvp": ExactInverse(0.05), "candidates": candidates}
    free = influence_scores(model, cross_entropy_loss, test, data, **kwargs)
    budget = RUNTIME_OVERHEAD + 30_000  # a few examples per chunk
    budgeted = influence_scores(model, cross_entropy_loss, test, data, max_memory=budget, **kwargs)
    torch.testing.assert_close(budgeted, free, rtol=1e-10, atol=1e-12)
    info = {}
    free = self_influence(model, cross_entropy_loss, data, ihvp=ExactInverse(0.05), batch_size=16)
    budgeted = self_influence(
        model, cross_entropy_loss, data, ihvp=ExactInverse(0.05), batch_size=16, max_memory=budget, diagnostics=info
    )
    torch.testing.assert_close(budgeted, free, rtol=1e-10, atol=1e-12)
    assert info["chunks"]["vectors_per_solve"] < 16  # the budget, not batch_size, set it
    assert info["ihvp"]["solves"] == -(-len(data) // info["chunks"]["vectors_per_solve"])
    with pytest.raises(MemoryBudgetError, match="max_memory: '1KB'"):
        self_influence(model, cross_entropy_loss, data, ihvp=Identity(), max_memory="1KB")


def test_chunked_test_gradients_equal_one_pass(problem):
    model, data, _ = problem
    f = FunctionalLoss(model, cross_entropy_loss)
    batch = tuple(t[:10] for t in data.tensors)
    torch.testing.assert_close(_gradients_in_chunks(f, batch, 3), f.per_example_gradients(batch), rtol=1e-12, atol=0)


def test_chunked_minibatch_hvp_equals_one_pass(problem):
    model, data, _ = problem
    vectors = torch.randn(3, 44, dtype=torch.float64)
    whole = HessianOperator(model, cross_entropy_loss, data, batch_size=256)
    chunked = HessianOperator(model, cross_entropy_loss, data, batch_size=7)
    batch = data.tensors
    torch.testing.assert_close(chunked.batch_hvp(batch, vectors), whole.batch_hvp(batch, vectors), rtol=1e-10, atol=0)


def test_diagnostics_and_logged_metrics(problem):
    model, data, test = problem
    info = {}
    influence_scores(
        model,
        cross_entropy_loss,
        test,
        data,
        ihvp=LiSSA(0.05, recursion_depth="auto", max_depth=1000),
        diagnostics=info,
        max_memory="10MB",
    )
    assert set(info) >= {"ihvp", "stages", "memory_plan", "chunks", "method"}
    assert set(info["stages"]) == {"test_gradients", "inverse_hvp", "scoring"}
    assert info["ihvp"]["estimator"] == "lissa"
    assert isinstance(info["ihvp"]["scale"], float)
    json.dumps(info)  # manifest-ready
    metrics = diagnostic_metrics(info)
    for key in (
        "fastif/ihvp/residual",
        "fastif/ihvp/iterations",
        "fastif/ihvp/seconds",
        "fastif/ihvp/scale",
        "fastif/ihvp/top_eigenvalue",
        "fastif/ihvp/converged",
        "fastif/inverse_hvp/seconds",
        "fastif/inverse_hvp/peak_bytes",
        "fastif/scoring/extra_bytes",
        "fastif/memory_plan/max_memory_bytes",
    ):
        assert isinstance(metrics[key], float), key
