"""Fingerprints change exactly when what determines the scores changes."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fastif.core.fingerprint import (
    changed_components,
    data_fingerprint,
    digest_of,
    estimator_fingerprint,
    function_fingerprint,
    params_fingerprint,
    weights_fingerprint,
)


def _data(n=2500, flip=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    if flip is not None:
        y = y.clone()
        y[flip] = 1 - y[flip]
    return TensorDataset(x, y)


def test_data_fingerprint_sees_one_relabelled_example_past_the_first_chunk():
    assert data_fingerprint(_data()) == data_fingerprint(_data())
    assert data_fingerprint(_data()) != data_fingerprint(_data(flip=2400))


def test_data_fingerprint_is_the_same_through_a_loader_and_sees_order():
    data = _data(50)
    assert data_fingerprint(DataLoader(data, batch_size=7)) == data_fingerprint(data)
    reordered = TensorDataset(data.tensors[0].flip(0), data.tensors[1].flip(0))
    assert data_fingerprint(reordered) != data_fingerprint(data)


def test_data_fingerprint_of_dict_items():
    items = [{"x": torch.tensor([float(i)]), "y": torch.tensor(i % 2)} for i in range(5)]
    other = [dict(item) for item in items]
    other[3] = {"x": torch.tensor([3.5]), "y": torch.tensor(1)}
    assert data_fingerprint(items) == data_fingerprint([dict(i) for i in items])
    assert data_fingerprint(items) != data_fingerprint(other)


def test_weights_and_params_fingerprints():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    before = weights_fingerprint(net)
    assert weights_fingerprint(net) == before
    with torch.no_grad():
        net.bias[1] += 1e-6
    assert weights_fingerprint(net) != before
    assert params_fingerprint(net.named_parameters()) == params_fingerprint(list(net.named_parameters()))
    assert params_fingerprint(net.named_parameters()) != params_fingerprint([("weight", net.weight)])


def _loss_a(model, batch):
    return (model(batch[0]).squeeze(-1) - batch[1]) ** 2


def _loss_b(model, batch):
    return (model(batch[0]).squeeze(-1) - batch[1]).abs()


def test_function_fingerprint_tells_lambdas_and_functions_apart():
    first = lambda m, b: m(b[0]).sum(-1)  # noqa: E731
    second = lambda m, b: m(b[0]).mean(-1)  # noqa: E731
    assert function_fingerprint(first) != function_fingerprint(second)
    assert function_fingerprint(_loss_a) == function_fingerprint(_loss_a)
    assert function_fingerprint(_loss_a) != function_fingerprint(_loss_b)
    assert function_fingerprint(_loss_a, name="mse") == function_fingerprint(_loss_b, name="mse")
    assert function_fingerprint(None) != function_fingerprint(_loss_a)


def test_function_fingerprint_sees_closure_constants():
    def make(weight):
        return lambda m, b: weight * m(b[0]).sum(-1)

    assert function_fingerprint(make(1.0)) != function_fingerprint(make(2.0))


def test_changed_components_names_what_changed_in_order():
    old = {"weights": "w", "estimator": "e", "train_data": "d", "loss_fn": "l"}
    new = {"weights": "w", "estimator": "e2", "train_data": "d2", "loss_fn": "l", "test_data": "t"}
    assert changed_components(old, new) == ["estimator", "train_data", "test_data"]
    assert changed_components(old, dict(old)) == []


def test_digests_distinguish_dtype_and_settings():
    assert digest_of(torch.zeros(2)) != digest_of(torch.zeros(2, dtype=torch.float64))
    assert digest_of([1, 2]) != digest_of([2, 1])
    assert estimator_fingerprint({"damping": 0.1, "name": "lissa"}) == estimator_fingerprint(
        {"name": "lissa", "damping": 0.1}
    )
    assert estimator_fingerprint({"damping": 0.1}) != estimator_fingerprint({"damping": 0.2})
