"""Problems with known answers for the reliability tests: a quadratic with a chosen spectrum, a small CNN."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from tests.helpers.exact import cross_entropy_loss


class Quadratic(nn.Module):
    """``ℓ_i(θ) = ½ θᵀAθ + x_iᵀθ``: every minibatch Hessian is exactly ``A``, whose eigenvalues are chosen."""

    def __init__(self, eigenvalues: list[float], seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
        self.register_buffer("a", q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T)
        self.register_buffer("q", q)
        self.theta = nn.Parameter(torch.zeros(len(eigenvalues), dtype=torch.float64))

    def per_example_loss(self, batch) -> Tensor:
        (x,) = batch
        return 0.5 * self.theta @ self.a @ self.theta + x @ self.theta


def quadratic_problem(eigenvalues: list[float], n: int = 32, seed: int = 0) -> tuple[Quadratic, TensorDataset]:
    model = Quadratic(eigenvalues, seed)
    x = torch.randn(n, len(eigenvalues), generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return model, TensorDataset(x)


def cnn_problem(n: int = 200, l2: float = 0.005, seed: int = 0) -> tuple[nn.Module, TensorDataset]:
    """A float64 conv(1→4, 3×3) + tanh + linear CNN (475 parameters) on 8×8 digits 0-2, at an exact minimum of
    ``mean cross-entropy + (l2/2)‖θ‖²`` (so ``λ_min(H) >= -l2``)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(n_class=3, return_X_y=True)
    x = torch.tensor(x[:n], dtype=torch.float64).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y[:n])
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 36, 3)).double()
    opt = torch.optim.LBFGS(
        net.parameters(),
        max_iter=500,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = cross_entropy_loss(net, (x, y)).mean() + l2 / 2 * sum((p**2).sum() for p in net.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return net, TensorDataset(x, y)


def autograd_hessian(model: nn.Module, loss_fn, data: TensorDataset) -> Tensor:
    """The Hessian of the mean loss over all parameters by ``torch.autograd.functional.hessian`` (independent of the
    engine's Hessian-vector products)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    class _Loss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, batch):
            return loss_fn(self.model, batch)

    wrapper = _Loss()

    def wrapped(flat: Tensor) -> Tensor:
        params = {f"model.{n}": t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return torch.func.functional_call(wrapper, params, (data.tensors,), strict=False).mean()

    return torch.autograd.functional.hessian(wrapped, flat0)
