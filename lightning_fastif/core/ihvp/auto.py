"""``AutoInverse``: the exact solve where it fits; elsewhere EK-FAC-preconditioned conjugate gradients when K-FAC
factors some selected layer, else a certified LiSSA; the diagnostics say which and why."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_fastif.core.curvature import KFACFactors
from lightning_fastif.core.curvature_layers import discover_layers
from lightning_fastif.core.hessian import HessianOperator
from lightning_fastif.core.ihvp.base import InverseHVP
from lightning_fastif.core.ihvp.direct import ConjugateGradient, ExactInverse, exact_memory_bytes
from lightning_fastif.core.ihvp.factored import PRECONDITIONERS
from lightning_fastif.core.ihvp.lissa import LiSSA
from lightning_fastif.core.memory import available_memory, format_bytes
from lightning_fastif.errors import ArgumentError, check_choice, check_int

MEMORY_SHARE = 0.5
"""The share of the memory available now that the exact factorisation may take when no budget is given."""


class AutoInverse(InverseHVP):
    """Choose the estimator per system: :class:`ExactInverse` when the selected parameters are few enough and
    their Hessian fits in memory; else :class:`ConjugateGradient` preconditioned by EK-FAC when K-FAC factors at
    least one selected layer (``Linear``, ``Conv2d``, ``Embedding``); else :class:`LiSSA` with its certified
    defaults.

    The exact solve is chosen when ``P <= max_params`` and its factorisation (``3·P²·8`` bytes) fits in half the
    operator's ``max_memory`` when a budget is set (the rest is for the chunks), else in half the memory available
    now (CUDA free memory on a CUDA device, ``MemAvailable`` on CPU). Its cost is ``P`` full-data Hessian-vector
    products once per weights, then nothing per test batch.

    Otherwise, with ``preconditioner="ekfac"`` (or ``"kfac"``), ``damping > 0``, at most ``cg_max_train``
    training examples and a factored layer among the selected parameters, conjugate gradients run on ``(H + λI)``
    itself, preconditioned by ``(G + λI)⁻¹`` with
    ``G`` the EK-FAC curvature (:func:`~lightning_fastif.core.ekfac.preconditioned_cg`): the factors are fitted
    once per weights (two passes over the training data, or given by :meth:`use_factors`), then each iteration is
    one full-data Hessian-vector product for all test vectors of a batch together, and the solve stops at the
    residual ``tol`` (certified over ``residual_examples`` on the first solve of a system, then by CG's own
    full-data recurrence residual). Near a minimum ``G`` resembles ``H`` and a few tens of iterations suffice,
    where LiSSA needs ``scale / λ`` minibatch steps. Parameters K-FAC does not factor get the diagonal empirical
    Fisher. A CG iteration is a pass over all ``N`` examples for every test batch, while LiSSA's cost does not
    grow with ``N`` (about 16k-30k example products per batch of test points on the benchmark MLP, depth and
    residual checks included), so beyond ``cg_max_train`` examples (or without a factored layer, or at
    ``damping=0``) LiSSA runs with ``recursion_depth="auto"`` and
    ``tail_fraction=0.5``, which certifies its residual at most ``tol``. Every estimator is kept, so its per-system
    caches (factorisation, factors, scale, depth, certificate) persist across test batches.

    ``diagnostics`` are those of the chosen estimator, with ``estimator="auto"``, ``chose`` (``"exact"``,
    ``"cg"`` or ``"lissa"``) and ``why``.

    Args:
        damping: λ ≥ 0.
        max_params: the largest ``P`` solved exactly.
        tol: the residual tolerance of the chosen estimator (``None``: its own default).
        residual_examples, strict, certify: passed to the chosen estimator (see
            :class:`~lightning_fastif.core.ihvp.InverseHVP`); CG, a full-data solve, checks its residual over all
            training examples unless ``residual_examples=0``.
        seed: LiSSA's seed.
        preconditioner: the preconditioner of CG beyond the exact solve: ``"ekfac"``, ``"kfac"``, or ``None``
            (LiSSA there, as before this option existed).
        max_iter: CG's iteration cap.
        cg_max_train: the largest ``N`` (training examples) solved by preconditioned CG; beyond it, LiSSA.

    Raises:
        ArgumentError: a bad argument (the message names it).

    Example::

        >>> AutoInverse(damping=0.01).settings()
        {'damping': 0.01, 'max_params': 5000, 'tol': None, 'preconditioner': 'ekfac'}
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
        preconditioner: str | None = "ekfac",
        max_iter: int = 200,
        cg_max_train: int = 2048,
    ) -> None:
        super().__init__(damping, tol=tol, residual_examples=residual_examples, strict=strict, certify=certify)
        self.max_params = check_int("max_params", max_params)
        self.seed = check_int("seed", seed, minimum=0)
        self.preconditioner = check_choice("preconditioner", preconditioner, (*PRECONDITIONERS, None))
        self.max_iter = check_int("max_iter", max_iter)
        self.cg_max_train = check_int("cg_max_train", cg_max_train, minimum=0)
        self._exact: ExactInverse | None = None
        self._lissa: LiSSA | None = None
        self._cg: ConjugateGradient | None = None
        self._given: KFACFactors | None = None

    def settings(self) -> dict[str, Any]:
        return {
            "damping": self.damping,
            "max_params": self.max_params,
            "tol": self.tol,
            "preconditioner": self.preconditioner,
        }

    def use_factors(self, factors: KFACFactors) -> bool:
        """Keep ``factors`` for the next system solved by preconditioned CG (see :meth:`InverseHVP.use_factors`);
        a system solved exactly does not need them and leaves them for the next one. ``False`` with
        ``preconditioner=None`` (no route uses factors)."""
        if self.preconditioner is None:
            return False
        if not isinstance(factors, KFACFactors):
            raise ArgumentError(f"factors: expected KFACFactors (from fit_kfac or KFACFactors.load), got {factors!r}")
        self._given = factors
        return True

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
            return self._iterative(operator, f"P={p} > max_params={self.max_params}")
        needed = exact_memory_bytes(p)
        fits, room, where = self._room(p, operator.max_memory, operator.device)
        if not fits:
            return self._iterative(
                operator,
                f"P={p} <= max_params but the exact factorisation needs {format_bytes(needed)} > {where} "
                f"({format_bytes(room)})",
            )
        return (
            self._exact_estimator(),
            f"P={p} <= max_params={self.max_params} and the factorisation ({format_bytes(needed)}) fits in {where}",
        )

    def _iterative(self, operator: HessianOperator, why: str) -> tuple[InverseHVP, str]:
        """Preconditioned CG when K-FAC factors a selected layer (and λ > 0), else LiSSA; ``why`` says which."""
        if self.preconditioner is None:
            return self._lissa_estimator(), f"{why}: LiSSA (preconditioner=None)"
        if self.damping <= 0:
            return self._lissa_estimator(), f"{why}: LiSSA (damping=0: the {self.preconditioner} inverse needs λ > 0)"
        if operator.num_train > self.cg_max_train:
            return (
                self._lissa_estimator(),
                f"{why}: LiSSA (N={operator.num_train} > cg_max_train={self.cg_max_train}: a CG iteration is a pass "
                "over all N examples)",
            )
        function = operator.function
        layers, _, unsupported = discover_layers(function.model, function.primals)
        if not layers:
            return self._lissa_estimator(), f"{why}: LiSSA (no selected layer K-FAC factors: Linear, Conv2d, Embedding)"
        shapes = dict(zip(function.names, (p.numel() for p in function.primals.values()), strict=True))
        covered = operator.num_params - sum(shapes[n] for n in unsupported)
        return (
            self._cg_estimator(),
            f"{why}: {self.preconditioner}-preconditioned CG ({len(layers)} factored layers cover {covered} of "
            f"{operator.num_params} parameters)",
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

    def _cg_estimator(self) -> ConjugateGradient:
        cg = self._cg
        if cg is None or (cg.damping, cg.preconditioner, cg.max_iter) != (
            self.damping,
            self.preconditioner,
            self.max_iter,
        ):
            # residual_examples as AutoInverse's (2048 by default, not CG's all-N): the first solve's certificate.
            cg = ConjugateGradient(
                self.damping, max_iter=self.max_iter, tol=self.tol, preconditioner=self.preconditioner
            )
            self._cg = cg
        return cg

    def _solve(self, operator: HessianOperator, v: Tensor) -> Tensor:
        inner, why = self.choose(operator)
        # Passed at every solve: InfluenceModule turns residual_examples off and on around a DDP solve.
        inner.residual_examples = self.residual_examples
        if inner is self._cg and self.residual_examples != 0:
            # CG solves the full-data system: a subsample's Hessian would measure the subsample's distance from it
            # (0.12 at N=20k on the benchmark MLP), not the solve. Over all N the check is one more CG iteration.
            inner.residual_examples = None
        inner.strict, inner.certify, inner.progress = self.strict, self.certify, self.progress
        if self._given is not None and inner is self._cg:  # handed over here, not in choose(), which only looks
            inner.use_factors(self._given)
            self._given = None
        x = inner.solve(operator, v)
        self.diagnostics = {**inner.diagnostics, "estimator": self.name, "chose": inner.name, "why": why}
        return x
