"""LiSSA's stopping rules: the search for a certified depth, and the divergence monitor of the recursion."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_fastif.core.hessian import HessianOperator
from lightning_fastif.core.ihvp.base import relative_residual

if TYPE_CHECKING:
    from lightning_fastif.core.ihvp.lissa import LiSSA

__all__ = ["BLOCK", "GROWTH_LIMIT", "STALL_CHECKS", "STALL_RATIO", "DepthSearch", "GrowthMonitor"]

BLOCK = 16
"""Steps per block of the divergence monitor (one device synchronisation per block)."""
GROWTH_LIMIT = 4.0
"""A stable recursion at most doubles its (block-mean) norm from step ``j/2`` to ``j``; four times is divergence."""
STALL_RATIO = 0.9
"""Past the depth theory asks for, a check that does not beat the best residual so far by 10% made no progress."""
STALL_CHECKS = 2
"""Checks in a row without progress (each doubling the steps) after which the depth search has stalled: one alone
can be minibatch noise (the residual of a tail mean moves by ±30% between doublings on a small MLP)."""


class DepthSearch:
    """The checkpoint callback of ``recursion_depth="auto"``: measure the residual, then stop, stall or go on."""

    def __init__(self, estimator: LiSSA, operator: HessianOperator, v: Tensor, theory: int) -> None:
        self.estimator, self.operator, self.v, self.theory = estimator, operator, v, theory
        self.checks: list[tuple[int, float]] = []
        self.best = math.inf
        self.best_x: Tensor | None = None
        self.best_step = 0
        self.idle = 0

    def reset(self) -> None:
        """Forget the checks of a diverged attempt (the retry starts over with twice the scale)."""
        self.checks.clear()
        self.best, self.best_x, self.best_step, self.idle = math.inf, None, 0, 0

    def __call__(self, step: int, x: Tensor) -> str | None:
        est = self.estimator
        residual = float(
            relative_residual(self.operator, x, self.v, est.damping, num_examples=est.residual_examples).max()
        )
        self.checks.append((step, residual))
        progress = residual <= STALL_RATIO * self.best
        if residual < self.best:  # an uncertified search returns its best estimate, not its last
            self.best, self.best_x, self.best_step = residual, x, step
        if residual <= est.tol:
            return "tol"
        self.idle = 0 if progress or step < self.theory else self.idle + 1
        if self.idle >= STALL_CHECKS:
            return "stalled"
        return "max_depth" if step >= est.max_depth else None


class GrowthMonitor:
    """Norms of LiSSA's iterate per block of :data:`BLOCK` steps; one device synchronisation per block.

    At each block end: the norms must be finite, within the linear bound ``1.5·(j + 1)·‖v‖`` (each step adds ``v``
    to a map of norm ≤ 1 while the recursion contracts), and the block-mean norm at most :data:`GROWTH_LIMIT` times
    the one at half the steps (the mean of a stable recursion's partial sums at most doubles from ``j/2`` to ``j``;
    geometric growth at rate ``ρ`` multiplies it by ``ρ^(j/2)``, which passes 4 within a few hundred steps at
    ``ρ = 1.01``).
    """

    def __init__(self, v: Tensor, steps: int) -> None:
        self.v_norm = v.norm(dim=-1)
        self.means = torch.zeros(steps // BLOCK + 2, v.shape[0], dtype=v.dtype, device=v.device)
        self.sum = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
        self.peak = torch.zeros_like(self.sum)
        self._samples: list[Tensor] = []

    def observe(self, h: Tensor, step: int, sample: Tensor | None) -> str | None:
        norm = h.norm(dim=-1)
        self.sum += norm
        torch.maximum(self.peak, norm, out=self.peak)
        if sample is not None:
            self._samples.append(sample)
        if step % BLOCK:
            return None
        k = step // BLOCK
        self.means[k] = self.sum / BLOCK
        earlier = self.means[(k + 1) // 2].clamp_min(torch.finfo(h.dtype).tiny)
        ratio = (self.means[k] / earlier).max() if k >= 4 else torch.zeros((), dtype=h.dtype, device=h.device)
        over = (self.peak / (self.v_norm * (step + 1.0)).clamp_min(torch.finfo(h.dtype).tiny)).max()
        finite, over_v, ratio_v = torch.stack([torch.isfinite(self.peak).all().to(h.dtype), over, ratio]).tolist()
        self.sum.zero_()
        self.peak.zero_()
        if not finite or not math.isfinite(over_v):
            return "non-finite"
        self._samples.clear()
        if over_v > 1.5:
            return "norm above the linear bound"
        if ratio_v > GROWTH_LIMIT:
            return f"norm grew {ratio_v:.3g}x from step {BLOCK * ((k + 1) // 2)} to {step}"
        return None

    def samples(self) -> Tensor:
        """The training examples drawn in the current block."""
        return torch.cat(self._samples) if self._samples else torch.zeros(0, dtype=torch.long)

    def culprits(self, operator: HessianOperator) -> bool:
        """Whether a training example drawn in this block has a non-finite loss or gradient (or the weights do)."""
        if not operator.function.parameters_finite():
            return True
        for _, batch in operator.data.chunks(operator.batch_size, self.samples().unique()):
            if operator.function.non_finite_examples(batch).numel():
                return True
        return False
