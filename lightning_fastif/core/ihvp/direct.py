"""The deterministic estimators: :class:`Identity` (no solve), :class:`ExactInverse` (a factorised explicit Hessian)
and :class:`ConjugateGradient` (full-data Hessian-vector products)."""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from torch import Tensor

from lightning_fastif.core.curvature import KFACFactors
from lightning_fastif.core.hessian import HessianOperator
from lightning_fastif.core.ihvp.base import (
    InverseHVP,
    damping_message,
    iteration_bar,
    lowest_eigenvalue,
    relative_residual,
    residual_count,
    suggest_damping,
)
from lightning_fastif.core.ihvp.factored import FactorSource, check_preconditioner
from lightning_fastif.core.ihvp.ordered import SizeOrdered, active_product, size_order
from lightning_fastif.core.memory import format_bytes
from lightning_fastif.errors import ArgumentError, MemoryBudgetError, check_int


class Identity(InverseHVP):
    """``x = v``: influence becomes the plain gradient dot product ``g_testᵀ g_train`` (TracIn at one checkpoint).

    Not a solve of ``(H + λI)x = v``, so nothing is certified: ``converged`` and ``residual`` are ``None``.

    Example::

        >>> Identity().settings()
        {'damping': 0.0}
    """

    name = "identity"

    def __init__(self) -> None:
        super().__init__(0.0, residual_examples=0)

    def _solve(self, operator: HessianOperator, v: Tensor) -> Tensor:
        return v.clone()


def exact_memory_bytes(num_params: int) -> int:
    """Peak bytes of :class:`ExactInverse`'s factorisation: the Hessian in float64, ``H + λI`` and its factor."""
    return 3 * num_params * num_params * 8


