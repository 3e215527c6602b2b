"""Fingerprints of everything that determines influence scores, so a stale result is never reused.

A result directory records one digest per component (weights, selected parameters, estimator settings, training
data, test data, loss function). A rerun into the same directory compares them and names what changed
(:func:`changed_components`); the caller then refuses to resume or starts fresh. Digests are SHA-256 over a
canonical byte form: tensors by name, dtype, shape and bytes; other values by ``repr``.

Data are hashed by streaming over the examples (one pass, a batch at a time); nothing is held beyond the batch.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fastif.core.batches import IndexedData

FINGERPRINT_COMPONENTS = ("weights", "params", "estimator", "train_data", "test_data", "loss_fn")
"""The components a result's fingerprint is made of, in the order they are reported."""


def _update(digest: Any, value: Any) -> None:
    """Feed one value into ``digest`` in a canonical form (tensors by dtype, shape and bytes)."""
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        digest.update(b"{")
        for key in sorted(value, key=str):
            digest.update(repr(key).encode())
            _update(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _update(digest, item)
        digest.update(b"]")
    else:
        digest.update(repr(value).encode())


def digest_of(value: Any) -> str:
    """SHA-256 hex digest of a value (tensors, mappings, sequences, plain values), in a canonical form.

    Example::

        >>> digest_of({"a": torch.ones(2)}) == digest_of({"a": torch.ones(2)})
        True
        >>> digest_of(torch.ones(2)) == digest_of(torch.ones(2, dtype=torch.float64))
        False
    """
    digest = hashlib.sha256()
    _update(digest, value)
    return digest.hexdigest()


def weights_fingerprint(model: nn.Module) -> str:
    """Digest of the model's whole state (parameter and buffer names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        _update(digest, tensor)
    return digest.hexdigest()


def params_fingerprint(named_params: Iterable[tuple[str, Tensor]]) -> str:
    """Digest of which parameters influence is taken over (names and shapes, not values)."""
    return digest_of([(name, tuple(p.shape)) for name, p in named_params])


DATA_CHUNK = 1024
"""Examples gathered per step when hashing data (fixed: the digest of padded batches depends on the chunking)."""


def data_fingerprint(data: Any) -> str:
    """Digest of a dataset's content, streamed a chunk at a time (labels included: relabelled data differ).

    Args:
        data: a map-style dataset, a ``DataLoader`` over one, or an :class:`IndexedData`.

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> a = TensorDataset(torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 0]))
        >>> b = TensorDataset(torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 1]))
        >>> data_fingerprint(a) == data_fingerprint(b)
        False
    """
    indexed = data if isinstance(data, IndexedData) else IndexedData(data)
    digest = hashlib.sha256()
    n = len(indexed)
    digest.update(f"N{n}".encode())
    for start in range(0, n, DATA_CHUNK):
        batch = indexed.gather(range(start, min(start + DATA_CHUNK, n)))
        _update(digest, batch)
    return digest.hexdigest()


def function_fingerprint(fn: Callable[..., Any] | None, *, name: str | None = None) -> str:
    """Digest of a loss function: the ``name`` the user gives, else its qualified name and source code.

    Lambdas all share the name ``<lambda>``; their source line tells them apart. A function whose source cannot be
    read (built in, defined in a REPL) is identified by its qualified name and, for bound methods, its class; give
    ``name`` to pin it explicitly (and change the name when the function changes).
    """
    if name is not None:
        return digest_of(("name", name))
    if fn is None:
        return digest_of(("default", "model.per_example_loss"))
    target = getattr(fn, "__func__", fn)
    owner = getattr(fn, "__self__", None)
    parts: list[Any] = [getattr(target, "__module__", None), getattr(target, "__qualname__", type(target).__name__)]
    if owner is not None:
        parts.append(type(owner).__qualname__)
    try:
        parts.append(inspect.getsource(target))
    except (OSError, TypeError):
        parts.append(None)
    closure = getattr(target, "__closure__", None) or ()
    for cell in closure:
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(contents, (int, float, str, bool, Tensor)):
            parts.append(contents)
    return digest_of(parts)


def changed_components(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The components whose digests differ (a component missing on either side counts as changed).

    Example::

        >>> changed_components({"weights": "a", "train_data": "b"}, {"weights": "a", "train_data": "c"})
        ['train_data']
    """
    keys = [k for k in FINGERPRINT_COMPONENTS if k in recorded or k in current]
    keys += sorted((set(recorded) | set(current)) - set(FINGERPRINT_COMPONENTS))
    return [k for k in keys if recorded.get(k) != current.get(k)]


def estimator_fingerprint(settings: Mapping[str, Any]) -> str:
    """Digest of an estimator's settings (``InverseHVP.settings()``), JSON-canonical."""
    return digest_of(json.dumps(settings, sort_keys=True, default=repr))
