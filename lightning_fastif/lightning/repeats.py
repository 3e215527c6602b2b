"""``parallel="repeats"``: one batch of test points computed by all ranks together (FastIF's parallel variant).

LiSSA's repeats are split across ranks (repeat ``r`` on rank ``r % world``, always with seed ``seed + r``) and
combined by an all-reduce; a deterministic estimator runs on rank 0 and reaches the others through the same
all-reduce. The candidates are cut into contiguous column ranges, one per rank, scored and gathered, every
(test, candidate) pair exactly once. Every function here is a collective: every rank calls it with the same batch.
A failure on one rank is raised on all of them together, so that none is left waiting in a collective.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_fastif.core.hessian import HessianOperator
from lightning_fastif.core.ihvp import InverseHVP, LiSSA, relative_residual
from lightning_fastif.lightning.distributed import all_reduce_sum, gather_uneven, rank, world_size

__all__ = ["fail_together", "score_split", "solve_split"]


def fail_together(error: BaseException | None, what: str) -> None:
    """A collective: every rank learns whether any rank failed, and all raise.

    Raises:
        BaseException: this rank's ``error``, or a ``RuntimeError`` naming ``what`` when another rank failed.
    """
    failed = float(all_reduce_sum(torch.tensor([0.0 if error is None else 1.0]))[0])
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"parallel='repeats': {what} failed on another rank (its error is in that rank's log)")


def solve_split(est: InverseHVP, operator: HessianOperator, g_test: Tensor) -> tuple[Tensor, dict[str, Any]]:
    """``s_test = (H + λI)⁻¹ g_test`` with LiSSA's repeats split across ranks; the residual measured once, on rank 0.

    Returns:
        ``(s_test, diagnostics)``: the same ``s_test`` on every rank; the diagnostics of this rank's share, with
        ``world_size`` and (rank 0) the combined estimate's ``residual``.
    """
    world, me = world_size(), rank()
    residual_examples = est.residual_examples
    est.residual_examples = 0  # measured once below, on the combined estimate
    error: BaseException | None = None
    partial = torch.zeros(g_test.shape, dtype=operator.dtype, device=operator.device)
    diag: dict[str, Any] = {"estimator": est.name, **est.settings()}
    try:
        if isinstance(est, LiSSA):
            mine = list(range(me, est.num_repeats, world))
            diag["repeats"] = mine
            if mine:
                partial = est.solve(operator, g_test, repeats=mine) * len(mine)
                diag = dict(est.diagnostics)
        elif me == 0:
            partial = est.solve(operator, g_test)
            diag = dict(est.diagnostics)
    except Exception as err:  # raised below on every rank together, so none waits in the all-reduce
        error = err
    finally:
        est.residual_examples = residual_examples
    fail_together(error, "the inverse-HVP solve")
    s_test = all_reduce_sum(partial)
    if isinstance(est, LiSSA):
        s_test = s_test / est.num_repeats
    diag["world_size"] = world
    if residual_examples != 0 and me == 0:
        v = g_test.to(operator.device, operator.dtype)
        diag["residual"] = float(
            relative_residual(operator, s_test, v, est.damping, num_examples=residual_examples).max()
        )
    return s_test, diag


def score_split(score_columns: Callable[[int, int], Tensor], width: int, like: Tensor) -> Tensor:
    """Score candidate columns ``[0, width)`` cut into one contiguous range per rank; gather them in order.

    Args:
        score_columns: ``score_columns(lo, hi) -> Tensor[rows, hi - lo]``, this rank's share.
        width: the number of candidate columns.
        like: ``s_test`` (``[rows, P]``): the rows, dtype and device of an empty share.

    Raises:
        RuntimeError: the ranks' ranges do not cover every column exactly once.
    """
    world, me = world_size(), rank()
    bounds = [width * r // world for r in range(world + 1)]
    lo, hi = bounds[me], bounds[me + 1]
    error: BaseException | None = None
    part = like.new_zeros(like.shape[0], 0)
    try:
        part = score_columns(lo, hi)
    except Exception as err:  # raised below on every rank together
        error = err
    fail_together(error, "scoring the candidates")
    columns = gather_uneven(torch.arange(lo, hi, device=like.device))
    ordered = columns.sort().values
    if ordered.numel() != width or not torch.equal(ordered.cpu(), torch.arange(width)):
        counts = torch.bincount(columns.cpu(), minlength=width)
        raise RuntimeError(
            f"parallel='repeats': candidate columns were not scored exactly once across {world} ranks "
            f"(duplicates at {(counts > 1).nonzero().reshape(-1)[:10].tolist()}, missing at "
            f"{(counts == 0).nonzero().reshape(-1)[:10].tolist()})"
        )
    gathered = gather_uneven(part.T.contiguous()).T  # [rows, width], columns in rank order
    return gathered[:, columns.argsort()]
