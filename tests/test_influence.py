"""Influence scores against exact answers and against leave-one-out retraining on a convex model."""

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_fastif import ExactInverse, HessianOperator, Identity, LiSSA, influence_scores, self_influence
from tests.helpers.exact import (
    breast_cancer,
    cross_entropy_loss,
    explicit_gradients,
    explicit_hessian,
    fit_logreg,
    tiny_mlp_problem,
)

L2 = 0.01


def logreg_loss(model, batch):
    return model.per_example_loss(batch)


def test_scores_equal_hand_computed_formula():
    model, data = tiny_mlp_problem()
    test = TensorDataset(*(t[:4] for t in data.tensors))
    grads = explicit_gradients(model, cross_entropy_loss, data)
    hess = explicit_hessian(model, cross_entropy_loss, data)
    damping = 0.05
    expected = grads[:4] @ torch.linalg.solve(hess + damping * torch.eye(hess.shape[0]).double(), grads.T)
    for method in ("jvp", "grads"):
        got = influence_scores(
            model, cross_entropy_loss, test.tensors, data, ihvp=ExactInverse(damping), method=method, batch_size=7
        )
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    ident = influence_scores(model, cross_entropy_loss, test.tensors, data, ihvp=Identity())
    torch.testing.assert_close(ident, grads[:4] @ grads.T)
    candidates = torch.tensor([[0, 5, 59], [1, 1, 2], [3, 4, 7], [10, 20, 30]])
    got = influence_scores(
        model, cross_entropy_loss, test.tensors, data, ihvp=ExactInverse(damping), candidates=candidates
    )
    torch.testing.assert_close(got, expected.gather(1, candidates), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        self_influence(model, cross_entropy_loss, data, ihvp=ExactInverse(damping), batch_size=16),
        (grads @ torch.linalg.solve(hess + damping * torch.eye(hess.shape[0]).double(), grads.T)).diagonal(),
    )


def test_leave_one_out_on_logistic_regression():
    """Predicted change of the test loss (score / n) against retraining without each of 40 points.

    The 40 training points with the largest |score| are retrained out, as in Koh & Liang (2017, Fig. 2).
    Measured here: Pearson 0.993 (ExactInverse) and 0.995 (LiSSA, auto scale, depth 400, 2 repeats).
    """
    train, test = breast_cancer(n_train=200, n_test=20)
    model = fit_logreg(train, l2=L2)
    test_batch = tuple(t[:3] for t in test.tensors)
    n = len(train)

    def test_loss(m) -> float:
        with torch.no_grad():
            return float(m.per_example_loss(test_batch).sum())

    exact = influence_scores(model, logreg_loss, test_batch, train, ihvp=ExactInverse(L2)).sum(0)
    lissa = influence_scores(
        model, logreg_loss, test_batch, train, ihvp=LiSSA(L2, recursion_depth=400, batch_size=50, num_repeats=2)
    ).sum(0)
    chosen = exact.abs().topk(40).indices
    base = test_loss(model)
    actual = []
    for i in chosen.tolist():
        keep = torch.tensor([j for j in range(n) if j != i])
        retrained = fit_logreg(TensorDataset(*(t[keep] for t in train.tensors)), l2=L2)
        actual.append(test_loss(retrained) - base)
    actual = torch.tensor(actual, dtype=torch.float64)
    for scores in (exact, lissa):
        predicted = scores[chosen] / n
        r = float(torch.corrcoef(torch.stack([predicted, actual]))[0, 1])
        assert r >= 0.95, r
    # Positive = helpful: removing the most helpful point must raise the test loss.
    assert actual[exact[chosen].argmax()] > 0


