"""Which parameters influence is taken over: all trainable ones, or a subset chosen by name patterns or modules.

FastIF restricts BERT to its top layers (layers 10-11, pooler, classifier) to make influence affordable;
``select_parameters(model, ["encoder.layer.11.*", "classifier.*"])`` is the same knob. Patterns are shell-style
(``fnmatch``) over the names of ``model.named_parameters()``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import Tensor, nn

ParamSpec = str | nn.Module | Sequence[str | nn.Module] | None
"""``None`` (every parameter with ``requires_grad``), a name pattern, a submodule, or a list of those."""


def select_parameters(model: nn.Module, params: ParamSpec = None) -> dict[str, nn.Parameter]:
    """Return the parameters influence is taken over, by name, in the model's own order.

    Args:
        model: the model.
        params: ``None`` for every parameter with ``requires_grad=True``; a shell-style pattern
            (``"classifier.*"``, ``"encoder.layer.11.*"``), a submodule of ``model``, or a list of those.
            A pattern selects a parameter whatever its ``requires_grad`` (frozen layers may be analysed).

    Returns:
        An ordered ``{name: parameter}`` dict.

    Raises:
        ValueError: if nothing is selected, or a pattern/module matches no parameter; the message lists the names
            that are available.

    Example::

        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> list(select_parameters(net, "2.*"))
        ['2.weight', '2.bias']
    """
    named = dict(model.named_parameters())
    if params is None:
        selected = {n: p for n, p in named.items() if p.requires_grad}
        if not selected:
            raise ValueError(
                f"params: the model has no trainable parameter (all {len(named)} have requires_grad=False); pass "
                f"name patterns to choose parameters explicitly, e.g. params={_examples(named)}"
            )
        return selected
    specs: list[str | nn.Module] = [params] if isinstance(params, (str, nn.Module)) else list(params)
    if not specs:
        raise ValueError("params: an empty list selects nothing; pass None for all trainable parameters")
    chosen: set[str] = set()
    for spec in specs:
        if isinstance(spec, str):
            hits = {n for n in named if fnmatch.fnmatchcase(n, spec)}
            if not hits:
                raise ValueError(
                    f"params: the pattern {spec!r} matches no parameter of {type(model).__name__}; available names: "
                    f"{_listing(named)}"
                )
        elif isinstance(spec, nn.Module):
            ids = {id(p) for p in spec.parameters()}
            hits = {n for n, p in named.items() if id(p) in ids}
            if not hits:
                raise ValueError(
                    f"params: the module {type(spec).__name__} holds no parameter of the model (is it a submodule of "
                    f"{type(model).__name__}?); available names: {_listing(named)}"
                )
        else:
            raise TypeError(
                "params: expected None, a name pattern (str), an nn.Module, or a list of those, got "
                f"{type(spec).__name__}"
            )
        chosen |= hits
    return {n: p for n, p in named.items() if n in chosen}


def num_parameters(params: dict[str, Tensor]) -> int:
    """Return the total number of scalars in ``params``."""
    return sum(p.numel() for p in params.values())


def flatten(tensors: Sequence[Tensor] | dict[str, Tensor], batch_dims: int = 0) -> Tensor:
    """Concatenate tensors into one vector (or ``[*batch, P]`` when they carry ``batch_dims`` leading dims)."""
    values = list(tensors.values()) if isinstance(tensors, dict) else list(tensors)
    if batch_dims == 0:
        return torch.cat([t.reshape(-1) for t in values])
    lead = values[0].shape[:batch_dims]
    return torch.cat([t.reshape(*lead, -1) for t in values], dim=batch_dims)


def unflatten(vector: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Split a ``[..., P]`` tensor into a dict shaped like ``like`` (leading dims kept)."""
    lead = vector.shape[:-1]
    total = sum(ref.numel() for ref in like.values())
    if vector.shape[-1] != total:
        raise ValueError(f"vector: last dimension {vector.shape[-1]} does not match the {total} selected parameters")
    out: dict[str, Tensor] = {}
    offset = 0
    for name, ref in like.items():
        n = ref.numel()
        out[name] = vector[..., offset : offset + n].reshape(*lead, *ref.shape)
        offset += n
    return out


def _listing(named: dict[str, nn.Parameter], limit: int = 40) -> str:
    names = list(named)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _examples(named: dict[str, nn.Parameter]) -> str:
    return repr([n.rsplit(".", 1)[0] + ".*" for n in list(named)[-2:]])