class ExactInverse(InverseHVP):
    """The explicit Hessian of the mean training loss and a linear solve: exact, for small parameter counts.

    The Hessian (``P`` full-data products) and its factorisation (Cholesky, in float64) are computed once per
    system (weights, parameters, data, loss, damping) and reused by every later solve: all test batches and every
    chunk of self-influence pay for one factorisation. ``H + λI`` must be invertible; when it is indefinite (damping
    below ``|λ_min|``) it is still solved exactly, by LU, with a warning naming ``damping``, ``λ_min`` and a damping
    that would make it positive definite (``strict=True`` raises instead).

    Args:
        damping: λ ≥ 0.
        max_params: refuse parameter counts above this (the Hessian takes ``P²`` memory and ``P`` data passes).
        tol: the residual a solve must reach (``None``: 1e-6 in float64, 1e-3 in float32, 0.1 below).
        residual_examples: training examples of the residual check (``None``: all, about ``V / P`` of the cost
            of building the Hessian; ``0``: off).
        strict: raise instead of warning (non-convergence, an indefinite system).
        certify: ``"first"`` or ``"every"`` (see :class:`~lightning_fastif.core.ihvp.InverseHVP`).

    Raises:
        ArgumentError: a bad argument; at solve time, a singular ``H + λI`` (naming ``damping``, ``λ_min`` and a
            value that works) or too many parameters (naming ``max_params``).
        MemoryBudgetError: the operator's ``max_memory`` cannot hold the factorisation.

    Example::

        >>> ExactInverse(damping=0.01).settings()
        {'damping': 0.01, 'max_params': 5000}
    """

    name = "exact"
    cache_size = 1  # a P×P factor per system: keep one

    def __init__(
        self,
        damping: float = 0.0,
        *,
        max_params: int = 5000,
        tol: float | None = None,
        residual_examples: int | None = None,
        strict: bool = False,
        certify: str = "first",
    ) -> None:
        super().__init__(damping, tol=tol, residual_examples=residual_examples, strict=strict, certify=certify)
        self.max_params = check_int("max_params", max_params)

    def settings(self) -> dict[str, Any]:
        return {"damping": self.damping, "max_params": self.max_params}

    def remedy(self) -> str:
        return "the Hessian is badly conditioned at this precision: raise damping or use float64"

    def reserved_bytes(self, num_params: int, max_memory: int | None = None) -> int:
        return exact_memory_bytes(num_params)

    def _solve(self, operator: HessianOperator, v: Tensor) -> Tensor:
        entry = self._entry(operator)
        self.diagnostics["factorised"] = "factor" not in entry
        if "factor" not in entry:
            entry.update(self._factorise(operator))
        kind, factor = entry["factor"]
        self.diagnostics.update({k: entry[k] for k in ("factorisation", "factorise_seconds", "min_eigenvalue")})
        rhs = v.T.to(torch.float64)
        x = torch.cholesky_solve(rhs, factor) if kind == "cholesky" else torch.linalg.lu_solve(*factor, rhs)
        self.diagnostics["iterations"] = 1
        return x.T.to(v.dtype)

    def _factorise(self, operator: HessianOperator) -> dict[str, Any]:
        start = time.perf_counter()
        p = operator.num_params
        if p > self.max_params:
            operator.dense(self.max_params)  # raises, naming max_params
        needed = exact_memory_bytes(p)
        if operator.max_memory is not None and needed > operator.max_memory:
            raise MemoryBudgetError(
                f"max_memory: {format_bytes(operator.max_memory)} cannot hold ExactInverse's factorisation of the "
                f"{p}×{p} Hessian, which alone needs {format_bytes(needed)}; raise max_memory above that (plus the "
                "rest of the plan), select fewer parameters, or use LiSSA / ConjugateGradient / AutoInverse"
            )
        a = operator.dense(self.max_params, cache=False).to(torch.float64, copy=True)  # the operator may cache H
        a.diagonal().add_(self.damping)
        factor, info = torch.linalg.cholesky_ex(a)
        source_eps = torch.finfo(operator.dtype).eps
        if int(info) == 0:
            # (min/max pivot)² screens the condition number: far from singular, the Cholesky factor is the answer.
            pivots = factor.diagonal()
            ratio = float((pivots.min() / pivots.max()) ** 2)
            if ratio > 1e3 * source_eps:
                return {
                    "factor": ("cholesky", factor),
                    "factorisation": "cholesky",
                    "factorise_seconds": time.perf_counter() - start,
                    "min_eigenvalue": None,
                }
        # Not (numerically) positive definite: the spectrum says whether it is singular or indefinite.
        eigenvalues = torch.linalg.eigvalsh(a) - self.damping
        lowest, highest = float(eigenvalues.min()), float(eigenvalues.max())
        shifted = (eigenvalues + self.damping).abs()
        # Eigenvalues within rounding of H's entries (computed at the model's precision) of zero: singular.
        singular = float(shifted.min()) <= 10 * source_eps * float(shifted.max())
        if not singular and lowest + self.damping > 0:  # positive definite, only badly conditioned
            kind, value = ("cholesky", factor) if int(info) == 0 else ("lu", torch.linalg.lu_factor(a))
            return {
                "factor": (kind, value),
                "factorisation": kind,
                "factorise_seconds": time.perf_counter() - start,
                "min_eigenvalue": lowest,
            }
        if singular:
            raise ArgumentError(
                f"damping: expected a value that makes H + damping·I invertible (the Hessian's eigenvalues span "
                f"[{lowest:.3g}, {highest:.3g}]; H + {self.damping:g}·I is singular at this precision), got "
                f"{self.damping:g}; damping={suggest_damping(lowest, highest):g} would work"
            )
        message = "ExactInverse: H + damping·I is indefinite, solved exactly by LU; " + damping_message(
            self.damping, lowest, highest, how="exact"
        )
        if self.strict:
            raise ArgumentError(message)
        warnings.warn(message, UserWarning, stacklevel=5)
        return {
            "factor": ("lu", torch.linalg.lu_factor(a)),
            "factorisation": "lu (indefinite)",
            "factorise_seconds": time.perf_counter() - start,
            "min_eigenvalue": lowest,
        }


def negative_curvature_message(damping: float, p: Tensor, pap: Tensor, active: Tensor) -> str:
    """``damping: expected ...``: a CG search direction ``p`` (rows of ``[V, P]``) with ``pᵀ(H + λI)p ≤ 0``.

    The Rayleigh quotient ``R = pᵀHp / pᵀp`` of the worst active row bounds the Hessian's lowest eigenvalue from
    above (``λ_min ≤ R``), so a working damping exceeds ``-R``; the value suggested is twice that
    (:func:`~lightning_fastif.core.ihvp.base.suggest_damping`), a first try rather than a guarantee (``λ_min``
    may be lower still). Costs nothing: no product beyond the iteration's.

    Example::

        >>> p = torch.tensor([[1.0, 0.0]])
        >>> negative_curvature_message(0.01, p, torch.tensor([-0.49]), torch.tensor([True]))[-60:]
        'damping must exceed 0.5; try damping=1 (or more if it fails)'
    """
    row = int(torch.where(active, pap, torch.full_like(pap, float("inf"))).argmin())
    direction = p[row]
    rayleigh = float(pap[row] / (direction @ direction).clamp_min(torch.finfo(p.dtype).tiny)) - damping
    return (
        f"damping: expected a damping that makes H + λI positive definite, got {damping!r} (a search direction has "
        f"curvature {float(pap[row]):.3g}: the Hessian is indefinite here, with an eigenvalue at most {rayleigh:.3g}, "
        f"its Rayleigh quotient along that direction); damping must exceed {max(-rayleigh, 0.0):.3g}; try "
        f"damping={suggest_damping(rayleigh):g} (or more if it fails)"
    )


