"""``verify``: check an inverse-HVP estimator against exact influence on a slice of your own model.

Influence estimates fail silently: a LiSSA whose scale is too large for its depth, or whose minibatches are too
small, returns numbers of the right shape that rank training points almost at random. :func:`verify` answers "can I
trust these settings on this model?" on a problem small enough to solve exactly:

1. parameters restricted to the last layer(s) of the model, whole modules taken from the output backwards while
   they fit in ``max_params`` (or the ``params`` you give);
2. a random subset of ``num_train`` training points (the Hessian is taken over them);
3. scores of the configured estimator against :class:`~lightning_fastif.core.ihvp.ExactInverse` with the same damping:
   Pearson and Spearman correlations and top-10 overlap per test point (averaged), and the estimator's relative
   residual ``‖(H + λI)x − g_test‖ / ‖g_test‖`` over the whole subset;
4. with ``loo > 0``, leave-one-out retraining of that many training points of the subset (those of largest
   ``|score|``): only the slice's parameters are trained, the rest of the model is frozen, by L-BFGS from the current
   weights on ``mean loss + (λ/2)‖θ − θ₀‖²``. That proximal term is what ``damping`` means (its Hessian is
   ``H + λI``), so exact influence predicts the change of the test loss, ``score / n``, to first order. The model
   is first refitted on the full subset (``refit_shift`` reports how far it moved), then once per left-out point.

The report passes when every measured number meets :data:`DEFAULT_THRESHOLDS`:

=================  =========  =======================================================================================
metric             threshold  why this value
=================  =========  =======================================================================================
``pearson``        >= 0.95    FastIF reports 0.999 for its tuned LiSSA against the original; below 0.95 rankings move
``spearman``       >= 0.90    the order of the candidates, which is what top-k explanations show
``top10_overlap``  >= 0.5     at least half of the 10 most helpful points agree with exact influence
``residual``       <= 0.3     our measurements: a last-iterate LiSSA at residual 0.5 gave score Pearson 0.95, at 0.3
                              about 0.98; a LiSSA stopped after 5 steps sits near 1
``loo_pearson``    >= 0.9     predicted against retrained change of the test loss (only when ``loo >= 3``)
=================  =========  =======================================================================================

This module imports no Lightning. The Hydra app exposes it as a section of the job's report.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Subset, TensorDataset, default_collate

from lightning_fastif.core.batches import Batch, IndexedData
from lightning_fastif.core.grads import FunctionalLoss, LossFn, evaluating
from lightning_fastif.core.hessian import HessianOperator
from lightning_fastif.core.ihvp import ExactInverse, InverseHVP, relative_residual
from lightning_fastif.core.params import ParamSpec, select_parameters, unflatten
from lightning_fastif.errors import ArgumentError, check_int
from lightning_fastif.metrics import pearson, spearman, top_k_overlap

DEFAULT_THRESHOLDS: dict[str, float] = {
    "pearson": 0.95,
    "spearman": 0.90,
    "top10_overlap": 0.5,
    "residual": 0.3,
    "loo_pearson": 0.9,
}
"""Pass/fail thresholds of :class:`VerifyReport` (see the module docstring for the reasons)."""

_AT_MOST = ("residual",)  # the metrics that must stay *below* their threshold


def last_layer_parameters(model: nn.Module, max_params: int) -> list[str]:
    """Names of the parameters of the last module(s) of ``model`` that fit together in ``max_params``.

    Modules are taken whole, from the last registered trainable parameter backwards (registration order is the
    forward order for ``nn.Sequential`` and for models that define their layers in order).

    Raises:
        ArgumentError: if the last module alone has more than ``max_params`` parameters (naming both numbers).

    Example::

        >>> net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
        >>> last_layer_parameters(net, 100)
        ['2.weight', '2.bias']
    """
    check_int("max_params", max_params)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad] or list(model.named_parameters())
    if not named:
        raise ArgumentError(f"model: expected a model with parameters, got {type(model).__name__} with none")
    groups: dict[str, list[tuple[str, int]]] = {}
    for name, p in named:
        groups.setdefault(name.rpartition(".")[0], []).append((name, p.numel()))
    chosen: list[str] = []
    total = 0
    for owner in reversed(list(groups)):
        size = sum(n for _, n in groups[owner])
        if total + size > max_params:
            if not chosen:
                raise ArgumentError(
                    f"max_params: expected at least the {size} parameters of the last layer "
                    f"{owner or type(model).__name__!r}, got {max_params}; raise it or pass params= (name patterns)"
                )
            break
        chosen = [n for n, _ in groups[owner]] + chosen
        total += size
    return chosen


def _subset(data: IndexedData, indices: Tensor) -> IndexedData:
    dataset = data.dataset
    if isinstance(dataset, TensorDataset) and data.collate_fn is default_collate:
        return IndexedData(TensorDataset(*(t[indices] for t in dataset.tensors)))
    return IndexedData(Subset(dataset, indices.tolist()), collate_fn=data.collate_fn)


@dataclass
class VerifyReport:
    """What :func:`verify` measured, and whether it passes :data:`DEFAULT_THRESHOLDS` (or the ones given).

    Correlations and overlap are computed per test point over the ``num_train`` training points and averaged
    (``pearson_min`` is the worst test point). ``print(report)`` shows a table; ``to_dict()`` gives plain values.
    """

    estimator: str
    settings: dict[str, Any]
    params: list[str]
    num_params: int
    num_train: int
    num_test: int
    damping: float
    pearson: float
    pearson_min: float
    spearman: float
    top10_overlap: float
    residual: float
    exact_residual: float
    seconds: float
    exact_seconds: float
    loo: int = 0
    loo_pearson: float | None = None
    loo_pearson_exact: float | None = None
    loo_indices: list[int] = field(default_factory=list)
    loo_predicted: list[float] = field(default_factory=list)
    loo_actual: list[float] = field(default_factory=list)
    refit_shift: float | None = None
    thresholds: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))

    def _checks(self) -> list[tuple[str, float, float, bool]]:
        values = {
            "pearson": self.pearson,
            "spearman": self.spearman,
            "top10_overlap": self.top10_overlap,
            "residual": self.residual,
        }
        if self.loo >= 3 and self.loo_pearson is not None:
            values["loo_pearson"] = self.loo_pearson
        checks = []
        for name, value in values.items():
            limit = self.thresholds[name]
            ok = value <= limit if name in _AT_MOST else value >= limit
            checks.append((name, value, limit, bool(ok and not math.isnan(value))))
        return checks

    @property
    def failures(self) -> list[str]:
        """The checks that failed, each as ``"name value (needs >= limit)"``."""
        return [
            f"{name} {value:.4g} (needs {'<=' if name in _AT_MOST else '>='} {limit:g})"
            for name, value, limit, ok in self._checks()
            if not ok
        ]

    @property
    def passed(self) -> bool:
        """True when every check meets its threshold."""
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON-ready), with ``passed`` and ``failures``."""
        return {**asdict(self), "passed": self.passed, "failures": self.failures}

    def __str__(self) -> str:
        head = (
            f"verify: {self.estimator} against exact influence (damping {self.damping:g}) on {self.num_params} "
            f"parameters [{', '.join(self.params)}], {self.num_train} training points, {self.num_test} test points"
        )
        rows = [("metric", "value", "threshold", "ok")]
        for name, value, limit, ok in self._checks():
            rows.append(
                (name, f"{value:.4g}", f"{'<=' if name in _AT_MOST else '>='} {limit:g}", "yes" if ok else "NO")
            )
        rows.append(("pearson_min", f"{self.pearson_min:.4g}", "", ""))
        rows.append(("exact_residual", f"{self.exact_residual:.3g}", "", ""))
        if self.loo and self.loo_pearson_exact is not None:
            rows.append(("loo_pearson_exact", f"{self.loo_pearson_exact:.4g}", "", ""))
            if self.loo < 3:
                rows.append(("loo_pearson", f"{self.loo_pearson:.4g}", "(needs loo >= 3)", ""))
        rows.append(("seconds", f"{self.seconds:.3g}", f"exact {self.exact_seconds:.3g}", ""))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.append("PASSED" if self.passed else "FAILED: " + "; ".join(self.failures))
        return "\n".join(lines)


