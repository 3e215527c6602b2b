"""Factored curvature (K-FAC, EK-FAC): influence at a scale where Hessian-vector products are too slow.

**The curvature is the empirical Fisher** of the mean training loss, ``G = (1/N) Σ_i g_i g_iᵀ``, with ``g_i`` the
gradient of example ``i``'s loss as ``loss_fn`` gives it (the labels of the data). The true Fisher samples labels
from the model's predictive distribution; ``loss_fn`` is an opaque function of a batch, so that distribution is
not known here: ``sample_labels=True`` is refused, and ``sample_labels=sampler`` takes a function that returns the
batch with labels drawn from the model (:func:`sample_classifier_labels` for ``(inputs, labels)`` batches of a
classifier trained with cross-entropy). Its factors are those of the true Fisher, the Gauss-Newton matrix of a
softmax cross-entropy, which is closer to the Hessian than the empirical Fisher off the fit: on a small tanh
classifier (``tests/test_curvature.py``) EK-FAC self-influence correlates 0.964 instead of 0.943 with exact
self-influence at λ = 0.05. Where the labels follow the model's own predictive
distribution (a well-specified model near its fit) ``G`` approximates the Gauss-Newton part of the Hessian;
elsewhere it can differ from it considerably (Kunstner et al. 2019), and no factoring makes up for that: on a small
classifier with teacher-drawn labels at λ = 0.1 the exact ``G`` gives influence correlating 0.95 with exact
influence, EK-FAC 0.93 (``tests/test_curvature.py``). ``G`` is positive semi-definite, so ``(G + λI)⁻¹`` exists for
every ``λ > 0``.

``G`` is approximated block-diagonally, one block per layer (:mod:`~lightning_fastif.core.curvature_layers`), with
the per-example layer gradient ``G_i = Σ_t g_it a_itᵀ`` (``t`` over positions: tokens, spatial positions):

* **K-FAC** (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016): the block is ``A ⊗ S`` with
  ``A = (1/N) Σ_i Σ_t a_it a_itᵀ`` and ``S = (1/M) Σ_i Σ_t g_it g_itᵀ``, ``M`` the number of positions that carry
  gradient (``M = N`` with one position per example; then a single example's block is exactly ``g gᵀ``). For an
  embedding ``A`` is diagonal: the token counts over ``N``.
* **EK-FAC** (George et al. 2018; Grosse et al. 2023): the eigenbasis ``Q_S ⊗ Q_A`` of ``A ⊗ S`` is kept and its
  eigenvalues are replaced by the second moments of the per-example gradients in that basis,
  ``Λ = (1/N) Σ_i (Q_Sᵀ G_i Q_A)²`` (:func:`ekfac_correct`, a second pass over the data). It is the best
  diagonal approximation of the block in that basis; K-FAC's eigenvalues are ``s_j a_k``.

Selected parameters no layer covers (:attr:`KFACFactors.unsupported`: a bias selected without its weight, tied
weights, LayerNorm, custom parameters) **fall back to the diagonal empirical Fisher** ``(1/N) Σ_i g_ip²``, from
per-example gradients of those parameters in the same pass. Every block is inverted in its eigenbasis:
``(G + λI)⁻¹ v = Q (Qᵀ v / (Λ + λ))``. Factors accumulate in ``dtype`` (float64 by default); per-batch products run
in the model's dtype, at least float32. Everything runs on the model's device. This module imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fastif.core.batches import IndexedData
from lightning_fastif.core.curvature_factors import KFACFactors, KFACLayer
from lightning_fastif.core.curvature_layers import (
    KINDS,
    LayerBatch,
    LayerCapture,
    LayerSpec,
    compute_dtype,
    discover_layers,
    escaped_names,
    explained,
)
from lightning_fastif.core.deflation import LowRankCorrection
from lightning_fastif.core.grads import FunctionalLoss, LossFn, evaluating
from lightning_fastif.core.params import ParamSpec
from lightning_fastif.errors import ArgumentError, check_int, check_number

__all__ = ["KFACFactors", "KFACLayer", "ekfac_correct", "ekfac_self_influence", "fit_kfac", "sample_classifier_labels"]

LabelSampler = Callable[[nn.Module, Any, torch.Generator], Any]
"""``sampler(model, batch, generator) -> batch``: the batch with its labels drawn from the model's predictive
distribution (``generator`` seeds the draws), for factors of the true Fisher."""

LABEL_SEED = 0
"""Seeds the labels a sampler draws, so a fit is reproducible."""

Progress = Callable[[int, int], Any]
"""``progress(done, total)``: called after each batch with the examples processed so far and the total."""


# -- arguments ------------------------------------------------------------------------------------------------------
def _check_common(batch_size: Any, progress: Any) -> int:
    size = check_int("batch_size", batch_size)
    if progress is not None and not callable(progress):
        raise ArgumentError(f"progress: expected None or a callable progress(done, total), got {progress!r}")
    return size


def _check_dtype(dtype: Any) -> torch.dtype:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ArgumentError(f"dtype: expected a floating torch.dtype (torch.float64, torch.float32), got {dtype!r}")
    return dtype


def _check_sampler(sample_labels: Any) -> LabelSampler | None:
    if sample_labels is False:
        return None
    if callable(sample_labels):
        return sample_labels
    if sample_labels is True:
        raise ArgumentError(
            "sample_labels: expected False (the empirical Fisher, with the data's labels) or a sampler(model, batch, "
            "generator) -> batch such as sample_classifier_labels (loss_fn is an opaque function of a batch, so "
            "labels cannot be sampled without one), got True"
        )
    raise ArgumentError(
        f"sample_labels: expected False or a callable sampler(model, batch, generator), got {sample_labels!r}"
    )


def sample_classifier_labels(model: nn.Module, batch: Any, generator: torch.Generator) -> Any:
    """A :data:`LabelSampler` for classifiers: ``batch = (inputs, labels, ...)``, ``model(inputs)`` the logits of a
    softmax cross-entropy; returns the batch with one label per example drawn from ``softmax(logits)``.

    Example::

        >>> net = nn.Linear(2, 3)
        >>> x, y = torch.randn(4, 2), torch.zeros(4, dtype=torch.long)
        >>> sample_classifier_labels(net, (x, y), torch.Generator().manual_seed(0))[1].shape
        torch.Size([4])
    """
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ArgumentError(
            f"batch: expected (inputs, labels, ...) for sample_classifier_labels, got {type(batch).__name__}"
        )
    inputs, labels = batch[0], batch[1]
    device = next(model.parameters()).device
    with torch.no_grad():
        probs = torch.softmax(model(inputs.to(device)).double(), dim=-1).cpu()
    drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).reshape(probs.shape[:-1])
    return (inputs, drawn.to(labels.device, labels.dtype), *batch[2:])


def _check_factors(factors: Any) -> KFACFactors:
    if not isinstance(factors, KFACFactors):
        raise ArgumentError(f"factors: expected KFACFactors (from fit_kfac or KFACFactors.load), got {factors!r}")
    return factors


class _Pass:
    """What every pass over the data shares: the loss as a function, the layer capture, the fallback gradients."""

    def __init__(self, function: FunctionalLoss, layers: list[LayerSpec], unsupported: list[str]) -> None:
        model = function.model
        modules = {spec.name: model.get_submodule(spec.name) for spec in layers}
        self.function = function
        self.capture = LayerCapture(function, layers, modules)
        self.fallback = FunctionalLoss(model, function.loss_fn, escaped_names(unsupported)) if unsupported else None

    def fallback_gradients(self, batch: Any) -> Tensor | None:
        """Per-example gradients ``[B, P_u]`` of the unsupported parameters (``None`` when there are none)."""
        return None if self.fallback is None else self.fallback.per_example_gradients(batch)

    def run(self, batch: Any) -> dict[str, LayerBatch]:
        captured, _, problems = self.capture.run(batch)
        if problems:
            raise RuntimeError("K-FAC: " + "; ".join(problems.values()))
        return captured


def _bind(model: nn.Module, loss_fn: LossFn | None, factors: KFACFactors, params: ParamSpec = None) -> _Pass:
    """A pass over ``model`` for ``factors``: the factors' selection, each layer a module of the same kind."""
    function = FunctionalLoss(model, loss_fn, escaped_names(factors.names) if params is None else params)
    factors.check_selection(function.names, [tuple(p.shape) for p in function.primals.values()])
    for layer in factors.layers:
        try:
            module = model.get_submodule(layer.spec.name)
        except AttributeError:
            module = None
        if KINDS.get(type(module)) != layer.spec.kind:
            raise ArgumentError(
                f"factors: expected the module {layer.spec.name!r} to be a {layer.spec.kind} layer as when fitted, "
                f"got {type(module).__name__}"
            )
    return _Pass(function, [layer.spec for layer in factors.layers], list(factors.unsupported))


