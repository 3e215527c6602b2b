"""One feature vector per example: the space the kNN candidates are searched in.

FastIF embeds every training example with the fine-tuned model (the reference uses BERT's pooler output,
i.e. the classifier's input) and searches the nearest neighbours of a test example in that space. Features
come from, in order of preference:

1. ``layer=...``: a forward hook on a named submodule, taking its output (``hook="output"``) or its first
   input (``hook="input"``; ``layer="classifier", hook="input"`` gives the classifier's input);
2. ``model.features(batch) -> Tensor[B, D]`` when the model defines that method.

The forward pass that drives a hook is ``forward_fn(model, batch)``; the default calls ``model(batch)`` for a
tensor batch, ``model(batch[0])`` for a tuple/list ``(x, y, ...)`` and ``model(**inputs)`` for a dict batch
without its label keys.

**Two kinds of features** (``kind=``):

* ``"activations"`` (default, FastIF's choice): the activations above, compared by L2 or cosine distance.
* ``"loss_gradient"``: each example's loss gradient with respect to the parameters of one layer (``layer``,
  default :func:`last_layer_name`, e.g. the classifier), ``[B, P]``. For a classifier ``z = W h + b`` with
  cross-entropy this is ``(softmax(z) - onehot(y)) ⊗ [h, 1]``, of dimension ``C·(D+1)``; it is computed for any
  loss and any model by ``torch.func`` on that layer's parameters only
  (:meth:`~lightning_fastif.core.grads.FunctionalLoss.per_example_gradients`), so it needs the labels of the batch.
  Why: influence is ``g_testᵀ (H + λI)⁻¹ g_train``, so the training points with the largest ``|<g_test,
  g_train>|`` restricted to the last layer are the likely most helpful (positive) and most harmful (negative)
  ones. The *inner product* matters, not the angle: the most influential points are those with large gradients
  (high loss), which both L2 and cosine distances ignore. On the digits CNN (N = 1,437; see
  ``benchmarks/bench_fastif.py``), the original top-10 helpful points were found among k = 1% kNN candidates
  0.04 of the time with the classifier's input and L2, 0.79 with this embedding searched by inner product towards
  ``+g_test`` (:meth:`KNNIndex.search_signed <lightning_fastif.search.knn.KNNIndex.search_signed>`), and 0.95 (harmful:
  0.955) when the query is ``(H_last + λI)⁻¹ g_test``, ``H_last`` the last layer's Hessian of the mean training
  loss, which ``FeatureSnapshot`` stores and the influence module applies.

This module imports no Lightning.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_fastif.core.batches import LABEL_KEYS, Batch, IndexedData, batch_size_of, move_batch
from lightning_fastif.core.grads import FunctionalLoss

ForwardFn = Callable[[nn.Module, Batch], Any]
LossFn = Callable[[nn.Module, Batch], Tensor]
HookSide = Literal["input", "output"]
FeatureKind = Literal["activations", "loss_gradient"]
FEATURE_KINDS: tuple[str, ...] = ("activations", "loss_gradient")
"""The accepted ``kind`` values."""

_MAX_LISTED = 60


def default_forward(model: nn.Module, batch: Batch) -> Any:
    """Run ``model`` on the inputs of ``batch``: tensor -> ``model(batch)``, ``(x, y, ...)`` -> ``model(x)``,
    dict -> ``model(**batch without label keys)``.

    Example::

        >>> default_forward(torch.nn.Linear(2, 1), (torch.zeros(3, 2), torch.zeros(3))).shape
        torch.Size([3, 1])
    """
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**{k: v for k, v in batch.items() if k not in LABEL_KEYS})
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("batch: an empty tuple/list has no input to run the model on")
        return model(batch[0])
    raise TypeError(
        f"batch: the default forward accepts a tensor, a tuple/list (x, y, ...) or a dict of tensors, got "
        f"{type(batch).__name__}; pass forward_fn=(model, batch) -> output"
    )


def has_features_method(model: nn.Module) -> bool:
    """True when ``model`` defines a ``features(batch)`` method (a submodule named ``features`` does not count)."""
    # A submodule called `features` (torchvision's VGG/AlexNet) is not the features(batch) method.
    return inspect.ismethod(getattr(model, "features", None))


def _module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def resolve_layer(model: nn.Module, layer: str) -> nn.Module:
    """Return the submodule of ``model`` named ``layer`` (as in ``model.named_modules()``).

    Raises:
        ValueError: if there is no such submodule; the message lists the available names.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
        >>> resolve_layer(net, "1")
        ReLU()
    """
    modules = dict(model.named_modules())
    if layer and layer in modules:
        return modules[layer]
    names = _module_names(model)
    close = difflib.get_close_matches(layer, names, n=3)
    hint = f" Did you mean {close}?" if close else ""
    listed = names[:_MAX_LISTED]
    more = f" ... and {len(names) - len(listed)} more" if len(names) > len(listed) else ""
    raise ValueError(
        f"layer: {layer!r} is not a submodule of {type(model).__name__}.{hint} Available (model.named_modules()): "
        f"{listed}{more}"
    )


def last_layer_name(model: nn.Module) -> str:
    """Name of the last submodule (in ``model.named_modules()`` order) that owns parameters itself.

    The default layer of ``kind="loss_gradient"``: in the usual model the classifier head is registered last.

    Raises:
        ValueError: if no submodule owns a parameter.

    Example::

        >>> last_layer_name(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)))
        '2'
    """
    owners = [name for name, m in model.named_modules() if name and any(True for _ in m.parameters(recurse=False))]
    if not owners:
        raise ValueError(
            f"layer: None, and no submodule of {type(model).__name__} owns parameters; pass layer= the submodule "
            "whose parameters' loss gradients are the features (e.g. the classifier)"
        )
    return owners[-1]


def check_kind(kind: Any) -> str:
    """Return ``kind`` if it is ``"activations"`` or ``"loss_gradient"``, else raise ``ValueError`` naming it."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"kind: expected one of {list(FEATURE_KINDS)}, got {kind!r}")
    return str(kind)


