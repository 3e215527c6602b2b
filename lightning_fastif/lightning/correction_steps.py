"""Error correction's core: a few gradient steps on the training points most helpful to examples the model gets wrong.

FastIF's procedure (Guo et al. 2021, Sec. 6): draw a batch of anchor examples from the target distribution (HANS
for an MNLI model), find the ``top_m`` training points most helpful to the anchor batch among its kNN candidates
(influence of each candidate on the *mean* anchor loss, kNN around the anchors' mean feature), take one plain SGD
step on them, and repeat ``num_steps`` times, recomputing kNN and influence after every step. FastIF's defaults are
10 anchors, 10 points, lr 1e-4, 10 steps; they raised HANS accuracy by 2.5-2.6 points, more than random points.

Two additions make it safe to leave on by default:

* ``lr="auto"`` (the default of :class:`~lightning_fastif.lightning.arguments.CorrectionArguments`): a line search at
  the first step, on the anchors its points were chosen for and on all anchors, picks the learning rate (see
  :func:`search_lr`); the report records it and every trial.
* ``keep="improved"`` (the default): the metric is measured on a held-out part of the target distribution that is
  never an anchor, before and after every step, and on a *retain* set of in-distribution examples (by default a
  sample of the training data): a step that takes the retain metric more than ``retain_tolerance`` below its value
  before is undone and retried at half the rate, and the weights kept are the state with the best held-out metric,
  or those from before when none is at least as good (the weights and the optimizer's state are restored). Without
  ``holdout_dataset`` the anchors are split in half by ``seed`` (:func:`split_holdout`). See
  :mod:`~lightning_fastif.lightning.correction_guard`.

Selections: ``"helpful"`` (FastIF), ``"harmful"`` (the most harmful points, FastIF's contrast), ``"random"`` (the
baseline, same number of steps), and ``"downweight_harmful"`` (a step that *removes* the most harmful points'
contribution: gradient ascent on their loss, weighted by ``harmful_weight``). With ``pool`` the candidates come
from a pool of examples not seen in training (FastIF's data augmentation): the chosen examples are trained on.

The metric before and after (accuracy, or the mean loss of a model without classes) and the misclassified
anchors follow the evaluation contract of :mod:`lightning_fastif.lightning.evaluation`.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn

from lightning_fastif.core.batches import IndexedData, move_batch
from lightning_fastif.core.grads import LossFn, check_losses, default_loss_fn, evaluating
from lightning_fastif.errors import ArgumentError, LiSSADivergenceError, NonFiniteError, check_choice
from lightning_fastif.lightning import distributed
from lightning_fastif.lightning.arguments import SELECTIONS, CorrectionArguments, arguments_of
from lightning_fastif.lightning.correction_guard import (
    MAX_BACKTRACKS,
    RETAIN_TOLERANCE,
    CorrectionGuard,
    check_retain_tolerance,
    resolve_retain,
    restore_state,
    snapshot_state,
)
from lightning_fastif.lightning.correction_lr import LINE_SEARCH_ANCHORS, line_search_anchors, search_lr
from lightning_fastif.lightning.evaluation import dataset_of, evaluation_metric, split_holdout

__all__ = [
    "KEEP_MODES",
    "LINE_SEARCH_ANCHORS",
    "SELECTIONS",
    "CorrectionReport",
    "CorrectionStep",
    "correct_errors",
    "dataset_of",
    "resolve_steps",
    "search_lr",
    "split_holdout",
]

KEEP_MODES = ("improved", "always")
"""``keep``: ``"improved"`` rolls back a correction that lowers the held-out metric; ``"always"`` keeps every one."""


@dataclass
class CorrectionStep:
    """One gradient step: which anchors were used and which training (or pool) points it was taken on.

    ``chosen_by_rank`` (several processes only) holds the points each rank's own scores chose, in rank order; the
    step is taken on rank 0's choice (``chosen_indices``) everywhere. Under the guard (``keep="improved"``): ``lr``
    is the rate the step was taken at (lowered when a larger one broke the retain tolerance), ``undone`` says the
    step was skipped (every rate tried broke it), and ``holdout``/``retain`` are the metrics after the step.
    """

    step: int
    anchor_indices: list[int]
    chosen_indices: list[int]
    chosen_scores: list[float]
    anchor_loss_before: float
    anchor_loss_after: float
    chosen_by_rank: list[list[int]] | None = None
    lr: float | None = None
    undone: bool = False
    holdout: float | None = None
    retain: float | None = None


@dataclass
class CorrectionReport:
    """What one correction did: the steps, the learning rate, the metric before and after, and whether it was kept.

    ``metric`` is ``"accuracy"`` or ``"loss"`` (mean per-example loss, for models without classes) on the
    evaluation set; ``accuracy_before``/``accuracy_after`` are set only when it is ``"accuracy"``.
    ``metric_after`` is the metric of the weights the model ends with (equal to ``metric_before`` when the
    correction was rolled back); ``metric_corrected`` is the metric of the corrected weights, kept or not.
    ``holdout_before``/``holdout_after`` are the same metric on the held-out part (``holdout_metric``, before the
    correction and right after it, before any rollback); ``kept`` says whether the corrected weights were kept.
    ``lr`` is the learning rate the steps used (``lr="auto"`` resolved; the optimizer's for a given optimizer) and
    ``lr_trials`` the line search's trials (``lr`` 0 is the weights before the step). ``stopped`` says why the
    steps ended early (LiSSA diverged after the first step), else None. ``retain_metric``/``retain_before``/
    ``retain_after`` are the metric on the retain set (in-distribution examples, see
    :mod:`~lightning_fastif.lightning.correction_guard`) before and after the steps, ``retain_tolerance`` how much it
    could drop. ``kept_steps`` is how many steps the weights kept have taken (the guard keeps the state with the best
    held-out metric; 0 when rolled back, every step with ``keep="always"``), ``holdout_kept``/``retain_kept`` the
    metrics of the weights kept.
    """

    selection: str
    steps: list[CorrectionStep] = field(default_factory=list)
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    seconds: float = 0.0
    epoch: int | None = None
    global_step: int | None = None
    metric: str | None = None
    metric_before: float | None = None
    metric_after: float | None = None
    metric_corrected: float | None = None
    lr: float | None = None
    lr_trials: list[dict[str, Any]] = field(default_factory=list)
    keep: str = "always"
    kept: bool = True
    holdout_metric: str | None = None
    holdout_before: float | None = None
    holdout_after: float | None = None
    holdout_size: int | None = None
    stopped: str | None = None
    retain_metric: str | None = None
    retain_before: float | None = None
    retain_after: float | None = None
    retain_kept: float | None = None
    retain_size: int | None = None
    retain_tolerance: float | None = None
    holdout_kept: float | None = None
    kept_steps: int | None = None

    @property
    def used_indices(self) -> list[int]:
        """Every training (or pool) index a step was taken on, in order (repeats kept)."""
        return [i for s in self.steps for i in s.chosen_indices]

    @property
    def gain(self) -> float | None:
        """The improvement of the metric: accuracy after - before, or loss before - after (None if not measured)."""
        return _improvement(self.metric, self.metric_before, self.metric_after)

    @property
    def holdout_gain(self) -> float | None:
        """The improvement of the held-out metric the correction made (before any rollback; None if not measured)."""
        return _improvement(self.holdout_metric, self.holdout_before, self.holdout_after)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON-ready), with :attr:`gain` and :attr:`holdout_gain`."""
        return {**asdict(self), "gain": self.gain, "holdout_gain": self.holdout_gain}


def _improvement(metric: str | None, before: float | None, after: float | None) -> float | None:
    if before is None or after is None:
        return None
    return after - before if metric == "accuracy" else before - after


# -- the steps ---------------------------------------------------------------------------------------------------
def resolve_steps(steps: CorrectionArguments | Mapping[str, Any] | None, **flat: Any) -> CorrectionArguments:
    """``steps`` as :class:`CorrectionArguments`, with the flat keywords that are not None overriding its fields.

    Example::

        >>> resolve_steps({"num_steps": 3}, lr=0.1).lr
        0.1
    """
    base = arguments_of("steps", steps, CorrectionArguments)
    given = {k: v for k, v in flat.items() if v is not None}
    return dataclasses.replace(base, **given) if given else base


def correct_errors(
    model: nn.Module,
    influence: Any,
    anchors: Any,
    *,
    steps: CorrectionArguments | Mapping[str, Any] | None = None,
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    pool: Any = None,
    eval_dataset: Any = None,
    keep: str = "improved",
    holdout_dataset: Any = None,
    retain_dataset: Any = None,
    retain_tolerance: float | None = RETAIN_TOLERANCE,
    trainer: Trainer | None = None,
    num_anchors: int | None = None,
    top_m: int | None = None,
    num_steps: int | None = None,
    lr: float | str | None = None,
    selection: str | None = None,
    harmful_weight: float | None = None,
    seed: int | None = None,
) -> CorrectionReport:
    """Fine-tune ``model`` for ``num_steps`` steps on the ``top_m`` points most helpful to random anchor batches.

    With ``keep="improved"`` (the guard, :mod:`~lightning_fastif.lightning.correction_guard`) the metric of
    :func:`evaluation_metric` is measured on held-out target examples before and after every step, and on the retain
    set (``retain_dataset``, by default 512 training examples drawn by ``seed``): a step that takes the retain metric
    more than ``retain_tolerance`` below its value before is undone and retried at half the rate (twice, then
    skipped), and ``lr="auto"`` takes the best single-step rate itself, halved until its step stays within
    the tolerance. The weights kept are those after the step with the best held-out metric (the later of
    equals); when none is at least the metric before, the weights (and the state of a given ``optimizer``) from
    before are restored and ``report.kept`` is False. The held-out examples are ``holdout_dataset``, or, when it is
    None, half of ``anchors`` (:func:`split_holdout` by ``seed``; the steps draw their anchors from the other
    half). After every step the parameters must be finite: otherwise the weights are restored likewise and
    ``NonFiniteError`` names the step and the points it used.

    Args:
        model: the model to correct (the one ``influence`` wraps; updated in place).
        influence: an :class:`~lightning_fastif.InfluenceModule` over ``model`` (kNN candidates, estimator).
        anchors: examples whose predictions should improve (a Dataset or DataLoader); ``num_anchors`` drawn per step.
        steps: the step settings (:class:`~lightning_fastif.lightning.arguments.CorrectionArguments` or a mapping of
            its fields); its ``optimizer`` field is the callback's, here ``optimizer`` below decides.
        loss_fn: per-example loss (default ``model.per_example_loss``).
        optimizer: an optimizer over ``model``'s parameters to use instead of plain SGD (its own learning rate
            applies; ``lr`` is then ignored).
        pool: a :class:`~lightning_fastif.CandidatePool` of unseen examples to choose from instead of the
            training set (FastIF's data augmentation); the chosen examples are the ones trained on.
        eval_dataset: where the reported metric (accuracy, or mean loss without classes) is measured before and
            after (skipped when None); it is never used to decide anything.
        keep: ``"improved"`` (roll back a correction that lowers the held-out metric) or ``"always"``.
        holdout_dataset: held-out target examples for ``keep="improved"`` (never anchors); None splits ``anchors``.
            With ``keep="always"`` it is only measured.
        retain_dataset: in-distribution examples whose metric the correction must keep (``keep="improved"``); None
            takes 512 examples of ``influence``'s training data (drawn by ``seed``). With ``keep="always"`` it is
            only measured (and only when given).
        retain_tolerance: how much the retain metric may worsen: accuracy points (0.02 = 2 points), or for a model
            without classes a fraction of the mean loss (0.02 = 2% higher); None turns the retain check off (the
            held-out guard alone, and ``lr="auto"`` takes a third of the best single-step rate).
        trainer: the Trainer fitting ``model`` (the :class:`ErrorCorrection` callback passes it): the steps then go
            through ``trainer.strategy`` and its precision plugin (autocast, loss scaling, the module's backward
            and optimizer hooks, gradient clipping).
        num_anchors, top_m, num_steps, lr, selection, harmful_weight, seed: override the fields of ``steps``
            (FastIF: 10 anchors, 10 points, 10 steps, lr 1e-4; here ``lr="auto"`` by default).

    Returns:
        A :class:`CorrectionReport`.

    Raises:
        ArgumentError: for an empty anchor set, a bad step setting, ``keep`` or ``retain_tolerance``, anchors the
            loss cannot take, ``top_m`` larger than the candidates the influence module provides, or fewer than 2
            anchors to split.
        NonFiniteError: when a step makes a parameter non-finite (the weights are restored first).

    Example::

        >>> report = correct_errors(model, influence, anchors, eval_dataset=challenge)  # doctest: +SKIP
        >>> report.lr, report.kept, report.metric_after - report.metric_before  # doctest: +SKIP
        (0.03, True, 0.07)
    """
    args = resolve_steps(
        steps,
        num_anchors=num_anchors,
        top_m=top_m,
        num_steps=num_steps,
        lr=lr,
        selection=selection,
        harmful_weight=harmful_weight,
        seed=seed,
    )
    check_choice("keep", keep, KEEP_MODES)
    tolerance = check_retain_tolerance(retain_tolerance)
    if trainer is not None and not isinstance(trainer, Trainer):
        raise ArgumentError(f"trainer: expected None or the Trainer fitting the model, got {trainer!r}")
    anchor_data = dataset_of("anchors", anchors)
    holdout = dataset_of("holdout_dataset", holdout_dataset) if holdout_dataset is not None else None
    if holdout is None and keep == "improved":
        anchor_data, holdout = split_holdout(anchor_data, args.seed, name="anchors")
    retain = None
    if retain_dataset is not None or (keep == "improved" and tolerance is not None):
        retain = resolve_retain(retain_dataset, influence.train_data, args.seed)
    source = pool.data if pool is not None else influence.train_data
    if args.top_m > len(source):
        raise ArgumentError(
            f"top_m: expected at most the {len(source)} examples to choose from, got {args.top_m}; lower top_m"
        )
    loss_fn = loss_fn if loss_fn is not None else default_loss_fn(model)
    _anchor_loss(model, loss_fn, anchor_data, torch.arange(min(2, len(anchor_data))))  # refuse bad anchors first
    lightning = trainer if isinstance(model, LightningModule) and trainer is not None else None
    if optimizer is None:
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt: torch.optim.Optimizer = torch.optim.SGD(trainable, lr=args.lr if args.lr != "auto" else 0.0)
    else:
        opt = optimizer
    report = CorrectionReport(selection=args.selection, keep=keep)
    if optimizer is not None or args.lr != "auto":  # a given optimizer keeps its own learning rate
        report.lr = float(opt.param_groups[0]["lr"])
    start = time.perf_counter()
    if eval_dataset is not None:
        report.metric, report.metric_before = evaluation_metric(model, eval_dataset, loss_fn=loss_fn)
    same = eval_dataset is not None and eval_dataset is holdout_dataset  # measured once
    guard = CorrectionGuard(holdout, retain, tolerance if keep == "improved" else None, loss_fn)
    guard.start(model, (report.metric, report.metric_before) if same and holdout is not None else None)
    report.holdout_metric, report.holdout_before = guard.holdout_metric, guard.holdout_before
    report.holdout_size = len(holdout) if holdout is not None else None
    report.retain_metric, report.retain_before = guard.retain_metric, guard.retain_before
    report.retain_size = len(retain) if retain is not None else None
    report.retain_tolerance = guard.tolerance
    scaler = getattr(lightning.precision_plugin, "scaler", None) if lightning is not None else None
    given = opt if optimizer is not None else None
    # Kept off the accelerator: one copy of the weights, for a step that diverges or a correction rolled back.
    initial = snapshot_state(model, given, scaler)
    rates = [group["lr"] for group in opt.param_groups]  # the guard may lower a given optimizer's rate for a while
    estimator = influence.ihvp
    try:
        _correction_steps(
            model,
            influence,
            anchor_data,
            source,
            report,
            args,
            loss_fn,
            opt,
            pool,
            lightning,
            guard if keep == "improved" else None,
            (lambda: snapshot_state(model, given, scaler), lambda state: restore_state(model, given, scaler, state)),
        )
    except NonFiniteError:
        restore_state(model, given, scaler, initial)
        raise
    finally:
        influence.ihvp = estimator
    taken = sum(not s.undone for s in report.steps)
    report.holdout_after = guard.measure_holdout(model)
    report.retain_after = guard.measure_retain(model)
    if eval_dataset is not None:
        corrected = report.holdout_after if same else evaluation_metric(model, eval_dataset, loss_fn=loss_fn)[1]
        report.metric_corrected = corrected
    if keep == "always":
        report.kept_steps = taken
    else:  # the best state the guard saw; 0 steps: none was at least as good as before, roll back
        report.kept_steps = guard.best_step
    report.kept = bool(distributed.broadcast_object(report.kept_steps > 0 or keep == "always"))
    if report.kept_steps == taken:
        report.metric_after, report.holdout_kept, report.retain_kept = (
            report.metric_corrected,
            report.holdout_after,
            report.retain_after,
        )
    elif report.kept_steps == 0:
        restore_state(model, given, scaler, initial)
        report.metric_after = report.metric_before  # the weights from before, exactly
        report.holdout_kept, report.retain_kept = report.holdout_before, report.retain_before
    else:
        restore_state(model, given, scaler, guard.saved)
        report.holdout_kept, report.retain_kept = guard.best_holdout, guard.measure_retain(model)
        if eval_dataset is not None:
            report.metric_after = (
                guard.best_holdout if same else evaluation_metric(model, eval_dataset, loss_fn=loss_fn)[1]
            )
    for group, rate in zip(opt.param_groups, rates, strict=True):  # a given optimizer's own rate, as it was
        group["lr"] = rate
    if report.metric == "accuracy":
        report.accuracy_before, report.accuracy_after = report.metric_before, report.metric_after
    report.seconds = time.perf_counter() - start
    return report


def _correction_steps(
    model: nn.Module,
    influence: Any,
    anchor_data: IndexedData,
    source: IndexedData,
    report: CorrectionReport,
    args: CorrectionArguments,
    loss_fn: LossFn,
    opt: torch.optim.Optimizer,
    pool: Any,
    trainer: Trainer | None,
    guard: CorrectionGuard | None,
    state: tuple[Any, Any],
) -> None:
    """The steps (see :func:`correct_errors`); under ``guard`` each step is checked against the retain tolerance
    (undone and retried at half the rate, at most :data:`MAX_BACKTRACKS` times) and each state it keeps is offered to
    the guard with its held-out metric. ``state`` is ``(save, load)``: save and restore the weights and optimizer."""
    save, load = state
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    taken = 0
    for step in range(args.num_steps):
        anchor_idx = torch.randperm(len(anchor_data), generator=generator)[: min(args.num_anchors, len(anchor_data))]
        anchor_batch, before = _anchor_loss(model, loss_fn, anchor_data, anchor_idx)
        if args.selection == "random":
            local = torch.randperm(len(source), generator=generator)[: args.top_m]
            scores = torch.full((args.top_m,), float("nan"))
        else:
            found = _score_or_stop(influence, anchor_batch, pool, step, report)
            if found is None:
                break
            _fix_auto_scale(influence, found.diagnostics.get("ihvp", {}))
            candidates, all_scores = found.candidates[0].cpu(), found.scores[0].detach().cpu()
            if args.top_m > candidates.numel():
                raise ArgumentError(
                    f"top_m: expected at most the {candidates.numel()} kNN candidates, got {args.top_m}; raise "
                    "num_candidates of the influence module or lower top_m"
                )
            order = all_scores.argsort(descending=args.selection == "helpful")[: args.top_m]
            local, scores = candidates[order], all_scores[order]
        chosen, by_rank = _agree_on(local)
        if by_rank is not None:
            scores = distributed.broadcast_object(scores)
        batch = move_batch(source.gather(chosen), device)
        sign = -args.harmful_weight if args.selection == "downweight_harmful" else 1.0
        if report.lr is None:  # lr="auto": searched once, on the first step's points and the anchors they serve
            search = line_search_anchors(anchor_data, args.seed, device)
            report.lr, report.lr_trials = search_lr(
                model, loss_fn, search, batch, served=anchor_batch, sign=sign, guard=guard
            )
            for group in opt.param_groups:
                group["lr"] = report.lr
        checks = guard is not None and guard.checks_retain
        before_step = save() if checks else None
        retain, undone = None, False
        for attempt in range(MAX_BACKTRACKS + 1):
            _take_step(model, opt, loss_fn, batch, sign, chosen.numel(), trainer)
            _check_finite(model, params, step, chosen, args, float(opt.param_groups[0]["lr"]))
            retain = guard.measure_retain(model) if checks else None
            if not checks or guard.retain_passes(retain):
                break
            # Undone, and retried on the same points at half the rate (which the later steps keep).
            load(before_step)
            for group in opt.param_groups:
                group["lr"] = group["lr"] / 2
            undone = attempt == MAX_BACKTRACKS
        step_lr = float(opt.param_groups[0]["lr"]) * (2 if undone else 1)
        with evaluating(model), torch.no_grad():
            after = float(loss_fn(model, anchor_batch).mean())
        holdout = None
        if guard is not None and not undone:
            taken += 1
            holdout = guard.measure_holdout(model)
            guard.offer(taken, holdout, save)
        report.steps.append(
            CorrectionStep(
                step=step,
                anchor_indices=anchor_idx.tolist(),
                chosen_indices=chosen.tolist(),
                chosen_scores=[float(s) for s in scores],
                anchor_loss_before=before,
                anchor_loss_after=after,
                chosen_by_rank=by_rank,
                lr=step_lr,
                undone=undone,
                holdout=holdout,
                retain=retain if not undone else None,
            )
        )


def _score_or_stop(influence: Any, anchor_batch: Any, pool: Any, step: int, report: CorrectionReport) -> Any:
    """The anchors' scores, or None (every rank alike) when LiSSA diverged after the first step: the steps taken
    moved the weights where the Hessian has curvature below -damping, so the correction stops there and the steps
    taken so far are judged as a whole (``report.stopped`` says why). At the first step the divergence is raised."""
    try:
        found, failure = influence.score_batch(anchor_batch, combine=True, candidates_pool=pool), None
    except LiSSADivergenceError as exc:
        if step == 0 and distributed.world_size() <= 1:
            raise
        found, failure = None, exc
    failed = distributed.all_reduce_sum(torch.tensor([0.0 if failure is None else 1.0]))
    if float(failed.sum()) == 0.0:
        return found
    if step == 0:
        raise failure or LiSSADivergenceError("LiSSA diverged on another rank at the first correction step")
    report.stopped = f"step {step}: {failure or 'LiSSA diverged on another rank'}"
    warnings.warn(f"ErrorCorrection: stopped before {report.stopped}", RuntimeWarning, stacklevel=4)
    return None


def _anchor_loss(model: nn.Module, loss_fn: LossFn, anchor_data: IndexedData, idx: Tensor) -> tuple[Any, float]:
    """The anchors at ``idx`` as a batch on the model's device, and their mean loss (eval mode)."""
    batch = move_batch(anchor_data.gather(idx), next(model.parameters()).device)
    try:
        with evaluating(model), torch.no_grad():
            return batch, float(check_losses(loss_fn(model, batch), idx.numel(), "loss_fn").mean())
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError) as exc:
        raise ArgumentError(
            f"anchors: expected examples the loss function accepts, got a batch it fails on ({exc})"
        ) from exc


