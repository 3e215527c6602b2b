"""Typed argument groups: the advanced knobs of ``InfluenceModule`` and ``ErrorCorrection``, documented once.

The common case needs none of them (``InfluenceModule(model, train_dataset=..., snapshot=..., num_candidates=...)``).
Each group is a frozen dataclass validated at construction, so a wrong value fails before any work starts, with
the argument's name, the value and what is accepted (:class:`~lightning_fastif.errors.ArgumentError`). In Hydra
configs a group is a node with its own ``_target_``.

Example::

    >>> SearchArguments(knn_sign="helpful", knn_damping=0.1)
    SearchArguments(feature_layer=None, feature_hook='output', feature_version=None, knn_query='each', knn_sign='helpful', knn_damping=0.1)
    >>> ComputeArguments(batch_size=0)
    Traceback (most recent call last):
    ...
    lightning_fastif.errors.ArgumentError: batch_size: expected an integer >= 1, got 0
"""  # noqa: E501

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from lightning_fastif.errors import ArgumentError, check_bool, check_choice, check_int, check_number

KNN_QUERIES = ("each", "mean")
KNN_SIGNS = ("both", "helpful", "harmful")
FEATURE_HOOKS = ("input", "output")
PARALLEL_MODES = ("test", "repeats")
SCORE_METHODS = ("auto", "jvp", "grads")
SELECTIONS = ("helpful", "harmful", "random", "downweight_harmful")
OPTIMIZERS = ("sgd", "model")
AUTO_LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
"""The learning rates ``lr="auto"`` tries (FastIF's 1e-4 for BERT up to 1, a factor of about 3 apart)."""


@dataclass(frozen=True)
class SearchArguments:
    """How the kNN candidates of a test point are found.

    Args:
        feature_layer: submodule whose output (``feature_hook="output"``) or input (``"input"``) are the features;
            default: the snapshot's layer, else ``model.features``.
        feature_hook: ``"output"`` or ``"input"``.
        feature_version: the snapshot's features version (default: the latest). Query features are computed with
            the weights of the checkpoint of that version when it is among ``checkpoints``, else the live weights.
        knn_query: ``"each"`` (each test point's own neighbours) or ``"mean"`` (all test points of a batch share
            the neighbours of their mean feature).
        knn_sign: for a loss-gradient snapshot only: ``"both"`` (``num_candidates`` likely helpful and
            ``num_candidates`` likely harmful points), ``"helpful"`` or ``"harmful"``. ``None``: ``"both"`` for loss
            gradients; must be ``None`` for activation features, whose distances have no sign.
        knn_damping: λ of the query preconditioner ``(H_last + λI)⁻¹`` (loss-gradient snapshots that stored
            ``H_last``); ``None``: the estimator's damping, the λ the scores use.
    """

    feature_layer: str | None = None
    feature_hook: Literal["input", "output"] = "output"
    feature_version: str | int | None = None
    knn_query: Literal["each", "mean"] = "each"
    knn_sign: Literal["both", "helpful", "harmful"] | None = None
    knn_damping: float | None = None

    def __post_init__(self) -> None:
        if self.feature_layer is not None and not (isinstance(self.feature_layer, str) and self.feature_layer):
            raise ArgumentError(
                f"feature_layer: expected None or a submodule name such as 'classifier', got {self.feature_layer!r}"
            )
        check_choice("feature_hook", self.feature_hook, FEATURE_HOOKS)
        if self.feature_version is not None and (
            isinstance(self.feature_version, bool) or not isinstance(self.feature_version, (str, int))
        ):
            raise ArgumentError(
                f"feature_version: expected None, a version name or a position, got {self.feature_version!r}"
            )
        check_choice("knn_query", self.knn_query, KNN_QUERIES)
        if self.knn_sign is not None:
            check_choice("knn_sign", self.knn_sign, KNN_SIGNS)
        number = check_number("knn_damping", self.knn_damping, low=0, allow_none=True)
        object.__setattr__(self, "knn_damping", number)