def loss_gradient_features(
    model: nn.Module, batch: Batch, *, layer: str | None = None, loss_fn: LossFn | None = None
) -> Tensor:
    """Per-example loss gradients with respect to the parameters of ``layer``: ``[B, P]`` float32.

    ``P`` is the number of parameters of ``layer`` and its submodules (``C·(D+1)`` for a linear classifier with
    bias). Computed by ``torch.func`` on those parameters only (:class:`~lightning_fastif.core.grads.FunctionalLoss`),
    so any loss and any batch structure work; the model's train/eval mode is left as it is.

    Args:
        model: the network; ``batch`` must already be on its device.
        batch: a tensor, tuple/list or dict batch, **with labels** (the loss needs them).
        layer: submodule whose parameters are differentiated; ``None``: :func:`last_layer_name`.
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``; default ``model.per_example_loss``.

    Raises:
        ValueError: ``layer`` is not a submodule, or holds no parameter.
        TypeError: no ``loss_fn`` and the model defines no ``per_example_loss``.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
        >>> ce = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
        >>> loss_gradient_features(net, (torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1])), loss_fn=ce).shape
        torch.Size([5, 8])
    """
    name = last_layer_name(model) if layer is None else layer
    module = resolve_layer(model, name)
    if not any(True for _ in module.parameters()):
        raise ValueError(
            f"layer: {name!r} holds no parameters, so it has no loss gradient; choose a layer with parameters, "
            f"e.g. {last_layer_name(model)!r}"
        )
    function = FunctionalLoss(model, loss_fn, params=module)
    return function.per_example_gradients(batch).float()


def _check_features(value: Any, batch: Batch, source: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{source} returned {type(value).__name__}, expected a Tensor [batch, ...]; choose a layer whose "
            f"{'output' if 'output' in source else 'input'} is a tensor, or define model.features(batch)"
        )
    n = batch_size_of(batch)
    if value.dim() < 1 or value.shape[0] != n:
        raise ValueError(
            f"{source} returned shape {tuple(value.shape)}, expected the batch size {n} as its first dimension "
            f"(one feature vector per example)"
        )
    return value.detach().reshape(n, -1).float()


