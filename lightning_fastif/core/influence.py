"""Influence scores: ``score(z, z') = g(z')ᵀ (H + λI)⁻¹ g(z)``. **Positive = helpful.**

A positive score means training point ``z`` helped test point ``z'``: removing ``z`` from the ``n`` training points
would raise the test loss by about ``score / n`` (the sign of Kronfluence, TRAK and Captum; FastIF's reference code
reports the negative).

How candidates are scored (``method``):

* ``"jvp"`` (the default whenever candidates differ per test point, i.e. kNN): ``s_test = (H + λI)⁻¹ g_test`` is
  computed once per test point, and each candidate's score is the directional derivative of its loss along
  ``s_test``, by forward-mode AD. A batch of candidates costs about one forward pass and no gradient is stored.
* ``"grads"``: per-example gradients of the candidates are materialised (``vmap``) and multiplied with all
  ``s_test`` at once. Cheaper only when many test points share the same candidates (``candidates=None`` and more
  than ``32`` test points under ``"auto"``).

Chunk sizes are fixed (``batch_size``, ``hessian_batch_size``) unless ``max_memory`` is given (``"4GB"``): then
they are derived from the budget and the measured memory of one example (:mod:`lightning_fastif.core.memory`), each
work with its own chunk (test gradients and ``"grads"`` scoring: ``gradient_chunk``; ``"jvp"`` scoring:
``score_chunk``; Hessian products: ``hessian_chunk``; the explicit Hessian of ``ExactInverse`` is built as many
vectors at a time as the budget was planned for, and its factorisation is reserved out of the budget); chunking
never changes the scores beyond float rounding. Pass a dict as ``diagnostics`` to receive what the estimator did,
seconds and peak memory per stage, and the memory plan; :func:`diagnostic_metrics` flattens it for a logger.

Finite or nothing: a NaN or infinite loss, gradient, solve or score raises
:class:`~lightning_fastif.errors.NonFiniteError` naming the training and/or test indices involved; nothing
non-finite is ranked or returned.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fastif.core.batches import Batch, IndexedData, batch_size_of, slice_batch
from lightning_fastif.core.grads import FunctionalLoss, LossFn, check_finite, evaluating, format_indices
from lightning_fastif.core.hessian import HessianOperator
from lightning_fastif.core.ihvp import InverseHVP
from lightning_fastif.core.memory import (
    MemoryBudgetError,
    MemoryPlan,
    measure_example_cost,
    measure_stage,
    parse_memory,
    plan_chunks,
)
from lightning_fastif.core.params import ParamSpec
from lightning_fastif.errors import ArgumentError, NonFiniteError, check_choice, check_int

_METHODS = ("auto", "jvp", "grads")
GRADS_MIN_TEST_POINTS = 32
"""Under ``method="auto"`` with shared candidates, materialise gradients from this many test points on."""


def check_candidates(candidates: Any, num_test: int, num_train: int) -> Tensor:
    """Validate a ``[T, K]`` tensor of training indices (one row per test point)."""
    if not isinstance(candidates, Tensor):
        try:
            candidates = torch.as_tensor(candidates)
        except (TypeError, ValueError, RuntimeError):
            raise ArgumentError(
                f"candidates: expected an integer tensor of training indices [T, K], got {candidates!r}"
            ) from None
    if candidates.dim() == 1 and num_test == 1:
        candidates = candidates.unsqueeze(0)
    if candidates.dim() != 2 or candidates.shape[0] != num_test:
        raise ArgumentError(
            f"candidates: expected shape [T={num_test}, K] (training indices per test point), got "
            f"{tuple(candidates.shape)}"
        )
    if candidates.is_floating_point() or candidates.is_complex() or candidates.dtype == torch.bool:
        raise ArgumentError(f"candidates: expected an integer tensor of training indices, got dtype {candidates.dtype}")
    if candidates.numel() and (int(candidates.min()) < 0 or int(candidates.max()) >= num_train):
        bad = candidates[(candidates < 0) | (candidates >= num_train)][:5].tolist()
        raise ArgumentError(
            f"candidates: indices {bad} are out of range for a training set of {num_train} "
            f"(accepted: 0..{num_train - 1})"
        )
    return candidates.long()


def resolve_method(method: str, shared_candidates: bool, num_test: int) -> str:
    """The scoring method ``"auto"`` stands for: ``"grads"`` for many test points sharing candidates, else ``"jvp"``.

    Example::

        >>> resolve_method("auto", True, 64), resolve_method("auto", False, 64)
        ('grads', 'jvp')
    """
    check_choice("method", method, _METHODS)
    if method != "auto":
        return method
    return "grads" if shared_candidates and num_test >= GRADS_MIN_TEST_POINTS else "jvp"


def score_candidates(
    function: FunctionalLoss,
    train_data: IndexedData,
    s_test: Tensor,
    candidates: Tensor | None = None,
    *,
    batch_size: int = 256,
    method: str = "auto",
) -> Tensor:
    """Score training points against precomputed ``s_test`` vectors ``[T, P]``: ``[T, N]`` or ``[T, K]``.

    Args:
        function: the model's loss as a function of the selected parameters.
        train_data: the training set.
        s_test: ``(H + λI)⁻¹ g_test``, one row per test point.
        candidates: ``None`` (all training points) or ``[T, K]`` training indices per test point.
        batch_size: candidates per forward pass.
        method: ``"auto"``, ``"jvp"`` or ``"grads"`` (see the module docstring).

    Raises:
        NonFiniteError: ``s_test`` or a score is NaN or infinite (naming the training examples and test points).
    """
    check_int("batch_size", batch_size)
    check_finite(s_test, "s_test", rows="test points")
    if candidates is not None:
        candidates = check_candidates(candidates, s_test.shape[0], len(train_data))
    scores = _score(function, train_data, s_test, candidates, batch_size, method)
    return check_scores(scores, candidates)


def check_scores(scores: Tensor, candidates: Tensor | None, test_indices: Tensor | None = None) -> Tensor:
    """Return ``scores`` ``[T, K]`` if finite; else raise :class:`NonFiniteError` naming the training examples
    (``candidates[t, k]``, or ``k`` for all-candidate scores) and the test points (``test_indices[t]`` or ``t``).
    """
    bad = ~torch.isfinite(scores)
    if not bool(bad.any()):
        return scores
    rows, cols = bad.nonzero(as_tuple=True)
    train = cols if candidates is None else candidates.to(scores.device)[rows, cols]
    test = rows if test_indices is None else test_indices.to(rows.device)[rows]
    raise NonFiniteError(
        f"influence scores are not finite for training examples {format_indices(train.unique())} (against test "
        f"points {format_indices(test.unique())}): the loss or loss gradient of those training examples is NaN or "
        "infinite; fix or remove them"
    )


def _score(
    function: FunctionalLoss,
    train_data: IndexedData,
    s_test: Tensor,
    candidates: Tensor | None,
    batch_size: int,
    method: str,
) -> Tensor:
    num_test = s_test.shape[0]
    method = resolve_method(method, candidates is None, num_test)
    if candidates is None:
        use_grads = method == "grads"
        parts = []
        for _, batch in train_data.chunks(batch_size):
            if use_grads:
                parts.append(function.gradient_dots(batch, s_test))
            else:
                parts.append(function.directional_derivatives(batch, s_test))
        return torch.cat(parts, dim=1)
    if method == "grads":
        out = torch.empty(candidates.shape, dtype=s_test.dtype, device=s_test.device)
        for t in range(num_test):
            for start in range(0, candidates.shape[1], batch_size):
                idx = candidates[t, start : start + batch_size]
                out[t, start : start + idx.numel()] = function.gradient_dots(train_data.gather(idx), s_test[t])[0]
        return out
    rows = []
    for t in range(num_test):
        parts = [
            function.directional_derivatives(train_data.gather(candidates[t, start : start + batch_size]), s_test[t])[0]
            for start in range(0, candidates.shape[1], batch_size)
        ]
        rows.append(torch.cat(parts) if parts else s_test.new_zeros(0))
    return torch.stack(rows)


def _stage(name: str, stages: dict[str, dict[str, Any]] | None, device: torch.device) -> Any:
    """Measure a stage only when diagnostics were asked for (a sampling thread runs while it is measured)."""
    return contextlib.nullcontext() if stages is None else measure_stage(name, stages, device=device)


def _gradients_in_chunks(function: FunctionalLoss, batch: Batch, chunk: int | None) -> Tensor:
    size = batch_size_of(batch)
    if chunk is None or chunk >= size:
        return function.per_example_gradients(batch)
    return torch.cat(
        [function.per_example_gradients(slice_batch(batch, slice(i, i + chunk))) for i in range(0, size, chunk)]
    )


def _test_gradients(function: FunctionalLoss, batch: Batch, chunk: int | None) -> Tensor:
    grads = _gradients_in_chunks(function, batch, chunk)
    if bool(torch.isfinite(grads).all()):
        return grads
    if not function.parameters_finite():
        hint = "the selected parameters hold NaN or infinite values, so every loss is affected; check the weights"
    else:
        hint = "check these test inputs and labels (a NaN input, an overflowing loss)"
    return check_finite(grads, "the loss gradients", rows="test points", hint=hint)


def _plan(
    function: FunctionalLoss,
    data: IndexedData,
    ihvp: InverseHVP,
    max_memory: str | int,
    num_vectors: int,
    score_directions: int | None = None,
) -> MemoryPlan:
    """The chunk sizes, with what the estimator keeps beyond the plan (an exact factorisation) reserved."""
    budget = parse_memory(max_memory)
    reserved = ihvp.reserved_bytes(function.num_params, budget)
    cost = measure_example_cost(function, data)
    return plan_chunks(cost, max_memory, num_vectors=num_vectors, score_directions=score_directions, reserved=reserved)


def _operator(
    function: FunctionalLoss, data: IndexedData, hessian_batch_size: int, plan: MemoryPlan | None
) -> HessianOperator:
    if plan is None:
        return HessianOperator(function.model, None, data, batch_size=hessian_batch_size, function=function)
    return HessianOperator(
        function.model,
        None,
        data,
        batch_size=plan.hessian_chunk,
        function=function,
        vector_block=plan.num_vectors,
        max_memory=plan.max_memory,
    )


def _report(
    diagnostics: dict[str, Any] | None,
    ihvp: dict[str, Any],
    stages: dict[str, dict[str, Any]] | None,
    plan: MemoryPlan | None,
    chunks: dict[str, int],
    **extra: Any,
) -> None:
    if diagnostics is None:
        return
    diagnostics.update(
        ihvp=ihvp, stages=stages or {}, memory_plan=None if plan is None else plan.as_dict(), chunks=chunks, **extra
    )


def inverse_hvp_of_test(
    model: nn.Module,
    loss_fn: LossFn | None,
    test_batch: Batch,
    train_data: Any,
    *,
    ihvp: InverseHVP,
    params: ParamSpec = None,
    hessian_batch_size: int = 256,
    max_memory: str | int | None = None,
    diagnostics: dict[str, Any] | None = None,
) -> Tensor:
    """``s_test = (H + λI)⁻¹ g_test`` ``[T, P]`` for every test point of ``test_batch``, in one solve.

    ``max_memory`` and ``diagnostics`` work as in :func:`influence_scores`.

    Raises:
        NonFiniteError: a test gradient, a Hessian product or the solve is NaN or infinite (naming the indices).
    """
    _check_estimator(ihvp)
    check_int("hessian_batch_size", hessian_batch_size)
    function = FunctionalLoss(model, loss_fn, params)
    data = IndexedData(train_data)
    num_test = batch_size_of(test_batch)
    stages: dict[str, dict[str, Any]] | None = None if diagnostics is None else {}
    plan, grad_chunk = None, None
    if max_memory is not None:
        with evaluating(model):
            plan = _plan(function, data, ihvp, max_memory, num_test)
        hessian_batch_size, grad_chunk = plan.hessian_chunk, plan.gradient_chunk
    operator = _operator(function, data, hessian_batch_size, plan)
    with evaluating(model):
        with _stage("test_gradients", stages, function.device):
            g_test = _test_gradients(function, test_batch, grad_chunk)
        with _stage("inverse_hvp", stages, function.device):
            s_test = ihvp.solve(operator, g_test)
    chunks = {"test_gradients": grad_chunk or num_test, "hessian": hessian_batch_size}
    _report(diagnostics, dict(ihvp.diagnostics), stages, plan, chunks)
    return s_test


def influence_scores(
    model: nn.Module,
    loss_fn: LossFn | None,
    test_batch: Batch,
    train_data: Any,
    *,
    ihvp: InverseHVP,
    params: ParamSpec = None,
    candidates: Tensor | None = None,
    batch_size: int = 256,
    hessian_batch_size: int = 256,
    method: str = "auto",
    max_memory: str | int | None = None,
    diagnostics: dict[str, Any] | None = None,
) -> Tensor:
    """Influence of training points on each test point of ``test_batch``. **Positive = helpful.**

    Args:
        model: the trained model (put in eval mode for the computation, its modes restored after).
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``, per-example losses; ``None`` uses ``model.per_example_loss``.
        test_batch: a batch of ``T`` test points (tuple or dict of tensors, as the loss takes it).
        train_data: the training set: a map-style ``Dataset`` or a ``DataLoader`` over one.
        ihvp: the inverse-HVP estimator (:class:`~lightning_fastif.core.ihvp.LiSSA`, ``ConjugateGradient``, ...).
        params: which parameters (name patterns, modules; default: all trainable).
        candidates: ``None`` to score every training point, or ``[T, K]`` training indices per test point.
        batch_size: candidates per pass (ignored when ``max_memory`` is given).
        hessian_batch_size: examples per chunk in Hessian products (ignored when ``max_memory`` is given).
        method: ``"auto"``, ``"jvp"`` or ``"grads"`` (see the module docstring).
        max_memory: a memory budget (``"4GB"``, ``"512MiB"``, bytes): chunk sizes of the test gradients, the
            scoring and the Hessian products are derived from it and the measured cost of one example (see
            :mod:`lightning_fastif.core.memory`); the scores are the same as without it.
        diagnostics: a dict to fill with ``ihvp`` (the estimator's diagnostics: settings as used, iterations,
            residual, seconds), ``stages`` (seconds and peak memory of ``test_gradients``, ``inverse_hvp``,
            ``scoring``), ``memory_plan`` (or ``None``), ``chunks`` and ``method``.

    Returns:
        ``[T, N]`` scores, or ``[T, K]`` aligned with ``candidates``.

    Raises:
        MemoryBudgetError: ``max_memory`` cannot hold one example's work (the message gives the smallest budget
            that works).
        NonFiniteError: a loss, gradient, Hessian product, solve or score is NaN or infinite; the message names the
            training examples and/or test points involved.
        ArgumentError: a bad argument (``method``, ``batch_size``, ``candidates``, ...), named in the message.

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> from lightning_fastif.core.ihvp import ExactInverse
        >>> net = nn.Linear(2, 1).double()
        >>> mse = lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2
        >>> train = TensorDataset(torch.randn(8, 2, dtype=torch.float64), torch.randn(8, dtype=torch.float64))
        >>> influence_scores(net, mse, train[:2], train, ihvp=ExactInverse(0.1), max_memory="10MB").shape
        torch.Size([2, 8])
    """
    _check_estimator(ihvp)
    check_int("batch_size", batch_size)
    check_int("hessian_batch_size", hessian_batch_size)
    function = FunctionalLoss(model, loss_fn, params)
    data = IndexedData(train_data)
    num_test = batch_size_of(test_batch)
    resolved = resolve_method(method, candidates is None, num_test)
    if candidates is not None:
        candidates = check_candidates(candidates, num_test, len(data))
    stages: dict[str, dict[str, Any]] | None = None if diagnostics is None else {}
    plan, grad_chunk = None, None
    if max_memory is not None:
        directions = num_test if candidates is None else 1
        with evaluating(model):
            plan = _plan(function, data, ihvp, max_memory, num_test, directions)
        hessian_batch_size, grad_chunk = plan.hessian_chunk, plan.gradient_chunk
        batch_size = plan.gradient_chunk if resolved == "grads" else plan.score_chunk
    operator = _operator(function, data, hessian_batch_size, plan)
    with evaluating(model):
        with _stage("test_gradients", stages, function.device):
            g_test = _test_gradients(function, test_batch, grad_chunk)
        with _stage("inverse_hvp", stages, function.device):
            s_test = ihvp.solve(operator, g_test)
        with _stage("scoring", stages, function.device):
            scores = score_candidates(function, data, s_test, candidates, batch_size=batch_size, method=resolved)
    chunks = {"test_gradients": grad_chunk or num_test, "hessian": hessian_batch_size, "scoring": batch_size}
    _report(diagnostics, dict(ihvp.diagnostics), stages, plan, chunks, method=resolved)
    return scores


def _self_influence_plan(
    function: FunctionalLoss, data: IndexedData, ihvp: InverseHVP, max_memory: str | int, most: int
) -> MemoryPlan:
    """The plan with the most vectors per solve (at most ``most``) whose every work fits one example."""
    vectors = most
    while True:
        try:
            return _plan(function, data, ihvp, max_memory, vectors, 1)
        except MemoryBudgetError:
            if vectors == 1:
                raise
            vectors = max(1, vectors // 2)


def _check_estimator(ihvp: Any) -> None:
    if not isinstance(ihvp, InverseHVP):
        raise ArgumentError(
            "ihvp: expected an InverseHVP estimator (AutoInverse, LiSSA, ConjugateGradient, ExactInverse, Identity), "
            f"got {ihvp!r}"
        )


def _summary(solves: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The diagnostics of many solves as one: the last solve's, with the worst residual, all-or-nothing
    ``converged`` (``None`` when none was measured) and the total seconds."""
    summary = {**solves[-1], "seconds": seconds, "solves": len(solves)}
    residuals = [d["residual"] for d in solves if d.get("residual") is not None]
    summary["residual"] = max(residuals) if residuals else None
    verdicts = [d.get("converged") for d in solves if d.get("converged") is not None]
    summary["converged"] = all(verdicts) if verdicts else None
    return summary


