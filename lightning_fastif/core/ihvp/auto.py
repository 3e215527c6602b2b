"""``AutoInverse``: the exact solve where it fits, a certified LiSSA elsewhere; the diagnostics say which and why."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_fastif.core.hessian import HessianOperator
from lightning_fastif.core.ihvp.base import InverseHVP
from lightning_fastif.core.ihvp.direct import ExactInverse, exact_memory_bytes
from lightning_fastif.core.ihvp.lissa import LiSSA
from lightning_fastif.core.memory import available_memory, format_bytes
from lightning_fastif.errors import check_int

MEMORY_SHARE = 0.5
"""The share of the memory available now that the exact factorisation may take when no budget is given."""


class AutoInverse(InverseHVP):
    """Choose the estimator per system: :class:`ExactInverse` when the selected parameters are few enough and
    their Hessian fits in memory, else :class:`LiSSA` with its certified defaults.

    The exact solve is chosen when ``P <= max_params`` and its factorisation (``3·P²·8`` bytes) fits in half the
    operator's ``max_memory`` when a budget is set (the rest is for the chunks), else in half the memory available
    now (CUDA free memory on a CUDA device, ``MemAvailable`` on CPU). Its cost is ``P`` full-data Hessian-vector
    products once per weights, then nothing per test batch. Otherwise LiSSA runs with ``recursion_depth="auto"``
    and ``tail_fraction=0.5``, which certifies its residual at most ``tol`` (its defaults pass
    :func:`~lightning_fastif.core.verify.verify` on logistic regression, a tanh MLP and a small CNN). Both
    estimators are kept, so their per-system caches (factorisation, scale, depth, certificate) persist.

    ``diagnostics`` are those of the chosen estimator, with ``estimator="auto"``, ``chose`` (``"exact"`` or
    ``"lissa"``) and ``why``.

    Args:
        damping: λ ≥ 0.
        max_params: the largest ``P`` solved exactly.
        tol: the residual tolerance of the chosen estimator (``None``: its own default).
        residual_examples, strict, certify: passed to the chosen estimator (see
            :class:`~lightning_fastif.core.ihvp.InverseHVP`).
        seed: LiSSA's seed.

    Raises:
        ArgumentError: a bad argument (the message names it).

    Example::

        >>> AutoInverse(damping=0.01).settings()
        {'damping': 0.01, 'max_params': 5000, 'tol': None}
    """

    name = "auto"

    def __init__(
        self,
        damping: float = 0.01,
        *,
        max_params: int = 5000,
        tol: float | None = None,
        residual_examples: int | None = 2048,
        strict: bool = False,
        certify: str = "first",
        seed: int = 0,
    ) -> None:
        super().__init__(damping, tol=tol, residual_examples=residual_examples, strict=strict, certify=certify)
        self.max_params = check_int("max_params", max_params)
        self.seed = check_int("seed", seed, minimum=0)
        self._exact: ExactInverse | None = None
        self._lissa: LiSSA | None = None

    def settings(self) -> dict[str, Any]:
        return {"damping": self.damping, "max_params": self.max_params, "tol": self.tol}

    def reserved_bytes(self, num_params: int, max_memory: int | None = None) -> int:
        return exact_memory_bytes(num_params) if self._room(num_params, max_memory, None)[0] else 0

    def _room(self, p: int, max_memory: int | None, device: torch.device | None) -> tuple[bool, int, str]:
        """Whether the exact solve is chosen for ``P = p``, the memory it may take and where that comes from."""
        if max_memory is not None:
            room, where = int(MEMORY_SHARE * max_memory), f"half of max_memory={format_bytes(max_memory)}"
        else:
            room, where = int(MEMORY_SHARE * available_memory(device)), "half the available memory"
        return p <= self.max_params and exact_memory_bytes(p) <= room, room, where

    def choose(self, operator: HessianOperator) -> tuple[InverseHVP, str]:
        """The estimator for ``operator``'s system and the reason, without solving."""
        p = operator.num_params
        if p > self.max_params:
            return self._lissa_estimator(), f"P={p} > max_params={self.max_params}: LiSSA"
        needed = exact_memory_bytes(p)
        fits, room, where = self._room(p, operator.max_memory, operator.device)
        if not fits:
            return (
                self._lissa_estimator(),
                f"P={p} <= max_params but the exact factorisation needs {format_bytes(needed)} > {where} "
                f"({format_bytes(room)}): LiSSA",
            )
        return (
            self._exact_estimator(),
            f"P={p} <= max_params={self.max_params} and the factorisation ({format_bytes(needed)}) fits in {where}",
        )

    def _exact_estimator(self) -> ExactInverse:
        if self._exact is None or self._exact.damping != self.damping:
            self._exact = ExactInverse(self.damping, max_params=self.max_params, tol=self.tol)
        return self._exact

    def _lissa_estimator(self) -> LiSSA:
        if self._lissa is None or self._lissa.damping != self.damping:
            kwargs = {} if self.tol is None else {"tol": self.tol}
            self._lissa = LiSSA(self.damping, seed=self.seed, **kwargs)
        return self._lissa

    def _solve(self, operator: HessianOperator, v: Tensor) -> Tensor:
        inner, why = self.choose(operator)
        # Passed at every solve: InfluenceModule turns residual_examples off and on around a DDP solve.
        inner.residual_examples = self.residual_examples
        inner.strict, inner.certify = self.strict, self.certify
        x = inner.solve(operator, v)
        self.diagnostics = {**inner.diagnostics, "estimator": self.name, "chose": inner.name, "why": why}
        return x
