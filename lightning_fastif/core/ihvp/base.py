"""The estimator interface, certified solves, and the per-system cache every estimator pays its fixed costs into.

A solve is *certified*: ``converged`` means the relative residual ``‖(H + λI)x − v‖ / ‖v‖`` (the largest over the
``V`` vectors, or over ``residual_vectors`` of them evenly spaced when ``V`` is larger) is at most ``tol`` over a
stated set of training examples (``residual_examples`` in the diagnostics: the whole training set, or a fixed random
sample of it). On a sample, the residual of even an exact
solve is not zero (``H`` over the sample is not ``H``): the sample residual overstates the full one on average, so
a certified solve is never a false pass. The residual is measured on the first solve of a system (same weights,
parameters, data, loss and settings) and reused by later ones, whose diagnostics say ``residual_from: "first
solve"`` (``certify="every"`` measures every solve). The certificate describes the system (later solves reuse it for
other vectors), so a sample of the vectors measures it: ``V`` Hessian-vector products over the sample would otherwise
cost a batch of 100 test points more than the solve itself. A solve that misses ``tol`` warns, naming the estimator, the
residual, the tolerance and the setting to change; ``strict=True`` raises :class:`ConvergenceError` instead.
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_fastif.core.grads import check_finite
from lightning_fastif.core.hessian import HessianOperator
from lightning_fastif.errors import ArgumentError, ConvergenceError, check_bool, check_choice, check_int, check_number

if TYPE_CHECKING:
    from lightning_fastif.core.curvature_factors import KFACFactors

RESIDUAL_SEED = 12345
"""Seeds the residual sample, so every check of a run uses the same training examples."""

DEFAULT_TOL = {torch.float64: 1e-6, torch.float32: 1e-3}
"""``tol=None`` of the direct solvers, by dtype: what their arithmetic (and the residual's own) reaches."""
LOW_PRECISION_TOL = 1e-1

RESIDUAL_VECTORS = 8
"""The certificate's default number of vectors: the residual of at most this many rows of a solve, evenly spaced."""


def relative_residual(
    operator: HessianOperator,
    x: Tensor,
    v: Tensor,
    damping: float,
    *,
    num_examples: int | None = 2048,
    seed: int = RESIDUAL_SEED,
) -> Tensor:
    """``‖(H + λI)x − v‖ / ‖v‖`` per vector, with ``H`` over up to ``num_examples`` random training examples.

    When the training set has at most ``num_examples`` points (or ``num_examples`` is ``None``), ``H`` is the
    full-data Hessian and the residual is exact. Returns a ``[V]`` tensor.

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> net = torch.nn.Linear(2, 1, bias=False).double()
        >>> data = TensorDataset(torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
        >>> op = HessianOperator(net, lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2, data)  # H = I
        >>> v = torch.ones(1, 2, dtype=torch.float64)
        >>> relative_residual(op, v / 2, v, 1.0)  # (I + I) v/2 = v
        tensor([0.], dtype=torch.float64)
    """
    indices = residual_indices(operator, num_examples, seed)
    r = operator.matvec(x, indices).add_(x, alpha=damping).sub_(v)  # in place: no [V, P] temporaries
    return r.norm(dim=-1) / v.norm(dim=-1).clamp_min(torch.finfo(v.dtype).tiny)


def residual_indices(operator: HessianOperator, num_examples: int | None, seed: int = RESIDUAL_SEED) -> Tensor | None:
    """The training examples of a residual check: ``None`` (all) or a fixed random sample of ``num_examples``."""
    n = operator.num_train
    if num_examples is None or num_examples >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:num_examples]


def residual_rows(num_vectors: int, limit: int | None) -> Tensor | None:
    """The rows a certificate measures: ``None`` (all ``num_vectors``) or ``limit`` of them, evenly spaced.

    Example::

        >>> residual_rows(100, 4).tolist(), residual_rows(3, 4)
        ([0, 33, 66, 99], None)
    """
    if limit is None or num_vectors <= limit:
        return None
    return torch.linspace(0, num_vectors - 1, limit, dtype=torch.float64).round().long()


def residual_count(operator: HessianOperator, num_examples: int | None) -> int:
    """How many training examples a residual check over ``num_examples`` uses."""
    return operator.num_train if num_examples is None else min(num_examples, operator.num_train)