def _take_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: LossFn,
    batch: Any,
    sign: float,
    count: int,
    trainer: Trainer | None,
) -> None:
    """One optimizer step on ``sign * mean loss`` of ``batch``: through ``trainer.strategy`` when a Trainer is given
    (its precision plugin's autocast and loss scaling, the module's backward hooks, gradient clipping), else plain."""
    model.train()
    opt.zero_grad()
    if trainer is None:
        with torch.enable_grad():
            loss = sign * check_losses(loss_fn(model, batch), count, "loss_fn").mean()
            loss.backward()
        opt.step()
    else:
        strategy = trainer.strategy

        def closure() -> Tensor:
            opt.zero_grad()
            with torch.enable_grad(), trainer.precision_plugin.train_step_context():
                loss = sign * check_losses(loss_fn(model, batch), count, "loss_fn").float().mean()
            # Under DDP with automatic optimization no gradient all-reduce runs here (the forward bypassed the DDP
            # wrapper); every rank steps on the same points from the same weights, so their gradients already agree.
            strategy.backward(loss, opt)
            return loss

        strategy.optimizer_step(opt, closure, model=model)
    opt.zero_grad()


def _agree_on(local: Tensor) -> tuple[Tensor, list[list[int]] | None]:
    """Rank 0's choice on every rank (all step on the same points), and every rank's own choice for the record."""
    world = distributed.world_size()
    if world <= 1:
        return local, None
    gathered = distributed.gather_uneven(local.to(torch.long)).view(world, -1)
    by_rank = gathered.tolist()
    if any(choice != by_rank[0] for choice in by_rank[1:]) and distributed.rank() == 0:
        warnings.warn(
            f"ErrorCorrection: the ranks chose different points ({by_rank}); every rank steps on rank 0's",
            RuntimeWarning,
            stacklevel=3,
        )
    return gathered[0].clone(), by_rank


