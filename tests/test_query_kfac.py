"""The K-FAC kNN query preconditioner: factor layout against per-example gradients, the Kronecker solve, and
``FeatureSnapshot(features="loss_gradient")`` storing the last layer's K-FAC factors by default."""

from __future__ import annotations

import pickle

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fastif.core.curvature import KFACFactors, ekfac_correct, fit_kfac
from lightning_fastif.core.grads import FunctionalLoss
from lightning_fastif.errors import ArgumentError
from lightning_fastif.io.snapshot_store import (
    LAST_LAYER_HESSIAN,
    LAST_LAYER_KFAC,
    last_layer_hessian_file,
    snapshot_versions,
)
from lightning_fastif.lightning.module import InfluenceModule
from lightning_fastif.lightning.snapshots import FeatureSnapshot
from lightning_fastif.search.preconditioner import KNN_DAMPING_FLOOR, QueryPreconditioner
from tests.helpers.snapshot_models import CLASSES, HIDDEN, TinyClassifier, TinyDataModule, make_dataset

PARAMS = ["classifier.weight", "classifier.bias"]


def _ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _explicit_factors(model, data):
    """``A = E[a aᵀ]`` over the classifier's input with a 1 appended, ``S = E[g gᵀ]`` over its output gradients
    (softmax minus one-hot for cross-entropy), from the formulas, not from hooks."""
    x, y = data.tensors
    with torch.no_grad():
        h = model.body(x).double()
        p = torch.softmax(model.classifier(model.body(x)).double(), -1)
    a = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)
    g = p - nn.functional.one_hot(y, CLASSES).double()
    return a.T @ a / len(a), g.T @ g / len(g)


def _flat_kronecker(s, a):
    """``A ⊗ S`` as a matrix over the flat layout of loss-gradient features: ``[weight (C·D, row-major), bias (C)]``.

    In row-major ``vec`` of the ``[C, D+1]`` gradient matrix ``g aᵀ`` the per-example product is ``kron(S, A)``;
    the permutation moves the bias column to the end of the flat vector.
    """
    c, d1 = s.shape[0], a.shape[0]
    flat_of = torch.tensor([i * (d1 - 1) + k if k < d1 - 1 else c * (d1 - 1) + i for i in range(c) for k in range(d1)])
    out = torch.zeros(c * d1, c * d1, dtype=torch.float64)
    out[flat_of.unsqueeze(1), flat_of.unsqueeze(0)] = torch.kron(s, a)
    return out


def test_single_example_kfac_is_the_per_example_fisher_in_the_feature_layout():
    model = TinyClassifier().double()
    x, y = make_dataset(1, seed=3).tensors
    one = TensorDataset(x.double(), y)
    factors = fit_kfac(model, _ce, one, PARAMS)
    g = FunctionalLoss(model, _ce, PARAMS).per_example_gradients(one.tensors).double()  # the feature layout
    p = CLASSES * (HIDDEN + 1)
    assert g.shape == (1, p)
    torch.testing.assert_close(factors.apply(torch.eye(p, dtype=torch.float64)), g.T @ g, rtol=1e-10, atol=1e-12)
    # and the explicit factors' Kronecker matrix, permuted to the flat layout, is the same g gᵀ
    a, s = _explicit_factors(model, one)
    torch.testing.assert_close(_flat_kronecker(s, a), g.T @ g, rtol=1e-10, atol=1e-12)