def self_influence(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Any,
    *,
    ihvp: InverseHVP,
    params: ParamSpec = None,
    train_data: Any = None,
    batch_size: int = 64,
    hessian_batch_size: int = 256,
    max_memory: str | int | None = None,
    diagnostics: dict[str, Any] | None = None,
) -> Tensor:
    """``g(z)ᵀ (H + λI)⁻¹ g(z)`` for every example of ``data``: ``[N]``.

    High self-influence marks points the model had to bend to fit: likely mislabelled or atypical. ``H`` is taken
    over ``train_data`` (default: ``data`` itself). The estimator solves for ``batch_size`` examples at a time; with
    ``max_memory`` that is the largest number up to ``batch_size`` the budget holds, and the Hessian chunk follows
    from it. The estimator's fixed costs (an exact factorisation, LiSSA's scale and depth, the residual
    certificate) are paid on the first chunk and reused by the others. ``diagnostics`` is filled as in
    :func:`influence_scores`; its ``ihvp`` entry is the last solve's, with ``residual`` the largest, ``converged``
    true only if every solve converged, and ``seconds`` the total over all solves (``solves`` of them).

    Raises:
        NonFiniteError: an example's gradient, a product, a solve or a score is NaN or infinite (naming the
            indices of ``data`` or of the training data involved).

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> from lightning_fastif.core.ihvp import Identity
        >>> net = nn.Linear(2, 1)
        >>> mse = lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2
        >>> self_influence(net, mse, TensorDataset(torch.randn(5, 2), torch.randn(5)), ihvp=Identity()).shape
        torch.Size([5])
    """
    _check_estimator(ihvp)
    check_int("batch_size", batch_size)
    check_int("hessian_batch_size", hessian_batch_size)
    function = FunctionalLoss(model, loss_fn, params)
    source = IndexedData(data, name="data")
    hessian_data = source if train_data is None else IndexedData(train_data)
    stages: dict[str, dict[str, Any]] | None = None if diagnostics is None else {}
    plan, grad_chunk = None, None
    if max_memory is not None:
        with evaluating(model):
            plan = _self_influence_plan(function, hessian_data, ihvp, max_memory, batch_size)
        batch_size, hessian_batch_size, grad_chunk = plan.num_vectors, plan.hessian_chunk, plan.gradient_chunk
    operator = _operator(function, hessian_data, hessian_batch_size, plan)
    out = []
    solves, seconds = [], 0.0
    with evaluating(model):
        for idx, batch in source.chunks(batch_size):
            with _stage("gradients", stages, function.device):
                grads = _gradients_in_chunks(function, batch, grad_chunk)
                check_finite(grads, "the loss gradients", rows="examples", indices=idx)
            with _stage("inverse_hvp", stages, function.device):
                values = (grads * ihvp.solve(operator, grads)).sum(-1)
            out.append(check_finite(values, "the self-influence scores", rows="examples", indices=idx))
            seconds += ihvp.diagnostics.get("seconds", 0.0)
            solves.append(dict(ihvp.diagnostics))
    chunks = {"vectors_per_solve": batch_size, "gradients": grad_chunk or batch_size, "hessian": hessian_batch_size}
    _report(diagnostics, _summary(solves, seconds), stages, plan, chunks)
    return torch.cat(out)