def _check_finite(
    model: nn.Module, params: list[Tensor], step: int, chosen: Tensor, args: CorrectionArguments, lr: float | None
) -> None:
    """Raise ``NonFiniteError`` on every rank when any rank's step left a parameter NaN or infinite."""
    with torch.no_grad():
        finite = torch.stack([p.isfinite().all() for p in params]).all() if params else torch.tensor(True)
    bad = distributed.all_reduce_sum(torch.tensor([0.0 if bool(finite) else 1.0]))
    if float(bad.sum()) == 0.0:
        return
    names = [n for n, p in model.named_parameters() if p.requires_grad and not bool(p.detach().isfinite().all())]
    where = f"parameters {names[:10]}" if names else "parameters on another rank"
    raise NonFiniteError(
        f"ErrorCorrection: step {step} (selection {args.selection!r}, lr {lr:g}) on training indices "
        f"{chosen.tolist()} made {where} non-finite; the weights from before the correction are restored. Lower "
        "lr (or harmful_weight), or check the loss on those examples"
    )


def _fix_auto_scale(influence: Any, diagnostics: dict[str, Any] | list[dict[str, Any]]) -> None:
    """After the first step, keep LiSSA's auto-estimated scale: a few small steps barely move the Hessian's spectrum,
    and re-estimating it (power iteration over several batches) would cost more than the recursion itself."""
    from lightning_fastif.core.ihvp import LiSSA

    if isinstance(diagnostics, list):  # one entry per checkpoint; the first is the live weights or the latest
        diagnostics = diagnostics[0] if diagnostics else {}
    est = influence.ihvp
    if isinstance(est, LiSSA) and est.scale == "auto" and isinstance(diagnostics.get("scale"), (int, float)):
        influence.ihvp = est.reusing_scale(float(diagnostics["scale"]))
