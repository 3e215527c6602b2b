"""Per-example gradients, JVP scores and HVPs against plain autograd on models small enough to check exactly."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fastif import NonFiniteError
from lightning_fastif.core.grads import FunctionalLoss, check_finite, evaluating, per_example_gradients
from lightning_fastif.core.hessian import HessianOperator
from tests.helpers.exact import (
    LogReg,
    breast_cancer,
    cross_entropy_loss,
    explicit_gradients,
    explicit_hessian,
    fit_logreg,
    tiny_mlp_problem,
)


def logreg_loss(model, batch):
    return model.per_example_loss(batch)


@pytest.fixture(scope="module")
def logreg():
    train, _ = breast_cancer(n_train=80)
    return fit_logreg(train, l2=0.01), train


@pytest.mark.parametrize("problem", ["logreg", "mlp"])
def test_per_example_gradients_equal_loop(problem, logreg):
    if problem == "logreg":
        model, data = logreg
        loss_fn = logreg_loss
    else:
        model, data = tiny_mlp_problem()
        loss_fn = cross_entropy_loss
    expected = explicit_gradients(model, loss_fn, data)
    got = torch.cat([g for _, g in per_example_gradients(model, loss_fn, data, batch_size=7)])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_vmap_failure_falls_back_to_loop_with_warning():
    model, data = tiny_mlp_problem(n=10)

    def unvmappable(m, batch):  # .item() is data-dependent: vmap cannot trace it
        x, y = batch
        scale = 1.0 + 0.0 * float(x.sum().item())
        return scale * cross_entropy_loss(m, (x, y))

    expected = explicit_gradients(model, cross_entropy_loss, data)
    f = FunctionalLoss(model, unvmappable)
    with pytest.warns(UserWarning, match="vmap cannot run .* fall back to a loop"):
        got = f.per_example_gradients(data.tensors)
    torch.testing.assert_close(got, expected)


def test_directional_derivatives_equal_gradient_dot():
    model, data = tiny_mlp_problem()
    f = FunctionalLoss(model, cross_entropy_loss)
    directions = torch.randn(3, f.num_params, dtype=torch.float64)
    expected = directions @ explicit_gradients(model, cross_entropy_loss, data).T
    torch.testing.assert_close(f.directional_derivatives(data.tensors, directions), expected)
    torch.testing.assert_close(f.directional_derivatives(data.tensors, directions[1]), expected[1:2])


def test_hvp_equals_explicit_hessian(logreg):
    for model, loss_fn, data in [
        (*tiny_mlp_problem()[:1], cross_entropy_loss, tiny_mlp_problem()[1]),
        (logreg[0], logreg_loss, logreg[1]),
    ]:
        hess = explicit_hessian(model, loss_fn, data)
        op = HessianOperator(model, loss_fn, data, batch_size=13)
        vectors = torch.randn(4, op.num_params, dtype=torch.float64)
        torch.testing.assert_close(op.matvec(vectors), vectors @ hess, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(op.dense(), hess, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(op.batch_hvp(data.tensors, vectors[0]), hess @ vectors[0], rtol=1e-9, atol=1e-12)


def test_selected_parameters_subset_and_frozen():
    model, data = tiny_mlp_problem()
    model.requires_grad_(False)  # frozen parameters can still be differentiated when selected by name
    f = FunctionalLoss(model, cross_entropy_loss, params="2.*")
    model.requires_grad_(True)
    full = explicit_gradients(model, cross_entropy_loss, data)
    torch.testing.assert_close(f.per_example_gradients(data.tensors), full[:, -14:])
    assert f.num_params == 14


def test_dict_batches():
    class DictNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.classifier = nn.Linear(4, 2)

        def per_example_loss(self, batch):
            mask = batch["attention_mask"].unsqueeze(-1).to(self.emb.weight.dtype)
            pooled = (self.emb(batch["input_ids"]) * mask).sum(1) / mask.sum(1)
            return nn.functional.cross_entropy(self.classifier(pooled), batch["labels"], reduction="none")

    net = DictNet()
    batch = {
        "input_ids": torch.randint(10, (5, 6)),
        "attention_mask": torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 6, [1] * 2 + [0] * 4, [1] * 5 + [0]]),
        "labels": torch.tensor([0, 1, 1, 0, 1]),
    }
    f = FunctionalLoss(net)
    got = f.per_example_gradients(batch)
    rows = []
    for i in range(5):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(net.per_example_loss(one).sum(), list(net.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    torch.testing.assert_close(got, torch.stack(rows))
    d = torch.randn(f.num_params)
    torch.testing.assert_close(f.directional_derivatives(batch, d)[0], torch.stack(rows) @ d, rtol=1e-4, atol=1e-5)


def test_loss_fn_output_is_checked():
    model, data = tiny_mlp_problem(n=8)
    scalar = FunctionalLoss(model, lambda m, b: cross_entropy_loss(m, b).mean())
    with pytest.raises(ValueError, match=r"loss_fn: returned a scalar.*shape \[8\]"):
        scalar.hvp(data.tensors, torch.zeros(scalar.num_params, dtype=torch.float64))
    wrong = FunctionalLoss(model, lambda m, b: cross_entropy_loss(m, b)[:-1])
    with pytest.raises(ValueError, match=r"loss_fn: returned shape \(7,\); expected per-example losses of shape \[8\]"):
        wrong.losses(data.tensors)
    with pytest.raises(ValueError, match="loss_fn: returned a scalar"):
        scalar.per_example_gradients(data.tensors)


def test_default_loss_requires_method():
    with pytest.raises(TypeError, match="loss_fn: none given and Linear defines no `per_example_loss"):
        FunctionalLoss(nn.Linear(2, 2))
    assert FunctionalLoss(LogReg(3)).num_params == 4


def test_evaluating_restores_modes():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    net.train()
    net[1].eval()
    with evaluating(net):
        assert not any(m.training for m in net.modules())
    assert net.training
    assert not net[1].training


def test_attention_error_is_explained():
    class FusedAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def per_example_loss(self, batch):
            q = self.proj(batch[0]).unsqueeze(1)
            out = nn.functional.scaled_dot_product_attention(q, q, q)
            return out.pow(2).sum(dim=(1, 2, 3))

    net = FusedAttention()
    batch = (torch.randn(3, 5, 4),)
    f = FunctionalLoss(net)
    direction = torch.randn(f.num_params)
    # PyTorch's fused CPU attention has neither forward AD nor double backward (shared/DATA.md, measured here).
    with pytest.raises(RuntimeError, match=r'forward-mode AD.*attn_implementation="eager".*SDPBackend\.MATH'):
        f.directional_derivatives(batch, direction)
    with pytest.raises(RuntimeError, match=r'double backward.*attn_implementation="eager"'):
        f.hvp(batch, direction)
    # The remedy the message names works.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        assert torch.isfinite(f.directional_derivatives(batch, direction)).all()
        assert torch.isfinite(f.hvp(batch, direction)).all()


def test_empty_and_unindexable_data():
    model, _ = tiny_mlp_problem(n=8)
    empty = TensorDataset(torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="train_data: the dataset is empty"):
        HessianOperator(model, cross_entropy_loss, empty)
    with pytest.raises(TypeError, match="train_data: expected a map-style Dataset"):
        HessianOperator(model, cross_entropy_loss, iter([1, 2]))


def test_gradient_dots_equal_the_product_with_materialised_gradients():
    model, data = tiny_mlp_problem()
    f = FunctionalLoss(model, cross_entropy_loss)
    directions = torch.randn(3, f.num_params, dtype=torch.float64)
    expected = directions @ explicit_gradients(model, cross_entropy_loss, data).T
    torch.testing.assert_close(f.gradient_dots(data.tensors, directions), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f.gradient_dots(data.tensors, directions[0]), expected[:1], rtol=1e-10, atol=1e-12)


def test_non_finite_examples_and_the_streaming_check_name_indices():
    model, data = tiny_mlp_problem(n=12)
    x, y = (t.clone() for t in data.tensors)
    x[4, 0] = float("nan")
    x[9, 1] = float("inf")
    f = FunctionalLoss(model, cross_entropy_loss)
    assert f.non_finite_examples((x, y)).tolist() == [4, 9]
    assert f.non_finite_examples(data.tensors).tolist() == []
    with pytest.raises(NonFiniteError, match=r"the loss gradients of examples \[4\] are not finite"):
        list(per_example_gradients(model, cross_entropy_loss, TensorDataset(x, y), batch_size=5))


def test_check_finite_names_rows_by_their_indices():
    values = torch.zeros(4, 2)
    assert check_finite(values, "the scores") is values
    values[2, 1] = float("nan")
    with pytest.raises(
        NonFiniteError, match=r"^the scores of test points \[12\] are not finite \(NaN or infinite\); x$"
    ):
        check_finite(values, "the scores", rows="test points", indices=[10, 11, 12, 13], hint="x")
    with pytest.raises(NonFiniteError, match=r"of examples all 2 \[0, 1\] are not finite"):
        check_finite(torch.full((2, 3), float("inf")), "the losses")