# -- pass 1: the factors --------------------------------------------------------------------------------------------
def fit_kfac(
    model: nn.Module,
    loss_fn: LossFn | None,
    train_data: Any,
    params: ParamSpec = None,
    *,
    batch_size: int = 64,
    sample_labels: bool | LabelSampler = False,
    progress: Progress | None = None,
    dtype: torch.dtype = torch.float64,
) -> KFACFactors:
    """Fit K-FAC factors of the empirical Fisher in one pass over ``train_data``, and eigendecompose them.

    On the first batch each layer's captured inputs and output gradients must rebuild the layer's actual gradient;
    a layer whose weight is also used elsewhere (``F.linear(x, layer.weight)``) or whose input does not carry the
    examples first moves to :attr:`KFACFactors.unsupported` (the diagonal fallback).

    Args:
        model: the model (evaluated in eval mode; its modes are restored).
        loss_fn: per-example losses ``loss_fn(model, batch) -> Tensor[B]``; ``None`` uses ``model.per_example_loss``.
        train_data: a map-style ``Dataset`` or a ``DataLoader`` over one.
        params: which parameters (:func:`~lightning_fastif.core.params.select_parameters`; default all trainable).
        batch_size: examples per forward/backward pass (a memory bound; the factors do not depend on it).
        sample_labels: ``False``: the empirical Fisher (labels of the data); a :data:`LabelSampler` (e.g.
            :func:`sample_classifier_labels`): the true Fisher, with labels drawn from the model (seed
            :data:`LABEL_SEED`); pass the same to :func:`ekfac_correct`.
        progress: ``progress(done, total)`` after each batch.
        dtype: the dtype of the factors (float64 by default).

    Returns:
        :class:`KFACFactors` with K-FAC eigenvalues; :func:`ekfac_correct` turns them into EK-FAC.

    Raises:
        ArgumentError: a bad argument (named in the message).

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
        >>> data = TensorDataset(torch.randn(10, 4, dtype=torch.float64), torch.randint(2, (10,)))
        >>> ce = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
        >>> factors = fit_kfac(net, ce, data, batch_size=4)
        >>> [tuple(layer.A.shape) for layer in factors.layers]
        [(5, 5), (4, 4)]
    """
    batch_size = _check_common(batch_size, progress)
    sampler = _check_sampler(sample_labels)
    generator = torch.Generator().manual_seed(LABEL_SEED)
    dtype = _check_dtype(dtype)
    function = FunctionalLoss(model, loss_fn, params)
    data = IndexedData(train_data)
    layers, modules, unsupported = discover_layers(model, function.primals)
    device = function.device
    total = len(data)
    sums: dict[str, list[Any]] = {}
    diag_sum: Tensor | None = None
    stream: _Pass | None = None
    done = 0
    with evaluating(model):
        for idx, batch in data.chunks(batch_size):
            if sampler is not None:
                batch = sampler(model, batch, generator)
            if stream is None:
                captured, grads, problems = LayerCapture(function, layers, modules).run(batch)
                layers = _screen(layers, captured, grads, problems, unsupported)
                unsupported = {n: unsupported[n] for n in function.names if n in unsupported}
                stream = _Pass(function, layers, list(unsupported))
                sums = {spec.name: _zero_sums(spec, dtype, device) for spec in layers}
            else:
                captured = stream.run(batch)
            for spec in layers:
                if spec.name in captured:
                    _accumulate(spec, captured[spec.name], sums[spec.name])
            fallback_grads = stream.fallback_gradients(batch)
            if fallback_grads is not None:
                part = (fallback_grads.to(dtype) ** 2).sum(0)
                diag_sum = part if diag_sum is None else diag_sum + part
            done += idx.numel()
            if progress is not None:
                progress(done, total)
    fitted = [_eigen(spec, *sums[spec.name], total) for spec in layers]
    diagonal = _split(diag_sum / total, function, list(unsupported)) if diag_sum is not None else {}
    shapes = [tuple(p.shape) for p in function.primals.values()]
    return KFACFactors(function.names, shapes, fitted, diagonal, unsupported, total)


