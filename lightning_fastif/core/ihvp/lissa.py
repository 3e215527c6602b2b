"""LiSSA: FastIF's stochastic Neumann-series estimator, with a certified depth and a divergence monitor."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
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
    residual_count,
)
from lightning_fastif.core.ihvp.factored import FactorSource, check_preconditioner
from lightning_fastif.core.ihvp.lissa_monitors import BLOCK, DepthSearch, GrowthMonitor
from lightning_fastif.errors import ArgumentError, LiSSADivergenceError, check_int, check_number

Checkpoint = Callable[[int, Tensor], "str | None"]
"""Called with ``(steps, estimate)`` at each checkpoint; returns why to stop there, or ``None`` to go on."""


class LiSSA(InverseHVP):
    """FastIF's tuned LiSSA: a stochastic Neumann-series recursion over random training minibatches.

    Each repeat runs ``h ← v + (1 − damp)·h − H_batch·h / scale`` and returns ``h / scale`` (or the mean of its last
    iterates); repeats are averaged. The recursion converges to ``(H + scale·damp·I)⁻¹ v``. **Our ``damping`` is
    that effective λ**: the reference code's ``damp`` equals ``damping / scale`` here, so the reference setting
    ``damp=5e-3, scale=1e4`` is ``LiSSA(damping=50, scale=1e4)``. The recursion needs ``scale`` above the largest
    eigenvalue of the minibatch Hessians; ``scale="auto"`` estimates it by power iteration on ``scale_batches``
    random batches of ``batch_size``, times ``scale_safety``, once per system (weights, parameters, data: later
    test batches reuse it). Convergence takes about ``scale / (λ_min(H) + damping)`` steps.

    ``recursion_depth="auto"`` (the default) *certifies* its depth: the first solve of a system measures the residual
    ``‖(H + λI)x − v‖/‖v‖`` over ``residual_examples`` training examples at doubling depths and stops at the first
    one at most ``tol``; later solves of the same system run that depth and reuse the certificate. It stops
    uncertified at ``max_depth``, or when, past the depth theory asks for (``scale / damping · ln(1/tol)`` steps
    for a convex model, over ``1 − tail_fraction``), two doublings in a row fail to lower the best residual by 10%
    (the minibatch-noise floor: raise ``batch_size``, ``num_repeats`` or ``tail_fraction``). ``tol=0.2`` by
    default: at that residual the scores correlated at 0.99 or more with exact ones on logistic regression, a tanh
    MLP and a small CNN (``tests/test_ihvp_auto.py``). With the residual check off (``residual_examples=0``) it
    runs the depth theory asks for. Every solve ends with ``converged`` (residual ≤ ``tol``), ``residual``,
    ``residual_examples`` and ``residual_from``; a solve that misses ``tol`` warns (``strict=True``: raises).

    The last iterate carries the minibatch noise of the last few hundred steps; ``tail_fraction`` returns the mean
    of the last ``tail_fraction`` of the iterates instead (Polyak-Ruppert averaging; ``0.5`` by default): once the
    recursion is stationary their mean is the same fixed point with much less noise (on L2-regularised logistic
    regression at ``batch_size=8``: residual 0.70 for the last iterate after 1000 steps, 0.19 for the mean of the
    last half after 756).

    Divergence is caught two ways, at the end of every block of 16 steps: the norm exceeds the linear bound
    ``1.5·(j + 1)·‖v‖`` a contraction allows, or the block-mean norm grew more than four-fold since step ``j/2``
    (a stable recursion at most doubles it there), which catches geometric growth as slow as 1.01× per step within
    a few hundred steps. Slower growth than that shows as a failed certificate; either way, when the Hessian's
    estimated ``λ_min`` is below ``-damping`` the error names ``damping``, ``λ_min`` and a damping that works.

    Args:
        damping: λ ≥ 0 (effective damping, see above).
        scale: a number > 0, or ``"auto"``.
        recursion_depth: steps per repeat, or ``"auto"`` (see above).
        num_repeats: independent recursions averaged.
        batch_size: training examples per HVP.
        seed: seeds the minibatch draws (repeat ``r`` uses ``seed + r``), so results are reproducible.
        tol: the residual a solve must reach to count as converged (and where ``"auto"`` depth stops).
        max_depth: the most steps ``"auto"`` depth takes.
        tail_fraction: in ``[0, 1)``; ``0`` returns the last iterate (FastIF's reference), else the mean of the last
            ``ceil(tail_fraction · depth)`` iterates (same cost).
        scale_safety, scale_batches, power_iterations: the ``scale="auto"`` estimate (see above).
        scale_retries: with ``scale="auto"``, how many times a diverging repeat restarts with twice the scale (a
            rare minibatch can have a larger top eigenvalue than the batches the estimate saw).
        residual_examples: training examples of the residual check (``None``: all; ``0`` turns it off).
        strict: raise :class:`~lightning_fastif.errors.ConvergenceError` instead of warning.
        certify: ``"first"`` (measure once per system) or ``"every"`` solve.
        preconditioner: ``None`` (plain LiSSA), ``"ekfac"`` or ``"kfac"``: run the recursion on the preconditioned
            system ``M^{1/2}(H + λI)M^{1/2} y = M^{1/2} v`` (``x = M^{1/2} y``) with ``M = (G + λI)⁻¹`` from the
            EK-FAC (or K-FAC) factors of the selected parameters, fitted once per system (or handed over by
            :meth:`use_factors`); cf. ASTRA (arXiv 2507.14740). Its eigenvalues cluster near 1 where ``G`` resembles
            ``H``, so ``scale`` is a few units and the depth falls from ``scale / λ`` towards tens of steps. Needs
            ``damping > 0``; the depth search checks first after 32 steps. The certificate is unchanged.

    After :meth:`solve`, ``diagnostics`` holds the settings *as used* (``scale`` is the number chosen), ``auto``
    (the settings that were ``"auto"``), ``scale_estimate`` (eigenvalue, per-batch values, batches, seconds,
    ``cached``), ``iterations`` (steps per repeat), ``depth_from`` (``"fixed"``, ``"search"``, ``"first solve"`` or
    ``"theory"``), ``stopped_by`` (``"depth"``, ``"tol"``, ``"stalled"``, ``"max_depth"``), ``checks`` (the
    ``(steps, residual)`` pairs of the depth search; an uncertified search returns the estimate of its best check,
    whose steps are ``depth``), ``converged``, ``residual``, ``residual_examples``, ``residual_from`` and
    ``seconds``.

    Raises:
        ArgumentError: a bad argument (the message names it).
        LiSSADivergenceError: the recursion diverged, or cannot converge (damping below ``|λ_min|``); never NaN.
        NonFiniteError: a minibatch holds an example with a NaN or infinite loss or gradient (named).

    Example::

        >>> LiSSA(damping=0.01, scale=10.0, recursion_depth=100).settings()["scale"]
        10.0
    """

    name = "lissa"

    def __init__(
        self,
        damping: float = 0.01,
        scale: float | str = "auto",
        recursion_depth: int | str = "auto",
        num_repeats: int = 1,
        batch_size: int = 8,
        seed: int = 0,
        *,
        tol: float = 0.2,
        max_depth: int = 10000,
        tail_fraction: float = 0.5,
        scale_safety: float = 1.5,
        scale_retries: int = 3,
        scale_batches: int = 8,
        power_iterations: int = 20,
        residual_examples: int | None = 2048,
        strict: bool = False,
        certify: str = "first",
        preconditioner: str | None = None,
    ) -> None:
        super().__init__(damping, tol=tol, residual_examples=residual_examples, strict=strict, certify=certify)
        self.preconditioner = check_preconditioner(preconditioner, self.damping)
        self._source = FactorSource(correct=preconditioner != "kfac")
        self._root: Callable[[Tensor], Tensor] | None = None  # M^{1/2} during a preconditioned solve
        if tol is None:
            raise ArgumentError(f"tol: expected a finite number > 0, got {tol!r}")
        self.scale: float | str = _number_or_auto(
            "scale", scale, lambda x: check_number("scale", x, low=0, low_open=True)
        )
        self.recursion_depth: int | str = _number_or_auto(
            "recursion_depth", recursion_depth, lambda x: check_int("recursion_depth", x)
        )
        self.num_repeats = check_int("num_repeats", num_repeats)
        self.batch_size = check_int("batch_size", batch_size)
        self.seed = check_int("seed", seed, minimum=0)
        self.max_depth = check_int("max_depth", max_depth)
        self.tail_fraction = check_number("tail_fraction", tail_fraction, low=0, high=1, high_open=True)
        self.scale_safety = check_number("scale_safety", scale_safety, low=1)
        self.scale_retries = check_int("scale_retries", scale_retries, minimum=0)
        self.scale_batches = check_int("scale_batches", scale_batches)
        self.power_iterations = check_int("power_iterations", power_iterations)
        self._reused_scale: float | None = None
        self._repeats: list[int] = list(range(self.num_repeats))

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "damping": self.damping,
            "scale": self.scale,
            "recursion_depth": self.recursion_depth,
            "num_repeats": self.num_repeats,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "tol": self.tol,
        }
        if self.recursion_depth == "auto":
            out["max_depth"] = self.max_depth
        if self.tail_fraction:
            out["tail_fraction"] = self.tail_fraction
        if self.preconditioner is not None:
            out["preconditioner"] = self.preconditioner
        return out

    def use_factors(self, factors: KFACFactors) -> bool:
        """With a preconditioner, use ``factors`` for the next system instead of fitting (see
        :meth:`InverseHVP.use_factors`); plain LiSSA uses no factors and returns ``False``."""
        if self.preconditioner is None:
            return False
        self._source.give(factors)
        return True

    def remedy(self) -> str:
        stop = self.diagnostics.get("stopped_by")
        if stop == "stalled":
            return (
                "the residual stopped falling (minibatch noise): raise batch_size, num_repeats or tail_fraction, or "
                "raise tol"
            )
        if self.recursion_depth == "auto":
            return f"raise max_depth (now {self.max_depth}) or damping (now {self.damping:g})"
        return f"raise recursion_depth (now {self.recursion_depth}) or use recursion_depth='auto'"

    # -- scale ----------------------------------------------------------------------------------------------------
    def estimate_top_eigenvalue(self, operator: HessianOperator) -> dict[str, Any]:
        """Power iteration on ``scale_batches`` random minibatch Hessians (``batch_size`` examples each).

        Returns ``{"eigenvalue": max |λ| found, "per_batch": [...], "signed_min": the most negative Rayleigh
        quotient found (negative when a batch's dominant eigenvalue is negative), "batches": n, "seconds": t}``.
        Deterministic for a given ``seed``, so every DDP rank finds the same value.

        Raises:
            NonFiniteError: a minibatch's product is not finite (naming its training examples).
        """
        start = time.perf_counter()
        g = torch.Generator().manual_seed(self.seed + 7919)
        found, signed = [], []
        for _ in range(self.scale_batches):
            batch = operator.sample(self.batch_size, g)
            vec = torch.randn(operator.num_params, generator=g, dtype=torch.float64).to(operator.device, operator.dtype)
            vec /= vec.norm()
            value, rayleigh = 0.0, 0.0
            for _ in range(self.power_iterations):
                hv = self._product(operator, batch, vec)
                rayleigh = float(vec @ hv)
                value = float(hv.norm())
                if not math.isfinite(value):
                    raise operator.non_finite_error("LiSSA's scale estimate", operator.last_sample)
                if value == 0.0:
                    break
                vec = hv / value
            found.append(value)
            signed.append(rayleigh)
        return {
            "eigenvalue": max(found),
            "per_batch": found,
            "signed_min": min(signed),
            "batches": self.scale_batches,
            "seconds": time.perf_counter() - start,
        }

    def resolve_scale(self, operator: HessianOperator, entry: dict[str, Any] | None = None) -> float:
        """The scale to use: the fixed value, or ``scale_safety × (top minibatch eigenvalue + damping)``.

        The ``"auto"`` estimate is made once per system and reused by every later solve on it, whatever operator
        object carries it; ``diagnostics["scale_estimate"]["cached"]`` says which.
        """
        if self.scale != "auto":
            return float(self.scale)
        if self._reused_scale is not None:
            self.diagnostics["scale_estimate"] = {"reused": self._reused_scale}
            return self._reused_scale
        entry = self._entry(operator) if entry is None else entry
        if "scale" not in entry:
            est = self.estimate_top_eigenvalue(operator)
            # The preconditioned product already holds the damping (M^{1/2}(H_B + λI)M^{1/2}).
            scale = self.scale_safety * (est["eigenvalue"] + (0.0 if self._root is not None else self.damping))
            entry["scale"] = scale if scale > 0 else 1.0  # a zero Hessian: any scale converges
            entry["scale_estimate"] = est
            self.diagnostics["scale_estimate"] = {**est, "cached": False}
        else:
            self.diagnostics["scale_estimate"] = {**entry["scale_estimate"], "cached": True}
        return entry["scale"]

    def reusing_scale(self, scale: float) -> LiSSA:
        """A copy that skips the ``"auto"`` power iterations and starts from ``scale`` (still doubling it on a
        divergence). For many solves on a slowly changing model, e.g. the steps of an error correction."""
        other = copy.copy(self)
        other.diagnostics = {}
        other._reused_scale = float(check_number("scale", scale, low=0, low_open=True))
        return other

    # -- the solve -------------------------------------------------------------------------------------------------
    def solve(self, operator: HessianOperator, vectors: Tensor, repeats: Sequence[int] | None = None) -> Tensor:
        """``(H + λI)⁻¹ v`` averaged over ``repeats`` (default: all ``num_repeats``).

        Under FastIF's parallel variant each rank passes its own share of repeat ids and the means are combined by
        an all-reduce; repeat ``r`` always draws the same minibatches, so the combined result equals one process's.
        """
        self._repeats = list(range(self.num_repeats)) if repeats is None else list(repeats)
        if not self._repeats:
            raise ArgumentError("repeats: expected at least one repeat id, got []")
        return super().solve(operator, vectors)

    def theory_depth(self, scale: float) -> int:
        """Steps after which the slowest direction of a convex model (curvature ``damping``) is within ``tol``: the
        tail starts at ``(1 − tail_fraction)·depth`` and needs ``scale / damping · ln(1/tol)`` steps before it."""
        if self.damping <= 0:
            return self.max_depth
        # Preconditioned, the smallest eigenvalue of M^{1/2}(H + λI)M^{1/2} is unknown; a good preconditioner puts
        # it near 1, which is what this assumes (it sets where the stall test starts, or the depth unchecked).
        smallest = 1.0 if self._root is not None else self.damping
        need = scale / smallest * math.log(1.0 / min(self.tol, 0.5)) / (1.0 - self.tail_fraction)
        return int(min(self.max_depth, max(BLOCK, math.ceil(need))))

    def _solve(self, operator: HessianOperator, v: Tensor) -> Tensor:
        if self.preconditioner is None:
            return self._solve_system(operator, v, v)
        factors, source, seconds = self._source.factors(operator, self._entry(operator))
        self.diagnostics.update(preconditioner_fit_seconds=seconds, factors_from=source)

        def root(t: Tensor) -> Tensor:
            return factors.inverse_sqrt_apply(t, self.damping).to(t.dtype)

        # Neumann series on the symmetric system M^{1/2}(H + λI)M^{1/2} y = M^{1/2} v, x = M^{1/2} y: the
        # recursion, its scale and its divergence monitor stay Euclidean, and each estimate is mapped back to x.
        self._root = root
        try:
            return self._solve_system(operator, v, root(v))
        finally:
            self._root = None

    def _solve_system(self, operator: HessianOperator, v: Tensor, rhs: Tensor) -> Tensor:
        """The recursion on ``rhs`` (``v``, or ``M^{1/2} v`` preconditioned); estimates and checks are of ``x``."""
        entry = self._entry(operator)
        d = self.diagnostics
        scale = self.resolve_scale(operator, entry)
        d["auto"] = [k for k in ("scale", "recursion_depth") if getattr(self, k) == "auto"]
        search: DepthSearch | None = None
        if self.recursion_depth != "auto":
            depth, source = int(self.recursion_depth), "fixed"
        elif "depth" in entry:
            depth, source = entry["depth"], "first solve"
        elif self.residual_examples != 0:
            depth, source = self.max_depth, "search"
            search = DepthSearch(self, operator, v, self.theory_depth(scale))
        else:
            depth, source = self.theory_depth(scale), "theory"
        stop = "depth"
        total = torch.zeros_like(v)
        steps, scales = [], []
        for position, r in enumerate(self._repeats):
            if search is not None and position == 0:
                x, used, stop, used_scale = self._with_retries(operator, rhs, scale, r, None, search)
                if stop != "tol" and search.best_x is not None:
                    x = search.best_x
                depth = search.best_step if stop != "tol" else used
                entry["depth"] = depth
                if len(self._repeats) == 1:  # a check measured exactly the answer returned
                    d["residual"] = search.best
                    d["residual_examples"] = residual_count(operator, self.residual_examples)
            else:
                x, used, _, used_scale = self._with_retries(operator, rhs, scale, r, depth, None)
            if used_scale != scale and self.scale == "auto" and self._reused_scale is None:
                entry["scale"] = max(entry.get("scale", scale), used_scale)
            total += x
            steps.append(used)
            scales.append(used_scale)
        if any(s != scale for s in scales):
            d["scale"] = max(scales)
            d["scale_per_repeat"] = scales
        else:
            d["scale"] = scale
        d.update(iterations=steps, depth=depth, repeats=self._repeats, depth_from=source, stopped_by=stop)
        if search is not None:
            d["checks"] = search.checks
        return total / len(self._repeats)

    def _checkpoints(self, operator: HessianOperator, depth: int | None) -> list[int]:
        """A fixed depth, or the doubling depths of the search (the first costs about as many minibatch products as
        one residual check, so checks never cost more than the steps between them)."""
        if depth is not None:
            return [depth]
        first = max(2 * BLOCK, math.ceil(residual_count(operator, self.residual_examples) / self.batch_size))
        if self._root is not None:  # preconditioned, a few dozen steps often suffice: check early
            first = 2 * BLOCK
        out = []
        while first < self.max_depth:
            out.append(first)
            first *= 2
        return [*out, self.max_depth]

    def _with_retries(
        self,
        operator: HessianOperator,
        v: Tensor,
        scale: float,
        repeat: int,
        depth: int | None,
        search: DepthSearch | None,
    ) -> tuple[Tensor, int, str, float]:
        """With ``scale="auto"``, a divergence doubles the scale and restarts the repeat (up to ``scale_retries``).

        The power-iteration estimate sees ``scale_batches`` minibatches; the recursion sees thousands, and a rare one
        (a mislabelled example in a small batch) can have a larger top eigenvalue. Retries depend only on the repeat's
        own minibatches, so a repeat behaves the same on any rank of FastIF's parallel variant.
        """
        for attempt in range(self.scale_retries + 1):
            if search is not None:
                search.reset()
            try:
                x, used, stop = self._recursion(operator, v, scale, repeat, self._checkpoints(operator, depth), search)
                return x, used, stop, scale
            except LiSSADivergenceError:
                if self.scale != "auto" or attempt == self.scale_retries:
                    raise
                scale *= 2.0
        raise AssertionError("unreachable")  # pragma: no cover

    def _product(self, operator: HessianOperator, batch: Any, h: Tensor) -> Tensor:
        """``H_B h``, or preconditioned ``M^{1/2}(H_B + λI)M^{1/2} h``."""
        if self._root is None:
            return operator.batch_hvp(batch, h)
        u = self._root(h)
        return self._root(operator.batch_hvp(batch, u).add_(u, alpha=self.damping))

    def _step(self, operator: HessianOperator, g: torch.Generator, v: Tensor, h: Tensor, scale: float) -> Tensor:
        batch = operator.sample(self.batch_size, g)
        if self._root is not None:  # the damping is inside the preconditioned product
            return h.add_(v).sub_(self._product(operator, batch, h), alpha=1.0 / scale)
        hv = operator.batch_hvp(batch, h)
        # In place: h is the recursion's own buffer (a clone of v); fresh [V, P] arrays each step cost page faults.
        return h.mul_(1.0 - self.damping / scale).add_(v).sub_(hv, alpha=1.0 / scale)

    def _recursion(
        self,
        operator: HessianOperator,
        v: Tensor,
        scale: float,
        repeat: int,
        checkpoints: list[int],
        checkpoint: Checkpoint | None,
    ) -> tuple[Tensor, int, str]:
        """Run one repeat up to the last checkpoint; return ``(x, steps, stopped_by)``.

        At checkpoint ``c`` the estimate is the mean of the last ``t = ceil(tail_fraction · c)`` iterates over
        ``scale``. One running sum serves every checkpoint: it starts after the first tail begins, and is copied
        where a later tail begins (for doubling checkpoints and ``tail_fraction <= 0.5``, one copy at a time).
        """
        g = torch.Generator().manual_seed(self.seed + repeat)
        tails = {c: max(1, math.ceil(self.tail_fraction * c)) for c in checkpoints}
        marks: dict[int, list[int]] = {}
        for c, t in tails.items():
            if t > 1:
                marks.setdefault(c - t, []).append(c)
        first_mark = min(marks) if marks else None
        h = v.clone()
        bar = iteration_bar(self.progress, checkpoints[-1], f"fastif: LiSSA (repeat {repeat})")
        try:
            return self._iterate(operator, g, v, h, scale, checkpoints, checkpoint, tails, marks, first_mark, bar)
        finally:
            if bar is not None:
                bar.close()

    def _iterate(
        self,
        operator: HessianOperator,
        g: torch.Generator,
        v: Tensor,
        h: Tensor,
        scale: float,
        checkpoints: list[int],
        checkpoint: Checkpoint | None,
        tails: dict[int, int],
        marks: dict[int, list[int]],
        first_mark: int | None,
        bar: Any,
    ) -> tuple[Tensor, int, str]:
        """The steps of one repeat (see :meth:`_recursion`)."""
        running = torch.zeros_like(v) if first_mark == 0 else None
        snapshots: dict[int, Tensor] = {}
        monitor = GrowthMonitor(v, checkpoints[-1])
        for step in range(1, checkpoints[-1] + 1):
            h = self._step(operator, g, v, h, scale)
            if bar is not None:
                bar.update(1)
            reason = monitor.observe(h, step, operator.last_sample)
            if reason is not None:
                if reason == "non-finite" and monitor.culprits(operator):
                    raise operator.non_finite_error("LiSSA's minibatch Hessian-vector product", monitor.samples())
                raise LiSSADivergenceError(self._divergence_message(operator, scale, step, reason))
            if running is not None:
                running += h
            if step == first_mark:
                running = torch.zeros_like(v)
            elif step in marks:
                snapshot = running.clone()
                snapshots.update(dict.fromkeys(marks[step], snapshot))
            if step in tails:
                t = tails[step]
                if t == 1:
                    x = h / scale
                elif step in snapshots:
                    x = torch.sub(running, snapshots.pop(step)).div_(t * scale)
                else:  # this tail began at the first mark, where the running sum started
                    x = running / (t * scale)
                if self._root is not None:
                    x = self._root(x)
                stop = "depth" if checkpoint is None else checkpoint(step, x)
                checks = getattr(getattr(checkpoint, "__self__", None), "checks", None)  # the depth search's
                if bar is not None and checks:
                    bar.set_postfix(residual=f"{checks[-1][1]:.3g}")
                if stop is not None:
                    return x, step, stop
        raise AssertionError("unreachable: the last checkpoint always stops")  # pragma: no cover

    def _not_converged(self, operator: HessianOperator, x: Tensor, v: Tensor) -> None:
        """A failed certificate: if the Hessian is indefinite beyond ``damping``, no depth can help; say so."""
        entry = self._entry(operator)
        if "lowest" not in entry:  # once per system: later solves reuse the first one's failed certificate
            examples = self.residual_examples if self.residual_examples else 512
            entry["lowest"] = lowest_eigenvalue(operator, num_examples=min(examples, 512), seed=self.seed)
        estimate = entry["lowest"]
        self.diagnostics["min_eigenvalue"] = estimate["min_eigenvalue"]
        if estimate["min_eigenvalue"] < -self.damping:
            raise LiSSADivergenceError(
                f"LiSSA cannot converge (residual {self.diagnostics['residual']:.3g} after "
                f"{max(self.diagnostics['iterations'])} steps): "
                + damping_message(self.damping, estimate["min_eigenvalue"], estimate["max_eigenvalue"])
            )

    def _divergence_message(self, operator: HessianOperator, scale: float, step: int, reason: str) -> str:
        head = f"LiSSA diverged at step {step} ({reason}) with scale={scale:.4g}, damping={self.damping:g}"
        try:
            lowest = lowest_eigenvalue(operator, num_examples=512, seed=self.seed)
            if lowest["min_eigenvalue"] < -self.damping:
                return f"{head}: " + damping_message(self.damping, lowest["min_eigenvalue"], lowest["max_eigenvalue"])
            est = self.estimate_top_eigenvalue(operator)
            top, negative = est["eigenvalue"], est["signed_min"]
            if negative < -self.damping:
                return f"{head}: " + damping_message(self.damping, negative, top, how="minibatch")
            hint = f"the largest minibatch-Hessian eigenvalue is about {top:.3g} at batch_size={self.batch_size}"
            if top * self.scale_safety < scale:
                suggestion = (
                    f"scale already exceeds it, so the minibatch Hessians likely have eigenvalues below -damping: "
                    f"raise damping above {self.damping:g} (e.g. {max(10 * self.damping, 1e-3):g})"
                )
            else:
                least = self.scale_safety * (top + self.damping)
                suggestion = f"raise scale to at least {least:.3g}, or use scale='auto'"
        except (RuntimeError, ValueError, ArithmeticError):
            hint, suggestion = "the eigenvalue estimates failed", "raise scale or use scale='auto', or raise damping"
        return f"{head}: {hint}; {suggestion}."


def _number_or_auto(name: str, value: Any, check: Callable[[Any], Any]) -> Any:
    """``"auto"``, or ``value`` as ``check`` accepts it; one message naming both forms otherwise."""
    if isinstance(value, str) and value == "auto":
        return value
    try:
        if isinstance(value, str) or value is None:
            raise ArgumentError(name)
        return check(value)
    except ArgumentError:
        kind = "an integer >= 1" if name == "recursion_depth" else "a finite number > 0"
        raise ArgumentError(f"{name}: expected {kind} or 'auto', got {value!r}") from None