def diagnostic_metrics(diagnostics: dict[str, Any], prefix: str = "fastif/") -> dict[str, float]:
    """Flatten a ``diagnostics`` dict into numbers for a logger (``trainer.logger``, ``self.log_dict``).

    One key family, ``<prefix><stage>/<what>``: ``ihvp/residual``, ``ihvp/iterations`` (mean over repeats),
    ``ihvp/seconds``, ``ihvp/scale`` and ``ihvp/top_eigenvalue`` (LiSSA), ``ihvp/converged`` (1 or 0; for several
    solves the fraction that converged); per stage ``<stage>/seconds``, ``<stage>/peak_bytes`` (CUDA where
    measured, else CPU resident) and ``<stage>/extra_bytes``; ``memory_plan/max_memory_bytes`` under a budget.
    Missing values are left out.

    Example::

        >>> diagnostic_metrics({"ihvp": {"residual": 0.01, "iterations": [200, 300]}, "stages": {}})
        {'fastif/ihvp/residual': 0.01, 'fastif/ihvp/iterations': 250.0}
    """
    out: dict[str, float] = {}
    ihvp = diagnostics.get("ihvp") or {}
    if ihvp.get("residual") is not None:
        out[f"{prefix}ihvp/residual"] = float(ihvp["residual"])
    iterations = ihvp.get("iterations")
    if iterations is not None:
        values = iterations if isinstance(iterations, (list, tuple)) else [iterations]
        out[f"{prefix}ihvp/iterations"] = float(sum(values)) / max(len(values), 1)
    if ihvp.get("seconds") is not None:
        out[f"{prefix}ihvp/seconds"] = float(ihvp["seconds"])
    if isinstance(ihvp.get("scale"), (int, float)):
        out[f"{prefix}ihvp/scale"] = float(ihvp["scale"])
    if ihvp.get("scale_estimate"):
        out[f"{prefix}ihvp/top_eigenvalue"] = float(ihvp["scale_estimate"]["eigenvalue"])
    converged = ihvp.get("converged")
    if isinstance(converged, bool):  # one certified verdict (residual <= tol on the stated sample)
        out[f"{prefix}ihvp/converged"] = float(converged)
    elif isinstance(converged, (list, tuple)) and converged:  # per-repeat verdicts of several solves combined
        out[f"{prefix}ihvp/converged"] = sum(map(bool, converged)) / len(converged)
    for stage, record in (diagnostics.get("stages") or {}).items():
        out[f"{prefix}{stage}/seconds"] = float(record["seconds"])
        peak = record.get("cuda_peak_bytes", record.get("cpu_peak_bytes"))
        extra = record.get("cuda_extra_bytes", record.get("cpu_extra_bytes"))
        if peak is not None:
            out[f"{prefix}{stage}/peak_bytes"] = float(peak)
        if extra is not None:
            out[f"{prefix}{stage}/extra_bytes"] = float(extra)
    plan = diagnostics.get("memory_plan")
    if plan:
        out[f"{prefix}memory_plan/max_memory_bytes"] = float(plan["max_memory"])
    return out
