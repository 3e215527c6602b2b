"""The labels of a batch or a dataset, read the one way the app reads them.

A dict batch or item holds its labels under the first of :data:`LABEL_KEYS` it has; a tuple or list is
``(inputs..., labels)``. The app, its demo models and its report read labels through these two functions only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_fastif.errors import ArgumentError

LABEL_KEYS = ("labels", "label", "y", "target")
"""Keys a dict batch or item may hold its labels under, in the order they are looked up."""


def labels_of(batch: Any) -> Any:
    """The labels of a batch (or of one dataset item): a dict's first key of :data:`LABEL_KEYS`, a tuple's last entry.

    Raises:
        ArgumentError: for a dict without any of :data:`LABEL_KEYS`, or anything but a dict or a tuple/list of two or
            more entries.

    Example::

        >>> labels_of({"x": torch.zeros(2, 3), "y": torch.tensor([1, 0])})
        tensor([1, 0])
        >>> labels_of((torch.zeros(2, 3), torch.tensor([4, 5])))
        tensor([4, 5])
    """
    if isinstance(batch, Mapping):
        for key in LABEL_KEYS:
            if key in batch:
                return batch[key]
        raise ArgumentError(
            f"batch: expected a dict with one of the label keys {list(LABEL_KEYS)}, got keys {sorted(batch)}"
        )
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[-1]
    raise ArgumentError(
        f"batch: expected an (inputs, labels) tuple/list or a dict with one of {list(LABEL_KEYS)}, got "
        f"{type(batch).__name__}"
    )


def dataset_labels(dataset: Any) -> Tensor:
    """The label of every example of a map-style dataset, int64 ``[N]``.

    Reads a ``TensorDataset``'s last tensor or a tensor attribute ``labels`` directly; otherwise every item through
    :func:`labels_of`.

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> dataset_labels(TensorDataset(torch.zeros(3, 2), torch.tensor([2, 0, 1])))
        tensor([2, 0, 1])
        >>> dataset_labels([{"x": torch.zeros(2), "y": 1}, {"x": torch.ones(2), "y": 0}])
        tensor([1, 0])
    """
    if isinstance(dataset, torch.utils.data.TensorDataset):
        return dataset.tensors[-1].long()
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, Tensor) and labels.dim() == 1 and len(labels) == len(dataset):
        return labels.long()
    return torch.as_tensor([int(labels_of(dataset[i])) for i in range(len(dataset))], dtype=torch.long)
