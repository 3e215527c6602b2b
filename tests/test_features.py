"""extract_features / features_of_batch: hooks, features(), batch kinds, modes, and their errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_fastif.search.features import (
    extract_features,
    features_of_batch,
    has_features_method,
    last_layer_name,
    loss_gradient_features,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5))
        self.classifier = nn.Linear(6, 2)

    def forward(self, x):
        return self.classifier(self.body(x))


class WithFeatures(Net):
    def features(self, batch):
        return self.body(batch[0]) * 2


class DictNet(Net):
    def forward(self, input_ids, attention_mask):
        return self.classifier(self.body(input_ids * attention_mask))


class DictData(Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones(4), "labels": i % 2}


@pytest.fixture
def data():
    return TensorDataset(torch.randn(23, 4), torch.randint(0, 2, (23,)))


def test_hook_input_equals_classifier_input_in_eval_mode(data):
    net = Net().train()
    net.body[2].train()
    feats = extract_features(net, data, layer="classifier", hook="input", batch_size=5)
    with torch.no_grad():
        expected = net.eval().body(data.tensors[0])
    assert feats.shape == (23, 6)
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats, expected)  # dropout was off during extraction


def test_previous_modes_are_restored(data):
    net = Net().train()
    net.body.eval()  # a frozen part stays frozen
    extract_features(net, data, layer="body", batch_size=8)
    assert net.training
    assert not net.body.training
    assert net.classifier.training


def test_output_hook_indices_order_and_loader_collate(data):
    net = Net()
    loader = DataLoader(data, batch_size=3, shuffle=True)
    idx = torch.tensor([5, 0, 22, 7])
    feats = extract_features(net, loader, layer="body.1", indices=idx, batch_size=3)
    with torch.no_grad():
        expected = torch.tanh(net.body[0](data.tensors[0][idx]))
    torch.testing.assert_close(feats, expected)
    assert extract_features(net, data, layer="body", indices=[]).shape == (0, 0)


def test_features_method_is_used_without_layer(data):
    net = WithFeatures()
    assert has_features_method(net)
    feats = extract_features(net, data, batch_size=10)
    with torch.no_grad():
        torch.testing.assert_close(feats, net.eval().body(data.tensors[0]) * 2)


def test_submodule_named_features_is_not_a_features_method():
    net = nn.Module()
    net.features = nn.Linear(2, 2)
    assert not has_features_method(net)


def test_dict_batches_drop_label_keys():
    x = torch.randn(9, 4)
    net = DictNet()
    feats = extract_features(net, DictData(x), layer="classifier", hook="input", batch_size=4)
    with torch.no_grad():
        torch.testing.assert_close(feats, net.eval().body(x))


def test_outputs_with_more_dims_are_flattened_per_example():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU())
    x = torch.randn(5, 1, 4, 4)
    feats = extract_features(net, TensorDataset(x), layer="0", batch_size=2)
    assert feats.shape == (5, 2 * 4 * 4)


def test_custom_forward_fn(data):
    calls = []

    def forward_fn(model, batch):
        calls.append(len(batch[0]))
        return model(batch[0] + 1)

    net = Net()
    feats = features_of_batch(net, (data.tensors[0][:4], data.tensors[1][:4]), layer="body", forward_fn=forward_fn)
    assert calls == [4]
    assert feats.shape == (4, 6)


def test_bad_layer_name_lists_modules(data):
    with pytest.raises(ValueError, match="'clasifier' is not a submodule of Net") as err:
        extract_features(Net(), data, layer="clasifier")
    message = str(err.value)
    assert "Did you mean ['classifier']" in message
    for name in ("body", "body.0", "body.1", "body.2", "classifier"):
        assert repr(name) in message


def test_no_layer_and_no_features_method(data):
    with pytest.raises(ValueError, match="defines no features\\(batch\\) method.*'classifier'"):
        extract_features(Net(), data)


def test_non_tensor_feature_output(data):
    class TupleOut(nn.Module):
        def forward(self, x):
            return x, x

    net = nn.Sequential(nn.Linear(4, 3), TupleOut())
    with pytest.raises(TypeError, match="the output of layer '1' returned tuple, expected a Tensor"):
        extract_features(net, data, layer="1")

    class ListFeatures(Net):
        def features(self, batch):
            return [batch[0]]

    with pytest.raises(TypeError, match="ListFeatures.features\\(batch\\) returned list"):
        extract_features(ListFeatures(), data)


def test_feature_size_must_not_vary_between_batches():
    class Ragged(Net):
        def features(self, batch):
            x = batch[0]
            return x[:, : 1 + x.shape[0] % 3]  # width depends on the batch size

    x = TensorDataset(torch.randn(10, 4))
    with pytest.raises(ValueError, match="size 3 for the batch starting at index 8, but 2 for earlier batches"):
        extract_features(Ragged(), x, batch_size=4)


def test_wrong_batch_dimension_and_layer_run_count(data):
    class Pooled(Net):
        def features(self, batch):
            return batch[0].mean(0)  # pooled over the batch: one vector, not one per example

    with pytest.raises(ValueError, match="expected the batch size 23 as its first dimension"):
        extract_features(Pooled(), data, batch_size=100)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 4)

        def forward(self, x):
            return self.layer(self.layer(x))

    with pytest.raises(ValueError, match="ran 2 times in one forward pass"):
        extract_features(Twice(), data, layer="layer")
    with pytest.raises(ValueError, match="hook: expected 'input' or 'output', got 'middle'"):
        extract_features(Net(), data, layer="body", hook="middle")
    with pytest.raises(ValueError, match="batch_size: expected a positive integer, got 0"):
        extract_features(Net(), data, layer="body", batch_size=0)


def _ce(model, batch):
    if isinstance(batch, dict):
        logits = model(batch["input_ids"], batch["attention_mask"])
        return nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def test_loss_gradient_equals_autograd_and_the_closed_form(data):
    torch.manual_seed(0)
    net = Net().eval()
    x, y = data.tensors
    feats = extract_features(net, data, kind="loss_gradient", loss_fn=_ce, batch_size=5)
    assert feats.shape == (23, 2 * 7)  # C * (D + 1): the classifier's weight and bias
    # autograd, one example at a time
    for i in (0, 11, 22):
        net.zero_grad()
        _ce(net, (x[i : i + 1], y[i : i + 1])).sum().backward()
        expected = torch.cat([net.classifier.weight.grad.reshape(-1), net.classifier.bias.grad])
        torch.testing.assert_close(feats[i], expected, rtol=1e-5, atol=1e-6)
    # cross-entropy's closed form: (softmax(z) - onehot(y)) outer [h, 1]
    with torch.no_grad():
        h = net.body(x)
        residual = torch.softmax(net.classifier(h), 1) - nn.functional.one_hot(y, 2)
    closed = torch.cat([(residual[:, :, None] * h[:, None, :]).reshape(23, -1), residual], 1)
    torch.testing.assert_close(feats, closed, rtol=1e-5, atol=1e-6)
    assert net.training is False


def test_loss_gradient_default_layer_dict_batches_and_model_loss():
    torch.manual_seed(1)
    net = DictNet().eval()
    assert last_layer_name(net) == "classifier"
    data = DictData(torch.randn(7, 4))
    feats = extract_features(net, data, kind="loss_gradient", loss_fn=_ce, batch_size=3)
    assert feats.shape == (7, 14)

    class WithLoss(Net):
        def per_example_loss(self, batch):
            return _ce(self, batch)

    model = WithLoss().eval()
    batch = (torch.randn(4, 4), torch.tensor([0, 1, 1, 0]))
    body = loss_gradient_features(model, batch, layer="body")  # any layer with parameters: here Linear(4, 6)
    assert body.shape == (4, 6 * 5)
    torch.testing.assert_close(
        features_of_batch(model, batch, kind="loss_gradient"), loss_gradient_features(model, batch, loss_fn=_ce)
    )


def test_loss_gradient_bad_arguments(data):
    net = Net()
    with pytest.raises(ValueError, match="kind: expected one of \\['activations', 'loss_gradient'\\]"):
        extract_features(net, data, kind="gradients")
    with pytest.raises(ValueError, match="layer: 'body.1' holds no parameters"):
        loss_gradient_features(net, data.tensors, layer="body.1", loss_fn=_ce)
    with pytest.raises(TypeError, match="loss_fn: none given"):
        loss_gradient_features(net, data.tensors)
    with pytest.raises(ValueError, match="no submodule of ReLU owns parameters"):
        last_layer_name(nn.ReLU())
