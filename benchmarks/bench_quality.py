"""Attribution quality against ground truth from retraining: leave-one-out, mislabel detection, LDS.

Three tasks on scikit-learn's bundled data (no download), each with a ground truth that needs no peer:

* **Leave-one-out** (``loo_pearson``): an L2-regularised logistic regression on ``load_breast_cancer``
  (standardised, float64), trained to the optimum by Newton's method, retrained (warm-started Newton) without each
  training point in turn. For each of a few test points, the Pearson correlation of ``score / n`` with the actual
  change of its test loss; averaged over the test points. With an exact inverse this is the textbook check of
  Koh & Liang (2017, Fig. 2).
* **Mislabelled points** (``mislabel_top10_fraction``): 10% of the training labels of ``load_digits`` flipped to
  another class, a small MLP trained on them, training points ranked by ``self_influence``; the fraction of flipped
  points among the top 10% (random ranking: 0.10, perfect: 1.0).
* **Linear datamodeling score** (``lds``, TRAK, Park et al. 2023): ``M`` random halves ``S_j`` of the training set,
  the MLP retrained on each (same initialisation, full-batch L-BFGS); for each test point, the Spearman correlation
  over ``j`` of its model output (``-loss``, a monotone function of TRAK's margin, so the ranks are the same) with
  ``Σ_{i∈S_j} score(test, i)``; averaged over test points.

Every attribution method is an :class:`Attributor` (``scores`` ``[T, N]`` and ``self_scores`` ``[N]``, positive =
helpful); :mod:`benchmarks.bench_peers` plugs Captum, Kronfluence and dattri into the same tasks. Our headline
figures use LiSSA, FastIF's estimator; rows for the exact inverse, conjugate gradients and the identity (TracIn at
the final checkpoint) show how much of the quality is the estimator's.

Run: ``python -m benchmarks.bench_quality [--smoke] [--threads 1]``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from benchmarks.common import markdown_table, module_main, nanmean, pearson, set_threads, spearman
from lightning_fastif import (
    ConjugateGradient,
    ExactInverse,
    FunctionalLoss,
    HessianOperator,
    Identity,
    InverseHVP,
    LiSSA,
    evaluating,
    influence_scores,
    self_influence,
)

QUALITY_KEYS = ("loo_pearson", "lds", "mislabel_top10_fraction")


# -- models ---------------------------------------------------------------------------------------------------------
class BinaryLogReg(nn.Module):
    """Logistic regression with one logit; ``forward`` returns logits ``[B]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).squeeze(-1)


class SmallMLP(nn.Module):
    """``in -> hidden -> classes`` with tanh (a smooth Hessian); ``forward`` returns logits ``[B, classes]``."""

    def __init__(self, dim: int = 64, hidden: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def bce_loss(model: nn.Module, batch: Any) -> Tensor:
    """Per-example binary cross-entropy of ``(x, y)`` with float labels in {0, 1}."""
    x, y = batch
    return F.binary_cross_entropy_with_logits(model(x), y.to(x.dtype), reduction="none")


def ce_loss(model: nn.Module, batch: Any) -> Tensor:
    """Per-example cross-entropy of ``(x, y)`` with integer labels."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


# -- training -------------------------------------------------------------------------------------------------------
def fit_logreg_newton(x: Tensor, y: Tensor, l2: float, init: Tensor | None = None, iters: int = 50) -> Tensor:
    """``θ = [w, b]`` minimising mean BCE + (l2/2)‖θ‖² by Newton's method (float64, to machine precision)."""
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    theta = torch.zeros(xb.shape[1], dtype=x.dtype) if init is None else init.clone()
    eye = torch.eye(len(theta), dtype=x.dtype)
    for _ in range(iters):
        p = torch.sigmoid(xb @ theta)
        grad = xb.T @ (p - y) / len(y) + l2 * theta
        hess = (xb.T * (p * (1 - p))) @ xb / len(y) + l2 * eye
        step = torch.linalg.solve(hess, grad)
        theta = theta - step
        if float(step.abs().max()) < 1e-14:
            break
    return theta


def logreg_from_theta(theta: Tensor) -> BinaryLogReg:
    model = BinaryLogReg(len(theta) - 1).double()
    with torch.no_grad():
        model.linear.weight.copy_(theta[:-1].unsqueeze(0))
        model.linear.bias.copy_(theta[-1:])
    return model


def fit_mlp(x: Tensor, y: Tensor, *, l2: float, seed: int = 0, max_iter: int = 400, hidden: int = 32) -> SmallMLP:
    """Full-batch L-BFGS on mean CE + (l2/2)‖θ‖² from the initialisation of ``seed`` (deterministic)."""
    torch.manual_seed(seed)
    model = SmallMLP(x.shape[1], hidden, int(y.max()) + 1).double()
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = ce_loss(model, (x, y)).mean() + 0.5 * l2 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


# -- tasks ----------------------------------------------------------------------------------------------------------
@dataclass
class Task:
    """A trained model, its data, the damping that makes ``H + λI`` the regularised objective's Hessian, and the
    ground truth (filled by the task builders)."""

    name: str
    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], Tensor]
    train: TensorDataset
    test: TensorDataset
    damping: float
    kind: str  # "binary" (one logit, float labels) or "multiclass" (logits [B, C], integer labels)
    truth: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def test_batch(self) -> tuple[Tensor, ...]:
        return self.test.tensors


