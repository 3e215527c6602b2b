"""Loss gradients of a Linear layer as two factors: equal to autodiff's rows, the layer's exact Hessian, the kNN."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fastif.core.batches import IndexedData
from lightning_fastif.core.factored_grads import (
    FactoredGradients,
    extract_gradient_factors,
    linear_gradient_factors,
    linear_layer_hessian,
)
from lightning_fastif.core.hessian import HessianOperator
from lightning_fastif.search.features import loss_gradient_features
from lightning_fastif.search.knn import KNNIndex


def _ce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return ((model(batch[0]) - nn.functional.one_hot(batch[1], 3).to(batch[0].dtype)) ** 2).sum(1)


def _net(bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3, bias=bias)).double()


def _data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=generator).double(), torch.randint(0, 3, (n,), generator=generator)


@pytest.mark.parametrize("bias", [True, False])
def test_dense_rows_are_the_per_example_gradients(bias: bool) -> None:
    net, batch = _net(bias), _data()
    factors = linear_gradient_factors(net, batch, net[2], _ce)
    assert factors is not None
    assert factors.bias is bias
    rows = FactoredGradients(factors.out_grads.float(), factors.inputs.float(), bias=bias)
    dense = loss_gradient_features(net, batch, layer="2", loss_fn=_ce)
    assert rows.shape == dense.shape
    torch.testing.assert_close(rows[:], dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows[3], dense[3], rtol=1e-5, atol=1e-6)
    queries = torch.randn(5, dense.shape[1])
    torch.testing.assert_close(rows.dot(queries), queries @ dense.T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rows.dot(queries, 10, 25), queries @ dense[10:25].T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rows.sq_norms(), (dense * dense).sum(1), rtol=1e-5, atol=1e-6)
    assert [tuple(c.shape) for c in rows.split(16)] == [(16, dense.shape[1]), (16, dense.shape[1]), (8, dense.shape[1])]


@pytest.mark.parametrize(("loss", "bias"), [(_ce, True), (_mse, True), (_ce, False)])
def test_closed_form_hessian_equals_hessian_vector_products(loss, bias: bool) -> None:
    net, (x, y) = _net(bias), _data()
    data = IndexedData(TensorDataset(x, y))
    names = ["2.weight", "2.bias"] if bias else ["2.weight"]
    expected = HessianOperator(net, loss, data, params=names, batch_size=16).dense()
    hessian = linear_layer_hessian(net, data, net[2], loss, batch_size=16)
    assert hessian is not None
    torch.testing.assert_close(hessian, expected.double(), rtol=1e-6, atol=1e-8)


def test_layers_whose_gradients_do_not_factor_give_none() -> None:
    net, batch = _net(), _data()
    assert linear_gradient_factors(net, batch, net[1], _ce) is None  # no parameters, not Linear

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(3, 3).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(self.layer(x[:, :3]))

    twice = Twice()
    assert linear_gradient_factors(twice, batch, twice.layer, _ce) is None

    class Sequence(nn.Module):  # the head runs on every token: the gradient is a sum of outer products
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(2, 3).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x.reshape(x.shape[0], 2, 2)).mean(1)

    seq = Sequence()
    assert linear_gradient_factors(seq, batch, seq.head, _ce) is None
    assert extract_gradient_factors(seq, IndexedData(TensorDataset(*batch)), seq.head, _ce) is None
    assert linear_layer_hessian(seq, IndexedData(TensorDataset(*batch)), seq.head, _ce) is None


def test_extraction_keeps_the_order_of_indices_and_the_mode() -> None:
    net, (x, y) = _net(), _data()
    net.train()
    data = IndexedData(TensorDataset(x, y))
    rows = extract_gradient_factors(net, data, net[2], _ce, indices=torch.tensor([7, 2, 30]), batch_size=2)
    assert rows is not None
    assert net.training
    dense = loss_gradient_features(net, (x[[7, 2, 30]], y[[7, 2, 30]]), layer="2", loss_fn=_ce)
    torch.testing.assert_close(rows[:], dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_knn_over_factors_finds_what_it_finds_over_dense_rows(metric: str, tmp_path) -> None:
    torch.manual_seed(3)
    rows = FactoredGradients(torch.randn(300, 5), torch.randn(300, 7), bias=True)
    ids = torch.arange(300) + 1000
    factored = KNNIndex(rows, ids, metric=metric, kind="flat", backend="torch")
    dense = KNNIndex(rows[:], ids, metric=metric, kind="flat", backend="torch")
    queries = torch.randn(9, rows.shape[1])
    d1, i1 = factored.search(queries, 12)
    d2, i2 = dense.search(queries, 12)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(d1, d2, rtol=1e-4, atol=1e-4)
    if metric != "l2":
        d1, i1 = factored.search_signed(queries, 12, sign="both")
        d2, i2 = dense.search_signed(queries, 12, sign="both")
        assert torch.equal(i1, i2)
        torch.testing.assert_close(d1, d2, rtol=1e-4, atol=1e-4)
    path = factored.save(tmp_path, "idx")
    loaded = KNNIndex.load(tmp_path, "idx")
    assert isinstance(loaded.features, FactoredGradients)
    assert loaded.dim == rows.shape[1]
    assert torch.equal(loaded.search(queries, 12)[1], i2 if metric == "l2" else dense.search(queries, 12)[1])
    assert path.stat().st_size < 300 * (rows.shape[1] * 4 + 8) / 2  # the factors: 12 numbers a row, not 40


def test_both_signs_from_one_pass_equal_two_searches() -> None:
    torch.manual_seed(4)
    index = KNNIndex(torch.randn(500, 6), metric="ip", kind="flat", backend="torch")
    queries = torch.randn(7, 6)
    both_d, both_ids = index.search_signed(queries, 20, sign="both")
    pos_d, pos_ids = index.search(queries, 20)
    neg_d, neg_ids = index.search(-queries, 20)
    assert torch.equal(both_ids[:, :20], pos_ids)
    assert torch.equal(both_ids[:, 20:], neg_ids)
    torch.testing.assert_close(both_d, torch.cat([pos_d, neg_d], 1))


def test_factored_search_merges_across_small_blocks(monkeypatch) -> None:
    import lightning_fastif.search.exact as exact

    # Blocks of 7 rows and 3 queries: the running top-k of both signs is merged across many of them.
    monkeypatch.setattr(exact, "DB_CHUNK", 7)
    monkeypatch.setattr(exact, "BLOCK_ELEMENTS", 7 * 3 * 4)
    torch.manual_seed(5)
    rows = FactoredGradients(torch.randn(60, 4), torch.randn(60, 3), bias=False)
    queries = torch.randn(8, rows.shape[1])
    factored = KNNIndex(rows, metric="ip", kind="flat", backend="torch")
    dense = KNNIndex(rows[:], metric="ip", kind="flat", backend="torch")
    assert torch.equal(factored.search_signed(queries, 9, "both")[1], dense.search_signed(queries, 9, "both")[1])
    sims = queries @ rows[:].T
    assert torch.equal(factored.search(queries, 9)[1], sims.topk(9, 1).indices)


def test_a_features_file_is_checked_for_nan_unless_its_writer_checked_it(tmp_path) -> None:
    from lightning_fastif.io.atomic import TensorFileWriter, read_tensor_metadata
    from lightning_fastif.search.index_files import FINITE_CHECKED, features_layout

    features = torch.randn(20, 3)
    saved = KNNIndex(features, kind="flat", backend="torch").save(tmp_path, "good")
    assert read_tensor_metadata(saved)["finite"] == FINITE_CHECKED  # save refuses NaN, so it says so
    features[4, 1] = float("nan")
    # A file from before the header had it (or from another writer): checked at load, NaN refused.
    with TensorFileWriter(tmp_path / "old.safetensors", features_layout(20, 3), {"metric": "l2"}) as writer:
        writer.write("indices", torch.arange(20))
        writer.write("features", features)
    with pytest.raises(ValueError, match="NaN"):
        KNNIndex.load(tmp_path, "old")


def test_auto_index_stays_exact_over_factored_rows_above_the_ivf_threshold(monkeypatch) -> None:
    pytest.importorskip("faiss")
    from lightning_fastif.search import knn

    monkeypatch.setattr(knn, "AUTO_IVF_MIN_SIZE", 100)
    rows = FactoredGradients(torch.randn(300, 4), torch.randn(300, 5), bias=True)
    assert KNNIndex(rows[:], metric="ip", backend="faiss", use_gpu=False).kind == "ivf"  # dense rows: IVF
    factored = KNNIndex(rows, metric="ip", backend="faiss", use_gpu=False)
    assert factored.kind == "flat"  # the factors: an exact search over them, no dense copy
    # an IVF index can still be asked for, and is built from dense chunks of the factors
    ivf = KNNIndex(rows, metric="ip", kind="ivf", nlist=4, nprobe=4, backend="faiss", use_gpu=False)
    queries = torch.randn(3, rows.shape[1])
    assert torch.equal(ivf.search(queries, 5)[1], factored.search(queries, 5)[1])  # all 4 lists probed: exact


def test_inner_product_search_visits_rows_by_norm_and_stops_early_with_the_same_answer(monkeypatch) -> None:
    import lightning_fastif.search.exact as exact

    monkeypatch.setattr(exact, "DB_CHUNK", 16)
    generator = torch.Generator().manual_seed(6)
    scale = torch.rand(400, 1, generator=generator) ** 4  # heavy-tailed norms: most rows are small
    rows = FactoredGradients(torch.randn(400, 4, generator=generator) * scale, torch.randn(400, 5), bias=True)
    queries = torch.randn(6, rows.shape[1], generator=generator)
    index = KNNIndex(rows, metric="ip", kind="flat", backend="torch").build()
    order, norms = index._db_norm_order
    assert torch.equal(norms, rows.sq_norms().sqrt()[order])
    assert bool((norms[:-1] >= norms[1:]).all())
    visited: list[int] = []
    dot = FactoredGradients.dot

    def counting(self, q, start=0, stop=None):
        visited.append(len(self) if stop is None else stop - start)
        return dot(self, q, start, stop)

    monkeypatch.setattr(FactoredGradients, "dot", counting)
    found = index.search_signed(queries, 5, "both")
    assert sum(visited) < 400  # stopped before the small rows
    sims = queries @ rows[:].T
    assert torch.equal(found[1][:, :5], sims.topk(5, 1).indices)
    assert torch.equal(found[1][:, 5:], (-sims).topk(5, 1).indices)


def test_factors_of_different_lengths_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match=r"out_grads, inputs: expected \[N, C\] and \[N, D\] with the same N"):
        FactoredGradients(torch.zeros(4, 2), torch.zeros(3, 5), bias=True)
    with pytest.raises(ValueError, match=r"got \(4,\) and \(4, 5\)"):
        FactoredGradients(torch.zeros(4), torch.zeros(4, 5), bias=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("factor", ["out_grads", "inputs"])
def test_is_finite_finds_a_single_bad_number_in_either_factor(bad: float, factor: str) -> None:
    rows = FactoredGradients(torch.randn(50, 3), torch.randn(50, 4) * 1e30, bias=True)  # huge but finite
    assert rows.is_finite(chunk=16)
    getattr(rows, factor)[37, 1] = bad  # in the third chunk of 16 rows
    assert not rows.is_finite(chunk=16)
    assert FactoredGradients(torch.zeros(0, 3), torch.zeros(0, 4), bias=False).is_finite()


def test_squared_norms_are_the_dense_rows_squared_norms() -> None:
    torch.manual_seed(8)
    for bias in (True, False):
        rows = FactoredGradients(torch.randn(40, 3), torch.randn(40, 5), bias=bias)
        torch.testing.assert_close(rows.sq_norms(), (rows[:] ** 2).sum(1), rtol=1e-5, atol=0)
        torch.testing.assert_close(rows.sq_norms(10, 25), (rows[10:25] ** 2).sum(1), rtol=1e-5, atol=0)
