"""Picklable module-level models, data and callbacks for the snapshot tests (ddp_spawn pickles them)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

IN_DIM, HIDDEN, CLASSES = 6, 5, 3


def make_dataset(n: int = 37, seed: int = 0) -> TensorDataset:
    """A seeded classification set: ``x`` [n, 6] float32, ``y`` [n] int64."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_DIM, generator=gen)
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    return TensorDataset(x, y)


class TinyClassifier(pl.LightningModule):
    """``body`` (Linear + Tanh) then ``classifier`` (Linear); trained with plain SGD."""

    def __init__(self, lr: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.Tanh())
        self.classifier = nn.Linear(HIDDEN, CLASSES)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.body(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TinyClassifierWithFeatures(TinyClassifier):
    """The same network with a ``features(batch)`` method (the classifier's input)."""

    def features(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        return self.body(batch[0])


class TinyDataModule(pl.LightningDataModule):
    """An unshuffled train loader over ``make_dataset(n)``."""

    def __init__(self, n: int = 37, batch_size: int = 5) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size
        self.train_set = make_dataset(n, seed=0)
        self.val_set = make_dataset(11, seed=1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False)


class TinyDataModuleWithVal(TinyDataModule):
    """The same, with a validation loader over 11 other examples."""

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class ValLossClassifier(TinyClassifier):
    """Logs ``val_loss`` so a CheckpointSnapshot can monitor it."""

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))


class CrashAtEpoch(pl.Callback):
    """Raise at the start (``when="start"``) or the end (``"end"``) of epoch ``epoch``: an interrupted fit.

    At the end, it runs after the snapshot callbacks but before ``ModelCheckpoint`` (Lightning moves checkpoint
    callbacks last), so that epoch's snapshots are on disk but its checkpoint is not.
    """

    def __init__(self, epoch: int, when: str = "start") -> None:
        self.epoch, self.when = epoch, when

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "start" and trainer.current_epoch == self.epoch:
            raise RuntimeError(f"planned crash at the start of epoch {self.epoch}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "end" and trainer.current_epoch == self.epoch:
            raise RuntimeError(f"planned crash at the end of epoch {self.epoch}")
