"""``verify``: the estimator against exact influence on a slice of the model, and leave-one-out retraining."""

import json

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from lightning_fastif import ArgumentError, ExactInverse, Identity, LiSSA
from lightning_fastif.core.verify import (
    DEFAULT_THRESHOLDS,
    VerifyReport,
    last_layer_parameters,
    pearson,
    spearman,
    top_k_overlap,
    verify,
)
from tests.helpers.exact import breast_cancer, cross_entropy_loss, explicit_gradients, fit_logreg, tiny_mlp_problem
from tests.reliability.problems import autograd_hessian

L2 = 0.03


def logreg_loss(model, batch):
    return model.per_example_loss(batch)


@pytest.fixture(scope="module")
def logreg():
    train, test = breast_cancer(n_train=200, n_test=10)
    return fit_logreg(train, l2=L2), train, tuple(t[:4] for t in test.tensors)


def test_the_reference_is_an_independent_exact_answer(logreg):
    """verify's exact influence against ``torch.autograd.functional.hessian`` + ``torch.linalg.solve``.

    ``num_train`` is the whole training set (no random subset to replicate) and the estimator is Identity (damping
    0), so every number of the report is known in closed form: Pearson of ``g_test·g_trainᵀ`` with
    ``g_test·H⁻¹·g_trainᵀ``, and the residual ``‖H g_test − g_test‖ / ‖g_test‖``.
    """
    model, train, test = logreg
    report = verify(model, logreg_loss, train, test, ihvp=Identity(), num_train=len(train), thresholds={"residual": 10})
    hess = autograd_hessian(model, logreg_loss, train)
    g_train = explicit_gradients(model, logreg_loss, train)
    g_test = explicit_gradients(model, logreg_loss, TensorDataset(*test))
    exact = g_test @ torch.linalg.solve(hess, g_train.T)
    estimate = g_test @ g_train.T
    per_test = [float(torch.corrcoef(torch.stack([estimate[t], exact[t]]))[0, 1]) for t in range(4)]
    assert report.pearson == pytest.approx(sum(per_test) / 4, abs=1e-10)
    assert report.pearson_min == pytest.approx(min(per_test), abs=1e-10)
    top = [len(set(estimate[t].topk(10).indices.tolist()) & set(exact[t].topk(10).indices.tolist())) for t in range(4)]
    assert report.top10_overlap == pytest.approx(sum(top) / 40)
    residual = ((g_test @ hess - g_test).norm(dim=-1) / g_test.norm(dim=-1)).max()
    assert report.residual == pytest.approx(float(residual), rel=1e-9)
    assert report.exact_residual < 1e-10
    assert (report.num_params, report.num_train, report.num_test) == (31, 200, 4)
    assert report.params == ["linear.weight", "linear.bias"]


def test_a_good_lissa_passes_and_five_steps_fail(logreg):
    model, train, test = logreg
    good = verify(
        model,
        logreg_loss,
        train,
        test,
        ihvp=LiSSA(L2, recursion_depth="auto", batch_size=16, tail_fraction=0.5),
        num_train=150,
    )
    assert good.passed, str(good)
    assert good.pearson >= 0.99
    # LiSSA certified itself on the same 150 examples verify measures on: the same number, below its tol.
    assert good.settings["converged"] is True
    assert good.residual == pytest.approx(good.settings["checks"][-1][1], rel=1e-9)
    assert good.residual <= 0.2
    with pytest.warns(UserWarning, match=r"LiSSA: the solve did not converge.*raise recursion_depth \(now 5\)"):
        bad = verify(model, logreg_loss, train, test, ihvp=LiSSA(L2, recursion_depth=5), num_train=150)
    assert not bad.passed
    assert bad.residual > DEFAULT_THRESHOLDS["residual"]
    assert any(f.startswith("residual") for f in bad.failures)
    text = str(bad)
    assert "FAILED: " in text
    assert "residual" in text
    assert "<= 0.3" in text
    assert "PASSED" in str(good)
    # Settings as used travel with the report (the scale "auto" chose, the steps it took).
    assert isinstance(good.settings["scale"], float)
    assert good.settings["iterations"][0] < 1000
    data = json.loads(json.dumps(good.to_dict()))
    assert data["passed"] is True
    assert data["failures"] == []
    assert data["estimator"] == "lissa"