def _screen(
    layers: list[LayerSpec],
    captured: dict[str, LayerBatch],
    grads: dict[str, Tensor],
    problems: dict[str, str],
    unsupported: dict[str, str],
) -> list[LayerSpec]:
    """The layers the first batch confirms; the others join ``unsupported`` (in place) with the reason."""
    kept = []
    for spec in layers:
        own = [n for n in (spec.weight, spec.bias) if n is not None]
        if spec.name in problems:
            unsupported.update(dict.fromkeys(own, problems[spec.name]))
        elif not explained(spec, captured.get(spec.name), grads):
            reason = (
                f"{spec.name}: its weight's gradient is not explained by the module's own forward calls (is the "
                "weight also used outside them, e.g. F.linear(x, module.weight) or tied to another layer?)"
            )
            unsupported.update(dict.fromkeys(own, reason))
        else:
            kept.append(spec)
    return kept


def _zero_sums(spec: LayerSpec, dtype: torch.dtype, device: torch.device) -> list[Any]:
    a_shape = (spec.cols,) if spec.diagonal_input else (spec.cols, spec.cols)
    return [
        torch.zeros(a_shape, dtype=dtype, device=device),
        torch.zeros(spec.rows, spec.rows, dtype=dtype, device=device),
        0,
    ]


