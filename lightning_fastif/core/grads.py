"""The autodiff layer: per-example losses as a function of the selected parameters, and their derivatives.

:class:`FunctionalLoss` turns ``loss_fn(model, batch) -> Tensor[B]`` into a pure function of the selected parameters
(``torch.func.functional_call``) and provides the three derivatives influence needs:

* :meth:`FunctionalLoss.per_example_gradients`: ``[B, P]`` by ``vmap(grad(...))`` (a loop where vmap cannot run the
  model, with a warning saying why);
* :meth:`FunctionalLoss.directional_derivatives`: ``[T, B]`` = ``g_iᵀ s_t`` for every example ``i`` and direction
  ``s_t``, by forward-mode AD (``torch.func.jvp``) in about one forward pass, without materialising any gradient.
  This is how candidates are scored against ``s_test``;
* :meth:`FunctionalLoss.hvp`: ``[V, P]``, Hessian-vector products of the *mean* batch loss for ``V`` vectors at once
  (reverse-over-reverse, the second pass batched over the vectors).

The model's own parameters are never modified, and frozen parameters can be differentiated. Call these inside
:func:`evaluating` so dropout is off. This module imports no Lightning.

Finite or nothing: :func:`check_finite` raises :class:`~lightning_fastif.errors.NonFiniteError` naming the rows
(examples) of a tensor that hold a NaN or an infinity, and :meth:`FunctionalLoss.non_finite_examples` finds the
examples of a batch whose loss or gradient is not finite (the engine calls it to name the culprits when a product
over many examples turns out non-finite).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from lightning_fastif.core.batches import Batch, IndexedData, batch_size_of, move_batch, slice_batch
from lightning_fastif.core.params import ParamSpec, flatten, select_parameters, unflatten
from lightning_fastif.errors import ArgumentError, NonFiniteError, check_int

LossFn = Callable[[nn.Module, Batch], Tensor]
"""``loss_fn(model, batch) -> Tensor[B]``: the per-example losses of a batch (no reduction)."""

_VMAP_FAILED: weakref.WeakKeyDictionary[nn.Module, set[Any]] = weakref.WeakKeyDictionary()
"""Models (and the ids of the loss functions) for which vmap failed once: they go straight to the loop."""

_ATTENTION_HINT = (
    "This model's attention implementation does not support {what}. PyTorch's fused CPU attention "
    "(scaled_dot_product_attention's flash kernel) cannot be differentiated this way: load Hugging Face models with "
    '`attn_implementation="eager"`, or run influence inside '
    "`with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):`."
)


def default_loss_fn(model: nn.Module) -> LossFn:
    """Return the model's own per-example loss: ``model.per_example_loss(batch)``.

    Raises:
        TypeError: if the model defines no ``per_example_loss`` method.
    """
    if not callable(getattr(model, "per_example_loss", None)):
        raise TypeError(
            f"loss_fn: none given and {type(model).__name__} defines no `per_example_loss(batch) -> Tensor[B]` method; "
            "pass loss_fn(model, batch) returning per-example losses (e.g. cross_entropy(..., reduction='none'))"
        )

    def loss_fn(m: nn.Module, batch: Batch) -> Tensor:
        return m.per_example_loss(batch)

    return loss_fn


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (dropout off, batch-norm statistics frozen) and restore its modes afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.train(mode)


def check_losses(losses: Any, batch_size: int, where: str = "loss_fn") -> Tensor:
    """Validate the output of ``loss_fn``: a tensor of shape ``[batch_size]`` (one loss per example)."""
    if not isinstance(losses, Tensor):
        raise TypeError(f"{where}: must return a Tensor of per-example losses, got {type(losses).__name__}")
    if losses.dim() == 0:
        raise ValueError(
            f"{where}: returned a scalar; it must return one loss per example, shape [{batch_size}] "
            "(use reduction='none')"
        )
    if losses.dim() != 1 or losses.shape[0] != batch_size:
        raise ValueError(
            f"{where}: returned shape {tuple(losses.shape)}; expected per-example losses of shape [{batch_size}]"
        )
    return losses


def format_indices(indices: Sequence[int] | Tensor, *, total: int | None = None, limit: int = 10) -> str:
    """``indices`` as a short list for a message: the first ``limit`` and how many more (``"all 40"`` when every
    one of ``total`` is named).

    Example::

        >>> format_indices([3, 17]), format_indices(range(40), total=40), format_indices(range(12), limit=3)
        ('[3, 17]', 'all 40 ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ...])', '[0, 1, 2] and 9 more')
    """
    values = [int(i) for i in (indices.reshape(-1).tolist() if isinstance(indices, Tensor) else indices)]
    shown = str(values[:limit])
    if total is not None and len(values) == total and total > 1:
        return f"all {total} ({shown[:-1]}, ...])" if len(values) > limit else f"all {total} {shown}"
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def non_finite_rows(values: Tensor) -> Tensor:
    """Positions (along the first dimension) of the rows of ``values`` that hold a NaN or an infinity."""
    if values.dim() == 0:
        values = values.reshape(1)
    finite = torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
    return (~finite).nonzero().reshape(-1).cpu()


def check_finite(
    values: Tensor,
    what: str,
    *,
    rows: str = "examples",
    indices: Tensor | Sequence[int] | None = None,
    hint: str = "",
) -> Tensor:
    """Return ``values`` if every entry is finite; else raise :class:`NonFiniteError` naming the bad rows.

    Args:
        values: ``[B, ...]``, one row per example.
        what: what the values are (``"the loss gradients"``), the start of the message.
        rows: what a row is (``"test points"``, ``"training examples"``).
        indices: the dataset index of each row (default: the row positions).
        hint: appended to the message (a likely cause or a remedy).

    Raises:
        NonFiniteError: naming ``rows`` and their indices.

    Example::

        >>> check_finite(torch.tensor([[1.0], [float("nan")]]), "the losses", rows="training examples", indices=[7, 9])
        Traceback (most recent call last):
        ...
        lightning_fastif.errors.NonFiniteError: the losses of training examples [9] are not finite (NaN or infinite)
    """
    bad = non_finite_rows(values)
    if bad.numel() == 0:
        return values
    named = bad if indices is None else torch.as_tensor(indices, dtype=torch.long).reshape(-1)[bad]
    total = values.shape[0] if values.dim() else 1
    raise NonFiniteError(
        f"{what} of {rows} {format_indices(named, total=total)} are not finite (NaN or infinite)"
        + (f"; {hint}" if hint else "")
    )


class _LossModule(nn.Module):
    """Makes ``loss_fn(model, batch)`` a module forward, so ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: Batch) -> Tensor:
        return self._loss_fn(self.model, batch)