def _standardise(x: Tensor) -> Tensor:
    return (x - x.mean(0)) / x.std(0).clamp_min(1e-12)


@functools.lru_cache(maxsize=4)
def loo_task(smoke: bool = False) -> Task:
    """Breast-cancer logistic regression with the exact leave-one-out change of each test point's loss."""
    from sklearn.datasets import load_breast_cancer

    x_all, y_all = load_breast_cancer(return_X_y=True)
    x_all = _standardise(torch.tensor(x_all, dtype=torch.float64))
    y_all = torch.tensor(y_all, dtype=torch.float64)
    perm = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(0))
    n_train, n_test = (60, 3) if smoke else (300, 8)
    l2 = 0.01
    tr, te = perm[:n_train], perm[n_train:]
    x, y = x_all[tr], y_all[tr]
    theta = fit_logreg_newton(x, y, l2)
    model = logreg_from_theta(theta)
    # Test points the model gets least right carry the largest, least trivial influences (Koh & Liang's choice).
    with torch.no_grad():
        test_losses = bce_loss(model, (x_all[te], y_all[te]))
    te = te[test_losses.argsort(descending=True)[:n_test]]
    test = TensorDataset(x_all[te], y_all[te])

    def losses(th: Tensor) -> Tensor:
        with torch.no_grad():
            return bce_loss(logreg_from_theta(th), test.tensors)

    base = losses(theta)
    start = time.perf_counter()
    delta = torch.empty(n_test, n_train, dtype=torch.float64)
    for i in range(n_train):
        keep = torch.cat([torch.arange(i), torch.arange(i + 1, n_train)])
        delta[:, i] = losses(fit_logreg_newton(x[keep], y[keep], l2, init=theta)) - base
    task = Task("loo", model, bce_loss, TensorDataset(x, y), test, l2, "binary")
    task.truth = {"loo_delta": delta}
    task.info = {
        "data": "load_breast_cancer, standardised, float64",
        "model": "logistic regression (31 parameters), Newton to machine precision",
        "n_train": n_train,
        "n_test": n_test,
        "l2": l2,
        "retrain_seconds": time.perf_counter() - start,
    }
    return task


def _digits(n_train: int, n_test: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits

    x_all, y_all = load_digits(return_X_y=True)
    x_all = _standardise(torch.tensor(x_all, dtype=torch.float64))
    y_all = torch.tensor(y_all, dtype=torch.long)
    perm = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train : n_train + n_test]
    return x_all[tr], y_all[tr], x_all[te], y_all[te]


def _hidden(smoke: bool) -> int:
    return 8 if smoke else 32


MLP_L2 = 1e-3
MLP_DAMPING = 1e-2  # above the L2 weight: the MLP's Hessian is indefinite in places