def _gradients(function: FunctionalLoss, data: IndexedData, chunk: int = 256) -> Tensor:
    return torch.cat([function.per_example_gradients(batch) for _, batch in data.chunks(chunk)])


def _mean_loss(function: FunctionalLoss, params: dict[str, Tensor], data: IndexedData, total: int) -> Tensor:
    out = torch.zeros((), dtype=function.dtype, device=function.device)
    for _, batch in data.chunks(1024):
        out = out + function(params, function.prepare(batch)).sum()
    return out / total


def _refit(
    function: FunctionalLoss,
    data: IndexedData,
    start: Tensor,
    anchor: Tensor,
    damping: float,
    total: int,
    steps: int,
) -> Tensor:
    """argmin over θ of ``(1/total)·Σ_{data} ℓ(θ) + (λ/2)‖θ − anchor‖²`` by L-BFGS from ``start``."""
    theta = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=steps,
        history_size=50,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        with torch.enable_grad():
            loss = _mean_loss(function, unflatten(theta, function.primals), data, total)
            loss = loss + 0.5 * damping * ((theta - anchor) ** 2).sum()
            # autograd.grad, not backward(): the frozen rest of the model must not accumulate .grad
            (theta.grad,) = torch.autograd.grad(loss, [theta])
        return loss.detach()

    opt.step(closure)
    return theta.detach()


