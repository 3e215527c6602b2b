"""K-FAC / EK-FAC factors for the estimators that use them: fitted once per system, or given by the caller.

:class:`FactorSource` is what :class:`~lightning_fastif.core.ekfac.EKFAC`, the preconditioned
:class:`~lightning_fastif.core.ihvp.ConjugateGradient` and the preconditioned :class:`~lightning_fastif.core.ihvp.LiSSA`
share: factors fitted from the operator's model, loss and training data on the first solve of a system (weights,
parameters, data, loss: :meth:`~lightning_fastif.core.hessian.HessianOperator.system_key`) and kept in the estimator's
per-system cache, or factors handed over by :meth:`~lightning_fastif.core.ihvp.InverseHVP.use_factors` (fitted
elsewhere, e.g. stored with a snapshot), which serve the next system instead of a fit. **The caller of
``use_factors`` is responsible for the factors matching the weights**: only the parameter names and shapes are
checked here, not the values they were fitted at.
"""

from __future__ import annotations

import time
from typing import Any

from lightning_fastif.core.curvature import KFACFactors, ekfac_correct, fit_kfac
from lightning_fastif.core.curvature_layers import escaped_names
from lightning_fastif.core.hessian import HessianOperator
from lightning_fastif.errors import ArgumentError, check_bool, check_choice, check_int

PRECONDITIONERS = ("ekfac", "kfac")
"""The curvature a preconditioned solver may use: EK-FAC (corrected eigenvalues) or plain K-FAC."""


def check_preconditioner(preconditioner: str | None, damping: float) -> str | None:
    """``preconditioner`` checked for a solver with this ``damping``: None, or one of :data:`PRECONDITIONERS` with
    ``damping > 0`` (the factors' inverse needs it).

    Raises:
        ArgumentError: an unknown preconditioner, or ``damping <= 0`` with one.

    Example::

        >>> check_preconditioner("ekfac", 0.1)
        'ekfac'
    """
    if preconditioner is None:
        return None
    check_choice("preconditioner", preconditioner, PRECONDITIONERS)
    if damping <= 0:
        raise ArgumentError(
            f"damping: expected a number > 0 with preconditioner={preconditioner!r} (the factors' inverse needs it), "
            f"got {damping!r}"
        )
    return preconditioner


def factors_for_operator(
    operator: HessianOperator, *, correct: bool = True, batch_size: int | None = None
) -> KFACFactors:
    """Fit the factors of ``operator``'s model, loss, parameters and training data (EK-FAC when ``correct``).

    ``batch_size`` defaults to the operator's chunk size.

    Example::

        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> net = torch.nn.Linear(2, 1).double()
        >>> data = TensorDataset(torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64))
        >>> op = HessianOperator(net, lambda m, b: ((m(b[0]) - b[1]) ** 2).sum(-1), data)
        >>> factors_for_operator(op).corrected
        True
    """
    function = operator.function
    size = operator.batch_size if batch_size is None else batch_size
    params = escaped_names(function.names)
    factors = fit_kfac(function.model, function.loss_fn, operator.data, params, batch_size=size)
    if correct:
        factors = ekfac_correct(factors, function.model, function.loss_fn, operator.data, batch_size=size)
    return factors


def complete_factors(
    factors: KFACFactors, operator: HessianOperator, *, correct: bool = True, batch_size: int | None = None
) -> KFACFactors:
    """Factors fitted elsewhere, made ready for ``operator``: checked against its parameter selection, moved to its
    device and, when ``correct`` and they hold K-FAC eigenvalues only, given the EK-FAC correction (one pass over
    the operator's training data, :func:`~lightning_fastif.core.curvature.ekfac_correct`).

    Raises:
        ArgumentError: the factors are not :class:`KFACFactors` or cover other parameters.
    """
    if not isinstance(factors, KFACFactors):
        raise ArgumentError(f"factors: expected KFACFactors (from fit_kfac or KFACFactors.load), got {factors!r}")
    function = operator.function
    factors.check_selection(function.names, [tuple(p.shape) for p in function.primals.values()])
    if factors.device != operator.device:
        factors = factors.to(operator.device)
    if correct and not factors.corrected:
        size = operator.batch_size if batch_size is None else batch_size
        factors = ekfac_correct(factors, function.model, function.loss_fn, operator.data, batch_size=size)
    return factors


class FactorSource:
    """The factors of an estimator's systems: given ones for the next system, else fitted once per system.

    Args:
        correct: EK-FAC eigenvalues (a second pass over the data when fitting, or when given factors lack them);
            ``False`` keeps K-FAC's.
        batch_size: examples per fitting pass (``None``: the operator's chunk size).

    Example::

        >>> FactorSource(correct=False).pending is None
        True
    """

    def __init__(self, correct: bool = True, batch_size: int | None = None) -> None:
        self.correct = check_bool("correct", correct)
        self.batch_size = check_int("batch_size", batch_size, allow_none=True)
        self.pending: KFACFactors | None = None

    def give(self, factors: KFACFactors) -> None:
        """Use ``factors`` for the next system solved, instead of fitting (see the module docstring).

        Raises:
            ArgumentError: ``factors`` is not :class:`KFACFactors`.
        """
        if not isinstance(factors, KFACFactors):
            raise ArgumentError(f"factors: expected KFACFactors (from fit_kfac or KFACFactors.load), got {factors!r}")
        self.pending = factors

    def factors(self, operator: HessianOperator, entry: dict[str, Any]) -> tuple[KFACFactors, str, float]:
        """``(factors, source, seconds)`` for ``operator``'s system, whose cache dict is ``entry``.

        ``source`` is ``"given"`` (handed over by :meth:`give`, now kept for this system), ``"cached"`` (an earlier
        solve of the system fitted or received them) or ``"fitted"``; ``seconds`` is the time spent here.
        """
        start = time.perf_counter()
        if self.pending is not None:
            given, self.pending = self.pending, None
            entry["factors"] = complete_factors(given, operator, correct=self.correct, batch_size=self.batch_size)
            return entry["factors"], "given", time.perf_counter() - start
        if "factors" in entry:
            return entry["factors"], "cached", 0.0
        entry["factors"] = factors_for_operator(operator, correct=self.correct, batch_size=self.batch_size)
        return entry["factors"], "fitted", time.perf_counter() - start
