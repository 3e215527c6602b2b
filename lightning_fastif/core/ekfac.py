"""EK-FAC behind the inverse-HVP interface, and as a preconditioner of conjugate gradients on the true Hessian.

:class:`EKFAC` answers ``(G + λI)⁻¹ v`` with ``G`` the EK-FAC approximation of the empirical Fisher
(:mod:`lightning_fastif.core.curvature`), not the Hessian: two passes over the training data fit it (once per model
weights and parameter selection, cached), after which a solve costs a few small matrix products per layer, whatever
the number of training examples. The residual it reports is measured against the Hessian, so it shows how far the
approximation is from the exact inverse.

:func:`preconditioned_cg` solves ``(H + λI) x = v`` with the Hessian itself, to CG's tolerance, with a
preconditioner such as :class:`KFACPreconditioner`: when ``G`` resembles ``H`` (a model near a minimum) it needs
far fewer Hessian-vector products than plain CG. This module imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_fastif.core.curvature import KFACFactors, fit_kfac  # noqa: F401 - the doctests use fit_kfac
from lightning_fastif.core.hessian import HessianOperator
from lightning_fastif.core.ihvp import InverseHVP
from lightning_fastif.core.ihvp.base import RESIDUAL_VECTORS, iteration_bar
from lightning_fastif.core.ihvp.direct import negative_curvature_message
from lightning_fastif.core.ihvp.factored import FactorSource, complete_factors, factors_for_operator
from lightning_fastif.core.ihvp.ordered import active_product
from lightning_fastif.errors import ArgumentError, check_bool, check_int, check_number

__all__ = ["EKFAC", "KFACPreconditioner", "factors_for_operator", "preconditioned_cg"]

Preconditioner = Callable[[Tensor], Tensor]
"""``M(r [V, P]) -> [V, P]``: applies a symmetric positive-definite approximation of ``(H + λI)⁻¹``."""


class EKFAC(InverseHVP):
    """``(G + λI)⁻¹ v`` with ``G`` the EK-FAC (or K-FAC) curvature: inverse HVPs at the cost of a few matmuls.

    Without ``factors`` they are fitted on first use from the operator's model, loss and training data, and kept
    for the next solves of the same system (weights by storage, version counter and checksum; parameters; data;
    loss: :class:`~lightning_fastif.core.ihvp.SystemCache`). Factors handed over by :meth:`use_factors` serve the
    next system instead of a fit. Parameters no layer covers use the diagonal empirical Fisher (see
    :mod:`lightning_fastif.core.curvature`).

    Args:
        damping: λ > 0.
        factors: precomputed :class:`~lightning_fastif.core.curvature.KFACFactors` (e.g. ``KFACFactors.load``)
            used for every system; they must cover the operator's parameter selection.
        correct: fit EK-FAC eigenvalues (a second data pass); ``False`` keeps K-FAC's.
        batch_size: examples per fitting pass (default: the operator's chunk size).
        residual_examples: training examples of the residual check (``0`` turns it off).
        residual_vectors: how many of a solve's vectors the residual check measures (evenly spaced rows; ``None``:
            all). The check is one Hessian-vector product per vector over ``residual_examples``: with all of a batch
            of 100 test points it costs several times the solve.

    After :meth:`solve`, ``diagnostics`` holds ``estimator``, ``damping``, ``layers`` (factored layers),
    ``unsupported`` (parameter names on the diagonal fallback), ``fit_seconds`` (0 when the factors were given
    or cached), ``cached``, ``factors_from`` (``"constructor"``, ``"given"``, ``"cached"`` or ``"fitted"``),
    ``seconds`` and ``residual``.

    Example::

        >>> EKFAC(damping=0.1).settings()
        {'damping': 0.1, 'correct': True, 'batch_size': None}
    """

    name = "ekfac"

    def __init__(
        self,
        damping: float = 0.01,
        factors: KFACFactors | None = None,
        *,
        correct: bool = True,
        batch_size: int | None = None,
        residual_examples: int | None = 2048,
        residual_vectors: int | None = RESIDUAL_VECTORS,
    ) -> None:
        check_number("damping", damping, low=0, low_open=True)
        if factors is not None and not isinstance(factors, KFACFactors):
            raise ArgumentError(f"factors: expected None or KFACFactors, got {factors!r}")
        self.correct = check_bool("correct", correct)
        self.batch_size = check_int("batch_size", batch_size, allow_none=True)
        super().__init__(damping, residual_examples=residual_examples, residual_vectors=residual_vectors)
        self.factors = factors
        self._source = FactorSource(self.correct, self.batch_size)

    def settings(self) -> dict[str, Any]:
        return {"damping": self.damping, "correct": self.correct, "batch_size": self.batch_size}

    def use_factors(self, factors: KFACFactors) -> bool:
        self._source.give(factors)
        return True

    def factors_for(self, operator: HessianOperator) -> KFACFactors:
        """The factors used for ``operator``: the constructor's, given, cached or freshly fitted ones."""
        self.diagnostics.update(fit_seconds=0.0, cached=False)
        if self.factors is not None:
            self.diagnostics["factors_from"] = "constructor"
            return complete_factors(self.factors, operator, correct=False)
        factors, source, seconds = self._source.factors(operator, self._entry(operator))
        self.diagnostics.update(fit_seconds=seconds if source == "fitted" else 0.0, cached=source == "cached")
        self.diagnostics["factors_from"] = source
        return factors

    def _solve(self, operator: HessianOperator, v: Tensor) -> Tensor:
        factors = self.factors_for(operator)
        self.diagnostics.update(layers=len(factors.layers), unsupported=list(factors.unsupported))
        return factors.inverse_apply(v, self.damping).to(v.dtype)