def _set_params(function: FunctionalLoss, theta: Tensor) -> None:
    """Write ``theta`` into the model's selected parameters and the function's primals."""
    named = dict(function.model.named_parameters())
    for name, value in unflatten(theta, function.primals).items():
        with torch.no_grad():
            named[name].copy_(value)
        function.primals[name] = named[name].detach()


def verify(
    model: nn.Module,
    loss_fn: LossFn | None,
    train_data: Any,
    test_batch: Batch,
    *,
    ihvp: InverseHVP,
    params: ParamSpec = None,
    max_params: int = 2000,
    num_train: int = 500,
    loo: int = 0,
    loo_steps: int = 300,
    seed: int = 0,
    dtype: torch.dtype | None = torch.float64,
    thresholds: dict[str, float] | None = None,
) -> VerifyReport:
    """Check ``ihvp`` against exact influence on a slice of ``model`` small enough to solve exactly.

    Args:
        model: the trained model (not modified: a copy is used when it must be cast or retrained).
        loss_fn: per-example loss ``loss_fn(model, batch) -> Tensor[B]``; ``None`` uses ``model.per_example_loss``.
        train_data: the training set (map-style ``Dataset`` or a ``DataLoader`` over one).
        test_batch: a batch of test points, as the loss takes it.
        ihvp: the estimator to check (it is copied; its settings are used as they are, ``"auto"`` included).
        params: the parameters of the slice; default: the last layer(s) up to ``max_params``.
        max_params: the largest slice (the exact Hessian is ``P×P``).
        num_train: training points in the slice (a random subset, drawn with ``seed``).
        loo: training points to retrain without (``0``: no retraining; ``>= 3`` for ``loo_pearson`` to count).
        loo_steps: L-BFGS iterations per retraining.
        seed: seeds the subset.
        dtype: the slice is computed in this dtype (float64 default, so that "exact" is exact); ``None`` keeps
            the model's.
        thresholds: overrides of :data:`DEFAULT_THRESHOLDS`.

    Returns:
        A :class:`VerifyReport`: ``print(report)``, ``report.passed``, ``report.to_dict()``.

    Raises:
        ArgumentError: a bad argument (``ihvp``, ``max_params``, ``num_train``, ``loo``, ``thresholds``, ...) or a
            slice larger than ``max_params``; the message names it.
        NonFiniteError: a loss, gradient or solve on the slice is NaN or infinite (naming the indices).

    Example::

        >>> from lightning_fastif.core.ihvp import LiSSA
        >>> report = verify(model, None, train, test_batch, ihvp=LiSSA(0.01))  # doctest: +SKIP
        >>> print(report)  # doctest: +SKIP
    """
    if not isinstance(ihvp, InverseHVP):
        raise ArgumentError(
            f"ihvp: expected an InverseHVP estimator (AutoInverse, LiSSA, ConjugateGradient, ...), got {ihvp!r}"
        )
    check_int("num_train", num_train, minimum=2)
    check_int("max_params", max_params)
    check_int("loo_steps", loo_steps)
    check_int("seed", seed, minimum=0)
    if check_int("loo", loo, minimum=0) > num_train:
        raise ArgumentError(f"loo: expected an integer in [0, num_train={num_train}], got {loo!r}")
    unknown = set(thresholds or {}) - set(DEFAULT_THRESHOLDS)
    if unknown:
        raise ArgumentError(
            f"thresholds: expected metrics among {sorted(DEFAULT_THRESHOLDS)}, got unknown metric(s) {sorted(unknown)}"
        )
    limits = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    names = last_layer_parameters(model, max_params) if params is None else list(select_parameters(model, params))
    size = sum(p.numel() for n, p in model.named_parameters() if n in names)
    if size > max_params:
        raise ArgumentError(
            f"max_params: expected at least the {size} values of the selected parameters, got {max_params}; select "
            "fewer (params=...) or raise max_params"
        )
    first = next(p for n, p in model.named_parameters() if n in names)
    work = model
    if loo > 0 or (dtype is not None and dtype != first.dtype):
        work = copy.deepcopy(model)
        if dtype is not None:
            work = work.to(dtype)
    full = IndexedData(train_data)
    n_all = len(full)
    indices = torch.randperm(n_all, generator=torch.Generator().manual_seed(seed))[: min(num_train, n_all)]
    data = _subset(full, indices.sort().values)
    n = len(data)
    estimator = copy.deepcopy(ihvp)
    exact = ExactInverse(estimator.damping, max_params=max(size, 1), residual_examples=0)
    with evaluating(work):
        function = FunctionalLoss(work, loss_fn, names)
        est_scores, exact_scores, est_s, exact_s, g_test, timing = _scores(function, data, test_batch, estimator, exact)
        operator = HessianOperator(work, None, data, function=function)
        residual = float(relative_residual(operator, est_s, g_test, estimator.damping, num_examples=None).max())
        exact_res = float(relative_residual(operator, exact_s, g_test, estimator.damping, num_examples=None).max())
    rows = range(est_scores.shape[0])
    report = VerifyReport(
        estimator=estimator.name,
        settings={k: v for k, v in estimator.diagnostics.items() if k not in ("residual", "seconds")},
        params=names,
        num_params=size,
        num_train=n,
        num_test=est_scores.shape[0],
        damping=estimator.damping,
        pearson=sum(pearson(est_scores[t], exact_scores[t]) for t in rows) / len(rows),
        pearson_min=min(pearson(est_scores[t], exact_scores[t]) for t in rows),
        spearman=sum(spearman(est_scores[t], exact_scores[t]) for t in rows) / len(rows),
        top10_overlap=sum(top_k_overlap(est_scores[t], exact_scores[t]) for t in rows) / len(rows),
        residual=residual,
        exact_residual=exact_res,
        seconds=timing[0],
        exact_seconds=timing[1],
        thresholds=limits,
    )
    if loo > 0:
        _leave_one_out(report, function, data, test_batch, estimator, exact, loo, loo_steps)
    return report


