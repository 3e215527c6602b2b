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