def _accumulate(spec: LayerSpec, lb: LayerBatch, sums: list[Any]) -> None:
    """Add one batch to ``[Σ a aᵀ, Σ g gᵀ, positions]`` (sums over examples and positions)."""
    a_sum, s_sum = sums[0], sums[1]
    if lb.ids is not None:
        keep = lb.ids >= 0
        a_sum += torch.bincount(lb.ids[keep], minlength=spec.cols).to(a_sum)
        g = lb.g[keep]
    else:  # masked positions (padding) hold zero inputs and gradients: they add nothing, and are not counted
        a = lb.a.reshape(-1, spec.cols)
        a_sum += (a.T @ a).to(a_sum)
        g = lb.g.reshape(-1, spec.rows)
    s_sum += (g.T @ g).to(s_sum)
    sums[2] += lb.positions()


def _eigen(spec: LayerSpec, a_sum: Tensor, s_sum: Tensor, positions: int, num_examples: int) -> KFACLayer:
    A = a_sum / num_examples
    S = s_sum / max(positions, 1)
    s_values, s_basis = torch.linalg.eigh((S + S.T) / 2)
    if spec.diagonal_input:
        a_values, a_basis = A, None
    else:
        a_values, a_basis = torch.linalg.eigh((A + A.T) / 2)
    # Both factors are PSD; eigh returns rounding-level negative eigenvalues for their null spaces.
    # Contiguous bases: the same products (and rounding) before saving and after loading.
    a_basis = None if a_basis is None else a_basis.contiguous()
    return KFACLayer(spec, A, S, a_values.clamp_min(0), a_basis, s_values.clamp_min(0), s_basis.contiguous(), positions)


def _split(flat: Tensor, function: FunctionalLoss, names: list[str]) -> dict[str, Tensor]:
    out, start = {}, 0
    for name in names:
        size = function.primals[name].numel()
        out[name] = flat[start : start + size]
        start += size
    return out


# -- pass 2: EK-FAC eigenvalues -------------------------------------------------------------------------------------
def rotated_gradients(layer: KFACLayer, lb: LayerBatch) -> Tensor:
    """``[B, rows, cols]``: each example's layer gradient in the Kronecker eigenbasis, ``Q_Sᵀ G_i Q_A``.

    Rotating inputs and output gradients first costs ``T·(rows² + cols² + rows·cols)`` per example, forming ``G_i``
    first ``T·rows·cols + rows·cols·(rows + cols)``; the cheaper order is taken (few positions: rotate first).
    """
    g, a = lb.g, lb.a
    qs, qa = layer.s_basis.to(g), layer.a_basis.to(a)
    rows, cols, positions = layer.spec.rows, layer.spec.cols, g.shape[1]
    if positions * (rows * rows + cols * cols + rows * cols) <= positions * rows * cols + rows * cols * (rows + cols):
        return torch.einsum("bto,btk->bok", g @ qs, a @ qa)
    return qs.T @ torch.einsum("bto,btk->bok", g, a) @ qa


