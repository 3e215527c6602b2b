"""HessianOperator: products against an explicit Hessian, the system key, blocked dense builds, culprits named."""

import pytest
import torch

from lightning_fastif import ArgumentError, HessianOperator, NonFiniteError
from tests.helpers.exact import cross_entropy_loss, explicit_hessian, tiny_mlp_problem


@pytest.fixture
def mlp():
    model, data = tiny_mlp_problem(n=30)
    return model, data, HessianOperator(model, cross_entropy_loss, data, batch_size=7)


def test_dense_in_vector_blocks_equals_all_at_once(mlp):
    model, data, op = mlp
    hess = explicit_hessian(model, cross_entropy_loss, data)
    blocked = HessianOperator(model, cross_entropy_loss, data, batch_size=7, vector_block=5)
    torch.testing.assert_close(blocked.dense(cache=False), hess, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.dense(), hess, rtol=1e-10, atol=1e-12)
    assert blocked._dense is None  # cache=False keeps nothing
    assert op.dense() is op.dense()  # cached


def test_system_key_follows_the_weights_not_the_operator(mlp):
    model, data, op = mlp
    key = op.system_key()
    assert HessianOperator(model, cross_entropy_loss, data, batch_size=50).system_key() == key  # same system
    with torch.no_grad():
        model[2].bias.add_(1.0)
    bumped = op.system_key()
    assert bumped != key  # an in-place update: version counter and checksum
    with torch.no_grad():
        model[2].bias.sub_(1.0)
    assert op.system_key() != key  # the same values again, but a new version: recomputed, never stale
    before = op.system_key()
    model[2].bias.data.add_(1.0)  # .data bypasses the version counter; the checksum does not
    assert op.system_key() != before
    model[2].bias.data.sub_(1.0)
    other = tiny_mlp_problem(n=30)[1]  # equal contents, another dataset object
    assert HessianOperator(model, cross_entropy_loss, other).system_key() != op.system_key()


def test_a_nan_training_example_is_named_by_the_full_data_product(mlp):
    model, data, _ = mlp
    x, y = (t.clone() for t in data.tensors)
    x[17, 2] = float("nan")
    op = HessianOperator(model, cross_entropy_loss, torch.utils.data.TensorDataset(x, y), batch_size=7)
    with pytest.raises(NonFiniteError, match=r"Hessian-vector product is not finite: training examples \[17\] have"):
        op.matvec(torch.ones(op.num_params, dtype=torch.float64))
    with pytest.raises(NonFiniteError, match=r"training examples \[17\]"):
        op.matvec(torch.ones(op.num_params, dtype=torch.float64), torch.tensor([3, 17, 20]))
    assert op.matvec(torch.ones(op.num_params, dtype=torch.float64), torch.tensor([3, 20])).isfinite().all()


def test_non_finite_vectors_and_weights_are_named(mlp):
    model, _, op = mlp
    v = torch.ones(3, op.num_params, dtype=torch.float64)
    v[1, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"the vectors at rows \[1\] hold NaN or infinite values"):
        op.matvec(v)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"the selected parameters hold NaN or infinite values"):
        op.matvec(torch.ones(op.num_params, dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"batch_size: expected an integer >= 1, got 0"),
        ({"batch_size": "8"}, r"batch_size: expected an integer >= 1, got '8'"),
        ({"vector_block": 0}, r"vector_block: expected an integer >= 1 or None, got 0"),
        ({"max_memory": -5}, r"max_memory: expected an integer >= 1 or None, got -5"),
    ],
)
def test_bad_arguments(mlp, kwargs, match):
    model, data, _ = mlp
    with pytest.raises(ArgumentError, match=match):
        HessianOperator(model, cross_entropy_loss, data, **kwargs)
