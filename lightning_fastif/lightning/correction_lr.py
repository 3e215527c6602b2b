"""The learning rate of ``lr="auto"``: a line search at the first correction step (:func:`search_lr`).

Split from :mod:`~lightning_fastif.lightning.correction_steps` (which runs it once per correction, on the first
step's points); under the guard (``keep="improved"``) each rate tried is also held to the retain tolerance of
:mod:`~lightning_fastif.lightning.correction_guard`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_fastif.core.batches import IndexedData, move_batch
from lightning_fastif.core.grads import LossFn, evaluating
from lightning_fastif.lightning import distributed
from lightning_fastif.lightning.arguments import AUTO_LR_GRID
from lightning_fastif.lightning.correction_guard import CorrectionGuard

__all__ = ["LINE_SEARCH_ANCHORS", "SEARCH_HALVINGS", "line_search_anchors", "search_lr"]

LINE_SEARCH_ANCHORS = 256
"""At most this many anchors (drawn by ``seed``) stand for all anchors in the ``lr="auto"`` trials."""

SEARCH_HALVINGS = 5
"""With a retain check, the best rate is halved at most this many times (down to 1/32 of it) to find one whose step
keeps the retain metric within the tolerance; when none does, the grid's smallest rate is used."""


def line_search_anchors(anchor_data: IndexedData, seed: int, device: torch.device) -> Any:
    """Every anchor, or :data:`LINE_SEARCH_ANCHORS` of them drawn by ``seed`` (a generator of its own, so that the
    anchor batches of the steps are the same as with a fixed ``lr``)."""
    n = len(anchor_data)
    idx = torch.arange(n)
    if n > LINE_SEARCH_ANCHORS:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:LINE_SEARCH_ANCHORS]
    return move_batch(anchor_data.gather(idx), device)


