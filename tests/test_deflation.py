"""The low-rank (Lanczos) correction of EK-FAC toward the Hessian: exact at full rank, closer to exact below it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_fastif.core.curvature import ekfac_correct, ekfac_self_influence, fit_kfac
from lightning_fastif.core.deflation import LowRankCorrection, fit_low_rank_correction
from lightning_fastif.core.grads import FunctionalLoss
from lightning_fastif.core.hessian import HessianOperator
from lightning_fastif.core.verify import pearson
from lightning_fastif.errors import ArgumentError
from tests.helpers.exact import noisy_classifier

D = torch.float64


def ce(model: nn.Module, batch) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def exact_self_influence(model: nn.Module, data: TensorDataset, damping: float, params=None) -> tuple[Tensor, Tensor]:
    """``g_iᵀ (H + λI)⁻¹ g_i`` with the dense Hessian, and the dense ``(H + λI)⁻¹``."""
    h = HessianOperator(model, ce, data, params).dense()
    inverse = torch.linalg.inv(h + damping * torch.eye(h.shape[0], dtype=D))
    g = FunctionalLoss(model, ce, params).per_example_gradients(data.tensors)
    return ((g @ inverse) * g).sum(-1), inverse


def test_the_correction_is_exact_when_the_krylov_space_is_complete():
    model, data = noisy_classifier(200)
    damping = 0.05
    factors = ekfac_correct(fit_kfac(model, ce, data), model, ce, data)
    exact, inverse = exact_self_influence(model, data, damping)
    plain = ekfac_self_influence(model, ce, data, damping=damping, factors=factors)
    assert float((plain - exact).norm() / exact.norm()) > 0.05  # EK-FAC alone is visibly off here
    correction = fit_low_rank_correction(model, ce, data, factors, damping, steps=1000)
    assert correction.diagnostics["breakdown"]
    assert correction.diagnostics["steps"] <= 212
    got = ekfac_self_influence(model, ce, data, damping=damping, factors=factors, correction=correction, batch_size=64)
    torch.testing.assert_close(got, exact, rtol=1e-8, atol=1e-10)
    # The corrected inverse itself: exact on the training gradients (the Krylov space holds what they need).
    g = FunctionalLoss(model, ce).per_example_gradients(data.tensors)
    torch.testing.assert_close(correction.inverse_apply(factors, g[:5]), g[:5] @ inverse, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
    ("steps", "want_error", "want_pearson"),
    [(8, 0.652, 0.9624), (16, 0.465, 0.9782), (32, 0.261, 0.9948), (64, 0.099, 0.9987)],
)
def test_a_partial_correction_is_closer_to_exact_than_ekfac(steps, want_error, want_pearson):
    """212 parameters, 400 points, λ = 0.05: EK-FAC alone is 0.883 off (relative), Pearson 0.943; every Lanczos
    step count brings the scores closer, by the measured amounts."""
    model, data = noisy_classifier()
    damping = 0.05
    factors = ekfac_correct(fit_kfac(model, ce, data), model, ce, data)
    exact, _ = exact_self_influence(model, data, damping)
    plain = ekfac_self_influence(model, ce, data, damping=damping, factors=factors)
    correction = fit_low_rank_correction(model, ce, data, factors, damping, steps=steps)
    got = ekfac_self_influence(model, ce, data, damping=damping, factors=factors, correction=correction)
    error_plain = float((plain - exact).norm() / exact.norm())
    error = float((got - exact).norm() / exact.norm())
    assert error_plain == pytest.approx(0.883, abs=1e-3)
    assert pearson(plain, exact) == pytest.approx(0.9432, abs=1e-4)
    assert error == pytest.approx(want_error, abs=2e-3)
    assert pearson(got, exact) == pytest.approx(want_pearson, abs=2e-4)


def test_the_scoring_pass_adds_the_correction_on_rotated_gradients_embeddings_and_fallback_too():
    """Embedding (token pairs), a Linear over tokens, LayerNorm (the diagonal fallback) and a head: the hook's dot
    products in each layer's eigenbasis equal ``Σ_k c_k (u_kᵀ g_i)²`` on the flat per-example gradients."""

    class TokenNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(6, 3, padding_idx=0)
            self.proj = nn.Linear(3, 4)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 2)

        def forward(self, ids: Tensor) -> Tensor:
            return self.head(self.norm(torch.tanh(self.proj(self.embed(ids)))).mean(1))

    torch.manual_seed(0)
    ids = torch.randint(6, (20, 5))
    ids[:, -1] = 0
    data = TensorDataset(ids, torch.randint(2, (20,)))
    model = TokenNet().double()
    factors = ekfac_correct(fit_kfac(model, ce, data), model, ce, data)
    assert list(factors.unsupported) == ["norm.weight", "norm.bias"]
    damping = 2.0  # the untrained net's Hessian has eigenvalues from -1.14 to 2.0
    correction = fit_low_rank_correction(model, ce, data, factors, damping, steps=6)
    assert correction.rank == 6
    plain = ekfac_self_influence(model, ce, data, damping=damping, factors=factors)
    got = ekfac_self_influence(model, ce, data, damping=damping, factors=factors, correction=correction, batch_size=7)
    g = FunctionalLoss(model, ce).per_example_gradients(data.tensors)
    torch.testing.assert_close(got, plain + correction.scores(g))
    assert float((got - plain).abs().max()) > 1e-3  # the correction did something
    empty = LowRankCorrection(g.new_zeros(0, g.shape[1]), g.new_zeros(0), damping)
    torch.testing.assert_close(
        ekfac_self_influence(model, ce, data, damping=damping, factors=factors, correction=empty), plain
    )


def test_bad_arguments_and_an_indefinite_system_raise_argument_errors_naming_them():
    model, data = noisy_classifier(100)
    factors = ekfac_correct(fit_kfac(model, ce, data), model, ce, data)
    correction = fit_low_rank_correction(model, ce, data, factors, 0.1, steps=4)
    with pytest.raises(ArgumentError, match=r"^correction: expected a correction over these factors' 212 parameters"):
        ekfac_self_influence(model, ce, data, damping=0.2, factors=factors, correction=correction)
    with pytest.raises(ArgumentError, match=r"^correction: expected None or a LowRankCorrection"):
        ekfac_self_influence(model, ce, data, damping=0.1, factors=factors, correction="lanczos")
    with pytest.raises(ArgumentError, match=r"^steps: "):
        fit_low_rank_correction(model, ce, data, factors, 0.1, steps=0)
    with pytest.raises(ArgumentError, match=r"^factors: expected KFACFactors"):
        fit_low_rank_correction(model, ce, data, None, 0.1)
    # Untrained, the Hessian has curvature well below -1e-3: H + λI is not positive definite there.
    fresh = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    fresh_factors = ekfac_correct(fit_kfac(fresh, ce, data), fresh, ce, data)
    with pytest.raises(ArgumentError, match=r"^damping: expected a damping that makes H \+ λI positive definite"):
        fit_low_rank_correction(fresh, ce, data, fresh_factors, 1e-3, steps=200)
    assert isinstance(correction, LowRankCorrection)
    assert correction.damping == 0.1
