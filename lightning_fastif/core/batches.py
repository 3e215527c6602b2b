"""Batches as the engine sees them: tuples, lists or dicts of tensors, sliced and moved as one.

A *batch* is what a ``DataLoader`` yields: a tensor, a tuple/list of tensors (``(x, y)``), or a mapping of
tensors (``{"input_ids": ..., "attention_mask": ..., "labels": ...}``), every tensor sharing its first
(example) dimension. Non-tensor leaves (strings, ints) are carried along unchanged where possible.

Training data is given to the engine as a map-style ``Dataset`` (or a ``DataLoader`` over one, whose
``collate_fn`` is then used), so that any subset of examples, e.g. kNN candidates, can be gathered by index.
This module imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from lightning_fastif.errors import ArgumentError

Batch = Any
"""A tensor, a tuple/list of tensors, or a mapping of tensors, all sharing their first dimension."""

Collate = Callable[[list[Any]], Batch]


def tensors_of(batch: Batch) -> list[Tensor]:
    """Return the tensor leaves of ``batch`` in a stable order.

    Example::

        >>> [t.shape[0] for t in tensors_of({"x": torch.zeros(3, 2), "y": torch.zeros(3)})]
        [3, 3]
    """
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in tensors_of(v)]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in tensors_of(v)]
    return []


LABEL_KEYS: tuple[str, ...] = ("labels", "label", "y", "target", "targets")
"""Keys under which a dict batch holds its labels, in the order :func:`labels_of` looks for them."""


def labels_of(batch: Batch) -> Any:
    """Return the labels (targets) of ``batch``.

    A dict batch holds them under the first of :data:`LABEL_KEYS` it has (``"labels"``, ``"label"``, ``"y"``,
    ``"target"``, ``"targets"``); a tuple/list batch ``(inputs..., labels)`` holds them last.

    Args:
        batch: a dict batch, or a tuple/list of at least two elements.

    Returns:
        The labels as stored in the batch (a tensor for ``DataLoader`` batches).

    Raises:
        ArgumentError: if the batch is a dict with none of the label keys, a tuple/list of fewer than two
            elements, or any other type (a bare tensor carries no labels).

    Example::

        >>> labels_of((torch.zeros(3, 2), torch.tensor([0, 1, 1]))).tolist()
        [0, 1, 1]
        >>> labels_of({"input_ids": torch.zeros(2, 4), "label": torch.tensor([1, 0])}).tolist()
        [1, 0]
    """
    if isinstance(batch, Mapping):
        for key in LABEL_KEYS:
            if key in batch:
                return batch[key]
        raise ArgumentError(
            f"batch: expected a dict with one of the label keys {list(LABEL_KEYS)}, got a dict with keys "
            f"{sorted(map(str, batch))}"
        )
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[-1]
    what = f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__
    raise ArgumentError(
        f"batch: expected a tuple/list (inputs..., labels) or a dict with one of the keys {list(LABEL_KEYS)}, "
        f"got {what}"
    )


def batch_size_of(batch: Batch) -> int:
    """Return the number of examples in ``batch`` (the first dimension of its tensors).

    Raises:
        ValueError: if the batch holds no tensor, or its tensors disagree on the first dimension.

    Example::

        >>> batch_size_of((torch.zeros(5, 3), torch.zeros(5)))
        5
    """
    leaves = [t for t in tensors_of(batch) if t.dim() > 0]
    if not leaves:
        raise ValueError(
            f"batch: expected a tensor, or a tuple/list/dict of tensors with an example dimension, got "
            f"{type(batch).__name__}"
        )
    sizes = {int(t.shape[0]) for t in leaves}
    if len(sizes) != 1:
        raise ValueError(f"batch: its tensors disagree on the number of examples (first dimensions {sorted(sizes)})")
    return sizes.pop()


def map_tensors(batch: Batch, fn: Callable[[Tensor], Tensor]) -> Batch:
    """Apply ``fn`` to every tensor of ``batch`` that has an example dimension, keeping the structure."""
    if isinstance(batch, Tensor):
        return fn(batch) if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def slice_batch(batch: Batch, index: slice | Tensor | Sequence[int]) -> Batch:
    """Select examples of ``batch`` by a slice or an index tensor.

    Example::

        >>> slice_batch({"x": torch.arange(4)}, slice(1, 3))["x"].tolist()
        [1, 2]
    """
    if not isinstance(index, slice) and not isinstance(index, Tensor):
        index = torch.as_tensor(list(index), dtype=torch.long)
    return map_tensors(batch, lambda t: t[index.to(t.device) if isinstance(index, Tensor) else index])


def move_batch(batch: Batch, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Batch:
    """Move every tensor of ``batch`` to ``device``; floating tensors are cast to ``dtype`` when given.

    Integer tensors (token ids, labels, masks of ints) keep their dtype.
    """

    def move(t: Tensor) -> Tensor:
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device) if device is not None else t

    if isinstance(batch, Tensor):
        return move(batch)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_batch(v, device, dtype) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(v, device, dtype) for v in batch)
    return batch


class IndexedData:
    """A map-style dataset with the ``collate_fn`` that turns a list of its items into a batch.

    Wraps a ``Dataset`` (or the dataset of a ``DataLoader``, keeping its ``collate_fn``) so that any set of
    examples can be gathered into one batch by their dataset indices. ``TensorDataset`` is gathered by tensor
    indexing, without a Python loop over items.

    Args:
        data: a map-style ``Dataset`` (``__getitem__`` and ``__len__``) or a ``DataLoader`` over one.
        collate_fn: overrides the collate function (default: the loader's, else ``default_collate``).
        name: the argument name used in error messages.

    Raises:
        TypeError: if ``data`` cannot be indexed (an iterable-style dataset, a generator).
        ValueError: if ``data`` is empty.

    Example::

        >>> data = IndexedData(TensorDataset(torch.arange(6.0).view(3, 2), torch.tensor([0, 1, 0])))
        >>> x, y = data.gather([2, 0])
        >>> y.tolist(), len(data)
        ([0, 0], 3)
    """

    def __init__(
        self, data: Dataset | DataLoader | IndexedData, collate_fn: Collate | None = None, *, name: str = "train_data"
    ) -> None:
        if isinstance(data, IndexedData):
            self.dataset: Any = data.dataset
            self.collate_fn: Collate = collate_fn or data.collate_fn
            return
        if isinstance(data, DataLoader):
            dataset, loader_collate = data.dataset, data.collate_fn
        else:
            dataset, loader_collate = data, default_collate
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(
                f"{name}: expected a map-style Dataset with __getitem__ and __len__ (or a DataLoader over "
                f"one), got {type(dataset).__name__}; influence needs to gather training examples by index"
            )
        self.dataset = dataset
        self.collate_fn = collate_fn or loader_collate
        if len(self) == 0:
            raise ValueError(f"{name}: the dataset is empty (len 0); influence needs at least one example")

    def __len__(self) -> int:
        return len(self.dataset)

    def gather(self, indices: Sequence[int] | Tensor) -> Batch:
        """Return the examples at ``indices`` (dataset indices) as one batch, in that order."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        n = len(self)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            bad = idx[(idx < 0) | (idx >= n)][:5].tolist()
            raise IndexError(f"indices: {bad} out of range for a dataset of {n} examples (accepted: 0..{n - 1})")
        if isinstance(self.dataset, TensorDataset) and self.collate_fn is default_collate:
            return [t[idx] for t in self.dataset.tensors]
        return self.collate_fn([self.dataset[int(i)] for i in idx])

    def chunks(self, batch_size: int, indices: Sequence[int] | Tensor | None = None) -> Iterator[tuple[Tensor, Batch]]:
        """Yield ``(indices, batch)`` over the dataset (or over ``indices``) in chunks of ``batch_size``."""
        if batch_size < 1:
            raise ValueError(f"batch_size: must be a positive integer, got {batch_size}")
        idx = torch.arange(len(self)) if indices is None else torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        for start in range(0, idx.numel(), batch_size):
            part = idx[start : start + batch_size]
            yield part, self.gather(part)
