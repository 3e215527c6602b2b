"""Seeded splits, planted-cue helpers and the split bookkeeping the demo data modules share.

Every split is a seeded permutation, so DDP ranks that call ``setup()`` independently build the same splits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[Tensor]:
    """Cut a seeded permutation of ``range(n)`` into consecutive parts of the given fractions, then the rest."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for fraction in fractions:
        size = round(fraction * n)
        parts.append(order[start : start + size])
        start += size
    parts.append(order[start:])
    return parts


def disagreeing_mask(n: int, agreement: float, generator: torch.Generator) -> Tensor:
    """Mark exactly ``round((1 - agreement) * n)`` of ``n`` examples, chosen at random, as cue-disagreeing."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[: round((1.0 - agreement) * n)]] = True
    return mask


def other_class(labels: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
    """A class different from each label, uniformly among the other ``num_classes - 1``."""
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return (labels + shift) % num_classes


class SplitsMixin:
    """Datasets by split name, available after ``setup()``, and their loaders."""

    _datasets: dict[str, Dataset]
    batch_size: int
    num_workers: int

    def _dataset(self, split: str) -> Any:
        if not self._datasets:
            raise RuntimeError(f"{type(self).__name__}: call setup() before reading its datasets")
        if split not in self._datasets:
            raise KeyError(f"split: {split!r} is not a split of {type(self).__name__} (available: {self.splits})")
        return self._datasets[split]

    @property
    def splits(self) -> list[str]:
        """The split names built by ``setup()``."""
        return list(self._datasets)

    @property
    def train_dataset(self) -> Any:
        """The training dataset (after ``setup()``); indices into it are the training indices influence reports."""
        return self._dataset("train")

    @property
    def val_dataset(self) -> Any:
        """The validation dataset (after ``setup()``)."""
        return self._dataset("val")

    @property
    def test_dataset(self) -> Any:
        """The test dataset (after ``setup()``)."""
        return self._dataset("test")

    @property
    def collate_fn(self) -> Callable[[list[Any]], Any] | None:
        """The collate function of the loaders (``None``: PyTorch's default)."""
        return None

    def dataloader(self, split: str, *, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        """Return a loader over ``split`` (``"train"``, ``"val"``, ``"test"``, ...); unshuffled by default."""
        return DataLoader(
            self._dataset(split),
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.dataloader("test")


class ChallengeMixin(SplitsMixin):
    @property
    def challenge_dataset(self) -> Any:
        """The challenge examples anchors are drawn from (cue reversed; held out from training)."""
        return self._dataset("challenge")

    @property
    def challenge_eval_dataset(self) -> Any:
        """The challenge examples kept for evaluation, disjoint from :attr:`challenge_dataset`."""
        return self._dataset("challenge_eval")
