"""Error correction during ``trainer.fit``: the :class:`ErrorCorrection` callback over FastIF's correction steps.

One core, two entry points:

* :func:`~lightning_fastif.lightning.correction_steps.correct_errors`: after training, on any model and
  :class:`~lightning_fastif.lightning.module.InfluenceModule` (with :func:`compare_selections` here, FastIF's
  helpful-vs-random-vs-harmful table);
* :class:`ErrorCorrection`: a Lightning callback running the same core at configured moments of ``trainer.fit``.

The core and the reports live in :mod:`lightning_fastif.lightning.correction_steps`, the evaluation contract (which
hook gives the model's outputs; accuracy, or the mean loss without classes) in
:mod:`lightning_fastif.lightning.evaluation`; their public names are importable from here too.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import Dataset

from lightning_fastif.core.batches import IndexedData
from lightning_fastif.core.ihvp import InverseHVP
from lightning_fastif.core.params import ParamSpec, select_parameters
from lightning_fastif.errors import ArgumentError, check_bool, check_choice, check_int, check_path
from lightning_fastif.io.atomic import atomic_write_bytes
from lightning_fastif.lightning import distributed
from lightning_fastif.lightning.arguments import CorrectionArguments, fold_legacy_arguments
from lightning_fastif.lightning.correction_guard import RETAIN_TOLERANCE, check_retain_tolerance
from lightning_fastif.lightning.correction_steps import (
    KEEP_MODES,
    SELECTIONS,
    CorrectionReport,
    CorrectionStep,
    correct_errors,
    resolve_steps,
)
from lightning_fastif.lightning.evaluation import (
    accuracy,
    dataset_of,
    evaluation_metric,
    misclassified_indices,
    model_outputs,
    predicted_labels,
    split_holdout,
    subset_of,
)

__all__ = [
    "KEEP_MODES",
    "SELECTIONS",
    "CorrectionReport",
    "CorrectionStep",
    "ErrorCorrection",
    "accuracy",
    "compare_selections",
    "correct_errors",
    "evaluation_metric",
    "misclassified_indices",
    "model_outputs",
    "predicted_labels",
    "split_holdout",
]

ANCHOR_SOURCES = ("dataset", "misclassified")


class ErrorCorrection(Callback):
    """Correct the model's errors during ``trainer.fit`` with FastIF's influence-guided fine-tuning.

    At each configured moment (every ``every_n_epochs`` epochs, at the given ``epochs``, and/or at the end of fit),
    builds an :class:`~lightning_fastif.InfluenceModule` over the model being trained (kNN candidates from the
    latest :class:`~lightning_fastif.FeatureSnapshot` features, or every training point when ``num_candidates`` is
    None) and runs :func:`correct_errors`, its steps through ``trainer.strategy`` (the precision plugin's autocast
    and loss scaling, the module's backward hooks, gradient clipping; under DDP every rank takes the same steps and
    ends with rank 0's weights).

    **The guard** (``keep="improved"``, the default): the metric (accuracy, or the mean loss for a model without
    classes; see :func:`evaluation_metric`) is measured before and after each correction on a held-out part of the
    target distribution that is never an anchor, and a correction that lowers it is rolled back (the weights, and
    with ``optimizer="model"`` the optimizer's state, from before). The held-out part is ``holdout_dataset`` when
    given; otherwise it is split off once, deterministically by ``steps.seed`` (half of the examples, see
    :func:`~lightning_fastif.lightning.evaluation.split_holdout`), from ``eval_dataset`` with
    ``anchors_from="misclassified"`` (the anchors are then the misclassified examples of the other half), or from
    ``anchors`` with ``anchors_from="dataset"`` (the steps draw from the other half). With
    ``anchors_from="misclassified"`` the split is made for ``keep="always"`` too, so the reported metric is never
    measured on the anchors.

    **The retain check** (part of the guard): the held-out part says whether the target distribution gained, not
    what the distribution the model was trained for lost. So each step is also held to the metric on a *retain* set
    of in-distribution examples: ``retain_dataset`` when given, else a sample of 512 examples of the training data
    the Trainer fits on (drawn by ``steps.seed``; it is always at hand and in distribution by definition, where a
    validation set may be missing or be the target distribution itself; pass ``retain_dataset=dm.val_dataset`` to
    judge on your validation set). A step that takes that metric more than ``retain_tolerance`` below its value
    before the correction (accuracy points, or a fraction of the mean loss) is undone and retried at half the rate;
    ``lr="auto"`` takes the best single-step rate itself rather than a third of it, halved until its step stays
    within it. Of the states after each step, the weights kept are those with the best held-out metric (at
    least the metric before; otherwise everything is rolled back). See
    :mod:`~lightning_fastif.lightning.correction_guard`.

    Logged to the Trainer's loggers: ``fastif/correction/acc_before``/``..._after`` (or ``..._loss_...``) on
    ``eval_dataset`` (its held-out half with misclassified anchors), ``fastif/correction/holdout_acc_before``/
    ``..._after`` (or ``..._loss_...``; after the correction, before any rollback), ``fastif/correction/kept`` (1 or
    0), ``fastif/correction/lr`` (the learning rate used, ``lr="auto"`` resolved), ``fastif/correction/kept_steps``
    and, with the retain check, ``fastif/correction/retain_acc_before``/``..._after`` (or ``..._loss_...``; the
    weights kept). Everything, with the points
    used, is written to ``<dirpath>/correction.json`` and :attr:`history`. A step that makes the weights
    non-finite restores the weights from before that correction and stops the fit with ``NonFiniteError``.

    Args:
        anchors: examples whose predictions should improve. ``None`` with ``anchors_from="misclassified"`` takes the
            misclassified examples of ``eval_dataset`` at each moment.
        anchors_from: ``"dataset"`` (use ``anchors``) or ``"misclassified"`` (a classifier only).
        eval_dataset: where the metric is measured before and after each correction (with
            ``anchors_from="misclassified"`` and no ``holdout_dataset``: split into the anchors' half and the
            held-out half, where the metric is measured).
        keep: ``"improved"`` (roll back a correction that lowers the held-out metric) or ``"always"``.
        holdout_dataset: held-out examples of the target distribution for the guard, never used as anchors.
        retain_dataset: in-distribution examples whose metric the correction must keep (default: a sample of the
            training data).
        retain_tolerance: how far the retain metric may fall (accuracy points, 0.02 = 2 points; for a model without
            classes a fraction of the mean loss); None turns the retain check off.
        steps: the correction steps (:class:`~lightning_fastif.lightning.arguments.CorrectionArguments`, or a
            mapping of its fields): ``num_anchors``, ``top_m``, ``num_steps``, ``lr``, ``optimizer``,
            ``selection``, ``harmful_weight``, ``seed``.
        every_n_epochs, epochs, on_fit_end: when to correct.
        num_candidates: kNN candidates per anchor batch (FastIF: 1000); None scores every training point.
        ihvp: the inverse-HVP estimator (default: the InfluenceModule's).
        params: parameters influence is taken over (default: all trainable); checked against the model in
            ``setup``.
        snapshot_dir: the FeatureSnapshot directory (default: the directory of a FeatureSnapshot in the Trainer,
            its ``dirpath`` or, when that is None, ``<default_root_dir>/fastif_snapshot`` as FeatureSnapshot uses).
        pool: a dataset of unseen examples to choose from (FastIF's data augmentation).
        compare_with: ``None`` or a selection (``"random"``, ``"harmful"``, ...) run first at every moment, with the
            same settings and from the same weights, then undone: its gain is reported beside the correction's
            (``history[i]["comparison"]``, ``fastif/correction/<selection>_gain`` and ``fastif/correction/gain``), so
            a user sees what influence adds over, say, as many random points. It doubles the correction's cost.
        dirpath: where ``correction.json`` is written (default: ``<default_root_dir>/fastif_correction``).
        **legacy: the flat step arguments of earlier versions (``num_anchors=...``, ``lr=...``); folded into
            ``steps`` with a DeprecationWarning.

    Raises:
        ArgumentError: at construction for a bad argument (``keep`` not one of ``"improved"``/``"always"``, fewer
            than 2 examples to split a held-out part from, ``retain_tolerance`` not None or a number >= 0, an empty
            ``retain_dataset``); in ``setup`` (before the first training step) for a
            sharding strategy, a ``params`` pattern that matches no parameter, an empty ``anchors`` /
            ``eval_dataset`` / ``pool``, or ``num_candidates`` without a snapshot directory.

    Example::

        >>> ErrorCorrection(anchors_from="misclassified", eval_dataset=val, epochs=[1], on_fit_end=False,
        ...                 steps=CorrectionArguments(num_steps=5)).state_key  # doctest: +SKIP
        "ErrorCorrection{'selection': 'helpful', 'top_m': 10, 'num_steps': 5}"
    """

    def __init__(
        self,
        *,
        anchors: Dataset | None = None,
        anchors_from: str = "dataset",
        eval_dataset: Dataset | None = None,
        keep: str = "improved",
        holdout_dataset: Dataset | None = None,
        retain_dataset: Dataset | None = None,
        retain_tolerance: float | None = RETAIN_TOLERANCE,
        steps: CorrectionArguments | Mapping[str, Any] | None = None,
        every_n_epochs: int | None = None,
        epochs: Sequence[int] | None = None,
        on_fit_end: bool = True,
        num_candidates: int | None = 1000,
        ihvp: InverseHVP | None = None,
        params: ParamSpec = None,
        snapshot_dir: str | os.PathLike | None = None,
        pool: Dataset | None = None,
        compare_with: str | None = None,
        dirpath: str | os.PathLike | None = None,
        **legacy: Any,
    ) -> None:
        self.steps: CorrectionArguments = fold_legacy_arguments(
            "ErrorCorrection", legacy, {"steps": (steps, CorrectionArguments)}
        )["steps"]
        check_choice("anchors_from", anchors_from, ANCHOR_SOURCES)
        if anchors_from == "dataset" and anchors is None:
            raise ArgumentError(
                "anchors: expected a Dataset of anchor examples (or anchors_from='misclassified'), got None"
            )
        if anchors_from == "misclassified" and eval_dataset is None:
            raise ArgumentError(
                "eval_dataset: expected a Dataset whose misclassified examples become the anchors "
                "(anchors_from='misclassified'), got None"
            )
        check_choice("keep", keep, KEEP_MODES)
        if compare_with is not None:
            check_choice("compare_with", compare_with, SELECTIONS)
        named = (("anchors", anchors), ("eval_dataset", eval_dataset), ("holdout_dataset", holdout_dataset))
        for name, data in (*named, ("pool", pool), ("retain_dataset", retain_dataset)):
            if data is not None:
                dataset_of(name, data)
        check_int("every_n_epochs", every_n_epochs, allow_none=True)
        if epochs is not None and (isinstance(epochs, (str, bytes)) or not isinstance(epochs, Sequence)):
            raise ArgumentError(f"epochs: expected None or a list of epoch numbers >= 0, got {epochs!r}")
        for i, epoch in enumerate(epochs or []):
            check_int(f"epochs[{i}]", epoch, minimum=0)
        check_bool("on_fit_end", on_fit_end)
        if every_n_epochs is None and not epochs and not on_fit_end:
            raise ArgumentError(
                "on_fit_end: expected True when neither every_n_epochs nor epochs is set (otherwise the correction "
                "never runs), got False"
            )
        top_m = self.steps.top_m
        check_int("num_candidates", num_candidates, allow_none=True)
        if num_candidates is not None and num_candidates < top_m:
            raise ArgumentError(
                f"num_candidates: expected None (every training point) or an integer >= top_m ({top_m}), "
                f"got {num_candidates!r}"
            )
        if ihvp is not None and not isinstance(ihvp, InverseHVP):
            raise ArgumentError(
                f"ihvp: expected None or an InverseHVP estimator (LiSSA, ConjugateGradient, ...), got {ihvp!r}"
            )
        self.anchors, self.anchors_from, self.eval_dataset = anchors, anchors_from, eval_dataset
        self.keep, self.holdout_dataset = keep, holdout_dataset
        self.retain_dataset, self.retain_tolerance = retain_dataset, check_retain_tolerance(retain_tolerance)
        self._anchor_source, self._holdout, self._evaluated = self._parts()
        self.every_n_epochs, self.epochs, self.on_fit_end_enabled = every_n_epochs, list(epochs or []), on_fit_end
        self.num_candidates, self.ihvp, self.params = num_candidates, ihvp, params
        self.snapshot_dir = check_path("snapshot_dir", snapshot_dir, allow_none=True)
        self.dirpath = check_path("dirpath", dirpath, allow_none=True)
        self.pool = pool
        self.compare_with = compare_with
        self._done: list[str] = []
        self._history: list[dict[str, Any]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            selection=self.steps.selection, top_m=self.steps.top_m, num_steps=self.steps.num_steps
        )

    @property
    def history(self) -> list[dict[str, Any]]:
        """One :meth:`CorrectionReport.to_dict` per correction done so far (restored on resume)."""
        return list(self._history)

    # -- Lightning hooks ------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Resolve ``dirpath``; for ``fit``, check what needs the Trainer and the model before the first step."""
        dirpath = self.dirpath or str(Path(trainer.default_root_dir) / "fastif_correction")
        self._dirpath = Path(trainer.strategy.broadcast(dirpath))
        if stage != "fit":
            return
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            raise ArgumentError(
                "strategy: expected ddp, ddp_spawn or a single device (ErrorCorrection steps on whole parameters), "
                f"got {type(trainer.strategy).__name__}"
            )
        try:
            select_parameters(pl_module, self.params)
        except ArgumentError:
            raise
        except (TypeError, ValueError) as exc:  # the message names the patterns and the available names
            raise ArgumentError(str(exc)) from exc
        named = (("anchors", self.anchors), ("eval_dataset", self.eval_dataset), ("pool", self.pool))
        for name, data in (*named, ("holdout_dataset", self.holdout_dataset), ("retain_dataset", self.retain_dataset)):
            if data is not None:
                dataset_of(name, data)
        if self.num_candidates is not None and self.snapshot_dir is None:
            self._snapshot_dir(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        due = (self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0) or epoch in self.epochs
        if due:
            self._run(trainer, pl_module, f"epoch={epoch}")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.on_fit_end_enabled:
            self._run(trainer, pl_module, "fit_end")

    def state_dict(self) -> dict[str, Any]:
        return {"done": list(self._done), "history": json.loads(json.dumps(self._history))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._done = list(state_dict.get("done", []))
        self._history = list(state_dict.get("history", []))

    # -- the work -------------------------------------------------------------------------------------------------
    def _parts(self) -> tuple[Any, Any, Any]:
        """``(where the anchors come from, the held-out part or None, where the reported metric is measured)``,
        fixed for the whole fit so that no moment's held-out example was an earlier moment's anchor."""
        seed = self.steps.seed
        if self.anchors_from == "misclassified":
            if self.holdout_dataset is not None:
                return self.eval_dataset, self.holdout_dataset, self.eval_dataset
            source, held = split_holdout(self.eval_dataset, seed, name="eval_dataset")
            return source, held, held
        if self.holdout_dataset is not None or self.keep == "always":
            return self.anchors, self.holdout_dataset, self.eval_dataset
        source, held = split_holdout(self.anchors, seed, name="anchors")
        return source, held, self.eval_dataset

    def _run(self, trainer: Trainer, pl_module: LightningModule, moment: str) -> None:
        if moment in self._done:  # a resumed fit does not repeat a correction
            return
        from lightning_fastif.lightning.candidates import embed_pool
        from lightning_fastif.lightning.module import CandidatePool, InfluenceModule

        train_dataset = _train_dataset(trainer)
        anchors = self._anchor_source
        if self.anchors_from == "misclassified":
            try:
                wrong = misclassified_indices(pl_module, anchors)
            except ArgumentError as exc:  # a model without classes has nothing misclassified
                raise ArgumentError(
                    f"anchors_from: expected 'dataset' (with anchors) for this model, got 'misclassified' ({exc})"
                ) from exc
            if wrong.numel() == 0:
                self._record(trainer, moment, None)
                return
            anchors = subset_of(dataset_of("eval_dataset", anchors), wrong)
        kwargs: dict[str, Any] = {}
        if self.ihvp is not None:
            kwargs["ihvp"] = self.ihvp
        influence = InfluenceModule(
            pl_module,
            train_dataset=train_dataset,
            snapshot=self._snapshot_dir(trainer) if self.num_candidates is not None else None,
            num_candidates=self.num_candidates,
            params=self.params,
            compute={"progress": False},
            **kwargs,
        )
        pool = None
        if self.pool is not None:  # embedded under the current weights: the pool is small and changes nothing
            pool = embed_pool(influence, self.pool) if self.num_candidates is not None else CandidatePool(self.pool)
        optimizer = trainer.optimizers[0] if self.steps.optimizer == "model" and trainer.optimizers else None

        def correct(steps: CorrectionArguments) -> CorrectionReport:
            return correct_errors(
                pl_module,
                influence,
                anchors,
                steps=steps,
                optimizer=optimizer,
                pool=pool,
                eval_dataset=self._evaluated,
                keep=self.keep,
                holdout_dataset=self._holdout,
                retain_dataset=self.retain_dataset,
                retain_tolerance=self.retain_tolerance,
                trainer=trainer,
                seed=self.steps.seed + len(self._done),
            )

        comparison = None
        if self.compare_with is not None:
            # The comparison runs first and is undone, so the weights the fit goes on with are the correction's.
            weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            opt_state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
            comparison = correct(dataclasses.replace(self.steps, selection=self.compare_with))
            pl_module.load_state_dict(weights)
            if optimizer is not None and opt_state is not None:
                optimizer.load_state_dict(opt_state)
        report = correct(self.steps)
        report.epoch, report.global_step = trainer.current_epoch, trainer.global_step
        _sync_parameters(pl_module)
        self._record(trainer, moment, report, comparison)

    def _snapshot_dir(self, trainer: Trainer) -> str:
        """``snapshot_dir``, else the directory the Trainer's FeatureSnapshot writes to (resolved as it does)."""
        if self.snapshot_dir is not None:
            return self.snapshot_dir
        from lightning_fastif.lightning.snapshots import FeatureSnapshot, default_snapshot_dir

        for cb in trainer.callbacks:
            if isinstance(cb, FeatureSnapshot):
                resolved = getattr(cb, "snapshot_dir", None) or cb.dirpath or default_snapshot_dir(trainer)
                return os.path.abspath(resolved)
        raise ArgumentError(
            "snapshot_dir: expected a FeatureSnapshot directory, or a FeatureSnapshot callback in the Trainer, when "
            "num_candidates is set (or set num_candidates=None to score every training point), got None"
        )

    def _record(
        self, trainer: Trainer, moment: str, report: CorrectionReport | None, comparison: CorrectionReport | None = None
    ) -> None:
        self._done.append(moment)
        if report is not None:
            entry = {"moment": moment, **report.to_dict()}
            metrics = {"fastif/correction/seconds": report.seconds, "fastif/correction/kept": float(report.kept)}
            if comparison is not None:
                entry["comparison"] = comparison.to_dict()
                if report.gain is not None and comparison.gain is not None:
                    metrics["fastif/correction/gain"] = report.gain
                    metrics[f"fastif/correction/{comparison.selection}_gain"] = comparison.gain
            self._history.append(entry)
            if report.lr is not None:
                metrics["fastif/correction/lr"] = report.lr
            if report.metric_before is not None:
                short = "acc" if report.metric == "accuracy" else "loss"
                metrics[f"fastif/correction/{short}_before"] = report.metric_before
                metrics[f"fastif/correction/{short}_after"] = report.metric_after
            if report.holdout_before is not None:
                short = "acc" if report.holdout_metric == "accuracy" else "loss"
                metrics[f"fastif/correction/holdout_{short}_before"] = report.holdout_before
                metrics[f"fastif/correction/holdout_{short}_after"] = report.holdout_after
            if report.retain_before is not None:
                short = "acc" if report.retain_metric == "accuracy" else "loss"
                metrics[f"fastif/correction/retain_{short}_before"] = report.retain_before
                metrics[f"fastif/correction/retain_{short}_after"] = report.retain_kept
            if report.kept_steps is not None:
                metrics["fastif/correction/kept_steps"] = float(report.kept_steps)
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.is_global_zero:
            self._dirpath.mkdir(parents=True, exist_ok=True)
            payload = json.dumps({"corrections": self._history, "done": self._done}, indent=2).encode()
            atomic_write_bytes(self._dirpath / "correction.json", payload)
        trainer.strategy.barrier("ErrorCorrection.record")


def compare_selections(
    model: nn.Module,
    anchors: Any,
    eval_dataset: Any,
    *,
    make_influence: Any,
    selections: Sequence[str] = ("helpful", "harmful", "random"),
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    also: Mapping[str, Any] | None = None,
    random_at_lr_of: str | None = None,
    **correct_kwargs: Any,
) -> dict[str, Any]:
    """Run :func:`correct_errors` from copies of ``model`` for each selection and seed; summarise the gains.

    FastIF's comparison (helpful against random and harmful points, the same number of steps): every run starts
    from the same weights, so the gains are comparable. A gain is the improvement of the metric of
    :func:`evaluation_metric`: accuracy after - before, or for a model without classes mean loss before - after,
    of the weights each run ends with. With :func:`correct_errors`' defaults (``lr="auto"``, ``keep="improved"``)
    each run picks its own learning rate and holds out half of ``anchors`` for the guard (pass
    ``holdout_dataset=...`` to hold out other examples); ``eval_dataset`` only measures.

    Args:
        model: the trained model (not modified).
        anchors: anchor examples (a small sample of the target distribution).
        eval_dataset: where the metric is measured before and after.
        make_influence: ``make_influence(model_copy) -> InfluenceModule`` over the copy.
        selections: the selections compared.
        seeds: one run per seed and selection.
        also: more datasets measured after each run, by name (say ``{"test": test}``, to see what a correction
            costs in distribution): a run gets ``"<name>_after"``, the summary ``"<name>_before"``.
        random_at_lr_of: one of ``selections`` (say ``"helpful"``): also run random points, seed by seed, at the
            learning rate that selection's run used, as ``"random_at_<selection>_lr"``. With ``lr="auto"`` every run
            picks its own rate and random points (whose gradient barely moves the anchors' loss) get a small one:
            this separates what the choice of points gains from what the rate gains.
        **correct_kwargs: passed to :func:`correct_errors` (``steps``, ``num_steps``, ``lr``, ``top_m``, ...).

    Returns:
        ``{selection: {"metric", "gain_mean", "gain_std", "after_mean", "after_std", "before", "kept_fraction",
        "runs": [...]}}``; a run holds ``seed``, ``before``, ``after`` (the weights kept), ``gain``,
        ``corrected`` (the metric of the corrected weights, kept or not), ``lr``, ``kept``,
        ``holdout_before``/``_after`` and ``stopped``.

    Example::

        >>> table = compare_selections(model, anchors, challenge, make_influence=make, seeds=[0, 1])  # doctest: +SKIP
        >>> table["helpful"]["gain_mean"] > table["random"]["gain_mean"]  # doctest: +SKIP
        True
    """
    for name in selections:
        resolve_steps(None, selection=name)  # an unknown selection fails before the first run
    if random_at_lr_of is not None:
        check_choice("random_at_lr_of", random_at_lr_of, tuple(selections))
    also = dict(also or {})
    start = {name: evaluation_metric(model, data)[1] for name, data in also.items()}
    summary: dict[str, Any] = {}
    plan = [(name, name) for name in selections]
    if random_at_lr_of is not None:
        plan.append((f"random_at_{random_at_lr_of}_lr", "random"))
    for key, selection in plan:
        # the matched run takes, seed by seed, the rate the named selection's run used
        rates = {r["seed"]: r["lr"] for r in summary[random_at_lr_of]["runs"]} if key != selection else {}
        runs = []
        for seed in seeds:
            m = copy.deepcopy(model)
            kwargs = {**correct_kwargs, "lr": rates[seed]} if seed in rates else correct_kwargs
            report = correct_errors(
                m,
                make_influence(m),
                anchors,
                selection=selection,
                eval_dataset=eval_dataset,
                seed=seed,
                **kwargs,
            )
            runs.append(
                {
                    "seed": seed,
                    "before": report.metric_before,
                    "after": report.metric_after,
                    "gain": report.gain,
                    "corrected": report.metric_corrected,
                    "lr": report.lr,
                    "kept": report.kept,
                    "holdout_before": report.holdout_before,
                    "holdout_after": report.holdout_after,
                    "holdout_kept": report.holdout_kept,
                    "retain_before": report.retain_before,
                    "retain_kept": report.retain_kept,
                    "kept_steps": report.kept_steps,
                    "used_indices": report.used_indices,
                    "stopped": report.stopped,
                    **{f"{name}_after": evaluation_metric(m, data)[1] for name, data in also.items()},
                }
            )
        gains = [r["gain"] for r in runs]
        afters = [r["after"] for r in runs]
        summary[key] = {
            "metric": report.metric,
            "before": runs[0]["before"],
            "gain_mean": statistics.fmean(gains),
            "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
            "after_mean": statistics.fmean(afters),
            "after_std": statistics.stdev(afters) if len(afters) > 1 else 0.0,
            "kept_fraction": statistics.fmean(float(r["kept"]) for r in runs),
            **{f"{name}_before": value for name, value in start.items()},
            "runs": runs,
        }
    return summary


def _train_dataset(trainer: Trainer) -> Any:
    loader = trainer.train_dataloader
    if loader is None and trainer.datamodule is not None:
        loader = trainer.datamodule.train_dataloader()
    if loader is None:
        raise ArgumentError(
            "train_dataloaders: expected a training DataLoader in trainer.fit (ErrorCorrection takes its candidates "
            "from its dataset), got None"
        )
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    if hasattr(loader, "loaders"):  # CombinedLoader
        loader = loader.loaders if not isinstance(loader.loaders, (list, dict)) else next(iter(loader.loaders))
    return IndexedData(loader)


def _sync_parameters(model: nn.Module) -> None:
    """Make every rank hold rank 0's weights (the steps are deterministic; this guards against drift)."""
    if distributed.world_size() <= 1:
        return
    with torch.no_grad():
        for p in model.parameters():
            synced = distributed.broadcast_object(p.detach().cpu())
            p.copy_(synced.to(p.device))
