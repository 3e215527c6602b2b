"""The Hessian of the mean training loss over the selected parameters, as an operator on batches of vectors.

``H = (1/N) Σ_i ∇²ℓ_i(θ)`` over the ``N`` training examples. Inverse-HVP estimators (:mod:`lightning_fastif.core.ihvp`)
only see this operator: full-data products streamed in chunks (CG, the residual check), products over random
minibatches (LiSSA), or the explicit matrix (ExactInverse, small ``P`` only). Every product takes ``V`` vectors at
once, so the test points of a batch share each pass over the training data.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_fastif.core.batches import Batch, IndexedData, batch_size_of, slice_batch
from lightning_fastif.core.grads import FunctionalLoss, LossFn
from lightning_fastif.core.params import ParamSpec


class HessianOperator:
    """Hessian-vector products of the mean training loss.

    Args:
        model: the model (evaluated as it is: callers put it in eval mode).
        loss_fn: per-example loss ``loss_fn(model, batch) -> Tensor[B]`` (default ``model.per_example_loss``).
        train_data: a map-style ``Dataset`` or a ``DataLoader`` over one (its ``collate_fn`` is used).
        params: which parameters (see :func:`~lightning_fastif.core.params.select_parameters`).
        batch_size: chunk size of every product: full-data products, and minibatches larger than it (a LiSSA
            ``batch_size`` above it is summed chunk by chunk, same result). A memory bound, not a statistical choice;
            :func:`~lightning_fastif.core.memory.plan_chunks` derives it from a ``max_memory`` budget.

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> net = nn.Linear(2, 1, bias=False).double()
        >>> data = TensorDataset(torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
        >>> op = HessianOperator(net, lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2, data)
        >>> op.dense()  # (1/N) Σ 2 x xᵀ
        tensor([[1., 0.],
                [0., 1.]], dtype=torch.float64)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        train_data: Any,
        params: ParamSpec = None,
        *,
        batch_size: int = 256,
        function: FunctionalLoss | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be a positive integer, got {batch_size}")
        self.function = function if function is not None else FunctionalLoss(model, loss_fn, params)
        self.data = IndexedData(train_data)
        self.batch_size = batch_size
        self._dense: Tensor | None = None

    @property
    def num_params(self) -> int:
        """P, the number of selected parameters."""
        return self.function.num_params

    @property
    def num_train(self) -> int:
        """N, the number of training examples."""
        return len(self.data)

    @property
    def dtype(self) -> torch.dtype:
        return self.function.dtype

    @property
    def device(self) -> torch.device:
        return self.function.device

    def batch_hvp(self, batch: Batch, vectors: Tensor) -> Tensor:
        """``[V, P]``: the Hessian of the *mean* loss over ``batch`` times each row of ``vectors``.

        A batch larger than ``batch_size`` is processed in chunks of ``batch_size`` (sums, then one division), so
        memory stays bounded by the chunk whatever the minibatch.
        """
        size = batch_size_of(batch)
        if size <= self.batch_size:
            return self.function.hvp(batch, vectors)
        total = None
        for start in range(0, size, self.batch_size):
            chunk = slice_batch(batch, slice(start, start + self.batch_size))
            part = self.function.hvp(chunk, vectors, reduction="sum")
            total = part if total is None else total + part
        return total / size

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """A minibatch of ``batch_size`` training examples drawn uniformly (with replacement) by ``generator``."""
        idx = torch.randint(self.num_train, (batch_size,), generator=generator)
        return self.data.gather(idx)

    def matvec(self, vectors: Tensor, indices: Tensor | None = None) -> Tensor:
        """``[V, P]``: the mean-loss Hessian over all training data (or over ``indices``) times each vector."""
        squeeze = vectors.dim() == 1
        vecs = vectors.unsqueeze(0) if squeeze else vectors
        total = torch.zeros(vecs.shape, dtype=self.dtype, device=self.device)
        count = 0
        for idx, batch in self.data.chunks(self.batch_size, indices):
            total += self.function.hvp(batch, vecs, reduction="sum")
            count += idx.numel()
        total /= count
        return total[0] if squeeze else total

    def dense(self, max_params: int = 5000) -> Tensor:
        """The explicit ``[P, P]`` Hessian of the mean training loss (symmetrised), cached.

        Raises:
            ValueError: if ``P > max_params`` (the matrix would need ``P²`` memory and ``P`` products).
        """
        if self.num_params > max_params:
            raise ValueError(
                f"max_params: an explicit Hessian over {self.num_params} parameters exceeds the limit {max_params}; "
                "select fewer parameters (params=['classifier.*']), raise max_params, or use LiSSA / ConjugateGradient"
            )
        if self._dense is None:
            eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
            h = self.matvec(eye)
            self._dense = (h + h.T) / 2
        return self._dense
