"""How error correction evaluates a model: its outputs, predicted labels, accuracy, or mean loss without classes.

The model's *outputs* on a batch are taken from the first of these hooks it has (:func:`model_outputs`):

1. ``model.logits(batch)``, when the model defines a ``logits`` method;
2. ``model.predict_step(batch, 0)``, when the model overrides ``LightningModule.predict_step``;
3. the forward pass: ``model(batch)`` for a tensor, ``model(batch[0])`` for a tuple/list ``(x, y, ...)``; for a dict
   ``model(**inputs)`` (the dict without its label keys) when ``forward`` takes those keys as keyword arguments,
   else ``model(batch)`` (a model whose ``forward`` takes the whole batch).

The outputs are scores ``[B, C]`` (logits, probabilities; a Hugging Face output's ``.logits``) or predicted labels
``[B]`` of an integer type. The labels come from :func:`~lightning_fastif.core.batches.labels_of`. The metric is
the **accuracy** when the labels are integers and the outputs have classes; otherwise (a regression model, float
targets) it is the **mean per-example loss** (``loss_fn``, default ``model.per_example_loss``), and the report says
which (``CorrectionReport.metric``).

*Where* the metric is measured is the data's business: :func:`split_holdout` cuts target-distribution examples
into an anchor part and a held-out part (half each, by a seed) so that the guard of ``keep="improved"`` never judges
a correction on the examples it was made for.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from lightning_fastif.core.batches import LABEL_KEYS, Batch, IndexedData, labels_of, move_batch
from lightning_fastif.core.grads import LossFn, check_losses, default_loss_fn, evaluating
from lightning_fastif.errors import ArgumentError

__all__ = [
    "METRICS",
    "accuracy",
    "dataset_of",
    "evaluation_metric",
    "misclassified_indices",
    "model_outputs",
    "predicted_labels",
    "split_holdout",
    "subset_of",
]

METRICS = ("accuracy", "loss")
"""The metrics :func:`evaluation_metric` reports: higher accuracy is better, lower loss is better."""


def _device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _overrides_predict_step(model: nn.Module) -> bool:
    method = getattr(type(model), "predict_step", None)
    return isinstance(model, LightningModule) and method is not None and method is not LightningModule.predict_step


def _takes_keywords(model: nn.Module, keys: Sequence[str]) -> bool:
    """True when ``model.forward`` accepts every key as a keyword argument (or has ``**kwargs``)."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a builtin or C forward: keep the dict convention
        return True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return True
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return set(keys) <= named


def model_outputs(model: nn.Module, batch: Batch) -> Tensor:
    """The model's outputs on ``batch``: scores ``[B, C]`` or predicted labels ``[B]``, by the documented hooks.

    In order: ``model.logits(batch)``; ``model.predict_step(batch, 0)`` when the model overrides
    ``LightningModule.predict_step``; else the forward pass (``model(batch)`` for a tensor, ``model(batch[0])`` for
    a tuple/list, ``model(**inputs)`` for a dict when ``forward`` takes its input keys as keywords, else
    ``model(batch)``). A Hugging Face style output gives its ``.logits``, a dict its ``"logits"``, a tuple its
    first element.

    Args:
        model: the model, in the mode the caller chose.
        batch: a tensor, tuple/list or dict batch on the model's device.

    Returns:
        A tensor whose first dimension is the batch's.

    Example::

        >>> net = torch.nn.Linear(3, 2)
        >>> model_outputs(net, (torch.zeros(4, 3), torch.zeros(4).long())).shape
        torch.Size([4, 2])
    """
    if inspect.ismethod(getattr(model, "logits", None)):  # a submodule named `logits` is not the hook
        out = model.logits(batch)
    elif _overrides_predict_step(model):
        out = model.predict_step(batch, 0)
    elif isinstance(batch, Tensor):
        out = model(batch)
    elif isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        out = model(**inputs) if _takes_keywords(model, list(inputs)) else model(batch)
    elif isinstance(batch, (tuple, list)) and batch:
        out = model(batch[0])
    else:
        raise ArgumentError(f"batch: expected a tensor, a tuple/list (x, y, ...) or a dict, got {type(batch).__name__}")
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ArgumentError(
        f"model: expected outputs that are a tensor (scores [B, C] or labels [B]) from logits(batch), predict_step "
        f"or forward, got {type(out).__name__}"
    )