@functools.lru_cache(maxsize=4)
def mislabel_task(smoke: bool = False) -> Task:
    """Digits with 10% of the training labels flipped, and the MLP trained on them."""
    n_train = 200 if smoke else 1000
    x, y, xt, yt = _digits(n_train, 100, seed=1)
    g = torch.Generator().manual_seed(2)
    flipped = torch.randperm(n_train, generator=g)[: n_train // 10]
    noisy = y.clone()
    noisy[flipped] = (y[flipped] + torch.randint(1, 10, (len(flipped),), generator=g)) % 10
    start = time.perf_counter()
    model = fit_mlp(x, noisy, l2=MLP_L2, max_iter=60 if smoke else 400, hidden=_hidden(smoke))
    with torch.no_grad():
        train_acc = float((model(x).argmax(-1) == noisy).double().mean())
        test_acc = float((model(xt).argmax(-1) == yt).double().mean())
    task = Task("mislabel", model, ce_loss, TensorDataset(x, noisy), TensorDataset(xt, yt), MLP_DAMPING, "multiclass")
    task.truth = {"flipped": flipped}
    task.info = {
        "data": "load_digits, standardised, 10% of training labels flipped to another class",
        "model": f"MLP 64-{_hidden(smoke)}-10 tanh ({sum(p.numel() for p in model.parameters())} parameters), L-BFGS, l2 {MLP_L2}",
        "n_train": n_train,
        "flipped": len(flipped),
        "train_accuracy_on_noisy_labels": train_acc,
        "test_accuracy": test_acc,
        "train_seconds": time.perf_counter() - start,
    }
    return task


@functools.lru_cache(maxsize=4)
def lds_task(smoke: bool = False) -> Task:
    """Digits MLP, and its test outputs retrained on ``M`` random halves of the training set (TRAK's LDS)."""
    n_train, n_test, subsets, max_iter = (120, 8, 20, 60) if smoke else (500, 50, 64, 300)
    x, y, xt, yt = _digits(n_train, n_test, seed=3)
    model = fit_mlp(x, y, l2=MLP_L2, max_iter=max_iter, hidden=_hidden(smoke))
    g = torch.Generator().manual_seed(4)
    masks = torch.zeros(subsets, n_train, dtype=torch.bool)
    outputs = torch.empty(subsets, n_test, dtype=torch.float64)
    start = time.perf_counter()
    for j in range(subsets):
        idx = torch.randperm(n_train, generator=g)[: n_train // 2]
        masks[j, idx] = True
        sub = fit_mlp(x[idx], y[idx], l2=MLP_L2, max_iter=max_iter, hidden=_hidden(smoke))
        with torch.no_grad():
            outputs[j] = -ce_loss(sub, (xt, yt))
    task = Task("lds", model, ce_loss, TensorDataset(x, y), TensorDataset(xt, yt), MLP_DAMPING, "multiclass")
    task.truth = {"masks": masks, "outputs": outputs}
    with torch.no_grad():
        test_acc = float((model(xt).argmax(-1) == yt).double().mean())
    task.info = {
        "data": "load_digits, standardised",
        "model": f"MLP 64-{_hidden(smoke)}-10 tanh, L-BFGS from one fixed initialisation",
        "n_train": n_train,
        "n_test": n_test,
        "subsets": subsets,
        "subset_fraction": 0.5,
        "test_accuracy": test_acc,
        "retrain_seconds": time.perf_counter() - start,
    }
    return task


# -- metrics --------------------------------------------------------------------------------------------------------
def loo_correlation(task: Task, scores: Tensor) -> dict[str, float]:
    """Pearson of ``score / n`` with the actual LOO change, per test point (mean) and pooled; Spearman mean."""
    delta = task.truth["loo_delta"]
    predicted = scores.to(torch.float64) / len(task.train)
    per_point = [pearson(predicted[t], delta[t]) for t in range(delta.shape[0])]
    return {
        "loo_pearson": nanmean(per_point),
        "loo_pearson_pooled": pearson(predicted, delta),
        "loo_spearman": nanmean([spearman(predicted[t], delta[t]) for t in range(delta.shape[0])]),
    }


def mislabel_fraction(task: Task, self_scores: Tensor) -> dict[str, float]:
    """Fraction of flipped points among the top 10% by self-influence (random: 0.10)."""
    n = len(task.train)
    top = self_scores.to(torch.float64).topk(max(1, n // 10)).indices
    flipped = set(task.truth["flipped"].tolist())
    hits = sum(1 for i in top.tolist() if i in flipped)
    return {"mislabel_top10_fraction": hits / len(top), "mislabel_random_fraction": len(flipped) / n}


def linear_datamodeling_score(task: Task, scores: Tensor) -> dict[str, float]:
    """TRAK's LDS: per test point, Spearman over subsets of (output, sum of the subset's scores); mean."""
    masks, outputs = task.truth["masks"], task.truth["outputs"]
    predicted = masks.to(torch.float64) @ scores.to(torch.float64).T  # [M, T]
    per_point = [spearman(predicted[:, t], outputs[:, t]) for t in range(outputs.shape[1])]
    return {"lds": nanmean(per_point)}


# -- attributors ----------------------------------------------------------------------------------------------------
class Attributor(Protocol):
    """An attribution method under test: scores with **positive = helpful** (lowering the test loss)."""

    name: str

    def scores(self, task: Task) -> Tensor:
        """``[T, N]``: the influence of every training point of ``task`` on each of its test points."""
        ...

    def self_scores(self, task: Task) -> Tensor:
        """``[N]``: each training point's influence on its own loss."""
        ...


class Ours:
    """lightning_fastif's ``influence_scores`` / ``self_influence`` with one inverse-HVP estimator.

    Args:
        estimator: ``"lissa"``, ``"exact"``, ``"cg"`` or ``"identity"``.
        smoke: smaller LiSSA/CG settings.
    """

    def __init__(self, estimator: str, *, smoke: bool = False) -> None:
        if estimator not in ("lissa", "exact", "cg", "identity"):
            raise ValueError(f"estimator: expected 'lissa', 'exact', 'cg' or 'identity', got {estimator!r}")
        self.estimator, self.smoke = estimator, smoke
        # CG's self-influence of 1,000 points (a 200-iteration solve per 64 points) took 4 min here and converges to
        # the exact inverse's answer, which the exact row already shows.
        self.skip = (
            {"mislabel": "skipped (same fixed point as the exact inverse; 4 min here)"} if estimator == "cg" else {}
        )
        self.name = {
            "lissa": "ours: LiSSA (FastIF)",
            "exact": "ours: exact inverse",
            "cg": "ours: conjugate gradients",
            "identity": "ours: identity (TracIn, last checkpoint)",
        }[estimator]

    def ihvp(self, task: Task, *, repeats: int = 2) -> InverseHVP:
        """The estimator for ``task``; LiSSA's scale is estimated once here, then fixed for every solve."""
        if self.estimator == "identity":
            return Identity()
        if self.estimator == "exact":
            return ExactInverse(task.damping, residual_examples=0)
        if self.estimator == "cg":
            return ConjugateGradient(task.damping, max_iter=20 if self.smoke else 200, tol=1e-8, residual_examples=0)
        depth, batch = (20, 16) if self.smoke else (500, 32)
        probe = LiSSA(
            task.damping,
            scale="auto",
            batch_size=batch,
            seed=0,
            **({"scale_batches": 2, "power_iterations": 5} if self.smoke else {}),
        )
        function = FunctionalLoss(task.model, task.loss_fn)
        with evaluating(task.model):
            scale = probe.resolve_scale(HessianOperator(task.model, None, task.train, function=function))
        return LiSSA(
            task.damping, scale=scale, recursion_depth=depth, batch_size=batch, num_repeats=repeats, residual_examples=0
        )

    def scores(self, task: Task) -> Tensor:
        return influence_scores(task.model, task.loss_fn, task.test_batch, task.train, ihvp=self.ihvp(task))

    def self_scores(self, task: Task) -> Tensor:
        if self.estimator == "lissa":
            # One recursion for all N vectors at once: each step's HVP is shared, and one repeat keeps it affordable.
            ihvp, batch = self.ihvp(task, repeats=1), len(task.train)
        else:
            ihvp, batch = self.ihvp(task), 256
        return self_influence(task.model, task.loss_fn, task.train, ihvp=ihvp, batch_size=batch)


class RandomScores:
    """Random scores: the floor every metric is read against."""

    name = "random"

    def scores(self, task: Task) -> Tensor:
        g = torch.Generator().manual_seed(5)
        return torch.randn(len(task.test), len(task.train), generator=g, dtype=torch.float64)

    def self_scores(self, task: Task) -> Tensor:
        g = torch.Generator().manual_seed(6)
        return torch.randn(len(task.train), generator=g, dtype=torch.float64)


def _short_error(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:160]}"


def evaluate(
    attributor: Attributor, *, smoke: bool = False, tasks: tuple[str, ...] = ("loo", "lds", "mislabel")
) -> dict:
    """Run ``attributor`` on each task; return its metrics, the seconds of each call and any errors (per task).

    A failing task is recorded with the reason (``errors[task]``) and leaves its metric ``None``.
    """
    out: dict[str, Any] = {"name": attributor.name, "seconds": {}, "errors": {}, "skipped": {}}
    skip: dict[str, str] = getattr(attributor, "skip", {})
    for key in QUALITY_KEYS:
        out[key] = None
    builders = {"loo": loo_task, "lds": lds_task, "mislabel": mislabel_task}
    # An untimed warm-up on the smallest problem: one-off import and dispatch costs are no method's speed.
    # A method that fails here fails again below, where the error is recorded. Smoke timings mean nothing: no warm-up.
    if not smoke:
        with contextlib.suppress(Exception):
            attributor.scores(loo_task(True))
    for name in tasks:
        if name in skip:
            out["skipped"][name] = skip[name]
            continue
        task = builders[name](smoke)
        start = time.perf_counter()
        try:
            if name == "mislabel":
                result = attributor.self_scores(task)
            else:
                result = attributor.scores(task)
            out["seconds"][name] = time.perf_counter() - start
            result = torch.as_tensor(result, dtype=torch.float64).detach().cpu()
            expected = (len(task.train),) if name == "mislabel" else (len(task.test), len(task.train))
            if tuple(result.shape) != expected:
                raise ValueError(f"returned shape {tuple(result.shape)}, expected {expected}")
            if not bool(torch.isfinite(result).all()):
                raise ValueError("returned non-finite scores")
            metric = {"loo": loo_correlation, "lds": linear_datamodeling_score, "mislabel": mislabel_fraction}[name]
            out.update(metric(task, result))
            print(f"[bench] {attributor.name} / {name}: {out['seconds'][name]:.1f} s", file=sys.stderr, flush=True)
        except Exception as exc:  # a method that cannot run here is a table row, not a crash
            out["errors"][name] = _short_error(exc)
            out["seconds"].setdefault(name, None)
            out.setdefault("tracebacks", {})[name] = traceback.format_exc(limit=4)
    return out


_HEADLINE_RESULTS: dict[bool, dict[str, Any]] = {}


def headline_result(smoke: bool = False) -> dict[str, Any]:
    """Our headline method (LiSSA) evaluated on the three tasks, reused when :func:`run` already did it here."""
    if smoke not in _HEADLINE_RESULTS:
        _HEADLINE_RESULTS[smoke] = evaluate(Ours("lissa", smoke=smoke), smoke=smoke)
    return copy.deepcopy(_HEADLINE_RESULTS[smoke])


def quality_rows(results: list[dict[str, Any]]) -> str:
    """The Markdown table: one row per method, with the seconds of each task and any error."""
    rows = []
    for r in results:
        secs = r["seconds"]
        notes = "; ".join(f"{k}: {v}" for k, v in {**r.get("skipped", {}), **r["errors"]}.items())
        rows.append(
            [
                r["name"],
                r.get("loo_pearson"),
                r.get("lds"),
                r.get("mislabel_top10_fraction"),
                secs.get("loo"),
                secs.get("lds"),
                secs.get("mislabel"),
                r.get("seconds_ratio"),
                notes or "",
            ]
        )
    return markdown_table(
        [
            "method",
            "LOO Pearson",
            "LDS",
            "mislabel top-10%",
            "s LOO",
            "s LDS",
            "s self-inf.",
            "time / ours",
            "notes",
        ],
        rows,
    )


def task_notes(smoke: bool) -> str:
    """A short description of the three tasks (sizes, models, ground-truth cost)."""
    lines = []
    for builder in (loo_task, mislabel_task, lds_task):
        task = builder(smoke)
        info = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in task.info.items())
        lines.append(f"- **{task.name}**: {info}.")
    return "\n".join(lines)


def run(*, smoke: bool = False, threads: int = 1) -> dict[str, Any]:
    """Evaluate our estimators on the three ground-truth tasks; see the module docstring."""
    set_threads(threads)
    methods: list[Attributor] = [Ours(e, smoke=smoke) for e in ("lissa", "exact", "cg", "identity")]
    methods.append(RandomScores())
    results = [evaluate(m, smoke=smoke) for m in methods]
    _HEADLINE_RESULTS[smoke] = results[0]
    ours = results[0]
    markdown = "\n".join(
        [
            "Ground truth from retraining (no peer needed). LOO: mean over test points of Pearson(score/n, actual "
            "change of the test loss). LDS: TRAK's linear datamodeling score over random 50% subsets. Mislabel: "
            "fraction of flipped labels among the top 10% by self-influence (random 0.10). Seconds are for scoring "
            "every training point against the task's test points (self-influence of every training point for the "
            "mislabel task). The headline uses the first row (LiSSA, FastIF's estimator).",
            "",
            quality_rows(results),
            "",
            task_notes(smoke),
        ]
    )
    return {
        "name": "quality",
        "title": "Quality against ground truth: leave-one-out, mislabel detection, LDS",
        "headline": {k: ours[k] for k in QUALITY_KEYS},
        "markdown": markdown + "\n",
        "details": {
            "methods": results,
            "tasks": {b(smoke).name: b(smoke).info for b in (loo_task, mislabel_task, lds_task)},
        },
    }


if __name__ == "__main__":
    module_main(run, __doc__.splitlines()[0])