def _rotated_factors(layer: KFACLayer, lb: LayerBatch) -> tuple[Tensor, Tensor] | None:
    """``(Q_Sᵀ g_i, Q_Aᵀ a_i)`` ``[B, rows]``, ``[B, cols]`` when each example has one position, so that its rotated
    gradient is their outer product; ``None`` with several positions (a sum of outer products)."""
    if lb.g.shape[1] != 1:
        return None
    return lb.g[:, 0] @ layer.s_basis.to(lb.g), lb.a[:, 0] @ layer.a_basis.to(lb.a)


def rotated_second_moments(layer: KFACLayer, lb: LayerBatch) -> Tensor:
    """``Σ_i (Q_Sᵀ G_i Q_A)²`` ``[rows, cols]`` over the batch. With one position per example ``G_i`` is an outer
    product, and the sum is ``(Q_Sᵀ g)²ᵀ (Q_Aᵀ a)²``: one ``rows × B × cols`` matrix product, where forming the
    rotated gradients costs the same products plus ``B × rows × cols`` memory and element-wise work."""
    factored = _rotated_factors(layer, lb)
    if factored is None:
        return (rotated_gradients(layer, lb) ** 2).sum(0)
    g, a = factored
    return g.square().T @ a.square()


def token_gradients(layer: KFACLayer, lb: LayerBatch) -> tuple[Tensor, Tensor, Tensor]:
    """An embedding's per-example gradients in its eigenbasis, by (example, token) pair: ``(example, token, [n,
    rows])``. ``A`` is diagonal, so column ``v`` of ``Q_Sᵀ G_i`` is ``Q_Sᵀ`` times the sum of ``g_t`` over the
    positions of ``i`` holding token ``v``; other columns are zero, and the ``[rows, num_embeddings]`` matrix is never
    formed."""
    keep = lb.ids >= 0
    count, length = lb.ids.shape
    rotated = lb.g[keep] @ layer.s_basis.to(lb.g)
    example = torch.arange(count, device=lb.ids.device).unsqueeze(1).expand(count, length)[keep]
    keys, inverse = torch.unique(example * layer.spec.cols + lb.ids[keep], return_inverse=True)
    summed = rotated.new_zeros(keys.numel(), layer.spec.rows).index_add_(0, inverse, rotated)
    return keys // layer.spec.cols, keys % layer.spec.cols, summed