def _has_classes(outputs: Tensor, labels: Any) -> bool:
    """Integer labels ``[B]`` and outputs that are class scores ``[B, C >= 2]`` or integer predictions ``[B]``."""
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool or labels.dim() != 1:
        return False
    if outputs.dim() == 2 and outputs.shape[1] >= 2:
        return True
    return outputs.dim() == 1 and not outputs.is_floating_point()


def predicted_labels(model: nn.Module, batch: Batch) -> Tensor:
    """The predicted class of each example of ``batch``: ``argmax`` of the scores of :func:`model_outputs`.

    Raises:
        ArgumentError: if the outputs are not class scores ``[B, C >= 2]`` or integer labels ``[B]``.
    """
    outputs = model_outputs(model, batch)
    if outputs.dim() == 2 and outputs.shape[1] >= 2:
        return outputs.argmax(-1)
    if outputs.dim() == 1 and not outputs.is_floating_point():
        return outputs
    raise ArgumentError(
        f"model: expected class scores [B, C >= 2] or integer labels [B] from logits/predict_step/forward, got "
        f"outputs of shape {tuple(outputs.shape)} ({outputs.dtype}); a model without classes has no accuracy"
    )


def _classification_pass(model: nn.Module, data: Any, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(indices, predictions, targets)`` over ``data`` in eval mode."""
    source = IndexedData(data, name="eval_dataset")
    device = _device_of(model)
    indices, preds, targets = [], [], []
    with evaluating(model), torch.no_grad():
        for idx, batch in source.chunks(batch_size):
            batch = move_batch(batch, device)
            indices.append(idx)
            preds.append(predicted_labels(model, batch).reshape(-1).cpu())
            targets.append(labels_of(batch).reshape(-1).cpu())
    return torch.cat(indices), torch.cat(preds), torch.cat(targets)


def _accuracy_of(pred: Tensor, target: Tensor) -> float:
    # Functional torchmetrics: a Metric object would all-gather under DDP, and callers may run on rank 0 only.
    from torchmetrics.functional.classification import multiclass_accuracy

    num_classes = int(max(int(pred.max()), int(target.max())) + 1)
    return float(multiclass_accuracy(pred, target, num_classes=max(num_classes, 2), average="micro"))


def accuracy(model: nn.Module, data: Any, *, batch_size: int = 256) -> float:
    """Accuracy of ``model`` on ``data`` (a Dataset or DataLoader of ``(x, y)`` or dict batches), in eval mode.

    Predictions come from :func:`predicted_labels` (the hooks of :func:`model_outputs`), labels from
    :func:`~lightning_fastif.core.batches.labels_of`; micro-averaged multiclass accuracy (``torchmetrics``), as
    Lightning users log it.

    Raises:
        ArgumentError: if the model's outputs have no classes, or a batch has no labels.

    Example::

        >>> accuracy(model, test_dataset)  # doctest: +SKIP
        0.93
    """
    _, pred, target = _classification_pass(model, data, batch_size)
    return _accuracy_of(pred, target)


def misclassified_indices(model: nn.Module, data: Any, *, batch_size: int = 256) -> Tensor:
    """Indices of the examples of ``data`` that ``model`` gets wrong (a classifier; see :func:`accuracy`).

    Example::

        >>> wrong = misclassified_indices(model, challenge_dataset)  # doctest: +SKIP
    """
    idx, pred, target = _classification_pass(model, data, batch_size)
    return idx[pred != target]


def evaluation_metric(
    model: nn.Module, data: Any, *, loss_fn: LossFn | None = None, batch_size: int = 256
) -> tuple[str, float]:
    """The metric correction is judged by: ``("accuracy", acc)`` for a classifier, else ``("loss", mean loss)``.

    A classifier is a model whose labels are integers ``[B]`` and whose :func:`model_outputs` are class scores
    ``[B, C >= 2]`` or integer labels ``[B]`` (decided on the first batch). Otherwise (float targets, a single
    output) the metric is the mean of ``loss_fn`` (default ``model.per_example_loss``) over ``data``.

    Args:
        model: the model (evaluated in eval mode, without gradients).
        data: a Dataset or DataLoader.
        loss_fn: the per-example loss for models without classes.
        batch_size: examples per forward pass.

    Returns:
        ``(metric name, value)``.

    Example::

        >>> evaluation_metric(regression_model, eval_dataset)  # doctest: +SKIP
        ('loss', 0.42)
    """
    source = IndexedData(data, name="eval_dataset")
    device = _device_of(model)
    first = move_batch(source.gather([0]), device)
    try:
        labels = labels_of(first)
    except ArgumentError:
        labels = None
    classes = False
    if isinstance(labels, Tensor) and not labels.is_floating_point():  # only then ask the model for its outputs
        with evaluating(model), torch.no_grad():
            classes = _has_classes(model_outputs(model, first), labels)
    if classes:
        _, pred, target = _classification_pass(model, source, batch_size)
        return "accuracy", _accuracy_of(pred, target)
    loss_fn = loss_fn if loss_fn is not None else default_loss_fn(model)
    total, count = 0.0, 0
    with evaluating(model), torch.no_grad():
        for idx, batch in source.chunks(batch_size):
            losses = check_losses(loss_fn(model, move_batch(batch, device)), idx.numel(), "loss_fn")
            total += float(losses.double().sum())
            count += idx.numel()
    return "loss", total / count


def dataset_of(name: str, data: Any) -> IndexedData:
    """``data`` (a map-style Dataset or a DataLoader over one) as :class:`IndexedData`, checked to be non-empty.

    Raises:
        ArgumentError: naming ``name``, for an empty dataset or one that cannot be indexed.

    Example::

        >>> len(dataset_of("anchors", torch.utils.data.TensorDataset(torch.zeros(3, 2))))
        3
    """
    try:
        return IndexedData(data, name=name)
    except TypeError as exc:
        raise ArgumentError(
            f"{name}: expected a map-style Dataset (or a DataLoader over one), got {type(data).__name__}"
        ) from exc
    except ValueError as exc:  # IndexedData refuses an empty dataset
        raise ArgumentError(f"{name}: expected a non-empty Dataset, got an empty {type(data).__name__}") from exc


def subset_of(data: IndexedData, indices: Sequence[int] | Tensor) -> IndexedData:
    """The examples of ``data`` at ``indices`` (positions in ``data``), with ``data``'s collate function.

    Example::

        >>> part = subset_of(IndexedData(torch.utils.data.TensorDataset(torch.arange(4.0))), [3, 1])
        >>> part.gather([0, 1])[0].tolist()
        [3.0, 1.0]
    """
    positions = torch.as_tensor(indices, dtype=torch.long).reshape(-1).tolist()
    return IndexedData(torch.utils.data.Subset(data.dataset, positions), data.collate_fn)


def split_holdout(data: Any, seed: int, *, name: str = "anchors") -> tuple[IndexedData, IndexedData]:
    """Split ``data`` into an anchor part and a held-out part, half each, by a random permutation seeded by ``seed``.

    The same ``data`` and ``seed`` give the same parts; the held-out part gets ``len(data) // 2`` examples and the
    two never share an example. Both keep ``data``'s collate function.

    Args:
        data: a Dataset or DataLoader of target-distribution examples (at least 2).
        seed: seeds the permutation.
        name: the argument name used in the error message.

    Returns:
        ``(anchor part, held-out part)`` as :class:`~lightning_fastif.core.batches.IndexedData`.

    Raises:
        ArgumentError: naming ``holdout_dataset`` when ``data`` has fewer than 2 examples.

    Example::

        >>> anchors, held = split_holdout(torch.utils.data.TensorDataset(torch.arange(5.0)), seed=0)
        >>> len(anchors), len(held)
        (3, 2)
    """
    source = dataset_of(name, data)
    n = len(source)
    if n < 2:
        raise ArgumentError(
            f"holdout_dataset: expected held-out examples for keep='improved' ({name} has {n} example, too few to "
            "split into anchors and a held-out part), got None"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = order[: n // 2].sort().values
    rest = order[n // 2 :].sort().values
    return subset_of(source, rest), subset_of(source, held)
