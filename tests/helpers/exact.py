"""Models small enough to solve exactly: a Newton-trained logistic regression, a tiny float64 MLP and a tanh
classifier trained on noisy labels."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset


def cross_entropy_loss(model: nn.Module, batch) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


class LogReg(nn.Module):
    """Binary logistic regression with a single logit; loss = BCE with logits, per example."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).squeeze(-1)

    def per_example_loss(self, batch) -> Tensor:
        x, y = batch
        return nn.functional.binary_cross_entropy_with_logits(self(x), y.to(x.dtype), reduction="none")


def noisy_classifier(n: int = 400) -> tuple[nn.Module, TensorDataset]:
    """A tanh classifier (8-16-4, 212 parameters, float64) trained towards its fit on 10%-noisy teacher labels."""
    torch.manual_seed(1)
    x = torch.randn(n, 8, dtype=torch.float64)
    y = (x @ torch.randn(8, 4, dtype=torch.float64)).argmax(-1)
    flip = torch.rand(n) < 0.1
    y[flip] = torch.randint(4, (int(flip.sum()),))
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimiser.zero_grad()
        cross_entropy_loss(model, (x, y)).mean().backward()
        optimiser.step()
    return model, TensorDataset(x, y)


def breast_cancer(n_train: int = 200, n_test: int = 50, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(y, dtype=torch.float64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train : n_train + n_test]
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te])


def fit_logreg(data: TensorDataset, l2: float, model: LogReg | None = None, iters: int = 30) -> LogReg:
    """Minimise mean BCE + (l2/2)·‖θ‖² (bias included) exactly, by Newton's method in float64."""
    x, y = data.tensors
    model = model or LogReg(x.shape[1]).double()
    theta = torch.zeros(x.shape[1] + 1, dtype=torch.float64)
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    for _ in range(iters):
        p = torch.sigmoid(xb @ theta)
        grad = xb.T @ (p - y) / len(y) + l2 * theta
        hess = (xb.T * (p * (1 - p))) @ xb / len(y) + l2 * torch.eye(len(theta), dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        theta = theta - step
        if float(step.norm()) < 1e-13:
            break
    with torch.no_grad():
        model.linear.weight.copy_(theta[:-1].unsqueeze(0))
        model.linear.bias.copy_(theta[-1:])
    return model


def tiny_mlp_problem(n: int = 60, seed: int = 0, l2: float = 0.005):
    """A trained float64 2-layer tanh MLP (50 parameters) on a noisy 2-class problem, and its data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.3 * torch.randn(n, generator=g, dtype=torch.float64) > 0).long()
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    opt = torch.optim.LBFGS(net.parameters(), max_iter=300, tolerance_grad=1e-10)

    def closure():
        opt.zero_grad()
        loss = cross_entropy_loss(net, (x, y)).mean() + l2 / 2 * sum((p**2).sum() for p in net.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return net, TensorDataset(x, y)


def explicit_hessian(model: nn.Module, loss_fn, data: TensorDataset) -> Tensor:
    """The dense Hessian of the mean loss over all parameters, row by row with plain double backward."""
    params = list(model.parameters())
    loss = loss_fn(model, data.tensors).mean()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = [torch.cat([h.reshape(-1) for h in torch.autograd.grad(gi, params, retain_graph=True)]) for gi in flat]
    return torch.stack(rows).detach()


def explicit_gradients(model: nn.Module, loss_fn, data: TensorDataset) -> Tensor:
    """Per-example gradients ``[N, P]`` by a plain autograd loop (independent of our code)."""
    rows = []
    for i in range(len(data)):
        batch = tuple(t[i : i + 1] for t in data.tensors)
        loss = loss_fn(model, batch).sum()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)