def _scores(
    function: FunctionalLoss, data: IndexedData, test_batch: Batch, estimator: InverseHVP, exact: ExactInverse
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, tuple[float, float]]:
    """Scores ``[T, n]`` of the estimator and of exact influence, their ``s_test``, ``g_test`` and seconds."""
    operator = HessianOperator(function.model, None, data, function=function)
    g_train = _gradients(function, data)
    g_test = function.per_example_gradients(test_batch)
    start = time.perf_counter()
    est_s = estimator.solve(operator, g_test)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    exact_s = exact.solve(operator, g_test)
    exact_seconds = time.perf_counter() - start
    return est_s @ g_train.T, exact_s @ g_train.T, est_s, exact_s, g_test, (seconds, exact_seconds)


def _leave_one_out(
    report: VerifyReport,
    function: FunctionalLoss,
    data: IndexedData,
    test_batch: Batch,
    estimator: InverseHVP,
    exact: ExactInverse,
    loo: int,
    steps: int,
) -> None:
    """Refit the slice on the subset, then retrain without each of ``loo`` points; fill the report's ``loo_*``."""
    n, damping = len(data), estimator.damping
    theta0 = function.flat_params()
    theta_star = _refit(function, data, theta0, theta0, damping, n, steps)
    report.refit_shift = float((theta_star - theta0).norm() / theta0.norm().clamp_min(1e-30))
    _set_params(function, theta_star)
    with evaluating(function.model):
        # Influence at the refitted optimum: there the gradient of the objective is zero, as the derivation needs.
        est_scores, exact_scores, *_ = _scores(function, data, test_batch, estimator, exact)
        est_mean, exact_mean = est_scores.mean(0), exact_scores.mean(0)
        chosen = exact_mean.abs().topk(loo).indices
        test = function.prepare(test_batch)

        def test_loss(theta: Tensor) -> float:
            with torch.no_grad():
                return float(function(unflatten(theta, function.primals), test).mean())

        base = test_loss(theta_star)
        actual = []
        for i in chosen.tolist():
            rest = _subset(data, torch.tensor([j for j in range(n) if j != i]))
            theta_i = _refit(function, rest, theta_star, theta0, damping, n, steps)
            actual.append(test_loss(theta_i) - base)
    actual_t = torch.tensor(actual, dtype=torch.float64)
    report.loo = loo
    report.loo_indices = chosen.tolist()
    report.loo_actual = actual
    report.loo_predicted = (est_mean[chosen] / n).tolist()
    if loo >= 2:
        report.loo_pearson = pearson(est_mean[chosen] / n, actual_t)
        report.loo_pearson_exact = pearson(exact_mean[chosen] / n, actual_t)
