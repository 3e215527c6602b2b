"""The guard of error correction (``keep="improved"``): the target's held-out metric must improve, the retain metric
must not drop by more than a tolerance.

A correction fine-tunes on points chosen for the *target* distribution (the anchors); the held-out part of that
distribution tells whether it helped there. It says nothing about the distribution the model was trained for: on a
MiniLM planted cue (``benchmarks/bench_correction.py``) ten helpful steps at lr 0.1 raised the challenge accuracy by
33 points while the in-distribution test accuracy fell by 30, and the target-only guard kept them. So the guard
watches a second set, the *retain* set (in-distribution examples; by default 512 examples of the training data,
which every correction has at hand, where a validation set may be missing or be the target distribution itself),
and judges three things with it (:class:`CorrectionGuard`):

* the rate of ``lr="auto"``: the single-step rate that helps the anchors most (no longer a third of it), halved
  until one step at it keeps the retain metric within the tolerance
  (:func:`~lightning_fastif.lightning.correction_lr.search_lr`);
* each step: a step that takes the retain metric below the tolerance is undone and retried on the same points at
  half the rate (at most :data:`MAX_BACKTRACKS` times, then the step is skipped); the rate stays lowered for the
  steps after it;
* the whole correction: after every step the held-out metric is measured, and the weights kept are those of the
  step with the best held-out metric among the states within the tolerance (the latest of equals), provided it is
  at least the metric before; otherwise everything is rolled back.

The tolerance is in the metric's own units: accuracy points for a classifier (``0.02``: at most 2 points lower),
and for a model without classes a fraction of the mean loss (``0.02``: at most 2% higher).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_fastif.core.batches import IndexedData
from lightning_fastif.core.grads import LossFn
from lightning_fastif.errors import ArgumentError, check_number
from lightning_fastif.lightning import distributed
from lightning_fastif.lightning.evaluation import dataset_of, evaluation_metric, subset_of

__all__ = [
    "MAX_BACKTRACKS",
    "RETAIN_SAMPLE",
    "RETAIN_TOLERANCE",
    "CorrectionGuard",
    "check_retain_tolerance",
    "resolve_retain",
    "restore_state",
    "retain_sample",
    "snapshot_state",
    "within_tolerance",
]

RETAIN_SAMPLE = 512
"""Without ``retain_dataset``, this many training examples (drawn by the correction's seed) form the retain set."""

RETAIN_TOLERANCE = 0.02
"""The default ``retain_tolerance``: 2 accuracy points, or 2% of the mean loss for a model without classes."""

MAX_BACKTRACKS = 2
"""A step that breaks the retain tolerance is retried at half the rate this many times before it is skipped."""


def check_retain_tolerance(value: Any) -> float | None:
    """``retain_tolerance`` checked: None (no retain check) or a finite number >= 0.

    Raises:
        ArgumentError: naming ``retain_tolerance``.

    Example::

        >>> check_retain_tolerance(0.05)
        0.05
    """
    return check_number("retain_tolerance", value, low=0.0, allow_none=True)


def within_tolerance(metric: str, before: float, after: float, tolerance: float) -> bool:
    """Whether ``after`` is no worse than ``before`` by more than ``tolerance``: accuracy points for ``"accuracy"``,
    a fraction of ``before`` for ``"loss"`` (a mean loss may rise to ``before * (1 + tolerance)``).

    Example::

        >>> within_tolerance("accuracy", 0.90, 0.885, 0.02), within_tolerance("loss", 1.0, 1.03, 0.02)
        (True, False)
    """
    if after != after:  # NaN never passes
        return False
    if metric == "accuracy":
        return after >= before - tolerance - 1e-12
    return after <= before + abs(before) * tolerance + 1e-12


def retain_sample(train_data: IndexedData, seed: int, size: int = RETAIN_SAMPLE) -> IndexedData:
    """The default retain set: ``size`` training examples drawn by ``seed`` (all of them when there are fewer).

    Example::

        >>> len(retain_sample(IndexedData(torch.utils.data.TensorDataset(torch.zeros(600, 2))), seed=0))
        512
    """
    n = len(train_data)
    if n <= size:
        return train_data
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values
    return subset_of(train_data, idx)


@dataclass
class CorrectionGuard:
    """What ``keep="improved"`` measures and decides, for one correction.

    Built before the first step (:meth:`start` measures the metrics of the weights as they are); the steps ask
    :meth:`retain_passes` after each step and report each kept step's state with :meth:`offer`; :meth:`best` is
    then the step whose weights are kept (0: none, roll back).

    Attributes:
        holdout: held-out target examples (None: not judged on the target, e.g. ``keep="always"``).
        retain: in-distribution examples (None: no retain check).
        tolerance: how much the retain metric may worsen (see :func:`within_tolerance`); None: no retain check.
        loss_fn: the per-example loss (for models without classes).
    """

    holdout: IndexedData | None
    retain: IndexedData | None
    tolerance: float | None
    loss_fn: LossFn | None = None
    holdout_metric: str | None = None
    holdout_before: float | None = None
    retain_metric: str | None = None
    retain_before: float | None = None
    best_step: int = 0
    best_holdout: float | None = None
    saved: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def checks_retain(self) -> bool:
        """Whether the retain metric is checked (a retain set and a tolerance)."""
        return self.retain is not None and self.tolerance is not None

    def start(self, model: nn.Module, holdout_before: tuple[str, float] | None = None) -> None:
        """Measure the metrics before the correction (``holdout_before`` when it was measured already)."""
        if self.holdout is not None:
            measured = holdout_before or evaluation_metric(model, self.holdout, loss_fn=self.loss_fn)
            self.holdout_metric, self.holdout_before = measured
            self.best_holdout = self.holdout_before
        if self.retain is not None:
            self.retain_metric, self.retain_before = evaluation_metric(model, self.retain, loss_fn=self.loss_fn)

    def measure_retain(self, model: nn.Module) -> float | None:
        """The retain metric of the current weights (None without a retain set)."""
        return evaluation_metric(model, self.retain, loss_fn=self.loss_fn)[1] if self.retain is not None else None

    def measure_holdout(self, model: nn.Module) -> float | None:
        """The held-out metric of the current weights (None without a held-out set)."""
        return evaluation_metric(model, self.holdout, loss_fn=self.loss_fn)[1] if self.holdout is not None else None

    def retain_passes(self, value: float | None) -> bool:
        """Whether a retain metric ``value`` is within the tolerance of the value before (rank 0 decides for all)."""
        if not self.checks_retain or value is None:
            return True
        ok = within_tolerance(self.retain_metric, self.retain_before, value, self.tolerance)
        return bool(distributed.broadcast_object(ok))

    def offer(self, step: int, holdout: float | None, save: Any) -> bool:
        """A state within the tolerance after ``step`` steps: it becomes the best when its held-out metric is at least
        the best so far (a tie goes to the later state; ``save()`` is called to keep it). Returns whether it did."""
        if self.holdout is None or holdout is None:
            return False
        better = holdout >= self.best_holdout if self.holdout_metric == "accuracy" else holdout <= self.best_holdout
        better = bool(distributed.broadcast_object(better))
        if better:
            self.best_step, self.best_holdout, self.saved = step, holdout, save()
        return better


def snapshot_state(model: nn.Module, opt: torch.optim.Optimizer | None, scaler: Any) -> dict[str, Any]:
    """The model's weights (off the accelerator), the optimizer's state and the loss scaler's, to restore later."""
    return {
        "weights": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        "opt": copy.deepcopy(opt.state_dict()) if opt is not None else None,
        "scaler": copy.deepcopy(scaler.state_dict()) if scaler is not None else None,
    }


def restore_state(model: nn.Module, opt: torch.optim.Optimizer | None, scaler: Any, state: dict[str, Any]) -> None:
    """Put back what :func:`snapshot_state` saved."""
    model.load_state_dict(state["weights"])
    if opt is not None and state["opt"] is not None:
        opt.load_state_dict(state["opt"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])


def resolve_retain(retain_dataset: Any, train_data: IndexedData, seed: int) -> IndexedData:
    """``retain_dataset`` as :class:`IndexedData`, or the default sample of the training data when it is None.

    Raises:
        ArgumentError: naming ``retain_dataset`` for an empty or unindexable dataset.
    """
    if retain_dataset is not None:
        return dataset_of("retain_dataset", retain_dataset)
    if train_data is None:
        raise ArgumentError("retain_dataset: expected in-distribution examples (no training data to sample), got None")
    return retain_sample(train_data, seed)
