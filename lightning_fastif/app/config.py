"""Where the app's configuration lives, and the one helper that turns a config node into an object.

The YAML ships inside the package (``lightning_fastif/app/configs``, found as :data:`CONFIG_PATH`), one config group
per folder. Every node that builds an object is a ``_target_`` plus exactly its constructor's arguments; the nodes
the app completes at run time (the model, datasets, directories) say ``_partial_: true``. :func:`build` is the only
caller of ``hydra.utils.instantiate`` in the package, so Hydra 1.4's ``_target_`` allow-list is one change here.

Example::

    >>> from omegaconf import OmegaConf
    >>> build(OmegaConf.create({"_target_": "lightning_fastif.ConjugateGradient", "damping": 0.1})).damping
    0.1
"""

from __future__ import annotations

import importlib
from importlib import resources
from typing import Any

CONFIG_MODULE = "lightning_fastif.app.configs"
"""The importable package holding the YAML (``initialize_config_module(config_module=CONFIG_MODULE)``)."""

CONFIG_PATH = f"pkg://{CONFIG_MODULE}"
"""The config path of the app (``hydra.main(config_path=CONFIG_PATH, config_name=CONFIG_NAME)``)."""

CONFIG_NAME = "fastif"
"""The primary config."""


def build(node: Any, /, **runtime: Any) -> Any:
    """The object a config node describes; ``runtime`` adds the arguments only known when the app runs.

    Nested ``_target_`` nodes are built first (an estimator inside the influence node, the argument groups); lists
    and mappings reach the constructor as plain ``list``/``dict``. With ``runtime`` the node is taken as a partial
    and called with those arguments, so models and datasets never pass through OmegaConf (which would copy them).
    A constructor's bad-argument error is raised again as an :class:`~lightning_fastif.errors.ArgumentError` whose
    message starts with the config key (``correction.steps.lr: expected ...``).

    Args:
        node: a config node with a ``_target_``.
        **runtime: keyword arguments of the constructor that the config cannot hold.

    Returns:
        The constructed object.

    Raises:
        ArgumentError: the constructor refused an argument; the message names the config key.

    Example::

        >>> from omegaconf import OmegaConf
        >>> node = OmegaConf.create({"_target_": "lightning_fastif.ComputeArguments", "_partial_": True})
        >>> build(node, batch_size=8).batch_size
        8
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    key = _full_key(node)
    try:
        if not runtime:
            return instantiate(node, _convert_="all")
        return instantiate(node, _partial_=True, _convert_="all")(**runtime)
    except InstantiationException as err:
        cause, nested = _root_cause(err)
        if cause is None:
            raise
        raise _keyed(nested or key, cause) from cause
    except Exception as err:
        if not _is_argument_error(err):
            raise
        raise _keyed(key, err) from err


def locate(target: Any, key: str = "") -> Any:
    """The class or function a ``_target_`` names: the longest importable module prefix, then attributes.

    Raises:
        ArgumentError: ``<key>._target_: expected an importable class or function, got ...``.

    Example::

        >>> locate("lightning_fastif.LiSSA").__name__
        'LiSSA'
    """
    from lightning_fastif.errors import ArgumentError

    where = f"{key}._target_" if key else "_target_"
    if not isinstance(target, str) or not target:
        raise ArgumentError(f"{where}: expected a dotted path such as 'my_package.MyModel', got {target!r}")
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attribute in parts[cut:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            break
        return obj
    raise ArgumentError(
        f"{where}: expected an importable class or function (is its module on PYTHONPATH?), got {target!r}"
    )


def group_options(group: str) -> list[str]:
    """The packaged options of a config group (``"influence/ihvp"`` -> ``["cg", "exact", "identity", "lissa"]``)."""
    folder = resources.files(CONFIG_MODULE).joinpath(group)
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_option(group: str, name: str) -> Any:
    """The packaged option ``name`` of ``group`` as a ``DictConfig`` (what ``group=name`` would select)."""
    from omegaconf import OmegaConf

    text = resources.files(CONFIG_MODULE).joinpath(group, f"{name}.yaml").read_text(encoding="utf-8")
    return OmegaConf.create(text)


def _full_key(node: Any) -> str:
    getter = getattr(node, "_get_full_key", None)
    return str(getter(None)) if callable(getter) else ""


def _is_argument_error(err: BaseException) -> bool:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return isinstance(err, (ValueError, TypeError, MisconfigurationException))


def _root_cause(err: BaseException) -> tuple[BaseException | None, str]:
    """The constructor's own exception under Hydra's wrapping, and the key of the node that raised it."""
    nested = ""
    while err.__cause__ is not None:
        for line in str(err).splitlines():
            if line.startswith("full_key: "):
                nested = line.removeprefix("full_key: ")
        err = err.__cause__
        if not type(err).__module__.startswith("hydra"):
            return (err if _is_argument_error(err) else None), nested
    return None, nested


def _keyed(key: str, err: BaseException) -> Exception:
    """``err`` as an ArgumentError naming the config key: ``lr: expected ...`` under ``correction.steps`` becomes
    ``correction.steps.lr: expected ...``."""
    from lightning_fastif.errors import ArgumentError

    message = str(err)
    if not key:
        return ArgumentError(message)
    head, sep, _ = message.partition(":")
    if sep and head.isidentifier() and head.islower():  # "lr: expected ..." names an argument; a class name does not
        return ArgumentError(f"{key}.{message}")
    return ArgumentError(f"{key}: {message}")
