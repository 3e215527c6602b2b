import pytest
import torch
from torch import nn

from lightning_fastif.core.params import flatten, select_parameters, unflatten


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4))
        self.classifier = nn.Linear(4, 2)


def test_default_selects_trainable_only():
    net = Net()
    net.encoder[0].weight.requires_grad_(False)
    names = list(select_parameters(net))
    assert "encoder.0.weight" not in names
    assert names == ["encoder.0.bias", "encoder.2.weight", "encoder.2.bias", "classifier.weight", "classifier.bias"]


def test_patterns_and_modules():
    net = Net()
    assert list(select_parameters(net, "classifier.*")) == ["classifier.weight", "classifier.bias"]
    assert list(select_parameters(net, ["encoder.2.*", net.classifier])) == [
        "encoder.2.weight",
        "encoder.2.bias",
        "classifier.weight",
        "classifier.bias",
    ]
    net.encoder.requires_grad_(False)  # a pattern may select frozen parameters on purpose
    assert list(select_parameters(net, "encoder.0.weight")) == ["encoder.0.weight"]


def test_pattern_matching_nothing_lists_names():
    with pytest.raises(ValueError, match=r"params: the pattern 'decoder\.\*' matches no parameter.*classifier\.weight"):
        select_parameters(Net(), "decoder.*")


def test_no_trainable_parameters():
    net = Net().requires_grad_(False)
    with pytest.raises(ValueError, match="params: the model has no trainable parameter"):
        select_parameters(net)


def test_foreign_module_and_bad_type():
    with pytest.raises(ValueError, match="holds no parameter of the model"):
        select_parameters(Net(), nn.Linear(2, 2))
    with pytest.raises(TypeError, match="params: expected None, a name pattern"):
        select_parameters(Net(), [3])


def test_flatten_roundtrip():
    params = {"a": torch.randn(2, 3), "b": torch.randn(4)}
    flat = flatten(params)
    back = unflatten(flat, params)
    assert torch.equal(back["a"], params["a"])
    assert torch.equal(back["b"], params["b"])
    batched = unflatten(torch.stack([flat, 2 * flat]), params)
    assert batched["a"].shape == (2, 2, 3)
    with pytest.raises(ValueError, match="does not match"):
        unflatten(torch.zeros(5), params)
