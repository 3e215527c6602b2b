"""Picklable pieces for the ErrorCorrection tests (ddp_spawn pickles the callback and the module)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fastif.app.models import _Classifier


def cue_problem(n: int = 240, seed: int = 0):
    """A 2-class Gaussian problem with a planted cue feature: it agrees with the label on 95% of training points and is
    reversed on the challenge set, so a model that leans on it fails the challenge set (HANS-like, tiny)."""
    g = torch.Generator().manual_seed(seed)

    def make(m: int, agree: float) -> TensorDataset:
        y = torch.randint(0, 2, (m,), generator=g)
        signal = (2.0 * y - 1.0).unsqueeze(1) * 0.6 + torch.randn(m, 4, generator=g)
        agrees = torch.rand(m, generator=g) < agree
        cue = torch.where(agrees, 2.0 * y - 1.0, 1.0 - 2.0 * y).unsqueeze(1) * 2.0
        return TensorDataset(torch.cat([signal, cue], 1), y)

    return make(n, 0.95), make(60, 0.0), make(200, 0.0)


class CueNet(_Classifier):
    """A tiny MLP on the cue problem, with the package classifiers' steps, per-example loss and optimizer."""

    def __init__(self, lr: float = 0.05, weight_decay: float = 0.0) -> None:
        super().__init__(num_classes=2)
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(5, 16), nn.Tanh())
        self.classifier = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))

    def logits(self, batch):
        return self(batch[0])

    def features(self, batch):
        return self.body(batch[0])


class WeightsPerRank(pl.Callback):
    """Writes each rank's flattened weights at the end of fit, so a ddp_spawn test can compare ranks from disk."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_fit_end(self, trainer, pl_module) -> None:
        flat = torch.cat([p.detach().reshape(-1).cpu() for p in pl_module.parameters()])
        torch.save(flat, f"{self.dirpath}/weights-rank{trainer.global_rank}.pt")


class ChoicesPerRank(pl.Callback):
    """Writes, per rank, the training points this rank's own scores chose at each correction step.

    Every rank steps on rank 0's choice; ``chosen_by_rank[rank]`` is what this rank would have chosen itself, so
    comparing the files shows whether the ranks agreed rather than only that rank 0's choice was broadcast.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_fit_end(self, trainer, pl_module) -> None:
        import json

        from lightning_fastif.lightning.correction import ErrorCorrection

        correction = next(cb for cb in trainer.callbacks if isinstance(cb, ErrorCorrection))
        rank = trainer.global_rank
        own = [step["chosen_by_rank"][rank] for h in correction.history for step in h["steps"]]
        with open(f"{self.dirpath}/choices-rank{rank}.json", "w") as f:
            json.dump(own, f)


def regression_problem(n: int = 160, seed: int = 0):
    """``y = x·w + 0.1·noise`` with float targets: a training set and an evaluation set of 60 examples."""
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([1.5, -2.0, 0.5])

    def make(m: int) -> TensorDataset:
        x = torch.randn(m, 3, generator=g)
        return TensorDataset(x, x @ w + 0.1 * torch.randn(m, generator=g))

    return make(n), make(60)


class LinearRegressor(pl.LightningModule):
    """A linear model with mean squared error: no classes, a single float output per example."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def per_example_loss(self, batch) -> torch.Tensor:
        x, y = batch
        return (self(x) - y) ** 2

    def features(self, batch) -> torch.Tensor:
        return batch[0]

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class DictDataset(torch.utils.data.Dataset):
    """The cue problem's examples as dicts ``{"x": Tensor[5], "label": int}`` (collated into a dict batch)."""

    def __init__(self, data: TensorDataset) -> None:
        self.x, self.y = data.tensors

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "label": self.y[i]}


class WholeBatchNet(nn.Module):
    """A classifier whose ``forward`` takes the whole dict batch (no ``logits`` method, no ``predict_step``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 16), nn.Tanh())
        self.classifier = nn.Linear(16, 2)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.classifier(self.body(batch["x"]))

    def per_example_loss(self, batch: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch), batch["label"], reduction="none")