def features_of_batch(
    model: nn.Module,
    batch: Batch,
    *,
    layer: str | None = None,
    hook: HookSide = "output",
    forward_fn: ForwardFn | None = None,
    kind: FeatureKind = "activations",
    loss_fn: LossFn | None = None,
) -> Tensor:
    """Return the features of one batch, ``[B, D]`` float32 on the model's device.

    Activations run under ``torch.no_grad()``; the model's train/eval mode is left as it is
    (``extract_features`` sets eval mode). Outputs with more than two dimensions are flattened per example.

    Args:
        model: the network (an ``nn.Module`` or ``LightningModule``); ``batch`` must already be on its device.
        batch: a tensor, tuple/list or dict batch.
        layer: name of the submodule to hook (``model.named_modules()``); ``None`` uses ``model.features``. With
            ``kind="loss_gradient"``: the submodule whose parameters are differentiated (``None``: the last one).
        hook: ``"output"`` (the submodule's output) or ``"input"`` (its first input); activations only.
        forward_fn: ``(model, batch) -> Any`` driving the hook; default :func:`default_forward`.
        kind: ``"activations"`` or ``"loss_gradient"`` (:func:`loss_gradient_features`).
        loss_fn: the per-example loss of ``kind="loss_gradient"`` (default ``model.per_example_loss``).

    Raises:
        ValueError: bad ``layer``/``hook``, a layer that did not run exactly once, or a feature tensor whose
            first dimension is not the batch size.
        TypeError: the hooked value or ``model.features`` is not a tensor.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> features_of_batch(net, torch.randn(5, 4), layer="2", hook="input").shape
        torch.Size([5, 3])
    """
    if hook not in ("input", "output"):
        raise ValueError(f"hook: expected 'input' or 'output', got {hook!r}")
    if check_kind(kind) == "loss_gradient":
        return _check_features(
            loss_gradient_features(model, batch, layer=layer, loss_fn=loss_fn), batch, "the loss gradient"
        )
    if layer is None:
        if not has_features_method(model):
            names = _module_names(model)[:_MAX_LISTED]
            raise ValueError(
                f"layer: None, but {type(model).__name__} defines no features(batch) method; pass layer= one of "
                f"its submodules {names}, e.g. the classifier with hook='input'"
            )
        with torch.no_grad():
            return _check_features(model.features(batch), batch, f"{type(model).__name__}.features(batch)")

    module = resolve_layer(model, layer)
    captured: list[Any] = []

    def capture(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if hook == "output":
            captured.append(output)
        elif args:
            captured.append(args[0])
        else:
            # Called with keyword arguments only (common in transformers): take the first tensor.
            captured.append(next((v for v in kwargs.values() if isinstance(v, Tensor)), None))

    handle = module.register_forward_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            (forward_fn or default_forward)(model, batch)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(
            f"layer: {layer!r} ran {len(captured)} times in one forward pass, expected once; choose a submodule "
            f"that runs exactly once per batch (or pass forward_fn that runs it)"
        )
    return _check_features(captured[0], batch, f"the {hook} of layer {layer!r}")


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def extract_features(
    model: nn.Module,
    data: Dataset | DataLoader | IndexedData,
    *,
    layer: str | None = None,
    hook: HookSide = "output",
    forward_fn: ForwardFn | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    indices: Sequence[int] | Tensor | None = None,
    progress: bool | str = False,
    kind: FeatureKind = "activations",
    loss_fn: LossFn | None = None,
) -> Tensor:
    """Embed a dataset (or the examples at ``indices``), one feature vector per example.

    The model is put in eval mode under ``torch.no_grad()`` (dropout off, batch-norm statistics frozen) and
    every submodule's previous mode restored afterwards. Batches are gathered in the order of ``indices``
    (default: the whole dataset), ``batch_size`` at a time, with the loader's ``collate_fn`` when ``data`` is a
    ``DataLoader``.

    Args:
        model: the network; it is not moved.
        data: a map-style ``Dataset``, a ``DataLoader`` over one, or an ``IndexedData``.
        layer: submodule to hook; ``None`` uses ``model.features(batch)``. With ``kind="loss_gradient"``: the
            submodule whose parameters are differentiated (``None``: :func:`last_layer_name`).
        hook: ``"output"`` or ``"input"`` of ``layer`` (activations only).
        forward_fn: ``(model, batch) -> Any``; default :func:`default_forward`.
        batch_size: examples per forward pass.
        device: where batches are sent (default: the model's device).
        indices: dataset indices to embed, in this order (default: all).
        progress: show a tqdm bar; a string is used as its description.
        kind: ``"activations"`` or ``"loss_gradient"`` (per-example loss gradients of ``layer``'s parameters;
            the dataset's batches must carry labels).
        loss_fn: the per-example loss of ``kind="loss_gradient"`` (default ``model.per_example_loss``).

    Returns:
        ``[len(indices), D]`` float32 features on CPU (``[0, 0]`` when ``indices`` is empty).

    Raises:
        ValueError: bad ``layer``/``hook``/``batch_size``, wrong batch dimension, or the feature size differs
            between batches.
        TypeError: the features are not a tensor.

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> data = TensorDataset(torch.randn(10, 4), torch.zeros(10))
        >>> extract_features(net, data, layer="2", hook="input", batch_size=4).shape
        torch.Size([10, 8])
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if hook not in ("input", "output"):
        raise ValueError(f"hook: expected 'input' or 'output', got {hook!r}")
    check_kind(kind)
    if layer is not None:
        resolve_layer(model, layer)  # fail before any forward pass
    elif kind == "loss_gradient":
        layer = last_layer_name(model)
    indexed = IndexedData(data)
    idx = torch.arange(len(indexed)) if indices is None else torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    target = torch.device(device) if device is not None else _model_device(model)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=idx.numel(), desc=progress if isinstance(progress, str) else "features", leave=False)
    parts: list[Tensor] = []
    # Per-module modes, so a submodule the user froze in eval mode stays so after we restore.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for part, batch in indexed.chunks(batch_size, idx):
            feats = features_of_batch(
                model,
                move_batch(batch, target),
                layer=layer,
                hook=hook,
                forward_fn=forward_fn,
                kind=kind,
                loss_fn=loss_fn,
            ).cpu()
            if parts and feats.shape[1] != parts[0].shape[1]:
                raise ValueError(
                    f"features: size {feats.shape[1]} for the batch starting at index {int(part[0])}, but "
                    f"{parts[0].shape[1]} for earlier batches; every example needs the same feature size (pad or "
                    f"pool variable-length outputs)"
                )
            parts.append(feats)
            if bar is not None:
                bar.update(part.numel())
    finally:
        for module, mode in modes:
            module.training = mode
        if bar is not None:
            bar.close()
    if not parts:
        return torch.zeros(0, 0)
    return torch.cat(parts)
