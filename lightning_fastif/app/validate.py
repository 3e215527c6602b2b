"""Checks the app runs before training, so that a mistake fails in seconds with the key, the value and what works.

* :func:`validate_config`: the composed config: plain settings, every ``_target_`` node against its constructor's
  signature (unknown keys, numbers written as strings, missing arguments), the estimator named by
  ``influence.ihvp``, memory budgets, and the argument groups and estimators built once.
* :func:`check_datamodule` and :func:`check_model`: what the app needs of the user's LightningDataModule and
  LightningModule (docs/APP.md), tried on a batch of two training examples.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from typing import Any

import torch

from lightning_fastif.app.config import build, group_options, load_option, locate
from lightning_fastif.errors import ArgumentError, check_bool, check_choice, check_int, check_path

MODES = ("job", "verify")
SELF_INFLUENCE = ("identity", "same", None)
REPORT_KEYS = (
    "enabled",
    "max_test_points",
    "num_explained",
    "top_n",
    "self_influence",
    "verify",
    "verify_num_train",
    "verify_loo",
)
SPLIT_KEYS = ("explain", "eval", "anchors")
USER_GROUPS = ("data", "model")
"""Groups whose node users replace with their own class (``data=<name>`` from their config folder)."""

_HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")
_NUMERIC = re.compile(r"\b(int|float|Integral|Real)\b")
_TEXTUAL = re.compile(r"\b(str|Any|Literal|PathLike|Path)\b")


def validate_config(cfg: Any) -> None:
    """Check a composed config before anything is built or trained.

    ``influence.ihvp`` given as a name (``influence.ihvp=cg``) is replaced by that packaged estimator node.

    Raises:
        ArgumentError: ``<config key>: expected <what is accepted>, got <value>`` for the first problem found.

    Example::

        >>> from hydra import compose, initialize_config_module  # doctest: +SKIP
        >>> from lightning_fastif.app.config import CONFIG_MODULE
        >>> with initialize_config_module(CONFIG_MODULE, version_base=None):  # doctest: +SKIP
        ...     validate_config(compose("fastif", overrides=["influence.max_memory=4 gigs"]))
        Traceback (most recent call last):
        ...
        ArgumentError: influence.max_memory: cannot read '4 gigs' as a memory size; expected ...
    """
    _check_plain(cfg)
    _resolve_estimator(cfg)
    for key, node in target_nodes(cfg):
        _check_target_node(key, node)
    _check_influence(cfg.influence)
    # Value objects are cheap and side-effect free: building them once runs their own checks before training.
    for key in ("influence.ihvp", "influence.search", "influence.compute", "correction.steps"):
        node = _select(cfg, key)
        if node is not None and "_target_" in node:
            build(node)


def target_nodes(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every ``(key, node)`` with a ``_target_`` in a config tree (interpolations are checked at their source)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_dict(node):
        if "_target_" in node:
            yield path, node
        for key, value in node.items_ex(resolve=False):
            if not OmegaConf.is_interpolation(node, key):
                yield from target_nodes(value, f"{path}.{key}" if path else str(key))
    elif OmegaConf.is_list(node):
        for i, value in enumerate(node):
            yield from target_nodes(value, f"{path}[{i}]")


def check_datamodule(datamodule: Any, cfg: Any) -> dict[str, Any]:
    """Set ``datamodule`` up and return the datasets the app reads: ``{"train", "explain", "eval", "anchors"}``.

    ``setup("fit")`` is called, then ``setup("test")`` if a dataset the config names is still missing. Each split
    ``s`` named in ``cfg.splits`` is read from the attribute ``<s>_dataset``; ``eval`` and ``anchors`` only when
    correction is configured.

    Raises:
        ArgumentError: the datamodule is not a LightningDataModule, lacks a dataset the app needs, or a dataset is
            not map-style (``__len__`` and ``__getitem__``).
    """
    from lightning.pytorch import LightningDataModule

    name = type(datamodule).__qualname__
    if not isinstance(datamodule, LightningDataModule):
        raise ArgumentError(f"data: expected a LightningDataModule (its _target_), got {name}")
    wanted = {"train": "train", "explain": cfg.splits.explain}
    correction = cfg.get("correction")
    if correction is not None:
        wanted["eval"] = cfg.splits.eval
        if correction.get("anchors_from", "dataset") == "dataset":
            wanted["anchors"] = cfg.splits.anchors
    datamodule.setup("fit")
    if any(_dataset_of(datamodule, split) is None for split in wanted.values()):
        datamodule.setup("test")
    datasets = {}
    for role, split in wanted.items():
        key = "data" if role == "train" else f"splits.{role}"
        attribute = f"{split}_dataset"
        dataset = _dataset_of(datamodule, split)
        if dataset is None and role == "train":
            raise ArgumentError(
                f"data: expected a datamodule that holds its training set in {name}.train_dataset after setup() "
                f"(influence is taken over it), got {name} without it"
            )
        if dataset is None:
            raise ArgumentError(
                f"{key}: expected a split whose dataset the datamodule holds after setup() (the attribute "
                f"{name}.{attribute}), got {split!r}; define it in setup(), or name another split with {key}=<name>"
            )
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")) or len(dataset) == 0:
            raise ArgumentError(
                f"{key}: expected a non-empty map-style dataset (__len__ and __getitem__) at {name}.{attribute}, got "
                f"{type(dataset).__name__}"
            )
        datasets[role] = dataset
    return datasets


def _dataset_of(datamodule: Any, split: str) -> Any:
    """``datamodule.<split>_dataset``, or None where it is missing (a property may raise instead of being absent)."""
    try:
        return getattr(datamodule, f"{split}_dataset", None)
    except (KeyError, RuntimeError):  # the demo data modules' properties: no such split, or not set up
        return None


def check_model(model: Any, datasets: dict[str, Any], cfg: Any, collate: Any) -> None:
    """Check ``model`` on a batch of two training examples: its per-example loss, predictions and labels.

    Raises:
        ArgumentError: naming what is missing or has the wrong shape, and what the app expects.
    """
    from lightning.pytorch import LightningModule

    from lightning_fastif.app.data.labels import labels_of
    from lightning_fastif.lightning.correction import predicted_labels

    name = type(model).__qualname__
    if not isinstance(model, LightningModule):
        raise ArgumentError(f"model: expected a LightningModule (its _target_), got {name}")
    has_loss_fn = cfg.influence.get("loss_fn") is not None
    if not has_loss_fn and not callable(getattr(model, "per_example_loss", None)):
        raise ArgumentError(
            f"model: expected a LightningModule with per_example_loss(batch) -> Tensor[B] (one loss per example, no "
            f"reduction), got {name} without it; define it, or give influence.loss_fn"
        )
    train = datasets["train"]
    batch = collate([train[i] for i in range(min(2, len(train)))])
    size = min(2, len(train))
    try:
        labels = labels_of(batch)
    except ArgumentError as err:
        raise ArgumentError(f"data: the training batches carry no labels the app can read ({err})") from err
    if not isinstance(labels, torch.Tensor) or labels.shape != (size,):
        raise ArgumentError(
            f"data: expected labels of shape [{size}] in a batch of {size} training examples, got {_shape(labels)}"
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            losses = None if has_loss_fn else model.per_example_loss(batch)
            predicted = predicted_labels(model, batch)
    finally:
        model.train(was_training)
    if losses is not None and (not isinstance(losses, torch.Tensor) or losses.shape != (size,)):
        raise ArgumentError(
            f"model.per_example_loss: expected a Tensor of shape [{size}] for a batch of {size} examples (one loss "
            f"each, no reduction), got {_shape(losses)}"
        )
    if predicted.shape != (size,):
        raise ArgumentError(
            f"model: expected logits [{size}, num_classes] from model.logits(batch) or model(inputs) for a batch of "
            f"{size} examples, got predictions of shape {_shape(predicted)}"
        )


def _shape(value: Any) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _select(cfg: Any, key: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default=None)


def _check_plain(cfg: Any) -> None:
    check_choice("mode", cfg.mode, MODES)
    check_int("seed", cfg.seed, minimum=None)
    check_int("threads", cfg.threads, allow_none=True)
    check_path("output_dir", cfg.output_dir, allow_none=True)
    for group in ("data", "model", "trainer", "influence"):
        if cfg.get(group) is None or "_target_" not in cfg[group]:
            raise ArgumentError(f"{group}: expected a config node with a _target_, got {cfg.get(group)!r}")
    _known_keys("splits", cfg.splits, SPLIT_KEYS)
    for key in SPLIT_KEYS:
        value = cfg.splits.get(key)
        if not (value is None and key == "anchors") and not (isinstance(value, str) and value.isidentifier()):
            raise ArgumentError(f"splits.{key}: expected the name of a dataset of the datamodule, got {value!r}")
    correction = cfg.get("correction")
    anchors_from = None if correction is None else correction.get("anchors_from", "dataset")  # the class's default
    if anchors_from == "dataset" and cfg.splits.anchors is None:
        raise ArgumentError(
            "splits.anchors: expected the name of the datamodule's anchor dataset (e.g. challenge) because "
            "correction.anchors_from=dataset, got None"
        )
    report = cfg.report
    _known_keys("report", report, REPORT_KEYS)
    check_bool("report.enabled", report.enabled)
    check_bool("report.verify", report.verify)
    for key in ("max_test_points", "num_explained", "top_n", "verify_num_train"):
        check_int(f"report.{key}", report[key])
    check_int("report.verify_loo", report.verify_loo, minimum=0)
    check_choice("report.self_influence", report.self_influence, SELF_INFLUENCE)


def _known_keys(path: str, node: Any, accepted: tuple[str, ...]) -> None:
    unknown = sorted(set(node) - set(accepted))
    if unknown:
        raise ArgumentError(f"{path}: expected keys among {list(accepted)}, got unknown {unknown}")


def _resolve_estimator(cfg: Any) -> None:
    """``influence.ihvp=cg``: the name of an ``influence/ihvp`` option stands for that option's node."""
    from omegaconf import OmegaConf, open_dict

    node = cfg.influence.get("ihvp")
    if OmegaConf.is_dict(node) and "_target_" in node:
        return
    options = group_options("influence/ihvp")
    if node not in options:
        raise ArgumentError(
            f"influence.ihvp: expected one of {options} (the estimators of influence/ihvp) or a node with a "
            f"_target_, got {node!r}"
        )
    with open_dict(cfg):
        cfg.influence.ihvp = load_option("influence/ihvp", node)


