"""Per-example loss gradients of a ``Linear`` layer kept as their two factors, and its Hessian in closed form.

For ``z = W a + b`` the loss gradient of one example is ``∂ℓ/∂W = r aᵀ`` and ``∂ℓ/∂b = r`` with ``r = ∂ℓ/∂z``
(``C`` numbers) and ``a`` the layer's input (``D`` numbers). Stored as ``(r, a)`` a gradient costs ``C + D`` numbers
instead of ``C·(D+1)`` (1290 -> 138 for a 128 -> 10 classifier), and everything the kNN search needs is computed
from the factors without forming it:

* the inner product with a query ``q`` (``[C·D + C]`` in the layer's parameter order, weight then bias) is
  ``rᵀ (Q_W a + q_b)``: a ``[N, D] x [D, C]`` product per query, as many multiply-adds as the dense rows but
  a ninth of the memory traffic;
* the squared norm is ``|r|² (|a|² + 1)`` (``|r|² |a|²`` without a bias).

Both factors come from one forward pass and one backward pass to the layer's output (no per-example autodiff), and
the same pass gives ``∂²ℓ/∂z²`` (``C`` more backward passes through the loss head only) for the layer's exact
Hessian: because ``z`` is linear in ``(W, b)``, ``∂²ℓ/∂(W, b)² = (∂²ℓ/∂z²) ⊗ [a; 1][a; 1]ᵀ`` exactly (the
Gauss-Newton form is the Hessian here), so the mean over ``N`` examples is ``C(C+1)/2`` weighted ``[D+1, N] x
[N, D+1]`` products (``∂²ℓ/∂z²`` is symmetric) instead of ``C·(D+1)`` Hessian-vector products over the data.

Per-example means per example *in its batch*: the factors take the gradient of the summed batch loss with respect to
each example's own output, which is the example's gradient whenever one example's loss does not depend on another's
output (the case in eval mode, where the snapshots run). Applies to ``nn.Linear`` layers run once per forward pass
on ``[B, D]`` inputs; :func:`linear_gradient_factors` returns ``None`` elsewhere (sequence inputs, a layer run twice,
other layer types), and callers fall back to dense per-example gradients. This module imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fastif.core.batches import Batch, IndexedData, move_batch
from lightning_fastif.core.grads import LossFn, check_losses, evaluating

__all__ = [
    "FactoredGradients",
    "LinearFactors",
    "extract_gradient_factors",
    "linear_gradient_factors",
    "linear_layer_hessian",
]


@dataclass
class LinearFactors:
    """The factors of one batch's loss gradients of a ``Linear`` layer.

    Attributes:
        out_grads: ``[B, C]`` ``∂ℓ_i/∂z_i``, in the model's dtype.
        inputs: ``[B, D]`` the layer's inputs ``a_i``, in the model's dtype.
        bias: whether the layer has a bias (its gradient is ``out_grads`` itself).
        out_hessians: ``[B, C, C]`` ``∂²ℓ_i/∂z_i²`` when asked for, else None.
    """

    out_grads: Tensor
    inputs: Tensor
    bias: bool
    out_hessians: Tensor | None = None


def _plain_linear(module: nn.Module) -> bool:
    names = {name for name, _ in module.named_parameters()}
    return isinstance(module, nn.Linear) and names <= {"weight", "bias"} and "weight" in names


def linear_gradient_factors(
    model: nn.Module, batch: Batch, module: nn.Module, loss_fn: LossFn, *, output_hessian: bool = False
) -> LinearFactors | None:
    """The per-example loss gradients of ``module``'s parameters as factors, or None where they do not factor.

    Args:
        model: the network, in the mode the gradients are taken in (eval for snapshots); ``batch`` on its device.
        batch: one batch, with labels.
        module: the layer (a submodule of ``model``).
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``.
        output_hessian: also return ``∂²ℓ_i/∂z_i²`` for :func:`linear_layer_hessian`.

    Returns:
        :class:`LinearFactors`, or None when ``module`` is not a plain ``nn.Linear``, did not run exactly once, or
        its input is not ``[B, D]``.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        >>> ce = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
        >>> f = linear_gradient_factors(net, (torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1])), net[2], ce)
        >>> tuple(f.out_grads.shape), tuple(f.inputs.shape), f.bias
        ((5, 2), (5, 3), True)
    """
    if not _plain_linear(module):
        return None
    captured: list[tuple[Tensor, Tensor]] = []

    def swap_output(_module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            captured.append((torch.empty(0), torch.empty(0)))
            return output
        # The output as a leaf of its own: the backward pass stops at it. Autograd is switched on only from here
        # (the forward up to the layer ran without recording a graph); the no_grad block below restores the mode.
        torch.set_grad_enabled(True)
        leaf = output.detach().requires_grad_(True)
        captured.append((args[0].detach(), leaf))
        return leaf

    handle = module.register_forward_hook(swap_output)
    try:
        with torch.no_grad():
            losses = loss_fn(model, batch)
    finally:
        handle.remove()
    if len(captured) != 1:
        return None
    inputs, out = captured[0]
    if inputs.dim() != 2 or out.dim() != 2 or inputs.shape[0] != out.shape[0]:
        return None
    losses = check_losses(losses, int(out.shape[0]), "loss_fn")
    with torch.enable_grad():
        (grads,) = torch.autograd.grad(losses.sum(), out, create_graph=output_hessian)
    hessians = None
    if output_hessian:
        c = out.shape[1]
        rows = []
        for j in range(c):  # row j of every example's C x C output Hessian: the loss head only, a few ops each
            if not grads.requires_grad:  # a loss linear in z (its gradient is constant): no curvature
                rows.append(torch.zeros_like(out))
                continue
            (row,) = torch.autograd.grad(grads[:, j].sum(), out, retain_graph=j < c - 1, allow_unused=True)
            rows.append(torch.zeros_like(out) if row is None else row)
        hessians = torch.stack(rows, dim=1).detach()
    return LinearFactors(grads.detach(), inputs, module.bias is not None, hessians)


def linear_layer_hessian(
    model: nn.Module,
    data: IndexedData,
    module: nn.Module,
    loss_fn: LossFn,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """The exact Hessian of the mean loss over ``data`` with respect to ``module``'s parameters, ``[P, P]`` float64.

    ``(1/N) Σ_i (∂²ℓ_i/∂z_i²) ⊗ [a_i; 1][a_i; 1]ᵀ`` in the parameters' order (weight row by row, then bias): what
    ``P`` Hessian-vector products over ``data`` give, at the cost of one pass and ``C(C+1)/2`` weighted
    ``[D+1, N] x [N, D+1]`` products. Runs in eval mode (restored after).

    Returns:
        The ``[P, P]`` Hessian, or None when the layer's gradients do not factor (see :func:`linear_gradient_factors`).
    """
    target = torch.device(device) if device is not None else next(model.parameters()).device
    total: Tensor | None = None
    count = 0
    bias = False
    pairs_out = None
    with evaluating(model):
        for _, batch in data.chunks(batch_size):
            factors = linear_gradient_factors(model, move_batch(batch, target), module, loss_fn, output_hessian=True)
            if factors is None:
                return None
            assert factors.out_hessians is not None
            a = factors.inputs
            bias = factors.bias
            if bias:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)
            if pairs_out is None:
                pairs_out = torch.triu_indices(factors.out_grads.shape[1], factors.out_grads.shape[1], device=a.device)
            # Per pair (j, k) of outputs, Σ_i H_i[j, k] a_i a_iᵀ as one batched product; H_i is symmetric, so the
            # upper triangle's pairs only. One batch's sum in the model's precision (the products are most of the
            # cost), the running total in float64.
            weights = factors.out_hessians[:, pairs_out[0], pairs_out[1]].to(a.dtype).T  # [pairs, B]
            part = torch.bmm((weights.unsqueeze(2) * a.unsqueeze(0)).transpose(1, 2), a.expand(len(weights), -1, -1))
            total = part.double() if total is None else total.add_(part.double())  # [pairs, D+1, D+1]
            count += a.shape[0]
    if total is None or count == 0 or pairs_out is None:
        return None
    c = int(pairs_out.max()) + 1
    d = int(total.shape[1])
    full = total.div_(count)[_triangle_position(pairs_out, c)]  # [C, C, D+1, D+1]
    full = full.permute(0, 2, 1, 3).reshape(c * d, c * d)
    order = _parameter_order(c, d - 1 if bias else d, bias, full.device)
    return full[order][:, order].cpu()


def _triangle_position(pairs: Tensor, size: int) -> Tensor:
    """``[size, size]``: the column of ``(i, j)`` (or of ``(j, i)``) among the upper-triangle ``pairs``."""
    position = torch.empty(size, size, dtype=torch.long, device=pairs.device)
    columns = torch.arange(pairs.shape[1], device=pairs.device)
    position[pairs[0], pairs[1]] = columns
    position[pairs[1], pairs[0]] = columns
    return position


def _parameter_order(c: int, d: int, bias: bool, device: torch.device) -> Tensor:
    """Positions in the ``[C, D(+1)]`` layout (bias as the last column) of the parameters in their own order."""
    width = d + 1 if bias else d
    weight = (torch.arange(c, device=device).unsqueeze(1) * width + torch.arange(d, device=device)).reshape(-1)
    if not bias:
        return weight
    return torch.cat([weight, torch.arange(c, device=device) * width + d])


class FactoredGradients:
    """Loss gradients of a ``Linear`` layer for ``N`` examples, held as ``out_grads [N, C]`` and ``inputs [N, D]``.

    Behaves as the ``[N, C·D (+C)]`` matrix of the dense gradients for what a kNN index does with it: ``shape``,
    ``len()``, rows by index or slice (dense, formed on demand), :meth:`split` into dense chunks, and without forming
    rows :meth:`dot` (inner products with queries) and :meth:`sq_norms`. The factors may be memory-mapped.

    Args:
        out_grads: ``[N, C]`` float32.
        inputs: ``[N, D]`` float32.
        bias: whether the dense rows end with the bias gradient (``C`` more numbers).

    Example::

        >>> g = FactoredGradients(torch.tensor([[1.0, -1.0]]), torch.tensor([[2.0, 3.0]]), bias=True)
        >>> g[0].tolist()
        [2.0, 3.0, -2.0, -3.0, 1.0, -1.0]
        >>> g.dot(torch.ones(1, 6)).tolist(), g.sq_norms().tolist()
        ([[0.0]], [28.0])
    """

    def __init__(self, out_grads: Tensor, inputs: Tensor, *, bias: bool) -> None:
        if out_grads.dim() != 2 or inputs.dim() != 2 or out_grads.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"out_grads, inputs: expected [N, C] and [N, D] with the same N, got {tuple(out_grads.shape)} and "
                f"{tuple(inputs.shape)}"
            )
        self.out_grads = out_grads
        self.inputs = inputs
        self.bias = bool(bias)

    @property
    def num_outputs(self) -> int:
        """``C``."""
        return int(self.out_grads.shape[1])

    @property
    def num_inputs(self) -> int:
        """``D``."""
        return int(self.inputs.shape[1])

    @property
    def shape(self) -> torch.Size:
        """``(N, C·D + C)`` with a bias, ``(N, C·D)`` without: the dense matrix's shape."""
        c, d = self.num_outputs, self.num_inputs
        return torch.Size((int(self.out_grads.shape[0]), c * d + (c if self.bias else 0)))

    @property
    def device(self) -> torch.device:
        """Where the factors are."""
        return self.out_grads.device

    @property
    def dtype(self) -> torch.dtype:
        """float32."""
        return self.out_grads.dtype

    def __len__(self) -> int:
        return int(self.out_grads.shape[0])

    def __repr__(self) -> str:
        c, d = self.num_outputs, self.num_inputs
        return f"FactoredGradients(n={len(self)}, outputs={c}, inputs={d}, bias={self.bias})"

    def to(self, device: torch.device | str) -> FactoredGradients:
        """The factors on ``device`` (float32)."""
        return FactoredGradients(
            self.out_grads.to(device, torch.float32), self.inputs.to(device, torch.float32), bias=self.bias
        )

    def __getitem__(self, rows: Any) -> Tensor:
        """Dense rows: ``[n, P]`` for a slice or index tensor, ``[P]`` for an int."""
        r, a = self.out_grads[rows], self.inputs[rows]
        single = r.dim() == 1
        r, a = (r.unsqueeze(0), a.unsqueeze(0)) if single else (r, a)
        dense = (r.unsqueeze(2) * a.unsqueeze(1)).reshape(r.shape[0], -1)
        if self.bias:
            dense = torch.cat([dense, r], dim=1)
        return dense[0] if single else dense

    def split(self, size: int) -> Iterator[Tensor]:
        """Dense chunks of ``size`` rows, in order."""
        for start in range(0, len(self), size):
            yield self[start : start + size]

    def scaled(self, factors: Tensor) -> FactoredGradients:
        """Each row times ``factors[i]`` (``r`` is scaled: the gradient is linear in it), e.g. to normalise rows."""
        return FactoredGradients(self.out_grads * factors.unsqueeze(1), self.inputs, bias=self.bias)

    def is_finite(self, chunk: int = 1 << 16) -> bool:
        """Whether every factor is finite (so every dense row is), checked ``chunk`` rows at a time.

        A chunk's least and greatest values are both finite exactly when all of it is (a NaN propagates through
        both): one reduction, no mask (measured at 200k x (10 + 128): 10 times faster than ``isfinite().all()``).
        """

        def finite(part: Tensor) -> bool:
            if part.numel() == 0:
                return True
            low, high = torch.aminmax(part)
            return bool(torch.isfinite(low)) and bool(torch.isfinite(high))

        return all(
            finite(self.out_grads[s : s + chunk]) and finite(self.inputs[s : s + chunk])
            for s in range(0, len(self), chunk)
        )

    def query_factors(self, queries: Tensor) -> tuple[Tensor, Tensor | None]:
        """Dense queries ``[Q, P]`` split into ``Q_W [Q, C, D]`` and ``q_b [Q, C]`` (None without a bias)."""
        c, d = self.num_outputs, self.num_inputs
        weight = queries[:, : c * d].reshape(queries.shape[0], c, d)
        return weight, (queries[:, c * d :] if self.bias else None)

    def dot(self, queries: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """``[Q, n]`` inner products of dense ``queries [Q, P]`` with rows ``start:stop``, without forming them.

        ``<q, g_i> = r_iᵀ (Q_W a_i + q_b)``: the rows' inputs times every query's weight part at once, then
        weighted by ``r_i``.
        """
        r = self.out_grads[start:stop]
        a = self.inputs[start:stop]
        weight, bias = self.query_factors(queries.to(r.dtype))
        q, c = weight.shape[0], weight.shape[1]
        flat = weight.transpose(0, 1).reshape(c * q, -1).T  # column j·Q + i: query i's output j
        # [n, C·Q]: Q_W a_i (+ q_b) for every query, the bias added inside the product
        projected = a @ flat if bias is None else torch.addmm(bias.T.reshape(1, -1), a, flat)
        projected = projected.view(a.shape[0], c, q)
        # then weighted by r_i: C multiply-adds over contiguous [n, Q] blocks (a third faster than a bmm of [Q, C]
        # by [C, 1] per row: 15 against 24 ms for 4k rows and 100 queries, the product included)
        out = projected[:, 0] * r[:, :1]
        for j in range(1, c):
            out.addcmul_(projected[:, j], r[:, j : j + 1])
        return out.T

    def sq_norms(self, start: int = 0, stop: int | None = None) -> Tensor:
        """``[n]`` squared norms of the dense rows ``start:stop``: ``|r|² (|a|² + 1)`` (no ``+ 1`` without bias)."""
        r = self.out_grads[start:stop]
        a = self.inputs[start:stop]
        extra = 1.0 if self.bias else 0.0
        # einsum: a batched dot product per row; (a * a).sum(1) writes and reads an [n, D] square first (measured at
        # 200k x 128: 66 against 15 ms)
        return torch.einsum("ij,ij->i", r, r) * (torch.einsum("ij,ij->i", a, a) + extra)


def extract_gradient_factors(
    model: nn.Module,
    data: IndexedData,
    module: nn.Module,
    loss_fn: LossFn,
    *,
    indices: Tensor | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> FactoredGradients | None:
    """The factored loss gradients of ``module`` for the examples at ``indices`` (default all), in eval mode.

    Returns:
        :class:`FactoredGradients` on CPU (``len(indices)`` rows in their order), or None when the layer's gradients
        do not factor (decided on the first batch; see :func:`linear_gradient_factors`).
    """
    target = torch.device(device) if device is not None else next(model.parameters()).device
    idx = torch.arange(len(data)) if indices is None else torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    grads: list[Tensor] = []
    inputs: list[Tensor] = []
    bias = False
    with evaluating(model):
        for _, batch in data.chunks(batch_size, idx):
            factors = linear_gradient_factors(model, move_batch(batch, target), module, loss_fn)
            if factors is None:
                return None
            grads.append(factors.out_grads.to("cpu", torch.float32))
            inputs.append(factors.inputs.to("cpu", torch.float32))
            bias = factors.bias
    if not grads:
        return None
    return FactoredGradients(torch.cat(grads), torch.cat(inputs), bias=bias)