def search_lr(
    model: nn.Module,
    loss_fn: LossFn,
    anchors: Any,
    chosen: Any,
    *,
    served: Any = None,
    sign: float = 1.0,
    grid: Sequence[float] = AUTO_LR_GRID,
    guard: CorrectionGuard | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    """The learning rate of ``lr="auto"``: the SGD step on ``chosen`` that helps the anchors most (or a third of it).

    For each ``lr`` of ``grid`` the trainable parameters are set to ``w - lr * g`` (``g`` the gradient of
    ``sign * mean loss`` of ``chosen`` at the weights ``w``), the objective and the chosen points' own loss are
    measured (eval mode), and ``w`` is restored exactly. The objective is the mean loss of ``served`` (the anchors
    ``chosen`` was chosen for) plus the mean loss of ``anchors`` (all anchors); without ``served``, the latter alone.
    A trial is *allowed* when the chosen points' objective did not rise (a larger step overshoots the very loss it
    descends) and the losses are finite. Of the allowed trials the one with the lowest objective is the best.
    Without a retain check the answer is the grid point just below it (the rate is used for every step of the
    correction, not once). With a ``guard`` that checks a retain set it is the best rate itself, or its half, quarter,
    ... (at most :data:`SEARCH_HALVINGS` halvings), the first whose step keeps the retain metric within the guard's
    tolerance (these trials are appended with ``"checked": True``; each later step is held to the tolerance too).
    When no trial lowers the objective below its value at ``w`` the answer is the smallest ``lr`` of the grid.

    Why both: a step serves its own anchors (the next steps serve theirs), so judged on all anchors alone one step's
    points often raise their mean loss at every rate (they help their anchors, say those of one class, at the
    others' cost) and the search fell back to a rate that left the model as it was (2 of 5 seeds of the MiniLM cue
    in ``benchmarks/bench_correction.py``). Judged on its ten anchors alone, a step on points that barely help them
    (random points) found its best at a rate so large that ten such steps pushed the model to one class (2 of 5
    random runs there: lr 0.3, in-distribution accuracy 0.94 -> 0.48). The sum takes a rate only where the step's
    own anchors gain more than all anchors lose. Whether the steps together help the target distribution is the
    held-out guard's question (``keep="improved"``).

    Args:
        model: the model (its weights are the same afterwards).
        loss_fn: the per-example loss.
        anchors: a batch of anchor examples (all of them, or a sample) on the model's device.
        chosen: the batch the step is taken on.
        served: the anchor batch ``chosen`` was chosen for (None: judge on ``anchors`` alone).
        sign: -``harmful_weight`` for an ascent step (``"downweight_harmful"``), else 1.
        grid: the candidate learning rates, ascending.
        guard: the correction's :class:`~lightning_fastif.lightning.correction_guard.CorrectionGuard` (measured
            after :meth:`~lightning_fastif.lightning.correction_guard.CorrectionGuard.start`), or None.

    Returns:
        ``(lr, trials)``: one trial per ``lr`` (``{"lr", "objective", "anchor_loss", "served_loss", "chosen_loss",
        "retain", "allowed"}``; ``served_loss`` None without ``served``, ``retain`` None without a retain check),
        the first for ``lr`` 0 (the weights as they are).

    Example::

        >>> lr, trials = search_lr(model, model.per_example_loss, anchor_batch, chosen_batch)  # doctest: +SKIP
    """
    params = [p for p in model.parameters() if p.requires_grad]
    retaining = guard is not None and guard.checks_retain
    # A trial is not a training step: plain autograd on the live weights, restored after each trial, so neither the
    # Trainer's hooks nor its loss scaling apply (they would count or scale a step that is never kept).
    with evaluating(model):
        with torch.enable_grad():
            descended = sign * loss_fn(model, chosen).mean()  # the chosen points' own objective, at w
            grads = torch.autograd.grad(descended, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)]
        start = [p.detach().clone() for p in params]
        with torch.no_grad():

            def trial(lr: float, check_retain: bool = False) -> dict[str, Any]:
                for p, w, g in zip(params, start, grads, strict=True):
                    torch.add(w, g, alpha=-lr, out=p.data)
                anchor = float(loss_fn(model, anchors).mean())
                mine = float(loss_fn(model, served).mean()) if served is not None else None
                target = anchor + (mine if mine is not None else 0.0)
                own = float(sign * loss_fn(model, chosen).mean())
                allowed = math.isfinite(target) and math.isfinite(own) and own <= float(descended)
                retain = guard.measure_retain(model) if check_retain else None
                return {
                    "lr": float(lr),
                    "objective": target,
                    "anchor_loss": anchor,
                    "served_loss": mine,
                    "chosen_loss": own,
                    "retain": retain,
                    "allowed": allowed and (not check_retain or guard.retain_passes(retain)),
                }

            try:
                trials = [{**trial(0.0), "allowed": True}]
                base = trials[0]["objective"]
                trials += [trial(lr) for lr in grid]
                allowed = [t for t in trials[1:] if t["allowed"]]
                best = min(allowed, key=lambda t: t["objective"]) if allowed else None
                if best is None or best["objective"] >= base:
                    lr = float(grid[0])
                elif not retaining:
                    # The rate serves num_steps steps, not one: the grid point below the single-step best (a third
                    # of it). Measured (5 seeds, digits cue / tabular cue, challenge points): the best itself gained
                    # +17.9 / +19.8 but cost 26 / 10 in-distribution test points (searched on all anchors); a third
                    # of it gained +22.1 / +16.0 at +1.2 / -3.5.
                    lr = float(grid[max(list(grid).index(best["lr"]) - 1, 0)])
                else:
                    # With a retain check: the best rate itself, halved until its step keeps the retain metric
                    # within the tolerance (finer than the grid; each later step is held to it as well).
                    lr, rate = float(grid[0]), best["lr"]
                    for _ in range(SEARCH_HALVINGS + 1):
                        checked = {**trial(rate, check_retain=True), "checked": True}
                        trials.append(checked)
                        if checked["allowed"]:
                            lr = rate
                            break
                        rate /= 2
            finally:
                for p, w in zip(params, start, strict=True):
                    p.data.copy_(w)
    return float(distributed.broadcast_object(lr)), trials  # every rank steps at rank 0's learning rate
