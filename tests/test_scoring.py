"""Candidate scoring in the Lightning layer: both paths give the same scores, each in its own chunk size."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fastif.core.batches import IndexedData
from lightning_fastif.core.grads import FunctionalLoss
from lightning_fastif.lightning.scoring import score_columns


def _problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    data = TensorDataset(torch.randn(8, 3, dtype=torch.float64), torch.randint(2, (8,)))
    loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    return FunctionalLoss(net, loss, None), IndexedData(data)


def test_materialised_gradients_use_their_own_chunk_and_equal_the_dense_product():
    function, data = _problem()
    s_test = torch.randn(5, function.num_params, dtype=torch.float64)
    seen = []
    real = function.gradient_dots

    def recording(batch, directions):
        seen.append(int(batch[0].shape[0]))
        return real(batch, directions)

    function.gradient_dots = recording
    scores = score_columns(
        function, data, s_test, None, 0, 8, chunk_size=10, gradient_chunk_size=3, method="grads", progress=False
    )
    assert seen == [3, 3, 2]  # the gradient chunk, not the JVP chunk of 10
    dense = s_test @ function.per_example_gradients(data.gather(range(8))).T
    torch.testing.assert_close(scores, dense)
    jvp = score_columns(function, data, s_test, None, 0, 8, chunk_size=10, method="jvp", progress=False)
    torch.testing.assert_close(jvp, dense)