def ekfac_correct(
    factors: KFACFactors,
    model: nn.Module,
    loss_fn: LossFn | None,
    train_data: Any,
    *,
    batch_size: int = 64,
    sample_labels: bool | LabelSampler = False,
    progress: Progress | None = None,
) -> KFACFactors:
    """EK-FAC: replace K-FAC's eigenvalues by ``Λ = (1/N) Σ_i (Q_Sᵀ G_i Q_A)²``, in a second pass over the data.

    Memory per batch: ``batch_size × rows × cols`` for the largest layer with several positions per example (each
    example's rotated layer gradient); a layer with one position (a Linear on vectors) takes one matrix product of
    its rotated factors instead (:func:`rotated_second_moments`).

    Args:
        factors: from :func:`fit_kfac` on the same model, parameters and data.
        model, loss_fn, train_data: as given to :func:`fit_kfac`.
        batch_size: examples per pass.
        sample_labels: as for :func:`fit_kfac` (the true Fisher's eigenvalues with a sampler).
        progress: ``progress(done, total)`` after each batch.

    Returns:
        New :class:`KFACFactors` sharing the factors, with corrected eigenvalues.

    Raises:
        ArgumentError: a bad argument, or factors fitted over other parameters.

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> net = nn.Linear(3, 2).double()
        >>> data = TensorDataset(torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64))
        >>> mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).sum(-1)
        >>> ekfac_correct(fit_kfac(net, mse, data), net, mse, data).corrected
        True
    """
    factors = _check_factors(factors)
    batch_size = _check_common(batch_size, progress)
    sampler = _check_sampler(sample_labels)
    generator = torch.Generator().manual_seed(LABEL_SEED)
    stream = _bind(model, loss_fn, factors)
    data = IndexedData(train_data)
    sums = {
        layer.spec.name: layer.S.new_zeros(layer.spec.cols, layer.spec.rows) for layer in factors.layers
    }  # transposed, [cols, rows]: embeddings add rows by token
    done = 0
    with evaluating(model):
        for idx, batch in data.chunks(batch_size):
            if sampler is not None:
                batch = sampler(model, batch, generator)
            captured = stream.run(batch)
            for layer in factors.layers:
                lb = captured.get(layer.spec.name)
                if lb is None:
                    continue
                total = sums[layer.spec.name]
                if lb.ids is not None:
                    _, token, rotated = token_gradients(layer, lb)
                    total.index_add_(0, token, (rotated**2).to(total))
                else:
                    total += rotated_second_moments(layer, lb).T.to(total)
            done += idx.numel()
            if progress is not None:
                progress(done, len(data))
    layers = [replace(layer, corrected=(sums[layer.spec.name].T / len(data)).contiguous()) for layer in factors.layers]
    return KFACFactors(factors.names, factors.shapes, layers, factors.diagonal, factors.unsupported, len(data))


# -- self-influence -------------------------------------------------------------------------------------------------
def ekfac_self_influence(
    model: nn.Module,
    loss_fn: LossFn | None,
    train_data: Any,
    params: ParamSpec = None,
    damping: float = 0.01,
    factors: KFACFactors | None = None,
    *,
    batch_size: int = 64,
    sample_labels: bool | LabelSampler = False,
    progress: Progress | None = None,
    correction: LowRankCorrection | None = None,
) -> Tensor:
    """``g_iᵀ (G + λI)⁻¹ g_i`` for every training example, with ``G`` the EK-FAC curvature, in one pass.

    Per layer, in its eigenbasis: ``Σ_jk (Q_Sᵀ G_i Q_A)²_jk / (Λ_jk + λ)``; the diagonal fallback adds
    ``Σ_p g_ip² / (d_p + λ)``. Only one batch of per-example layer gradients exists at a time. With a
    ``correction`` each score also gets ``Σ_k c_k (u_kᵀ g_i)²``, its dot products taken on the same rotated
    gradients (the directions are rotated once), which moves the scores toward ``g_iᵀ (H + λI)⁻¹ g_i``.

    Args:
        model, loss_fn, train_data, params: as for :func:`fit_kfac`.
        damping: λ > 0.
        factors: fitted factors (EK-FAC eigenvalues when corrected, else K-FAC's); ``None`` fits K-FAC and
            corrects it first (two more passes).
        batch_size: examples per pass.
        sample_labels: with ``factors=None``, fit the true Fisher's factors (see :func:`fit_kfac`); the scores
            always use the data's labels.
        progress: ``progress(done, total)`` after each batch of the scoring pass.
        correction: a :class:`~lightning_fastif.core.deflation.LowRankCorrection` fitted on these factors at this
            damping (:func:`~lightning_fastif.core.deflation.fit_low_rank_correction`), or ``None``.

    Returns:
        ``[N]`` self-influence scores, in dataset order.

    Raises:
        ArgumentError: a bad argument, or factors fitted over other parameters.

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> net = nn.Linear(3, 1).double()
        >>> data = TensorDataset(torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64))
        >>> mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).sum(-1)
        >>> ekfac_self_influence(net, mse, data, damping=0.1).shape
        torch.Size([6])
    """
    lam = check_number("damping", damping, low=0, low_open=True)
    batch_size = _check_common(batch_size, progress)
    if factors is None:
        factors = fit_kfac(model, loss_fn, train_data, params, batch_size=batch_size, sample_labels=sample_labels)
        factors = ekfac_correct(factors, model, loss_fn, train_data, batch_size=batch_size, sample_labels=sample_labels)
    stream = _bind(model, loss_fn, _check_factors(factors), params)
    data = IndexedData(train_data)
    dtype = compute_dtype(stream.function.dtype)
    denominators = {layer.spec.name: (layer.eigenvalues() + lam).to(dtype) for layer in factors.layers}
    diag = torch.cat([factors.diagonal[n] for n in factors.unsupported]) + lam if factors.unsupported else None
    rotated_directions, fallback_directions = _correction_directions(correction, factors, lam, dtype)
    coefficients = None if correction is None else correction.coefficients.to(dtype).reshape(-1)
    if coefficients is not None and coefficients.numel() == 0:
        coefficients = coefficients.new_zeros(1)
    out = []
    with evaluating(model):
        for idx, batch in data.chunks(batch_size):
            scores = torch.zeros(idx.numel(), dtype=dtype, device=stream.function.device)
            dots = None if correction is None else scores.new_zeros(idx.numel(), max(1, correction.rank))
            captured = stream.run(batch)
            for layer in factors.layers:
                lb = captured.get(layer.spec.name)
                if lb is None:
                    continue
                denominator = denominators[layer.spec.name]
                if lb.ids is not None:
                    example, token, rotated = token_gradients(layer, lb)
                    scores.index_add_(0, example, (rotated**2 / denominator.T[token]).sum(-1))
                    if dots is not None:  # directions [k, rows, cols]: column `token` of each, per pair
                        along = torch.einsum("nr,krn->nk", rotated, rotated_directions[layer.spec.name][:, :, token])
                        dots.index_add_(0, example, along)
                elif (factored := _rotated_factors(layer, lb)) is not None:
                    # one position: Σ_jk g_j² a_k² / d_jk = ((g² @ (1/d)) · a²).sum(), no [B, rows, cols] tensor
                    g, a = factored
                    scores += ((g.square() @ denominator.reciprocal()) * a.square()).sum(-1)
                    if dots is not None:  # u_kᵀ G_i = g_iᵀ U_k a_i
                        dots += torch.einsum("bj,kjl,bl->bk", g, rotated_directions[layer.spec.name], a)
                else:
                    rotated = rotated_gradients(layer, lb)
                    scores += (rotated**2 / denominator).sum((1, 2))
                    if dots is not None:
                        dots += rotated.flatten(1) @ rotated_directions[layer.spec.name].flatten(1).T
            fallback_grads = stream.fallback_gradients(batch)
            if fallback_grads is not None:
                scores += (fallback_grads.to(dtype) ** 2 / diag.to(dtype)).sum(-1)
                if dots is not None:
                    dots += fallback_grads.to(dtype) @ fallback_directions.T
            if dots is not None:
                scores += (dots.square() * coefficients).sum(-1)
            out.append(scores)
            if progress is not None:
                progress(sum(part.numel() for part in out), len(data))
    return torch.cat(out)


