"""Memory budgets: parsing, per-stage peaks, chunk planning, and budgeted runs equal to unbudgeted ones."""

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

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
    _lifetime_peak,
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
    """Peaks of nested stages; the allocations are held 20 ms (ten samples) so the sampling thread sees them
    whether or not the stage raised the process's high-water mark."""
    stages = {}
    with measure_stage("outer", stages, release_heap=True):
        big = torch.ones(10_000_000)  # 40 MB
        time.sleep(0.02)
        with measure_stage("inner", stages):
            small = torch.ones(2_500_000)  # 10 MB
            time.sleep(0.02)
            del small
        del big
    with measure_stage("inner", stages):
        pass
    outer, inner = stages["outer"], stages["inner"]
    assert (inner["calls"], outer["calls"]) == (2, 1)
    assert outer["cpu_peak_method"] in ("high-water mark", "sampled")
    assert 48e6 <= outer["cpu_extra_bytes"] < 60e6  # 40 MB + the inner 10 MB, and not much else
    assert 9e6 <= inner["cpu_extra_bytes"] < 20e6
    assert outer["cpu_peak_bytes"] >= inner["cpu_peak_bytes"]
    json.dumps(stages)


def test_measure_stage_resets_no_process_counter():
    """The process's high-water mark (read by other tools) survives a measured stage: nothing is reset."""
    before = _lifetime_peak()
    spike = torch.ones(int(before // 4) + 10_000_000)  # raise the high-water mark above anything so far
    del spike
    raised = _lifetime_peak()
    assert raised > before
    stages = {}
    with measure_stage("small", stages, release_heap=True):
        keep = torch.ones(1_000_000)
        time.sleep(0.01)
    assert _lifetime_peak() == raised  # /proc/self/clear_refs would have dropped it to the current RSS
    assert stages["small"]["cpu_peak_method"] == "sampled"  # the stage stayed below the mark: sampled
    assert 3.5e6 <= stages["small"]["cpu_extra_bytes"] < 10e6
    del keep


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
    # A budget small enough to force chunks of a few examples everywhere (ExactInverse's factor reserved on top).
    cost = measure_example_cost(FunctionalLoss(model, cross_entropy_loss), data)
    plan = plan_chunks(cost, 10**12, num_vectors=8, reserved=make().reserved_bytes(44))
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
    reserved = 3 * 44 * 44 * 8  # the exact factorisation: the Hessian in float64, H + λI and its factor
    assert ExactInverse(0.05).reserved_bytes(44) == reserved
    budget = RUNTIME_OVERHEAD + reserved + 30_000  # a few examples per chunk
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
        ihvp=LiSSA(0.05, max_depth=1000),
        diagnostics=info,
        max_memory="10MB",
    )
    assert set(info) >= {"ihvp", "stages", "memory_plan", "chunks", "method"}
    assert set(info["stages"]) == {"test_gradients", "inverse_hvp", "scoring"}
    assert info["ihvp"]["estimator"] == "lissa"
    assert isinstance(info["ihvp"]["scale"], float)
    json.dumps(info)  # manifest-ready
    assert (info["ihvp"]["converged"], info["ihvp"]["residual_examples"]) == (True, 60)
    metrics = diagnostic_metrics(info)
    assert metrics["fastif/ihvp/converged"] == 1.0
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


def _wide_problem():
    """A float32 MLP 128→256→10 (35,594 parameters, 142 KB a gradient) on 1,024 training points, 32 test points:
    unchunked, the per-example gradients of all candidates take about 440 MB."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(128, 256), nn.Tanh(), nn.Linear(256, 10))
    train = TensorDataset(torch.randn(1024, 128), torch.randint(10, (1024,)))
    return net, train, tuple(t[:32] for t in train.tensors)


BUDGET = 60 * 10**6


def _measure_paths(budget: float = BUDGET) -> dict[str, float]:
    """Peak resident growth of whole influence_scores calls under ``budget``, one per path, after a warm-up call
    each (first calls set up autograd's and vmap's machinery, about 10 MB outside any budget)."""
    torch.set_num_threads(1)
    net, train, test = _wide_problem()
    paths = {
        "grads": ("auto", lambda: Identity()),  # 32 test points, all candidates: "auto" materialises gradients
        "jvp": ("jvp", lambda: Identity()),
        # Two CG iterations and a fixed-depth LiSSA: the memory of their products, not an answer.
        "cg": ("jvp", lambda: ConjugateGradient(1.0, max_iter=2, residual_examples=0)),
        "lissa": ("jvp", lambda: LiSSA(1.0, recursion_depth=50, batch_size=64, residual_examples=0)),
        "lissa_certified": ("jvp", lambda: LiSSA(1.0, max_depth=128, residual_examples=256)),
    }
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the short solves are not certified; that is not what is measured
        few = tuple(t[:2] for t in test)
        for method in ("grads", "jvp"):  # warm-up on two test points: first-call costs, whatever the sizes
            warm = ConjugateGradient(1.0, max_iter=1)
            influence_scores(net, cross_entropy_loss, few, train, ihvp=warm, method=method)
        for name, (method, make) in paths.items():
            stages: dict = {}
            with measure_stage(name, stages, release_heap=True):
                influence_scores(net, cross_entropy_loss, test, train, ihvp=make(), method=method, max_memory=budget)
            out[name] = stages[name]["cpu_extra_bytes"]
    stages = {}
    with measure_stage("free", stages, release_heap=True):
        influence_scores(net, cross_entropy_loss, test, train, ihvp=Identity(), method="grads", batch_size=1024)
    out["free"] = stages["free"]["cpu_extra_bytes"]
    return out


def test_budget_holds_on_every_path():
    """Peak growth of whole runs (sampled resident memory) within max_memory, on every path, in a fresh process.

    The process runs with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``), so resident memory follows
    live memory: with the default adaptive threshold, glibc keeps some freed blocks resident and a loop of large
    [V, P] products can sit up to 2.5x above what it holds (see :mod:`lightning_fastif.core.memory`). The same
    work without a budget (batch_size=1024) shows the measurement sees the peaks.
    """
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    code = "import json; from tests.test_memory import _measure_paths; print(json.dumps(_measure_paths()))"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    free = measured.pop("free")
    assert all(extra <= BUDGET for extra in measured.values()), measured
    assert free > 2 * BUDGET, free


@pytest.mark.parametrize("method", ["auto", "jvp"])
def test_budget_holds_for_scoring_in_this_process(method):
    """The scoring paths stay within the budget with the default allocator too (the 942 MB of a 300 MB budget on
    main came from gradients materialised in chunks sized for JVP)."""
    net, train, test = _wide_problem()
    run = {"ihvp": Identity(), "method": method, "max_memory": BUDGET}
    influence_scores(net, cross_entropy_loss, test, train, **run)  # warm-up: autograd's and vmap's first-call costs
    stages: dict = {}
    info: dict = {}
    with measure_stage("budgeted", stages, release_heap=True):
        budgeted = influence_scores(net, cross_entropy_loss, test, train, diagnostics=info, **run)
    plan = info["memory_plan"]
    assert info["method"] == ("grads" if method == "auto" else "jvp")
    assert info["chunks"]["scoring"] == (plan["gradient_chunk"] if method == "auto" else plan["score_chunk"])
    assert stages["budgeted"]["cpu_extra_bytes"] <= BUDGET, (stages, plan)
    free = influence_scores(net, cross_entropy_loss, test, train, ihvp=Identity(), method=method, batch_size=1024)
    torch.testing.assert_close(budgeted, free, rtol=1e-4, atol=1e-6)  # float32: chunked sums round differently