def suggest_damping(min_eigenvalue: float, max_eigenvalue: float = 0.0) -> float:
    """A damping that makes ``H + λI`` comfortably positive definite: twice ``|λ_min|`` (the estimate may be a
    little above the true λ_min), at least ``1e-4 · λ_max``, rounded up to two significant digits.

    Example::

        >>> suggest_damping(-0.0312)
        0.063
    """
    value = max(2.0 * abs(min_eigenvalue), 1e-4 * abs(max_eigenvalue), 1e-8)
    step = 10.0 ** (math.floor(math.log10(value)) - 1)
    return round(math.ceil(round(value / step, 6)) * step, 12)


def damping_message(damping: float, min_eigenvalue: float, max_eigenvalue: float = 0.0, how: str = "estimated") -> str:
    """``damping: expected ... got ...``: damping below the Hessian's most negative eigenvalue, and one that works."""
    return (
        f"damping: expected a value above {max(-min_eigenvalue, 0.0):.3g} (the {how} most negative eigenvalue of the "
        f"Hessian is {min_eigenvalue:.3g}, so H + damping·I is not positive definite and the model is not convex "
        f"here), got {damping:g}; damping={suggest_damping(min_eigenvalue, max_eigenvalue):g} would work"
    )


def lowest_eigenvalue(
    operator: HessianOperator,
    *,
    num_examples: int | None = 512,
    iterations: int = 40,
    seed: int = RESIDUAL_SEED,
    start: Tensor | None = None,
) -> dict[str, float]:
    """Estimate the extreme eigenvalues of ``H`` (over up to ``num_examples`` training examples) by power iteration.

    ``λ_max`` by power iteration on ``H``, then ``λ_min`` by power iteration on ``shift·I − H`` (``shift`` just above
    ``|λ|_max``, so its dominant eigenvalue is ``shift − λ_min``). The returned ``min_eigenvalue`` is a Rayleigh
    quotient, so it is at least the true ``λ_min`` (it may understate how negative the spectrum goes). Costs
    ``iterations + 15`` products over the sample: the error path of the estimators calls it, not every solve.

    Returns:
        ``{"min_eigenvalue", "max_eigenvalue", "examples", "seconds"}``.
    """
    begin = time.perf_counter()
    indices = residual_indices(operator, num_examples, seed)
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(operator.num_params, generator=g, dtype=torch.float64).to(operator.device, operator.dtype)
    first = first / first.norm()
    vec, top = first, 0.0
    for _ in range(15):
        hv = operator.matvec(vec, indices)
        top = float(hv.norm())
        if top == 0.0:
            break
        vec = hv / top
    shift = 1.05 * top + 1e-12
    # A fresh start (not the top eigenvector, which is an eigenvector of shift·I − H too and would stay put).
    vec = start.reshape(-1).to(operator.device, operator.dtype) if start is not None else first
    vec = vec / vec.norm().clamp_min(torch.finfo(vec.dtype).tiny)
    for _ in range(iterations):
        w = shift * vec - operator.matvec(vec, indices)
        norm = float(w.norm())
        if norm == 0.0:
            break
        vec = w / norm
    lowest = float(vec @ operator.matvec(vec, indices))
    return {
        "min_eigenvalue": lowest,
        "max_eigenvalue": top,
        "examples": residual_count(operator, num_examples),
        "seconds": time.perf_counter() - begin,
    }