def _in_dims(batch: Batch) -> Any:
    """vmap ``in_dims`` for a batch: 0 for tensors with an example dimension, None for everything else."""
    if isinstance(batch, Tensor):
        return 0 if batch.dim() > 0 else None
    if isinstance(batch, dict):
        return {k: _in_dims(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_in_dims(v) for v in batch)
    return None


def _unsqueeze_leaves(example: Batch) -> Batch:
    """Give every tensor of one vmapped example a batch dimension of 1 (labels are 0-d inside vmap)."""
    if isinstance(example, Tensor):
        return example.unsqueeze(0)
    if isinstance(example, dict):
        return {k: _unsqueeze_leaves(v) for k, v in example.items()}
    if isinstance(example, (tuple, list)):
        return type(example)(_unsqueeze_leaves(v) for v in example)
    return example


def _explain_autodiff_error(exc: Exception, what: str) -> Exception | None:
    text = str(exc)
    markers = ("scaled_dot_product", "flash_attention", "_efficient_attention")
    if any(m in text for m in markers) or ("derivative for" in text and "not implemented" in text):
        return RuntimeError(_ATTENTION_HINT.format(what=what) + f" (original error: {text.splitlines()[0]})")
    return None


class FunctionalLoss:
    """Per-example losses of ``model`` as a pure function of the selected parameters, and their derivatives.

    Args:
        model: the model (any ``nn.Module``); it is not modified.
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``; defaults to ``model.per_example_loss``.
        params: which parameters to differentiate (see :func:`~lightning_fastif.core.params.select_parameters`).

    Example::

        >>> net = nn.Linear(3, 1)
        >>> f = FunctionalLoss(net, lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2)
        >>> batch = (torch.randn(4, 3), torch.randn(4))
        >>> f.per_example_gradients(batch).shape
        torch.Size([4, 4])
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn | None = None, params: ParamSpec = None) -> None:
        self.model = model
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else default_loss_fn(model)
        self._loss_key: Any = "per_example_loss" if loss_fn is None else id(loss_fn)
        selected = select_parameters(model, params)
        self.names = list(selected)
        self.primals: dict[str, Tensor] = {n: p.detach() for n, p in selected.items()}
        self.num_params = sum(p.numel() for p in self.primals.values())
        first = next(iter(self.primals.values()))
        self.device, self.dtype = first.device, first.dtype
        self._module = _LossModule(model, self.loss_fn)

    # -- the function ---------------------------------------------------------------------------------------------
    def prepare(self, batch: Batch) -> Batch:
        """Move ``batch`` to the parameters' device, casting floating tensors to their dtype."""
        return move_batch(batch, self.device, self.dtype)

    def __call__(self, params: dict[str, Tensor], batch: Batch) -> Tensor:
        """Per-example losses ``[B]`` with the selected parameters replaced by ``params``."""
        return functional_call(self._module, {f"model.{n}": p for n, p in params.items()}, (batch,), strict=False)

    def losses(self, batch: Batch) -> Tensor:
        """Per-example losses ``[B]`` at the current parameters, validated."""
        batch = self.prepare(batch)
        with torch.no_grad():
            return check_losses(self(self.primals, batch), batch_size_of(batch))

    def non_finite_examples(self, batch: Batch, chunk: int = 32) -> Tensor:
        """Positions of the examples of ``batch`` whose loss or loss gradient is NaN or infinite.

        The slow path that names culprits after a product over many examples came out non-finite: per-example losses
        first, then per-example gradients in chunks of ``chunk`` (so its memory stays that of ``chunk`` examples).
        """
        batch = self.prepare(batch)
        size = batch_size_of(batch)
        bad = set(non_finite_rows(self.losses(batch)).tolist())
        for start in range(0, size, chunk):
            part = slice_batch(batch, slice(start, start + chunk))
            bad.update(start + int(i) for i in non_finite_rows(self.per_example_gradients(part)))
        return torch.tensor(sorted(bad), dtype=torch.long)

    def parameters_finite(self) -> bool:
        """True when every selected parameter is finite (a NaN weight makes every loss NaN)."""
        return all(bool(torch.isfinite(p).all()) for p in self.primals.values())

    def flat_params(self) -> Tensor:
        """The current selected parameters as one vector ``[P]``."""
        return flatten(self.primals)

    # -- per-example gradients ------------------------------------------------------------------------------------
    def per_example_gradients(self, batch: Batch) -> Tensor:
        """Return the per-example loss gradients ``[B, P]`` (vectorised; a loop where vmap cannot run the model)."""
        return self._gradients(batch, None)

    def gradient_dots(self, batch: Batch, directions: Tensor) -> Tensor:
        """Return ``[T, B]``: ``∇ℓ_i(θ)ᵀ d_t`` from materialised per-example gradients, one parameter at a time.

        The same numbers as ``directions @ per_example_gradients(batch).T``, without the ``[B, P]`` concatenation:
        each parameter's gradients are multiplied and freed in turn, so the peak is about one gradient-sized copy
        of the batch instead of two.
        """
        directions = directions.to(self.device, self.dtype)
        if directions.dim() == 1:
            directions = directions.unsqueeze(0)
        if directions.shape[-1] != self.num_params:
            raise ArgumentError(
                f"directions: expected a last dimension of {self.num_params} (the selected parameters), got "
                f"{directions.shape[-1]}"
            )
        return self._gradients(batch, directions)

    def _gradients(self, batch: Batch, directions: Tensor | None) -> Tensor:
        batch = self.prepare(batch)
        size = batch_size_of(batch)
        if self._loss_key not in _VMAP_FAILED.get(self.model, set()):
            try:
                return self._vmap_gradients(batch, directions)
            except (ValueError, TypeError) as exc:
                if "loss_fn" in str(exc):
                    raise
                self._warn_vmap(exc)
            except RuntimeError as exc:
                hint = _explain_autodiff_error(exc, "double backward / reverse-mode AD")
                if hint is not None:
                    raise hint from exc
                self._warn_vmap(exc)
        grads = self._loop_gradients(batch, size)
        return grads if directions is None else directions @ grads.T

    def _vmap_gradients(self, batch: Batch, directions: Tensor | None) -> Tensor:
        check_losses(self(self.primals, slice_batch(batch, slice(0, 1))), 1)

        def one(params: dict[str, Tensor], example: Batch) -> Tensor:
            single = _unsqueeze_leaves(example)
            return self(params, single).sum()

        grads = vmap(grad(one), in_dims=(None, _in_dims(batch)))(self.primals, batch)
        if directions is None:
            # Detached: other trainable parameters outside the selection would otherwise keep a graph alive.
            return flatten([grads[n] for n in self.names], batch_dims=1).detach()
        out = None
        offset = 0
        for name in self.names:
            block = grads.pop(name).detach()
            width = block[0].numel()
            part = directions[:, offset : offset + width] @ block.reshape(block.shape[0], width).T
            out = part if out is None else out.add_(part)
            offset += width
            del block
        return out

    def _loop_gradients(self, batch: Batch, size: int) -> Tensor:
        params = {n: p.clone().requires_grad_(True) for n, p in self.primals.items()}
        rows = []
        for i in range(size):
            with torch.enable_grad():
                loss = check_losses(self(params, slice_batch(batch, slice(i, i + 1))), 1).sum()
                g = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            rows.append(flatten([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params.values())]))
        return torch.stack(rows).detach()

    def _warn_vmap(self, exc: Exception) -> None:
        _VMAP_FAILED.setdefault(self.model, set()).add(self._loss_key)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        warnings.warn(
            f"torch.func.vmap cannot run {type(self.model).__name__} ({first}); per-example gradients fall back to a "
            "loop over examples (slower, same values). Scoring candidates by JVP is unaffected.",
            stacklevel=3,
        )

    # -- directional derivatives (JVP scoring) --------------------------------------------------------------------
    def directional_derivatives(self, batch: Batch, directions: Tensor) -> Tensor:
        """Return ``[T, B]``: ``∇ℓ_i(θ)ᵀ d_t`` for every example ``i`` of ``batch`` and row ``d_t`` of ``directions``.

        Forward-mode AD: one forward pass carries the tangent, no per-example gradient is materialised.
        """
        batch = self.prepare(batch)
        size = batch_size_of(batch)
        directions = directions.to(self.device, self.dtype)
        if directions.dim() == 1:
            directions = directions.unsqueeze(0)
        if directions.shape[-1] != self.num_params:
            raise ValueError(
                f"directions: last dimension {directions.shape[-1]} != {self.num_params} selected parameters"
            )
        tangents = unflatten(directions, self.primals)

        def dloss(tangent: dict[str, Tensor]) -> Tensor:
            # no_grad: trainable parameters outside the selection would otherwise record the forward for backward.
            with torch.no_grad():
                losses, derivative = jvp(lambda p: self(p, batch), (self.primals,), (tangent,))
            check_losses(losses, size)
            return derivative

        try:
            if directions.shape[0] == 1:
                return dloss({n: t[0] for n, t in tangents.items()}).unsqueeze(0)
            try:
                return vmap(dloss)(tangents)
            except (RuntimeError, ValueError) as exc:
                if "loss_fn" in str(exc) or _explain_autodiff_error(exc, "forward-mode AD") is not None:
                    raise
                rows = [dloss({n: t[i] for n, t in tangents.items()}) for i in range(directions.shape[0])]
                return torch.stack(rows)
        except RuntimeError as exc:
            hint = _explain_autodiff_error(exc, "forward-mode AD (torch.func.jvp)")
            if hint is not None:
                raise hint from exc
            raise

    # -- Hessian-vector products ----------------------------------------------------------------------------------
    def hvp(self, batch: Batch, vectors: Tensor, *, reduction: str = "mean") -> Tensor:
        """Return ``[V, P]``: the Hessian of the batch loss (``mean`` or ``sum`` over examples) times each vector."""
        batch = self.prepare(batch)
        size = batch_size_of(batch)
        vectors = vectors.to(self.device, self.dtype)
        squeeze = vectors.dim() == 1
        if squeeze:
            vectors = vectors.unsqueeze(0)
        params = {n: p.clone().requires_grad_(True) for n, p in self.primals.items()}
        leaves = list(params.values())
        try:
            with torch.enable_grad():
                losses = check_losses(self(params, batch), size)
                loss = losses.mean() if reduction == "mean" else losses.sum()
                g = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
                g_flat = flatten([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, leaves)])
                if not g_flat.requires_grad:  # the loss is linear in these parameters: H = 0
                    out = torch.zeros_like(vectors)
                else:
                    out = self._second_backward(g_flat, leaves, vectors)
        except RuntimeError as exc:
            hint = _explain_autodiff_error(exc, "double backward (Hessian-vector products)")
            if hint is not None:
                raise hint from exc
            raise
        return out[0] if squeeze else out

    @staticmethod
    def _second_backward(g_flat: Tensor, leaves: list[Tensor], vectors: Tensor) -> Tensor:
        def collect(parts: tuple[Tensor | None, ...], lead: tuple[int, ...]) -> Tensor:
            return torch.cat(
                [
                    torch.zeros(*lead, p.numel(), dtype=p.dtype, device=p.device) if h is None else h.reshape(*lead, -1)
                    for h, p in zip(parts, leaves)
                ],
                dim=-1,
            )

        if vectors.shape[0] > 1:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "batched grad fallback" performance warnings
                    parts = torch.autograd.grad(
                        g_flat,
                        leaves,
                        grad_outputs=vectors,
                        retain_graph=True,
                        allow_unused=True,
                        is_grads_batched=True,
                    )
                return collect(parts, (vectors.shape[0],)).detach()
            except RuntimeError:
                pass  # an op without a batching rule: one backward per vector below
        rows = []
        for v in vectors:
            parts = torch.autograd.grad(g_flat, leaves, grad_outputs=v, retain_graph=True, allow_unused=True)
            rows.append(collect(parts, ()))
        return torch.stack(rows).detach()


def per_example_gradients(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Any,
    *,
    params: ParamSpec = None,
    batch_size: int = 64,
    indices: Tensor | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Stream per-example gradients ``(indices [b], grads [b, P])`` over a dataset in chunks of ``batch_size``.

    Memory stays bounded by one chunk whatever the dataset size; the model is in eval mode while iterating.

    Raises:
        NonFiniteError: a chunk holds an example whose loss gradient is NaN or infinite (naming its dataset index).

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> net = nn.Linear(2, 1)
        >>> data = TensorDataset(torch.randn(5, 2), torch.randn(5))
        >>> mse = lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2
        >>> [g.shape[0] for _, g in per_example_gradients(net, mse, data, batch_size=2)]
        [2, 2, 1]
    """
    check_int("batch_size", batch_size)
    f = FunctionalLoss(model, loss_fn, params)
    source = IndexedData(data)
    with evaluating(model):
        for idx, batch in source.chunks(batch_size, indices):
            grads = f.per_example_gradients(batch)
            yield idx, check_finite(grads, "the loss gradients", rows="examples", indices=idx)