def test_candidate_validation():
    model, data = tiny_mlp_problem(n=20)
    test = tuple(t[:2] for t in data.tensors)
    with pytest.raises(ValueError, match=r"candidates: expected shape \[T=2, K\].*got \(3, 4\)"):
        influence_scores(model, cross_entropy_loss, test, data, ihvp=Identity(), candidates=torch.zeros(3, 4).long())
    with pytest.raises(ValueError, match=r"candidates: indices \[20\] are out of range.*accepted: 0..19"):
        influence_scores(model, cross_entropy_loss, test, data, ihvp=Identity(), candidates=torch.tensor([[0], [20]]))
    with pytest.raises(TypeError, match="candidates: expected an integer tensor"):
        influence_scores(model, cross_entropy_loss, test, data, ihvp=Identity(), candidates=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="method: expected one of"):
        influence_scores(model, cross_entropy_loss, test, data, ihvp=Identity(), method="fast")


def test_empty_training_set_and_bad_loss():
    model, data = tiny_mlp_problem(n=10)
    test = tuple(t[:2] for t in data.tensors)
    empty = TensorDataset(torch.zeros(0, 4).double(), torch.zeros(0).long())
    with pytest.raises(ValueError, match="train_data: the dataset is empty"):
        influence_scores(model, cross_entropy_loss, test, empty, ihvp=Identity())
    with pytest.raises(ValueError, match="loss_fn: returned a scalar"):
        influence_scores(model, lambda m, b: cross_entropy_loss(m, b).sum(), test, data, ihvp=Identity())


def test_never_returns_nan_when_lissa_diverges():
    model, data = tiny_mlp_problem(n=30)
    from lightning_fastif import LiSSADivergenceError

    with pytest.raises(LiSSADivergenceError):
        influence_scores(
            model,
            cross_entropy_loss,
            tuple(t[:2] for t in data.tensors),
            data,
            ihvp=LiSSA(0.01, scale=1e-3, recursion_depth=100),
        )


def test_model_modes_restored_and_dropout_off():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2)).double()
    _, data = tiny_mlp_problem(n=16)
    net.train()
    a = influence_scores(net, cross_entropy_loss, tuple(t[:2] for t in data.tensors), data, ihvp=Identity())
    b = influence_scores(net, cross_entropy_loss, tuple(t[:2] for t in data.tensors), data, ihvp=Identity())
    torch.testing.assert_close(a, b)  # deterministic: dropout was off
    assert net.training


def test_self_influence_pays_the_exact_factorisation_once(monkeypatch):
    """Every chunk of self-influence reuses the factor and the certificate of the first."""
    model, data = tiny_mlp_problem(n=40)
    builds = []
    real = HessianOperator.dense
    monkeypatch.setattr(HessianOperator, "dense", lambda self, *a, **k: builds.append(1) or real(self, *a, **k))
    info = {}
    got = self_influence(model, cross_entropy_loss, data, ihvp=ExactInverse(0.05), batch_size=8, diagnostics=info)
    assert builds == [1]
    assert (info["ihvp"]["solves"], info["ihvp"]["factorised"], info["ihvp"]["residual_from"]) == (
        5,
        False,
        "first solve",
    )
    assert info["ihvp"]["converged"] is True
    grads = explicit_gradients(model, cross_entropy_loss, data)
    hess = explicit_hessian(model, cross_entropy_loss, data)
    expected = (grads @ torch.linalg.solve(hess + 0.05 * torch.eye(hess.shape[0]).double(), grads.T)).diagonal()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_test_batches_share_one_certified_system():
    """Two test batches with the same estimator: the second reuses the factor and says where its residual is from."""
    model, data = tiny_mlp_problem(n=40)
    est = ExactInverse(0.05)
    first, second = {}, {}
    influence_scores(model, cross_entropy_loss, tuple(t[:3] for t in data.tensors), data, ihvp=est, diagnostics=first)
    influence_scores(model, cross_entropy_loss, tuple(t[3:6] for t in data.tensors), data, ihvp=est, diagnostics=second)
    assert (first["ihvp"]["factorised"], first["ihvp"]["residual_from"]) == (True, "this solve")
    assert (second["ihvp"]["factorised"], second["ihvp"]["residual_from"]) == (False, "first solve")
    assert second["ihvp"]["residual"] == first["ihvp"]["residual"] < 1e-12
