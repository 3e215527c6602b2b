"""Collectives over plain ``torch.distributed``: usable inside any Lightning strategy, and no-ops without one.

Every function here is a collective when a process group is initialised: **every rank must call it**, in the
same order, never from inside rank-0-only code. Without an initialised process group (one process) each
function returns its input (or the obvious single-process answer).

Tensors are moved to the device the backend communicates on (CUDA for NCCL, CPU for gloo) and the results
come back on the input's device. This module imports no Lightning. Lightning's strategies broadcast and reduce
too; these functions serve code that runs without a Trainer of its own (``InfluenceModule.score_batch`` called inside
another model's fit by ``ErrorCorrection``, the snapshot callbacks), where the process group is all there is.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors

T = TypeVar("T")


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


def _check_meta(metas: list[tuple[tuple[int, ...], str]]) -> tuple[list[tuple[int, ...]], str]:
    """Validate every rank's ``(shape, dtype)`` the same way on every rank; return the shapes and the common dtype."""
    shapes = [tuple(shape) for shape, _ in metas]
    if any(len(s) < 1 for s in shapes):
        raise ValueError(
            f"tensor: gather_uneven needs at least one dimension on every rank, got shapes {[list(s) for s in shapes]}"
        )
    nonempty = [i for i, s in enumerate(shapes) if s[0] > 0]
    if len({shapes[i][1:] for i in nonempty}) > 1:
        raise ValueError(f"tensor: gather_uneven needs the same trailing shape on every rank, got shapes {shapes}")
    dtypes = [metas[i][1] for i in nonempty]
    if len(set(dtypes)) > 1:
        raise ValueError(f"tensor: gather_uneven needs one dtype on every rank, got {dtypes}")
    return shapes, dtypes[0] if dtypes else str(torch.float32)


def gather_uneven(t: Tensor) -> Tensor:
    """Concatenate every rank's ``t`` along dimension 0, in rank order; the first dimension may differ per rank.

    Ranks that contribute zero rows may pass any trailing shape and dtype (e.g. ``torch.empty(0)``); the
    others must agree on both. Works with gloo on CPU and with NCCL. The padding and trimming are torchmetrics'
    ``gather_all_tensors``; this function adds the checks it lacks (it waits forever when ranks disagree on the
    number of dimensions or the dtype), so that a mismatch raises on every rank alike.

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
    shapes, dtype_name = _check_meta(all_gather_object((tuple(t.shape), str(t.dtype))))
    nonempty = [s for s in shapes if s[0] > 0]
    if not nonempty:
        return t.new_empty((0, *shapes[0][1:]))
    tail, dtype = nonempty[0][1:], getattr(torch, dtype_name.removeprefix("torch."))
    device = _comm_device(t)
    if t.shape[0] > 0:
        local = t.detach().to(device=device, dtype=dtype)
    else:
        local = torch.zeros((0, *tail), dtype=dtype, device=device)
    return torch.cat(gather_all_tensors(local)).to(t.device)


def all_gather_object(obj: T) -> list[T]:
    """Every rank's picklable ``obj``, in rank order (a collective; ``[obj]`` without a process group).

    Example::

        >>> all_gather_object({"rows": 3})
        [{'rows': 3}]
    """
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


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