@dataclass(frozen=True)
class ComputeArguments:
    """How the work is cut and spread (never changes the scores).

    Args:
        parallel: ``"test"`` (test points split across ranks) or ``"repeats"`` (LiSSA repeats and candidates split
            across ranks; for few test points).
        batch_size: candidates per forward pass (ignored under ``max_memory``, which derives chunk sizes).
        hessian_batch_size: examples per chunk of full-data Hessian products (CG, exact, residuals).
        score_method: ``"auto"``, ``"jvp"`` or ``"grads"`` (see :mod:`lightning_fastif.core.influence`).
        progress: show progress bars on long stages (only when the Trainer's progress bar is on).
    """

    parallel: Literal["test", "repeats"] = "test"
    batch_size: int = 256
    hessian_batch_size: int = 256
    score_method: Literal["auto", "jvp", "grads"] = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        check_choice("parallel", self.parallel, PARALLEL_MODES)
        check_int("batch_size", self.batch_size)
        check_int("hessian_batch_size", self.hessian_batch_size)
        check_choice("score_method", self.score_method, SCORE_METHODS)
        check_bool("progress", self.progress)


@dataclass(frozen=True)
class CorrectionArguments:
    """The fine-tuning steps of error correction (FastIF section 6).

    ``lr="auto"`` (the default) picks the learning rate by a line search at the first step, so the steps help
    without tuning. Once the first step's points are chosen, each rate of :data:`AUTO_LR_GRID` is tried as one SGD
    step on them from the current weights (restored exactly after each trial). Among the rates that do not raise
    the chosen points' own loss (a larger step overshoots the loss it descends), the best is the one that lowers
    most the mean loss of the step's anchors (the ``num_anchors`` the points were chosen for) plus the mean loss of
    all anchors (at most 256). Under the guard's retain check (``keep="improved"`` with a ``retain_tolerance``, the
    default) the rate used is that best rate itself, or its half, quarter, ... : the first whose step keeps the
    retain set's metric (in-distribution examples) within the tolerance, and every later step is held to it too
    (:mod:`~lightning_fastif.lightning.correction_guard`). Without the retain check it is the grid point just below
    the best, a third of it, because it serves ``num_steps`` steps rather than one. When no rate lowers that sum,
    the smallest rate of the
    grid is used. Why both: judged on all anchors alone, a step that helps its own anchors at the others' cost
    found no rate (a MiniLM model's correction fell back to the smallest rate in 2 of 5 seeds); judged on its ten
    anchors alone, random points found a rate so large that ten steps pushed the model to one class
    (:func:`~lightning_fastif.lightning.correction_steps.search_lr`). ``keep="improved"`` judges the whole
    correction on held-out examples. The rate used and every trial are in the report (``CorrectionReport.lr``,
    ``.lr_trials``). With ``optimizer="model"`` the Trainer's optimizer keeps its own rate. Why not a fixed rate:
    FastIF's 1e-4 (BERT on MNLI) barely moves a small model (+0.07 challenge points on a tabular planted cue, where
    0.05 gained +16.6), and a CNN's optimizer rate (Adam, 1e-3) is no SGD rate. Measured over 5 seeds with the
    defaults (``benchmarks/bench_correction.py``): before the retain check, the best single-step rate itself cost
    10-26 in-distribution test points, a third of it -3.5 to +1.2; with it, the best rate halved until the retain
    set stays within 2 points cost 1-4 test points on the MiniLM cue and gained +9.9 challenge points over random.

    Args:
        num_anchors: anchor examples drawn per step.
        top_m: training points trained on per step (the most helpful for the anchors, or as ``selection`` says).
        num_steps: correction steps per moment.
        lr: ``"auto"`` (above) or a fixed learning rate > 0 of the steps (FastIF: 1e-4 for BERT on MNLI).
        optimizer: ``"sgd"`` (plain SGD at ``lr``, FastIF) or ``"model"`` (the Trainer's first optimizer).
        selection: ``"helpful"``, ``"harmful"``, ``"random"`` or ``"downweight_harmful"``.
        harmful_weight: the weight of the ascent step in ``"downweight_harmful"`` (finite, >= 0).
        seed: seeds the anchors drawn at each step (and the split of the held-out part, see ``ErrorCorrection``).

    Raises:
        ArgumentError: naming the field, for a value out of range (``lr`` neither ``"auto"`` nor a number > 0).

    Example::

        >>> CorrectionArguments().lr
        'auto'
        >>> CorrectionArguments(lr=0)
        Traceback (most recent call last):
        ...
        lightning_fastif.errors.ArgumentError: lr: expected 'auto' or a finite number > 0, got 0
    """

    num_anchors: int = 10
    top_m: int = 10
    num_steps: int = 10
    lr: float | Literal["auto"] = "auto"
    optimizer: Literal["sgd", "model"] = "sgd"
    selection: Literal["helpful", "harmful", "random", "downweight_harmful"] = "helpful"
    harmful_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("num_anchors", self.num_anchors)
        check_int("top_m", self.top_m)
        check_int("num_steps", self.num_steps)
        if self.lr != "auto":
            try:
                object.__setattr__(self, "lr", check_number("lr", self.lr, low=0, low_open=True))
            except ArgumentError:
                raise ArgumentError(f"lr: expected 'auto' or a finite number > 0, got {self.lr!r}") from None
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("selection", self.selection, SELECTIONS)
        object.__setattr__(self, "harmful_weight", check_number("harmful_weight", self.harmful_weight, low=0))
        check_int("seed", self.seed, minimum=None)


