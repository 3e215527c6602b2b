"""The labels of a dataset, read the one way the whole package reads a batch's labels.

:func:`~lightning_fastif.core.batches.labels_of` (keys ``labels``, ``label``, ``y``, ``target``, ``targets``, or a
tuple's last entry) is the one reader of a batch's labels; this module adds a dataset's labels for the app's report.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_fastif.core.batches import LABEL_KEYS, labels_of

__all__ = ["LABEL_KEYS", "dataset_labels", "labels_of"]


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
