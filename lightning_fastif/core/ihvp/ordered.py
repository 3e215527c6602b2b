"""Full-data Hessian-vector products over chunks of similar-sized examples: less padding, the same sums.

A collate function that pads each batch to its longest example (text: ``DataCollatorWithPadding``, or a collate
that trims the padding) makes a chunk of ``batch_size`` training examples cost as much as its longest example
times ``batch_size``. In dataset order a chunk of 256 sentences nearly always holds one close to the maximum length,
so every chunk pays for the longest sentences. :func:`size_order` sorts the examples by the size of their own
collated batch once per system, and :class:`SizeOrdered` hands that order to every full-data product of a solver:
each chunk then holds examples of about the same size. A product over ``indices`` is the mean over the same
examples whatever their order, so only the rounding of the sums changes (on the MiniLM benchmark, 2,000 snippets of
27 tokens on average padded to at most 64, one product took half the time). Examples that all collate to the same
size (a ``TensorDataset``, images) keep the dataset order, and their products are unchanged to the bit.

:func:`active_product` is the other saving of the iterative solvers: the rows (test points) that have already
reached the tolerance need no more products, and a product costs about one backward pass per row.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_fastif.core.batches import IndexedData, tensors_of
from lightning_fastif.core.hessian import HessianOperator

__all__ = ["SizeOrdered", "active_product", "example_sizes", "size_order"]


def example_sizes(data: IndexedData) -> Tensor | None:
    """The number of tensor elements in each example's own collated batch (``[N]``), or ``None`` when every example
    has the same size without looking (a ``TensorDataset``: one shape for all).

    One pass of ``collate_fn([item])`` over the dataset: no model call.

    Example::

        >>> from lightning_fastif.core.batches import IndexedData, tensors_of
        >>> items = [torch.zeros(3), torch.zeros(1), torch.zeros(2)]
        >>> example_sizes(IndexedData(items, collate_fn=lambda b: torch.stack(b)))
        tensor([3, 1, 2])
    """
    if isinstance(data.dataset, TensorDataset):
        return None
    sizes = [sum(t.numel() for t in tensors_of(data.collate_fn([data.dataset[i]]))) for i in range(len(data))]
    return torch.tensor(sizes, dtype=torch.long)


def size_order(data: IndexedData) -> tuple[Tensor | None, Tensor | None]:
    """``(order, sizes)``: the dataset indices sorted by :func:`example_sizes` (stable), or ``(None, None)`` when every
    example has the same size (then there is nothing to gain and the dataset order is kept).

    Example::

        >>> from lightning_fastif.core.batches import IndexedData, tensors_of
        >>> items = [torch.zeros(3), torch.zeros(1), torch.zeros(2)]
        >>> size_order(IndexedData(items, collate_fn=lambda b: torch.stack(b)))[0]
        tensor([1, 2, 0])
    """
    sizes = example_sizes(data)
    if sizes is None or bool((sizes == sizes[0]).all()):
        return None, None
    return torch.argsort(sizes, stable=True), sizes


class SizeOrdered:
    """``operator`` whose products run over chunks of similar-sized examples (see the module docstring).

    A product over all examples runs in ``order``; one over ``indices`` runs over the same indices sorted by
    ``sizes``. Everything else is the operator's own. With ``order=None`` it is the operator unchanged.

    Args:
        operator: the Hessian operator.
        order: every dataset index, sorted by size (:func:`size_order`), or ``None``.
        sizes: each example's size (``[N]``), or ``None``.

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> net = torch.nn.Linear(2, 1, bias=False).double()
        >>> data = TensorDataset(torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
        >>> op = HessianOperator(net, lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2, data)
        >>> SizeOrdered(op, *size_order(op.data)).matvec(torch.ones(2, dtype=torch.float64))
        tensor([1., 1.], dtype=torch.float64)
    """

    def __init__(self, operator: HessianOperator, order: Tensor | None, sizes: Tensor | None) -> None:
        self.operator = operator
        self.order = order
        self.sizes = sizes

    def matvec(self, vectors: Tensor, indices: Tensor | None = None) -> Tensor:
        """``operator.matvec(vectors, indices)`` with the examples in size order (same mean, other rounding)."""
        if self.order is None or self.sizes is None:
            return self.operator.matvec(vectors, indices)
        if indices is None:
            return self.operator.matvec(vectors, self.order)
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        return self.operator.matvec(vectors, idx[torch.argsort(self.sizes[idx], stable=True)])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.operator, name)


def active_product(operator: Any, p: Tensor, damping: float, active: Tensor) -> Tensor:
    """``(H + λI) p`` for the rows of ``p`` where ``active`` is true, zero elsewhere: a solver's rows that have
    converged take no part in the next full-data product (each row costs about one backward pass per chunk).

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> net = torch.nn.Linear(2, 1, bias=False).double()
        >>> data = TensorDataset(torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
        >>> op = HessianOperator(net, lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2, data)  # H = I
        >>> active_product(op, torch.ones(2, 2, dtype=torch.float64), 1.0, torch.tensor([True, False]))
        tensor([[2., 2.],
                [0., 0.]], dtype=torch.float64)
    """
    if bool(active.all()):
        return operator.matvec(p).add_(p, alpha=damping)
    out = torch.zeros_like(p)
    rows = p[active]
    out[active] = operator.matvec(rows).add_(rows, alpha=damping)
    return out