def test_kfac_query_equals_a_dense_solve_with_the_kronecker_matrix():
    model = TinyClassifier().double()
    data = TensorDataset(make_dataset(37).tensors[0].double(), make_dataset(37).tensors[1])
    factors = fit_kfac(model, _ce, data, PARAMS, batch_size=8)
    a, s = _explicit_factors(model, data)
    torch.testing.assert_close(factors.layers[0].A, a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(factors.layers[0].S, s, rtol=1e-10, atol=1e-12)
    dense = _flat_kronecker(s, a)
    g = FunctionalLoss(model, _ce, PARAMS).per_example_gradients(make_dataset(5, seed=9).tensors).double()
    pre = QueryPreconditioner(factors, layer="classifier")
    assert pre.kind == "kfac"
    eye = torch.eye(dense.shape[0], dtype=torch.float64)
    expected = torch.linalg.solve(dense + 0.05 * eye, g.T).T
    torch.testing.assert_close(pre(g, damping=0.05), expected.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pre(g[2], damping=0.05), expected[2].float(), rtol=1e-5, atol=1e-6)
    # λ = 0: the floor is 1e-6 of the mean eigenvalue, tr(S)·tr(A)/P
    floor = KNN_DAMPING_FLOOR * float(torch.trace(s) * torch.trace(a)) / dense.shape[0]
    assert pre.factorise(0.0).damping == pytest.approx(floor, rel=1e-9)
    assert pre.factorisation.kind == "kfac"
    with pytest.raises(ArgumentError, match=r"queries: expected \[Q, 18\] loss gradients of layer 'classifier'"):
        pre(torch.ones(2, 5), damping=0.05)
    # EK-FAC: its eigenvalues in the same basis, Q diag(Λ) Qᵀ
    ek = ekfac_correct(factors, model, _ce, data)
    dense_ek = ek.apply(eye)
    torch.testing.assert_close(
        QueryPreconditioner(ek)(g, 0.05), torch.linalg.solve(dense_ek + 0.05 * eye, g.T).T.float(), rtol=1e-5, atol=1e-6
    )


def _fit(tmp_path, **snapshot_args):
    snapshot = FeatureSnapshot(dirpath=tmp_path / "snap", features="loss_gradient", loss_fn=_ce, **snapshot_args)
    model = TinyClassifier()
    trainer = Trainer(
        default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_train_batches=4, max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[snapshot],
    )  # fmt: skip
    trainer.fit(model, TinyDataModule())
    [entry] = snapshot_versions(tmp_path / "snap", "features")
    return model.eval(), entry


def test_query_curvature_auto_is_dense_for_a_small_layer_and_ekfac_above_max_hessian_params(tmp_path):
    _, entry = _fit(tmp_path / "small")
    assert entry[LAST_LAYER_HESSIAN]["curvature"] == "hessian"
    assert last_layer_hessian_file(tmp_path / "small" / "snap", entry).is_file()
    _, entry = _fit(tmp_path / "large", max_hessian_params=CLASSES * (HIDDEN + 1) - 1)
    record = entry[LAST_LAYER_HESSIAN]
    assert (record["curvature"], record["file"]) == ("ekfac", LAST_LAYER_KFAC)
    assert KFACFactors.load(last_layer_hessian_file(tmp_path / "large" / "snap", entry)).corrected


def test_loss_gradient_snapshot_stores_the_last_layer_kfac_factors(tmp_path):
    model, entry = _fit(tmp_path, query_curvature="kfac")
    record = entry[LAST_LAYER_HESSIAN]
    assert (record["curvature"], record["file"], record["layer"], record["num_params"]) == (
        "kfac",
        LAST_LAYER_KFAC,
        "classifier",
        CLASSES * (HIDDEN + 1),
    )
    assert (record["num_train"], record["hessian_examples"], record["factored_layers"]) == (37, 37, ["classifier"])
    path = last_layer_hessian_file(tmp_path / "snap", entry)
    assert path.is_dir()
    factors = KFACFactors.load(path)
    assert not factors.corrected
    a, s = _explicit_factors(model, make_dataset(37))
    torch.testing.assert_close(factors.layers[0].A, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(factors.layers[0].S, s, rtol=1e-5, atol=1e-6)
    assert not list((tmp_path / "snap").rglob(f"{LAST_LAYER_HESSIAN}.safetensors"))
    # The influence module's query preconditioner uses the stored factors: a solve with their Kronecker matrix.
    train, test = make_dataset(37), make_dataset(4, seed=5)
    module = InfluenceModule(model, loss_fn=_ce, train_dataset=train, snapshot=tmp_path / "snap", num_candidates=5)
    assert module.knn_preconditioned
    assert module.queries.preconditioner.kind == "kfac"
    g = FunctionalLoss(model, _ce, PARAMS).per_example_gradients(test.tensors).double()
    eye = torch.eye(g.shape[1], dtype=torch.float64)
    expected = torch.linalg.solve(_flat_kronecker(s, a) + 0.3 * eye, g.T).T
    torch.testing.assert_close(module.queries.precondition(g, 0.3), expected.float(), rtol=1e-4, atol=1e-5)
    restored = pickle.loads(pickle.dumps(module.queries.preconditioner))
    torch.testing.assert_close(restored(g, 0.3), expected.float(), rtol=1e-4, atol=1e-5)


def test_ekfac_query_curvature_and_a_sample(tmp_path):
    model, entry = _fit(tmp_path, query_curvature="ekfac", hessian_examples=10)
    record = entry[LAST_LAYER_HESSIAN]
    assert (record["curvature"], record["num_train"], record["hessian_examples"]) == ("ekfac", 37, 10)
    factors = KFACFactors.load(last_layer_hessian_file(tmp_path / "snap", entry))
    assert factors.corrected
    assert factors.num_examples == 10
    sample = torch.randperm(37, generator=torch.Generator().manual_seed(0))[:10].sort().values
    subset = TensorDataset(*(t[sample] for t in make_dataset(37).tensors))
    a, s = _explicit_factors(model, subset)
    torch.testing.assert_close(factors.layers[0].A, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(factors.layers[0].S, s, rtol=1e-5, atol=1e-6)
    with pytest.raises(ArgumentError, match=r"query_curvature: expected one of \['auto', 'kfac', 'ekfac', 'hessian'\]"):
        FeatureSnapshot(features="loss_gradient", query_curvature="dense")


@pytest.mark.slow
def test_knn_recall_of_last_layer_influence_with_kfac_queries():
    """Recall of each test point's exact top-10 helpful training points (influence over the classifier layer,
    (H + 0.01 I)⁻¹) among its k = 10 inner-product neighbours (of 600 digits), 40 test points. Measured: raw gradient
    queries 0.685, K-FAC 0.725, EK-FAC 0.740, the dense H_last 1.000 (it is the scores' own curvature here; K-FAC
    approximates the empirical Fisher, not the Hessian)."""
    from sklearn.datasets import load_digits

    from lightning_fastif.core.hessian import HessianOperator
    from tests.helpers.module_models import TinyMLP, fit

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0), torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train = TensorDataset(x[perm[:600]], y[perm[:600]])
    test = TensorDataset(x[perm[600:640]], y[perm[600:640]])
    model = fit(TinyMLP(dim=64, hidden=16, classes=10), train, steps=300, lr=0.02, l2=1e-2)
    names = ["classifier.weight", "classifier.bias"]
    function = FunctionalLoss(model, None, names)
    g_train = function.per_example_gradients(train.tensors).double()
    g_test = function.per_example_gradients(test.tensors).double()
    h = HessianOperator(model, None, train, params=names).dense().double()
    scores = g_test @ torch.linalg.solve(h + 0.01 * torch.eye(h.shape[0], dtype=h.dtype), g_train.T)
    truth = scores.topk(10, 1).indices
    kfac = fit_kfac(model, None, train, names)
    queries = {
        "raw": g_test,
        "hessian": QueryPreconditioner(h)(g_test, 0.01),
        "kfac": QueryPreconditioner(kfac)(g_test, 0.01),
        "ekfac": QueryPreconditioner(ekfac_correct(kfac, model, None, train))(g_test, 0.01),
    }
    recall = {}
    for name, q in queries.items():
        found = (q.double() @ g_train.T).topk(10, 1).indices
        recall[name] = sum(len(set(truth[t].tolist()) & set(found[t].tolist())) for t in range(40)) / 400
    assert recall["hessian"] == 1.0
    assert recall["raw"] == pytest.approx(0.685, abs=0.03)
    assert recall["kfac"] == pytest.approx(0.725, abs=0.03)
    assert recall["ekfac"] == pytest.approx(0.74, abs=0.03)
    assert recall["ekfac"] >= recall["kfac"] > recall["raw"]
