"""Collectives over plain ``torch.distributed``: usable inside any Lightning strategy, and no-ops without one.

Every function here is a collective when a process group is initialised: **every rank must call it**, in the
same order, never from inside rank-0-only code. Without an initialised process group (one process) each
function returns its input (or the obvious single-process answer).

Tensors are moved to the device the backend communicates on (CUDA for NCCL, CPU for gloo) and the results
come back on the input's device. This module imports no Lightning.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")

_MAX_DIMS = 8


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if is_distributed() else 0


def barrier() -> None:
    """Wait until every rank reaches this point (nothing without a process group)."""
    if is_distributed():
        dist.barrier()


def _comm_device(t: Tensor) -> torch.device:
    """The device a tensor must be on for the default group's backend."""
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and not t.is_cuda and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def all_reduce_sum(t: Tensor) -> Tensor:
    """Return the element-wise sum of ``t`` over all ranks (a new tensor; ``t`` is not modified).

    Example::

        >>> all_reduce_sum(torch.tensor([1.0, 2.0])).tolist()  # one process: the input
        [1.0, 2.0]
    """
    if not is_distributed():
        return t.clone()
    out = t.detach().to(_comm_device(t), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def all_reduce_mean(t: Tensor) -> Tensor:
    """Return the element-wise mean of ``t`` over all ranks; integer tensors are averaged as float32.

    Example::

        >>> all_reduce_mean(torch.tensor([2, 4])).tolist()
        [2.0, 4.0]
    """
    if not t.is_floating_point() and not t.is_complex():
        t = t.float()
    return all_reduce_sum(t) / world_size()


_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def _meta_record(t: Tensor) -> Tensor:
    """``[ndim, dtype code, *shape, -1 padding]``: gathered first so every rank can check every other one."""
    record = torch.full((_MAX_DIMS + 2,), -1, dtype=torch.long)
    if 1 <= t.dim() <= _MAX_DIMS:
        record[0] = t.dim()
        record[2 : 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.long)
    record[1] = _DTYPES.index(t.dtype) if t.dtype in _DTYPES else -1
    return record


def _check_meta(records: list[Tensor]) -> tuple[list[tuple[int, ...]], torch.dtype]:
    """Validate the gathered records the same way on every rank; return the shapes and the common dtype."""
    ndims = [int(r[0]) for r in records]
    if min(ndims) < 1:
        raise ValueError(
            f"tensor: gather_uneven needs 1 to {_MAX_DIMS} dimensions on every rank, got ranks with ndim "
            f"{[int(r[0]) if int(r[0]) > 0 else 'unsupported' for r in records]}"
        )
    shapes = [tuple(int(s) for s in r[2 : 2 + int(r[0])].tolist()) for r in records]
    codes = [int(r[1]) for r in records]
    nonempty = [i for i, s in enumerate(shapes) if s[0] > 0]
    if any(codes[i] < 0 for i in nonempty):
        raise ValueError(f"tensor: gather_uneven supports dtypes {[str(d) for d in _DTYPES]}")
    if len({shapes[i][1:] for i in nonempty}) > 1:
        raise ValueError(f"tensor: gather_uneven needs the same trailing shape on every rank, got shapes {shapes}")
    if len({codes[i] for i in nonempty}) > 1:
        raise ValueError(
            f"tensor: gather_uneven needs one dtype on every rank, got {[str(_DTYPES[codes[i]]) for i in nonempty]}"
        )
    dtype = _DTYPES[codes[nonempty[0]]] if nonempty else torch.float32
    return shapes, dtype


def gather_uneven(t: Tensor) -> Tensor:
    """Concatenate every rank's ``t`` along dimension 0, in rank order; the first dimension may differ per rank.

    Each rank learns all shapes, pads its tensor to the largest, ``all_gather``-s, and trims the padding.
    Ranks that contribute zero rows may pass any trailing shape and dtype (e.g. ``torch.empty(0)``); the
    others must agree on both. Works with gloo on CPU and with NCCL.

    Returns:
        A tensor of ``sum(sizes)`` rows on ``t``'s device; ``t`` itself without a process group.

    Raises:
        ValueError: raised on every rank alike (so none is left waiting) if non-empty ranks disagree on the
            trailing shape or dtype, or a rank passes a tensor without dimensions.

    Example::

        >>> gather_uneven(torch.arange(3)).tolist()  # one process: the input
        [0, 1, 2]
    """
    if not is_distributed():
        if t.dim() < 1:
            raise ValueError(f"tensor: gather_uneven needs at least one dimension, got shape {tuple(t.shape)}")
        return t
    device = _comm_device(t)
    n = world_size()
    record = _meta_record(t).to(device)
    records = [torch.empty_like(record) for _ in range(n)]
    dist.all_gather(records, record)
    shapes, dtype = _check_meta([r.cpu() for r in records])
    sizes = [s[0] for s in shapes]
    nonempty = [i for i in range(n) if sizes[i] > 0]
    if not nonempty:
        return t.new_empty((0, *shapes[0][1:]))
    tail = shapes[nonempty[0]][1:]
    padded = torch.zeros((max(sizes), *tail), dtype=dtype, device=device)
    if sizes[rank()] > 0:
        padded[: sizes[rank()]] = t.detach().to(device=device, dtype=dtype)
    buffers = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(buffers, padded)
    return torch.cat([buf[:size] for buf, size in zip(buffers, sizes, strict=True)]).to(t.device)


def broadcast_object(obj: T, src: int = 0) -> T:
    """Return rank ``src``'s ``obj`` on every rank (pickled; keep it small). Without a process group: ``obj``.

    Example::

        >>> broadcast_object({"dirpath": "runs/a"})
        {'dirpath': 'runs/a'}
    """
    if not is_distributed():
        return obj
    holder: list[Any] = [obj]
    device = None
    if "nccl" in str(dist.get_backend()).lower() and "gloo" not in str(dist.get_backend()).lower():
        device = torch.device("cuda", torch.cuda.current_device())
    dist.broadcast_object_list(holder, src=src, device=device)
    return holder[0]