def _correction_directions(
    correction: Any, factors: KFACFactors, damping: float, dtype: torch.dtype
) -> tuple[dict[str, Tensor], Tensor | None]:
    """A correction's directions ``u_k`` in each layer's eigenbasis (``Q_Sᵀ U_k Q_A``), and on the fallback."""
    if correction is None:
        return {}, None
    if not isinstance(correction, LowRankCorrection):
        raise ArgumentError(f"correction: expected None or a LowRankCorrection, got {correction!r}")
    if correction.directions.shape[-1] != factors.num_params or correction.damping != damping:
        raise ArgumentError(
            f"correction: expected a correction over these factors' {factors.num_params} parameters at damping "
            f"{damping!r}, got one over {correction.directions.shape[-1]} at damping {correction.damping!r}"
        )
    u = correction.directions
    if correction.rank == 0:  # an empty correction (k = 0): one zero direction, so the scores are EK-FAC's
        u = u.new_zeros(1, factors.num_params)
    rotated = {
        layer.spec.name: layer.rotate(layer.spec.matrices(u, factors.offsets).to(dtype)) for layer in factors.layers
    }
    fallback = None
    if factors.unsupported:
        fallback = torch.cat([u[:, slice(*_span(factors.offsets[n]))] for n in factors.unsupported], dim=-1).to(dtype)
    return rotated, fallback


def _span(offset: tuple[int, int]) -> tuple[int, int]:
    return offset[0], offset[0] + offset[1]