class ConjugateGradient(InverseHVP):
    """Conjugate gradients on ``(H + λI) x = v``, one full-data HVP per iteration, all vectors at once.

    Needs ``H + λI`` positive definite: a direction of non-positive curvature raises an :class:`ArgumentError`
    naming ``damping``, the estimated ``λ_min`` and a damping that would work.

    Every full-data product (the iterations and the certificate's) runs over chunks of similar-sized examples
    (:mod:`~lightning_fastif.core.ihvp.ordered`: the size of each example's own collated batch, found once per
    system), so a collate that pads each chunk to its longest example pads little; the sums are over the same
    examples, only their rounding differs. ``diagnostics["chunks"]`` says ``"by example size"`` or, when every
    example has the same size, ``"dataset order"`` (products unchanged). A row (test point) that has reached ``tol``
    takes no part in the next products (:func:`~lightning_fastif.core.ihvp.ordered.active_product`): a product
    costs about one backward pass per row.

    Args:
        damping: λ ≥ 0.
        max_iter: iteration cap (at most ``P`` are needed in exact arithmetic).
        tol: stop when every ``‖r‖ / ‖v‖`` is at most it; also the certificate's tolerance (``None``: 1e-6 in
            float64, 1e-3 in float32, 0.1 below).
        residual_examples: training examples of the residual check (``None``: all, one more iteration's cost).
        strict, certify: see :class:`~lightning_fastif.core.ihvp.InverseHVP`. Solves after the first report
            their own recurrence residual (over all examples, free) next to the first solve's measured one.
        preconditioner: ``None`` (plain CG) or ``"ekfac"``: EK-FAC factors of the selected parameters
            (:mod:`lightning_fastif.core.curvature`), fitted once per weights in one pass over the training data,
            precondition the iteration, so it reaches the same tolerance in fewer Hessian-vector products
            (:func:`~lightning_fastif.core.ekfac.preconditioned_cg`). ``"kfac"`` skips the eigenvalue correction.

    Example::

        >>> ConjugateGradient(damping=0.01, max_iter=50).settings()
        {'damping': 0.01, 'max_iter': 50, 'tol': None}
    """

    name = "cg"

    def __init__(
        self,
        damping: float = 0.01,
        *,
        max_iter: int = 100,
        tol: float | None = None,
        residual_examples: int | None = None,
        strict: bool = False,
        certify: str = "first",
        preconditioner: str | None = None,
    ) -> None:
        super().__init__(damping, tol=tol, residual_examples=residual_examples, strict=strict, certify=certify)
        self.max_iter = check_int("max_iter", max_iter)
        self.preconditioner = check_preconditioner(preconditioner, self.damping)
        self._source = FactorSource(correct=preconditioner != "kfac")

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"damping": self.damping, "max_iter": self.max_iter, "tol": self.tol}
        if self.preconditioner is not None:
            out["preconditioner"] = self.preconditioner
        return out

    def remedy(self) -> str:
        return f"raise max_iter (now {self.max_iter}) or damping (now {self.damping:g})"

    def _solve(self, operator: HessianOperator, v: Tensor) -> Tensor:
        tol = self.diagnostics["tol"]
        entry = self._entry(operator)
        if "order" not in entry:  # once per system: one collate per example, no model call
            entry["order"] = size_order(operator.data)
        ordered = SizeOrdered(operator, *entry["order"])
        self.diagnostics["chunks"] = "dataset order" if ordered.order is None else "by example size"
        if self.preconditioner is not None:
            x = self._preconditioned_solve(ordered, v, tol, entry)
        else:
            x = self._plain_solve(ordered, v, tol)
        self._measure_residual(ordered, x, v, entry)
        return x

    def _measure_residual(self, ordered: SizeOrdered, x: Tensor, v: Tensor, entry: dict[str, Any]) -> None:
        """The certificate's residual, measured here when the base class would (the first solve of a system, or
        every solve with ``certify="every"``), so that its product runs over the size-ordered chunks too."""
        if self.residual_examples == 0 or (self.certify == "first" and "certified" in entry):
            return
        residual = relative_residual(ordered, x, v, self.damping, num_examples=self.residual_examples)  # type: ignore[arg-type]
        self.diagnostics["residual"] = float(residual.max())
        self.diagnostics["residual_examples"] = residual_count(ordered.operator, self.residual_examples)

    def _plain_solve(self, operator: SizeOrdered, v: Tensor, tol: float) -> Tensor:
        tiny = torch.finfo(v.dtype).tiny
        x = torch.zeros_like(v)
        r = v.clone()
        p = r.clone()
        rs = torch.einsum("vp,vp->v", r, r)
        v_norm = v.norm(dim=-1).clamp_min(tiny)
        iterations = 0
        bar = iteration_bar(self.progress, self.max_iter, "fastif: CG")
        # Updates in place: CG's state is five [V, P] arrays, and temporaries of that size would break a budget.
        for iterations in range(1, self.max_iter + 1):  # noqa: B007 - reported below
            active = rs.sqrt() / v_norm > tol
            ap = active_product(operator, p, self.damping, active)  # converged rows take no product
            pap = torch.einsum("vp,vp->v", p, ap)
            if bool((pap[active] <= 0).any()):
                self._not_positive_definite(operator, p, pap, active)
            alpha = torch.where(active, rs / pap.clamp_min(tiny), torch.zeros_like(rs))[:, None]
            x.addcmul_(alpha, p)
            r.addcmul_(alpha, ap, value=-1.0)
            del ap
            rs_new = torch.einsum("vp,vp->v", r, r)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(residual=f"{float((rs_new.sqrt() / v_norm).max()):.3g}")
            if bool((rs_new.sqrt() / v_norm <= tol).all()):
                rs = rs_new
                break
            p.mul_((rs_new / rs.clamp_min(tiny))[:, None]).add_(r)
            rs = rs_new
        if bar is not None:
            bar.close()
        self.diagnostics["iterations"] = iterations
        self.diagnostics["recurrence_residual"] = float((rs.sqrt() / v_norm).max())
        return x

    def use_factors(self, factors: KFACFactors) -> bool:
        """With a preconditioner, use ``factors`` for the next system instead of fitting (see
        :meth:`InverseHVP.use_factors`); plain CG uses no factors and returns ``False``."""
        if self.preconditioner is None:
            return False
        self._source.give(factors)
        return True

    def _preconditioned_solve(self, operator: SizeOrdered, v: Tensor, tol: float, entry: dict[str, Any]) -> Tensor:
        # Imported here: core.ekfac builds on this package (its EKFAC is an InverseHVP).
        from lightning_fastif.core.ekfac import KFACPreconditioner, preconditioned_cg

        factors, source, seconds = self._source.factors(operator.operator, entry)
        self.diagnostics.update(preconditioner_fit_seconds=seconds, factors_from=source)
        info: dict[str, Any] = {}
        x, iterations = preconditioned_cg(
            operator,  # type: ignore[arg-type]
            v,
            self.damping,
            KFACPreconditioner(factors, self.damping),
            tol,
            self.max_iter,
            progress=self.progress,
            info=info,
        )
        self.diagnostics["iterations"] = iterations
        self.diagnostics["recurrence_residual"] = info["residual"]
        return x

    def _not_positive_definite(self, operator: SizeOrdered, p: Tensor, pap: Tensor, active: Tensor) -> None:
        """Raise naming damping: ``p`` is a direction of curvature ``pᵀ(H + λI)p ≤ 0``, refined to ``λ_min``."""
        row = int(torch.where(active, pap, torch.full_like(pap, float("inf"))).argmin())
        direction = p[row]
        rayleigh = float(pap[row] / (direction @ direction)) - self.damping
        estimate = lowest_eigenvalue(operator, num_examples=None, start=direction)  # type: ignore[arg-type]
        lowest = min(rayleigh, estimate["min_eigenvalue"])
        raise ArgumentError(damping_message(self.damping, lowest, estimate["max_eigenvalue"]))
