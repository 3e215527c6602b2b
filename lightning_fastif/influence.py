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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_fastif.batches import Batch, IndexedData, batch_size_of
from lightning_fastif.grads import FunctionalLoss, LossFn, evaluating
from lightning_fastif.hessian import HessianOperator
from lightning_fastif.ihvp import InverseHVP
from lightning_fastif.params import ParamSpec

_METHODS = ("auto", "jvp", "grads")
GRADS_MIN_TEST_POINTS = 32
"""Under ``method="auto"`` with shared candidates, materialise gradients from this many test points on."""


def check_candidates(candidates: Any, num_test: int, num_train: int) -> Tensor:
    """Validate a ``[T, K]`` tensor of training indices (one row per test point)."""
    if not isinstance(candidates, Tensor):
        candidates = torch.as_tensor(candidates)
    if candidates.dim() == 1 and num_test == 1:
        candidates = candidates.unsqueeze(0)
    if candidates.dim() != 2 or candidates.shape[0] != num_test:
        raise ValueError(
            f"candidates: expected shape [T={num_test}, K] (training indices per test point), got "
            f"{tuple(candidates.shape)}"
        )
    if candidates.is_floating_point() or candidates.dtype == torch.bool:
        raise TypeError(f"candidates: expected an integer tensor of training indices, got dtype {candidates.dtype}")
    if candidates.numel() and (int(candidates.min()) < 0 or int(candidates.max()) >= num_train):
        bad = candidates[(candidates < 0) | (candidates >= num_train)][:5].tolist()
        raise ValueError(
            f"candidates: indices {bad} are out of range for a training set of {num_train} "
            f"(accepted: 0..{num_train - 1})"
        )
    return candidates.long()


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
    """
    if method not in _METHODS:
        raise ValueError(f"method: expected one of {_METHODS}, got {method!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size}")
    num_test, num_train = s_test.shape[0], len(train_data)
    if candidates is None:
        use_grads = method == "grads" or (method == "auto" and num_test >= GRADS_MIN_TEST_POINTS)
        parts = []
        for _, batch in train_data.chunks(batch_size):
            if use_grads:
                parts.append(s_test @ function.per_example_gradients(batch).T.to(s_test.dtype))
            else:
                parts.append(function.directional_derivatives(batch, s_test))
        return torch.cat(parts, dim=1)
    candidates = check_candidates(candidates, num_test, num_train)
    if method == "grads":
        out = torch.empty(candidates.shape, dtype=s_test.dtype, device=s_test.device)
        for t in range(num_test):
            for start in range(0, candidates.shape[1], batch_size):
                idx = candidates[t, start : start + batch_size]
                grads = function.per_example_gradients(train_data.gather(idx))
                out[t, start : start + idx.numel()] = grads.to(s_test.dtype) @ s_test[t]
        return out
    rows = []
    for t in range(num_test):
        parts = [
            function.directional_derivatives(train_data.gather(candidates[t, start : start + batch_size]), s_test[t])[0]
            for start in range(0, candidates.shape[1], batch_size)
        ]
        rows.append(torch.cat(parts) if parts else s_test.new_zeros(0))
    return torch.stack(rows)


def inverse_hvp_of_test(
    model: nn.Module,
    loss_fn: LossFn | None,
    test_batch: Batch,
    train_data: Any,
    *,
    ihvp: InverseHVP,
    params: ParamSpec = None,
    hessian_batch_size: int = 256,
) -> Tensor:
    """``s_test = (H + λI)⁻¹ g_test`` ``[T, P]`` for every test point of ``test_batch``, in one solve."""
    function = FunctionalLoss(model, loss_fn, params)
    operator = HessianOperator(model, None, train_data, batch_size=hessian_batch_size, function=function)
    with evaluating(model):
        return ihvp.solve(operator, function.per_example_gradients(test_batch))


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
) -> Tensor:
    """Influence of training points on each test point of ``test_batch``. **Positive = helpful.**

    Args:
        model: the trained model (put in eval mode for the computation, its modes restored after).
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``, per-example losses; ``None`` uses ``model.per_example_loss``.
        test_batch: a batch of ``T`` test points (tuple or dict of tensors, as the loss takes it).
        train_data: the training set: a map-style ``Dataset`` or a ``DataLoader`` over one.
        ihvp: the inverse-HVP estimator (:class:`~lightning_fastif.ihvp.LiSSA`, ``ConjugateGradient``, ...).
        params: which parameters (name patterns, modules; default: all trainable).
        candidates: ``None`` to score every training point, or ``[T, K]`` training indices per test point.
        batch_size: candidates per pass.
        hessian_batch_size: examples per chunk in full-data Hessian products.
        method: ``"auto"``, ``"jvp"`` or ``"grads"`` (see the module docstring).

    Returns:
        ``[T, N]`` scores, or ``[T, K]`` aligned with ``candidates``.

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> from lightning_fastif.ihvp import ExactInverse
        >>> net = nn.Linear(2, 1).double()
        >>> mse = lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2
        >>> train = TensorDataset(torch.randn(8, 2, dtype=torch.float64), torch.randn(8, dtype=torch.float64))
        >>> influence_scores(net, mse, train[:2], train, ihvp=ExactInverse(0.1)).shape
        torch.Size([2, 8])
    """
    function = FunctionalLoss(model, loss_fn, params)
    data = IndexedData(train_data)
    batch_size_of(test_batch)
    operator = HessianOperator(model, None, data, batch_size=hessian_batch_size, function=function)
    with evaluating(model):
        g_test = function.per_example_gradients(test_batch)
        if candidates is not None:
            candidates = check_candidates(candidates, g_test.shape[0], len(data))
        s_test = ihvp.solve(operator, g_test)
        return score_candidates(function, data, s_test, candidates, batch_size=batch_size, method=method)


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
) -> Tensor:
    """``g(z)ᵀ (H + λI)⁻¹ g(z)`` for every example of ``data``: ``[N]``.

    High self-influence marks points the model had to bend to fit: likely mislabelled or atypical. ``H`` is taken
    over ``train_data`` (default: ``data`` itself). The estimator solves for ``batch_size`` examples at a time.

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> from lightning_fastif.ihvp import Identity
        >>> net = nn.Linear(2, 1)
        >>> mse = lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2
        >>> self_influence(net, mse, TensorDataset(torch.randn(5, 2), torch.randn(5)), ihvp=Identity()).shape
        torch.Size([5])
    """
    function = FunctionalLoss(model, loss_fn, params)
    source = IndexedData(data, name="data")
    hessian_data = source if train_data is None else IndexedData(train_data)
    operator = HessianOperator(model, None, hessian_data, batch_size=hessian_batch_size, function=function)
    out = []
    with evaluating(model):
        for _, batch in source.chunks(batch_size):
            grads = function.per_example_gradients(batch)
            out.append((grads * ihvp.solve(operator, grads)).sum(-1))
    return torch.cat(out)
