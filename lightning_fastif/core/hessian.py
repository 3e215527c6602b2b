"""The Hessian of the mean training loss over the selected parameters, as an operator on batches of vectors.

``H = (1/N) Σ_i ∇²ℓ_i(θ)`` over the ``N`` training examples. Inverse-HVP estimators (:mod:`lightning_fastif.core.ihvp`)
only see this operator: full-data products streamed in chunks (CG, the residual check), products over random
minibatches (LiSSA), or the explicit matrix (ExactInverse, small ``P`` only). Every product takes ``V`` vectors at
once, so the test points of a batch share each pass over the training data.

Full-data products are checked for NaN and infinities; when one is found, the operator names the training examples
whose loss or gradient is not finite (:class:`~lightning_fastif.errors.NonFiniteError`). :meth:`HessianOperator.
system_key` identifies the linear system (weights, parameters, data, loss) so that estimators can pay their fixed
costs (a scale estimate, a factorisation, a certified residual) once per system rather than once per test batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_fastif.core.batches import Batch, IndexedData, batch_size_of, slice_batch
from lightning_fastif.core.grads import FunctionalLoss, LossFn, format_indices
from lightning_fastif.core.params import ParamSpec
from lightning_fastif.errors import ArgumentError, NonFiniteError, check_int


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
        vector_block: at most this many vectors per product when the explicit Hessian is built (``None``: all ``P``
            unit vectors at once). Under a memory budget it is the number of vectors the budget was planned for.
        max_memory: the budget in bytes the computation runs under (``None``: none); :class:`~lightning_fastif.core.
            ihvp.ExactInverse` refuses an explicit Hessian that does not fit in it.

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
        vector_block: int | None = None,
        max_memory: int | None = None,
    ) -> None:
        self.batch_size = check_int("batch_size", batch_size)
        self.vector_block = check_int("vector_block", vector_block, allow_none=True)
        self.max_memory = check_int("max_memory", max_memory, allow_none=True)
        self.function = function if function is not None else FunctionalLoss(model, loss_fn, params)
        self.data = IndexedData(train_data)
        self.last_sample: Tensor | None = None
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

    def system_key(self) -> tuple[Any, ...]:
        """A hashable identity of the system ``H``: the data, the loss, the selected parameters and their values.

        The values enter three ways: each parameter's storage (``data_ptr``), its version counter (``_version``,
        bumped by every in-place update: optimiser steps, ``load_state_dict``) and a float64 sum of its entries
        (which also catches writes through ``.data``, which bypass the version counter). Reloading the same weights
        in place counts as a change: a cache keyed on this is never stale, at worst recomputed.
        """
        primals = self.function.primals
        layout = tuple(
            (name, p.data_ptr(), p._version, tuple(p.shape), str(p.dtype), str(p.device)) for name, p in primals.items()
        )
        sums = tuple(torch.stack([p.sum(dtype=torch.float64) for p in primals.values()]).tolist())
        dataset = self.data.dataset
        return (
            id(dataset),
            len(self.data),
            id(self.data.collate_fn),
            id(self.function.model),
            self.function._loss_key,
            layout,
            sums,
        )

    def batch_hvp(self, batch: Batch, vectors: Tensor) -> Tensor:
        """``[V, P]``: the Hessian of the *mean* loss over ``batch`` times each row of ``vectors``.

        A batch larger than ``batch_size`` is processed in chunks of ``batch_size`` (sums, then one division), so
        memory stays bounded by the chunk whatever the minibatch. Not checked for NaN (LiSSA checks its iterate).
        """
        size = batch_size_of(batch)
        if size <= self.batch_size:
            return self.function.hvp(batch, vectors)
        total = None
        for start in range(0, size, self.batch_size):
            chunk = slice_batch(batch, slice(start, start + self.batch_size))
            part = self.function.hvp(chunk, vectors, reduction="sum")
            total = part if total is None else total.add_(part)
        return total.div_(size)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """A minibatch of ``batch_size`` training examples drawn uniformly (with replacement) by ``generator``.

        Its dataset indices are kept in ``last_sample`` (to name the culprits of a non-finite product).
        """
        idx = torch.randint(self.num_train, (batch_size,), generator=generator)
        self.last_sample = idx
        return self.data.gather(idx)

    def matvec(self, vectors: Tensor, indices: Tensor | None = None) -> Tensor:
        """``[V, P]``: the mean-loss Hessian over all training data (or over ``indices``) times each vector.

        Raises:
            NonFiniteError: the product is not finite; names the training examples with a non-finite loss or
                gradient (or the vectors, when they are the non-finite part).
        """
        squeeze = vectors.dim() == 1
        vecs = vectors.unsqueeze(0) if squeeze else vectors
        total = torch.zeros(vecs.shape, dtype=self.dtype, device=self.device)
        count = 0
        for idx, batch in self.data.chunks(self.batch_size, indices):
            total += self.function.hvp(batch, vecs, reduction="sum")
            count += idx.numel()
        total /= count
        if not bool(torch.isfinite(total).all()):
            raise self.non_finite_error("the Hessian-vector product", indices, vecs)
        return total[0] if squeeze else total

    def non_finite_error(self, what: str, indices: Tensor | None, vectors: Tensor | None = None) -> NonFiniteError:
        """The error for a non-finite product over the training examples ``indices`` (``None``: all of them).

        Looks for the cause, in this order: non-finite vectors, non-finite parameters, training examples whose loss
        or gradient is not finite (one more pass over ``indices``; this only runs on the way to an error).
        """
        if vectors is not None and not bool(torch.isfinite(vectors).all()):
            rows = format_indices((~torch.isfinite(vectors).all(dim=-1)).nonzero().reshape(-1))
            return NonFiniteError(f"{what} is not finite: the vectors at rows {rows} hold NaN or infinite values")
        if not self.function.parameters_finite():
            return NonFiniteError(
                f"{what} is not finite: the selected parameters hold NaN or infinite values, so the loss of every "
                "training and test example is affected; check the checkpoint or the training run"
            )
        pool = torch.arange(self.num_train) if indices is None else torch.as_tensor(indices).reshape(-1).unique()
        bad: list[int] = []
        for idx, batch in self.data.chunks(self.batch_size, pool):
            bad.extend(idx[self.function.non_finite_examples(batch)].tolist())
        if bad:
            return NonFiniteError(
                f"{what} is not finite: training examples {format_indices(sorted(bad), total=pool.numel())} have a "
                "NaN or infinite loss or loss gradient; fix or remove them (check their inputs and labels)"
            )
        return NonFiniteError(
            f"{what} is not finite although the loss and gradient of every one of the {pool.numel()} training "
            "examples involved are: the second derivatives overflow; use float64 or rescale the inputs"
        )

    def dense(self, max_params: int = 5000, *, cache: bool = True) -> Tensor:
        """The explicit ``[P, P]`` Hessian of the mean training loss (symmetrised); kept when ``cache``.

        Built from ``P`` unit vectors, ``vector_block`` at a time.

        Raises:
            ArgumentError: if ``P > max_params`` (the matrix would need ``P²`` memory and ``P`` products).
        """
        if self.num_params > max_params:
            raise ArgumentError(
                f"max_params: expected at least the {self.num_params} selected parameters for an explicit Hessian "
                f"(it exceeds the limit), got {max_params}; select fewer parameters (params=['classifier.*']), raise "
                "max_params, or use LiSSA / ConjugateGradient"
            )
        if self._dense is not None:
            return self._dense
        p = self.num_params
        block = p if self.vector_block is None else min(p, self.vector_block)
        h = torch.empty(p, p, dtype=self.dtype, device=self.device)
        for start in range(0, p, block):
            stop = min(p, start + block)
            eye = torch.zeros(stop - start, p, dtype=self.dtype, device=self.device)
            eye[:, start:stop].fill_diagonal_(1.0)
            h[start:stop] = self.matvec(eye)
        h = (h + h.T) / 2
        if cache:
            self._dense = h
        return h