def _check_target_node(key: str, node: Any) -> None:
    target = node.get("_target_")
    obj = locate(target, key)
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # some builtins have no signature: nothing to compare with
        return
    params = {n: p for n, p in signature.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    # ``**legacy`` takes the deprecated flat arguments of 0.1 (InfluenceModule, ErrorCorrection): a config uses the
    # argument groups instead, so it does not make the node open to any key.
    open_kwargs = any(p.kind is p.VAR_KEYWORD and p.name != "legacy" for p in signature.parameters.values())
    fields = [k for k in node if k not in _HYDRA_KEYS]
    unknown = [k for k in fields if k not in params]
    if unknown and not open_kwargs:
        raise ArgumentError(_unknown_fields_message(key, target, unknown, list(params)))
    if not node.get("_partial_", False):
        missing = [n for n, p in params.items() if p.default is p.empty and n not in fields]
        if missing:
            raise ArgumentError(
                f"{key}: expected values for the required argument(s) {missing} of {target}, got only {fields}"
            )
    for field in fields:
        if field in params and not _is_interpolation(node, field):
            _check_number_given_as_string(f"{key}.{field}" if key else field, node[field], params[field])


def _unknown_fields_message(key: str, target: str, unknown: list[str], accepted: list[str]) -> str:
    message = f"{key}: expected only arguments of {target} {accepted}, got unknown {unknown}"
    if key in USER_GROUPS:
        message += (
            f". These are fields of the built-in {key} node, which overriding {key}._target_ alone keeps; write your "
            f"own node instead: a file <your config dir>/{key}/<name>.yaml holding `_target_: {target}` and exactly "
            f"its arguments, selected with `{key}=<name> hydra.searchpath=[file:///abs/path/to/your/config/dir]` "
            f"(or --config-dir)"
        )
    return message


def _is_interpolation(node: Any, field: str) -> bool:
    from omegaconf import OmegaConf

    return OmegaConf.is_interpolation(node, field)


def _check_number_given_as_string(key: str, value: Any, param: inspect.Parameter) -> None:
    """A string where the constructor wants a number (YAML reads ``1e-3`` as a string; so do quoted numbers)."""
    if not isinstance(value, str):
        return
    annotation = param.annotation
    if not isinstance(annotation, str):  # a string under `from __future__ import annotations`, else a type
        annotation = "" if annotation is param.empty else inspect.formatannotation(annotation)
    default = param.default
    numeric_default = isinstance(default, (int, float)) and not isinstance(default, bool)
    wants_number = bool(_NUMERIC.search(annotation)) or (not annotation and numeric_default)
    if wants_number and not _TEXTUAL.search(annotation):
        raise ArgumentError(
            f"{key}: expected a number ({annotation or type(default).__name__}), got the string {value!r}; write it "
            f"unquoted, and floats with a dot and a signed exponent (1.0e-3, not 1e-3, which YAML reads as a string)"
        )


def _check_influence(node: Any) -> None:
    """The InfluenceModule node's own scalars (the module itself is built after training, on the trained model)."""
    from omegaconf import OmegaConf

    from lightning_fastif.core.memory import parse_memory

    check_int("influence.num_candidates", node.get("num_candidates"), allow_none=True)
    check_int("influence.top_k", node.get("top_k"))
    try:
        parse_memory(node.get("max_memory"), name="influence.max_memory")
    except ValueError as err:
        raise ArgumentError(str(err)) from err
    params = node.get("params")
    patterns = OmegaConf.is_list(params) and all(isinstance(p, str) for p in params)
    if params is not None and not (isinstance(params, str) or patterns):
        raise ArgumentError(
            f"influence.params: expected null, a parameter name pattern or a list of them (e.g. ['classifier.*']), "
            f"got {params!r}"
        )
