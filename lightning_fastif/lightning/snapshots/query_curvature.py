"""The last layer's curvature a loss-gradient ``FeatureSnapshot`` stores for preconditioning kNN queries (``H_last``).

Either the dense Hessian of the mean training loss with respect to the layer's parameters (one safetensors file; in
closed form for a ``Linear`` layer, :func:`~lightning_fastif.core.factored_grads.linear_layer_hessian`, else by
``P`` Hessian-vector products) or the layer's K-FAC / EK-FAC factors (a ``KFACFactors`` directory, any layer size),
over a seeded sample of the training set. :mod:`lightning_fastif.search.preconditioner` reads either back.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Subset

from lightning_fastif.core.batches import IndexedData
from lightning_fastif.core.curvature import ekfac_correct, fit_kfac
from lightning_fastif.core.factored_grads import linear_layer_hessian
from lightning_fastif.core.grads import LossFn, evaluating
from lightning_fastif.core.hessian import HessianOperator
from lightning_fastif.io.atomic import save_tensors
from lightning_fastif.io.snapshot_store import LAST_LAYER_HESSIAN, LAST_LAYER_KFAC, feature_dir, feature_file
from lightning_fastif.search.features import resolve_layer


def write_query_curvature(
    pl_module: pl.LightningModule,
    layer_name: str,
    loss_fn: LossFn,
    dirpath: str,
    version: str,
    train: IndexedData | None,
    *,
    curvature: str,
    max_hessian_params: int,
    hessian_examples: int | None,
    batch_size: int,
) -> dict[str, Any]:
    """Write ``H_last`` of ``layer_name`` into the snapshot version's directory; return its manifest entry.

    Args:
        pl_module: the model, at the weights of the snapshot.
        layer_name: the feature layer.
        loss_fn: the per-example loss of the features.
        dirpath, version: the snapshot directory and the version being written.
        train: the training set (None: nothing is written, the entry says why).
        curvature: ``"auto"`` (dense up to ``max_hessian_params`` parameters, else EK-FAC), ``"hessian"``,
            ``"kfac"`` or ``"ekfac"`` (see ``FeatureSnapshot(query_curvature=...)``).
        max_hessian_params: the largest layer whose dense Hessian is stored.
        hessian_examples: the size of the seeded training sample (None or more than N: all of it).
        batch_size: examples per pass.

    Returns:
        The entry (``file``, ``layer``, ``num_params``, ``params``, ``curvature``, and for a stored file
        ``num_train``, ``hessian_examples``, ``method`` or ``factored_layers``; a ``note`` when skipped).
    """
    layer = resolve_layer(pl_module, layer_name)
    names = [f"{layer_name}.{n}" for n, _ in layer.named_parameters()]
    num_params = sum(p.numel() for p in layer.parameters())
    if curvature == "auto":
        curvature = "hessian" if num_params <= max_hessian_params else "ekfac"
    entry: dict[str, Any] = {
        "file": None,
        "layer": layer_name,
        "num_params": num_params,
        "params": names,
        "curvature": curvature,
    }
    if train is None:
        entry["note"] = "skipped: include_train=False, there is no training set to take the Hessian over"
        return entry
    if curvature == "hessian" and num_params > max_hessian_params:
        entry["note"] = (
            f"skipped: layer {layer_name!r} has {num_params} parameters, more than max_hessian_params="
            f"{max_hessian_params}; queries are raw loss gradients (raise max_hessian_params to store it)"
        )
        return entry
    data: Any = train
    if hessian_examples is not None and hessian_examples < len(train):
        generator = torch.Generator().manual_seed(0)
        sample = torch.randperm(len(train), generator=generator)[:hessian_examples].sort().values
        data = DataLoader(Subset(train.dataset, sample.tolist()), collate_fn=train.collate_fn)
    if curvature != "hessian":
        with torch.inference_mode(False):
            factors = fit_kfac(pl_module, loss_fn, data, names, batch_size=batch_size)
            if curvature == "ekfac":
                factors = ekfac_correct(factors, pl_module, loss_fn, data, batch_size=batch_size)
        path = factors.save(feature_dir(dirpath, version) / LAST_LAYER_KFAC)
        entry.update(file=path.name, num_train=len(train), hessian_examples=factors.num_examples)
        entry["factored_layers"] = [spec.spec.name for spec in factors.layers]
        return entry
    examples = IndexedData(data)
    with torch.inference_mode(False), evaluating(pl_module):
        # A Linear layer's Hessian in closed form (one pass, exact); other layers by P Hessian-vector products.
        hessian = linear_layer_hessian(
            pl_module, examples, layer, loss_fn, batch_size=batch_size, device=pl_module.device
        )
        entry["method"] = "closed_form" if hessian is not None else "hvp"
        if hessian is None:
            operator = HessianOperator(pl_module, loss_fn, data, params=names, batch_size=batch_size)
            hessian = operator.dense(max_params=max_hessian_params)
    hessian = hessian.detach().to("cpu", next(layer.parameters()).dtype)
    meta = {"layer": layer_name, "num_params": str(num_params), "num_train": str(len(train))}
    save_tensors(feature_file(dirpath, version, LAST_LAYER_HESSIAN), {LAST_LAYER_HESSIAN: hessian}, meta)
    entry["file"] = feature_file(dirpath, version, LAST_LAYER_HESSIAN).name
    entry["num_train"] = len(train)
    entry["hessian_examples"] = len(examples)
    return entry
