"""Plot inputs as plain tensors and lists: tensors, numpy arrays and (nested) lists are all accepted.

Every conversion names the argument it was given, so a bad input raises an
:class:`~lightning_fastif.errors.ArgumentError` that says which one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_fastif.errors import ArgumentError


def as_tensor(value: Any, name: str) -> Tensor:
    """``value`` as a CPU tensor (detached when it already is one)."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ArgumentError(
            f"{name}: expected a tensor, a numpy array or a (nested) list of numbers, got {type(value).__name__} "
            f"({err})"
        ) from err


def as_vector(value: Any, name: str, length: int | None = None) -> Tensor:
    """A 1-D float64 tensor (a scalar counts as one value) of the expected length."""
    t = as_tensor(value, name)
    if t.dim() > 1:
        raise ArgumentError(f"{name}: expected a 1-D sequence of numbers, got shape {tuple(t.shape)}")
    t = t.reshape(-1).double()
    if length is not None and t.numel() != length:
        raise ArgumentError(f"{name}: expected {length} values, got {t.numel()}")
    return t


def as_labels(value: Any, name: str, length: int) -> list[Any]:
    """Group labels as Python values (ints from tensors, strings kept), one per test point."""
    if isinstance(value, Tensor):
        labels = value.detach().cpu().reshape(-1).tolist()
    elif hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        labels = list(value.tolist())
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        labels = list(value)
    else:
        raise ArgumentError(f"{name}: expected a sequence or tensor of labels, got {type(value).__name__}")
    if len(labels) != length:
        raise ArgumentError(f"{name}: expected {length} labels (one per test point), got {len(labels)}")
    return labels


def sorted_labels(labels: Sequence[Any]) -> list[Any]:
    """The distinct labels, sorted (by their text when they cannot be compared, e.g. ints and ``None``)."""
    unique = list(dict.fromkeys(labels))
    try:
        return sorted(unique)
    except TypeError:  # mixed types, e.g. ints and None
        return sorted(unique, key=str)


def as_series(value: Any, name: str, length: int) -> dict[str, Tensor]:
    """One or several curves: a mapping name -> values, or one sequence (named ``""``), ``length`` values each."""
    if isinstance(value, Mapping):
        if not value:
            raise ArgumentError(f"{name}: empty mapping; expected at least one series")
        return {str(k): as_vector(v, f"{name}[{k!r}]", length) for k, v in value.items()}
    return {"": as_vector(value, name, length)}