def test_leave_one_out_retraining_agrees_with_the_prediction(logreg):
    model, train, test = logreg
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = verify(model, logreg_loss, train, test, ihvp=ExactInverse(L2), num_train=120, loo=8, loo_steps=100)
    assert report.loo == 8
    assert len(report.loo_actual) == len(report.loo_predicted) == 8
    assert report.loo_pearson >= 0.95, str(report)  # measured 0.99
    assert report.loo_pearson_exact == pytest.approx(report.loo_pearson)
    assert report.refit_shift is not None
    assert report.refit_shift < 0.5
    assert report.passed
    # Positive = helpful: removing the point predicted most helpful raises the test loss.
    most = max(range(8), key=lambda i: report.loo_predicted[i])
    assert report.loo_actual[most] > 0
    for k, v in model.state_dict().items():  # the user's model is untouched (a copy was retrained)
        assert torch.equal(v, before[k])


class DictDataset(Dataset):
    """Items as dicts, so the slice goes through Subset and the loader's collate."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def test_last_layers_of_an_mlp_on_dict_batches():
    model, data = tiny_mlp_problem(n=40)
    model = model.float()
    x, y = data.tensors
    ds = DictDataset(x.float(), y)

    def loss(m, batch):
        return cross_entropy_loss(m, (batch["x"], batch["y"]))

    report = verify(model, loss, ds, {"x": x[:3].float(), "y": y[:3]}, ihvp=ExactInverse(0.05), max_params=20)
    assert report.params == ["2.weight", "2.bias"]
    assert report.num_params == 14
    assert report.passed
    assert report.residual < 1e-8
    assert next(model.parameters()).dtype == torch.float32  # the model itself was not cast
    assert last_layer_parameters(model, 100) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_identity_is_not_an_inverse_hessian(logreg):
    """TracIn-style dot products against exact influence (damping 0): measured Pearson 0.41."""
    model, train, test = logreg
    report = verify(model, logreg_loss, train, test, ihvp=Identity(), num_train=100, thresholds={"residual": 10.0})
    assert isinstance(report, VerifyReport)
    assert report.damping == 0.0
    assert report.pearson < 0.8
    assert not report.passed
    assert report.exact_residual < 1e-8
    assert not any(f.startswith("residual") for f in report.failures)  # the threshold override applied


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"max_params": 10},
            ArgumentError,
            r"max_params: expected at least the 31 parameters of the last layer 'linear', got 10",
        ),
        ({"num_train": 1}, ArgumentError, r"num_train: expected an integer >= 2, got 1"),
        ({"loo": -1}, ArgumentError, r"loo: expected an integer >= 0, got -1"),
        ({"loo": 501}, ArgumentError, r"loo: expected an integer in \[0, num_train=500\], got 501"),
        (
            {"thresholds": {"pearsn": 0.9}},
            ArgumentError,
            r"thresholds: expected metrics .*unknown .*pearsn",
        ),
        ({"params": "linear.*", "max_params": 5}, ArgumentError, r"max_params: expected at least the 31 values"),
        ({"ihvp": "lissa"}, ArgumentError, r"ihvp: expected an InverseHVP estimator"),
        ({"seed": -1}, ArgumentError, r"seed: expected an integer >= 0, got -1"),
    ],
)
def test_bad_arguments(logreg, kwargs, error, match):
    model, train, test = logreg
    kwargs = {"ihvp": ExactInverse(L2), **kwargs}
    with pytest.raises(error, match=match):
        verify(model, logreg_loss, train, test, **kwargs)


def test_metric_helpers():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert spearman(a, a**3) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([0.0, 0.0, 5.0])) == pytest.approx(1.0)  # ties
    assert top_k_overlap(torch.arange(20.0), torch.arange(20.0), k=10) == 1.0
    assert top_k_overlap(torch.arange(20.0), -torch.arange(20.0), k=10) == 0.0