ArgumentsT = TypeVar("ArgumentsT", SearchArguments, ComputeArguments, CorrectionArguments)


def arguments_of(name: str, value: Any, cls: type[ArgumentsT]) -> ArgumentsT:
    """``value`` as a ``cls``: ``None`` gives the defaults, a mapping (a Hydra node) is unpacked, an instance passes.

    Example::

        >>> arguments_of("compute", {"batch_size": 64}, ComputeArguments).batch_size
        64
    """
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - fields - {"_target_"})
        if unknown:
            raise ArgumentError(f"{name}: {cls.__name__} has no field(s) {unknown}; accepted: {sorted(fields)}")
        return cls(**{k: v for k, v in value.items() if k != "_target_"})
    raise ArgumentError(f"{name}: expected None, a {cls.__name__} or a mapping of its fields, got {value!r}")


def fold_legacy_arguments(
    owner: str, legacy: Mapping[str, Any], groups: Mapping[str, tuple[Any, type[Any]]]
) -> dict[str, Any]:
    """Fold flat keyword arguments of versions before 0.2 into their argument groups, with a DeprecationWarning.

    ``groups`` maps a group's parameter name to ``(the value given, its dataclass)``; returns the groups as
    instances. A flat argument that belongs to no group raises ``TypeError`` naming it, as Python would.

    Example::

        >>> fold_legacy_arguments("InfluenceModule", {}, {"compute": (None, ComputeArguments)})["compute"].batch_size
        256
    """
    owners = {
        f.name: group for group, (_, cls) in groups.items() for f in dataclasses.fields(cls)
    }  # field name -> its group
    unknown = sorted(set(legacy) - set(owners))
    if unknown:
        raise TypeError(f"{owner}.__init__() got unexpected keyword argument(s) {unknown}")
    resolved = {}
    for group, (value, cls) in groups.items():
        moved = {k: v for k, v in legacy.items() if owners[k] == group}
        base = arguments_of(group, value, cls)
        if moved:
            warnings.warn(
                f"{owner}({', '.join(f'{k}=...' for k in moved)}): pass these as "
                f"{group}={cls.__name__}({', '.join(f'{k}=...' for k in moved)}); flat arguments will be removed",
                DeprecationWarning,
                stacklevel=3,
            )
            base = dataclasses.replace(base, **moved)
        resolved[group] = base
    return resolved