def iteration_bar(enabled: bool, total: int, description: str) -> Any:
    """A tqdm bar over a solver's iterations, or ``None`` when progress is off (tqdm is imported only then)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, leave=False, unit="step")


class SystemCache:
    """What an estimator computed for one system (``H`` and the estimator's settings), for its later solves.

    Keyed on :meth:`HessianOperator.system_key` (weights by storage, version counter and checksum; data; loss) and
    the estimator's settings, never on the operator object: every test batch builds a new operator over the same
    system. A few systems are kept, least recently used first out (several checkpoints of one run alternate).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[Any, tuple[Any, dict[str, Any]]] = OrderedDict()

    def entry(self, operator: HessianOperator, settings: Any) -> dict[str, Any]:
        """The (possibly new, empty) dict of values for ``operator``'s system under ``settings``."""
        key = (operator.system_key(), settings)
        dataset = operator.data.dataset
        found = self._entries.get(key)
        # The dataset enters the key by id(); the weak reference rules out a new dataset at a recycled address.
        if found is not None and (found[0] is None or found[0]() is dataset):
            self._entries.move_to_end(key)
            return found[1]
        try:
            ref: Any = weakref.ref(dataset)
        except TypeError:
            ref = None
        entry: dict[str, Any] = {}
        self._entries[key] = (ref, entry)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return entry

    def clear(self) -> None:
        """Forget every system."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class InverseHVP(ABC):
    """Interface of the inverse-HVP estimators: ``solve(operator, vectors) -> (H + λI)⁻¹ vectors``.

    Args:
        damping: λ ≥ 0, added to the Hessian's diagonal.
        tol: the relative residual at most which a solve counts as converged (``None``: the estimator's default).
        residual_examples: training examples of the residual check (``None``: all; ``0`` turns the check off, and
            ``converged`` is then ``None``: not measured).
        strict: raise :class:`ConvergenceError` when a solve misses ``tol``, instead of warning.
        certify: ``"first"`` measures the residual on the first solve of a system and reuses it for later solves
            of the same system; ``"every"`` measures every solve.
        residual_vectors: how many of a solve's vectors the residual check measures, evenly spaced rows
            (``None``: all; the check costs one Hessian-vector product per vector over ``residual_examples``).

    Raises:
        ArgumentError: an argument out of range (the message names it).
    """

    name = "base"
    cache_size = 8

    def __init__(
        self,
        damping: float = 0.0,
        *,
        tol: float | None = None,
        residual_examples: int | None = 2048,
        strict: bool = False,
        certify: str = "first",
        residual_vectors: int | None = RESIDUAL_VECTORS,
    ) -> None:
        self.damping = float(check_number("damping", damping, low=0))
        self.tol = check_number("tol", tol, low=0, low_open=True, allow_none=True)
        self.residual_examples = check_int("residual_examples", residual_examples, minimum=0, allow_none=True)
        self.strict = check_bool("strict", strict)
        self.certify = check_choice("certify", certify, ("first", "every"))
        self.residual_vectors = check_int("residual_vectors", residual_vectors, allow_none=True)
        self.diagnostics: dict[str, Any] = {}
        self.progress = False
        """Show a progress bar over the iterations of each solve (set by ``InfluenceModule`` when the Trainer's
        progress bar is on); it never changes the result."""
        self._cache = SystemCache(self.cache_size)

    # -- the template every estimator follows -------------------------------------------------------------------
    def solve(self, operator: HessianOperator, vectors: Tensor) -> Tensor:
        """Return ``(H + λI)⁻¹ v`` for each row of ``vectors`` ``[V, P]`` (or a single ``[P]`` vector).

        Raises:
            ArgumentError: ``vectors`` do not match the operator's parameters.
            NonFiniteError: the vectors, a product or the solution hold NaN or infinite values.
            ConvergenceError: with ``strict=True``, the solve missed ``tol``.
        """
        squeeze = vectors.dim() == 1
        v = (vectors.unsqueeze(0) if squeeze else vectors).to(operator.device, operator.dtype)
        if v.shape[-1] != operator.num_params:
            raise ArgumentError(
                f"vectors: expected a last dimension of {operator.num_params} (the selected parameters), got "
                f"{v.shape[-1]}"
            )
        check_finite(v, "the vectors", rows="rows")
        start = time.perf_counter()
        self.diagnostics = {"estimator": self.name, **self.settings(), "tol": self.resolved_tol(operator)}
        x = self._solve(operator, v)
        check_finite(x, f"the {type(self).__name__} solution", rows="rows")
        if "converged" not in self.diagnostics:  # AutoInverse's chosen estimator certified itself
            self._certify(operator, x, v)
        self.diagnostics["seconds"] = time.perf_counter() - start
        return x[0] if squeeze else x

    @abstractmethod
    def _solve(self, operator: HessianOperator, v: Tensor) -> Tensor: ...

    def settings(self) -> dict[str, Any]:
        """The estimator's settings, as plain values."""
        return {"damping": self.damping}

    def resolved_tol(self, operator: HessianOperator) -> float:
        """``tol``, or the estimator's default for the operator's dtype."""
        if self.tol is not None:
            return self.tol
        return DEFAULT_TOL.get(operator.dtype, LOW_PRECISION_TOL)

    def remedy(self) -> str:
        """The setting to change when a solve misses ``tol`` (named in the warning)."""
        return "raise damping"

    def use_factors(self, factors: KFACFactors) -> bool:
        """Offer K-FAC / EK-FAC factors fitted elsewhere (e.g. stored with a snapshot) for the next system solved.

        An estimator that uses factors (:class:`~lightning_fastif.core.ekfac.EKFAC`, a preconditioned
        :class:`~lightning_fastif.core.ihvp.ConjugateGradient` or :class:`~lightning_fastif.core.ihvp.LiSSA`,
        :class:`~lightning_fastif.core.ihvp.AutoInverse`) keeps them and uses them for the next system it solves
        instead of fitting its own; they are then cached for that system (weights, parameters, data, loss) like
        fitted ones. **The caller is responsible for the factors matching the weights of that system**: only the
        parameter names and shapes are checked (at the solve), not the values the factors were fitted at. Factors
        without the EK-FAC correction are corrected at the solve when the estimator asks for EK-FAC.

        Args:
            factors: :class:`~lightning_fastif.core.curvature.KFACFactors` over the estimator's parameter selection.

        Returns:
            ``True`` when the estimator will use them, ``False`` when it uses no factors (this default).

        Example::

            >>> from lightning_fastif.core.ihvp import Identity
            >>> Identity().use_factors(None)
            False
        """
        return False

    def reserved_bytes(self, num_params: int, max_memory: int | None = None) -> int:
        """Bytes this estimator keeps for a whole run beyond the per-chunk work of a memory plan (``0``: none).

        Args:
            num_params: ``P``.
            max_memory: the run's budget, for estimators whose choice depends on it.
        """
        return 0

    def _entry(self, operator: HessianOperator) -> dict[str, Any]:
        """This estimator's cached values for ``operator``'s system (see :class:`SystemCache`)."""
        return self._cache.entry(operator, tuple(sorted((k, repr(v)) for k, v in self.settings().items())))

    # -- certification -----------------------------------------------------------------------------------------
    def _certify(self, operator: HessianOperator, x: Tensor, v: Tensor) -> None:
        d = self.diagnostics
        tol = d["tol"]
        if self.residual_examples == 0:
            d.update(converged=None, residual=None, residual_examples=0, residual_from="off")
            return
        entry = self._entry(operator)
        if "residual" in d:  # measured by the solver itself on this solve's answer
            residual, examples, source = d["residual"], d["residual_examples"], "this solve"
        elif self.certify == "every" or "certified" not in entry:
            rows = residual_rows(v.shape[0], self.residual_vectors)
            if rows is not None:
                x, v = x[rows.to(x.device)], v[rows.to(v.device)]
            residual = float(relative_residual(operator, x, v, self.damping, num_examples=self.residual_examples).max())
            examples, source = residual_count(operator, self.residual_examples), "this solve"
            d["residual_vectors"] = v.shape[0]
        else:
            residual, examples = entry["certified"]
            source = "first solve"
        converged = residual <= tol
        if source == "this solve":
            entry["certified"] = (residual, examples)
        recurrence = d.get("recurrence_residual")
        if source == "first solve" and recurrence is not None:
            # CG's own residual of this solve (all N examples, no extra product) on top of the first certificate.
            converged = converged and recurrence <= tol
            residual, source = max(residual, recurrence), "first solve and this solve's recurrence"
        d.update(converged=converged, residual=residual, residual_examples=examples, residual_from=source)
        if not converged:
            self._not_converged(operator, x, v)
            message = (
                f"{type(self).__name__}: the solve did not converge: relative residual ‖(H + λI)x − v‖/‖v‖ = "
                f"{residual:.3g} > tol={tol:g} over {examples} training examples ({source}); {self.remedy()}"
            )
            if self.strict:
                raise ConvergenceError(message)
            warnings.warn(message, UserWarning, stacklevel=4)

    def _not_converged(self, operator: HessianOperator, x: Tensor, v: Tensor) -> None:
        """Called before the warning: an estimator raises here when it knows the solve cannot converge at all."""

    # -- copies drop the cache: it holds large tensors and describes the original's systems ---------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cache = SystemCache(self.cache_size)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"