class KFACPreconditioner:
    """``v ↦ (G + λI)⁻¹ v`` with K-FAC/EK-FAC factors, as a preconditioner for :func:`preconditioned_cg`.

    Args:
        factors: fitted factors over the solver's parameter selection.
        damping: λ > 0, normally the solver's own damping.

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> net = torch.nn.Linear(2, 1).double()
        >>> data = TensorDataset(torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64))
        >>> mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).sum(-1)
        >>> KFACPreconditioner(fit_kfac(net, mse, data), damping=0.1)(torch.ones(2, 3, dtype=torch.float64)).shape
        torch.Size([2, 3])
    """

    def __init__(self, factors: KFACFactors, damping: float) -> None:
        if not isinstance(factors, KFACFactors):
            raise ArgumentError(f"factors: expected KFACFactors, got {factors!r}")
        self.factors = factors
        self.damping = check_number("damping", damping, low=0, low_open=True)

    @classmethod
    def fit(
        cls, operator: HessianOperator, damping: float, *, correct: bool = True, batch_size: int | None = None
    ) -> KFACPreconditioner:
        """Fit the factors for ``operator`` (see :func:`factors_for_operator`) and wrap them."""
        return cls(factors_for_operator(operator, correct=correct, batch_size=batch_size), damping)

    def __call__(self, vectors: Tensor) -> Tensor:
        return self.factors.inverse_apply(vectors, self.damping).to(vectors.dtype)


def preconditioned_cg(
    operator: HessianOperator,
    vectors: Tensor,
    damping: float,
    preconditioner: Preconditioner | None = None,
    tol: float = 1e-6,
    max_iter: int = 100,
    *,
    progress: bool = False,
    info: dict[str, Any] | None = None,
) -> tuple[Tensor, int]:
    """Solve ``(H + λI) x = v`` for every row of ``vectors`` ``[V, P]`` by preconditioned conjugate gradients.

    One full-data Hessian-vector product and one preconditioner application per iteration, all vectors at once.
    Stops when every ``‖r‖ / ‖v‖ ≤ tol`` (the true residual, not the preconditioned one). ``preconditioner=None``
    is plain CG.

    Args:
        operator: the Hessian of the mean training loss.
        vectors: right-hand sides ``[V, P]`` (or one ``[P]``).
        damping: λ ≥ 0.
        preconditioner: ``M(r)`` approximating ``(H + λI)⁻¹ r``, symmetric positive definite
            (:class:`KFACPreconditioner`), or ``None``.
        tol: relative residual to reach.
        max_iter: iteration cap.
        progress: show a tqdm bar with the iteration and the current largest relative residual.
        info: when given, receives ``"residual"``: the largest final ``‖r‖ / ‖v‖`` of the recurrence.

    Returns:
        ``(x, iterations)``.

    Raises:
        ArgumentError: a bad argument, or ``H + λI`` is not positive definite along a search direction (the message
            asks for more damping).

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> net = torch.nn.Linear(2, 1, bias=False).double()
        >>> data = TensorDataset(torch.eye(2, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64))
        >>> op = HessianOperator(net, lambda m, b: ((m(b[0]) - b[1]) ** 2).sum(-1), data)
        >>> x, iterations = preconditioned_cg(op, torch.ones(1, 2, dtype=torch.float64), damping=1.0)
        >>> x, iterations
        (tensor([[0.5000, 0.5000]], dtype=torch.float64), 1)
    """
    lam = check_number("damping", damping, low=0)
    tol = check_number("tol", tol, low=0, low_open=True)
    max_iter = check_int("max_iter", max_iter)
    if preconditioner is not None and not callable(preconditioner):
        raise ArgumentError(f"preconditioner: expected None or a callable M(r) -> [V, P], got {preconditioner!r}")
    if not isinstance(vectors, Tensor) or vectors.dim() not in (1, 2) or vectors.shape[-1] != operator.num_params:
        shape = tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
        raise ArgumentError(f"vectors: expected a tensor [V, {operator.num_params}], got {shape}")
    squeeze = vectors.dim() == 1
    v = (vectors.unsqueeze(0) if squeeze else vectors).to(operator.device, operator.dtype)
    tiny = torch.finfo(v.dtype).tiny
    v_norm = v.norm(dim=-1).clamp_min(tiny)
    x = torch.zeros_like(v)
    r = v.clone()
    z = r.clone() if preconditioner is None else preconditioner(r)
    p = z.clone()
    rz = (r * z).sum(-1)
    iterations = 0
    relative = r.norm(dim=-1) / v_norm
    bar = iteration_bar(progress, max_iter, "fastif: preconditioned CG")
    # One HVP over the training data per iteration for all V columns: the test points of a batch share each pass.
    while bool((relative > tol).any()) and iterations < max_iter:
        iterations += 1
        active = relative > tol
        ap = active_product(operator, p, lam, active)  # converged rows take no product
        pap = (p * ap).sum(-1)
        if bool((pap[active] <= 0).any()):
            if bar is not None:
                bar.close()
            raise ArgumentError(negative_curvature_message(lam, p, pap, active))
        alpha = torch.where(active, rz / pap.clamp_min(tiny), torch.zeros_like(rz))[:, None]
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1.0)
        del ap
        z = r.clone() if preconditioner is None else preconditioner(r)
        rz_new = (r * z).sum(-1)
        beta = torch.where(active, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
        p = z + beta[:, None] * p  # z may be the preconditioner's own buffer: no in-place update
        rz = rz_new
        relative = r.norm(dim=-1) / v_norm
        if bar is not None:
            bar.update(1)
            bar.set_postfix(residual=f"{float(relative.max()):.3g}")
    if bar is not None:
        bar.close()
    if info is not None:
        info["residual"] = float(relative.max())
    return (x[0] if squeeze else x), iterations
