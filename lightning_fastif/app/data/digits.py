"""scikit-learn's digits as Lightning data modules: plain (with optional label noise) and with a planted cue.

Batches are ``(x, y)`` with ``x`` float32 ``[B, 1, 8, 8]`` in ``[0, 1]`` and ``y`` int64 ``[B]``; datasets are
``TensorDataset`` s. scikit-learn is optional: imported when the digits are loaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from lightning_fastif.app.data.splits import (
    ChallengeMixin,
    SplitsMixin,
    disagreeing_mask,
    other_class,
    split_indices,
)
from lightning_fastif.errors import ArgumentError, check_choice, check_int, check_number

DIGITS_BINARY_NAMES = ("0-4", "5-9")
"""Class names of :class:`SpuriousDigitsDataModule` with ``task="binary"`` (label = digit >= 5)."""


def _load_digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "the digits data modules need scikit-learn: `pip install scikit-learn` (or `pip install "
            "lightning-fastif[app]`)"
        ) from err
    digits = load_digits()
    # Pixels are counts 0..16; scaled to [0, 1] so a planted patch of 1.0 is exactly "fully bright".
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.as_tensor(digits.target, dtype=torch.long)


class DigitsDataModule(SplitsMixin, LightningDataModule):
    """scikit-learn's digits (1,797 images 8x8, 10 classes) in a seeded train/val/test split, optional label noise.

    Batches are ``(x, y)``: ``x`` float32 ``[B, 1, 8, 8]`` in ``[0, 1]``, ``y`` int64 ``[B]``. Datasets are
    ``TensorDataset`` s, so influence code gathers any training subset by indexing.

    Args:
        batch_size: examples per batch of every loader.
        val_fraction: fraction of the images in the validation split.
        test_fraction: fraction of the images in the test split; training gets the rest (60% by default).
        label_noise: fraction of *training* labels replaced by another class, uniformly at random (seeded); their
            indices into the training dataset are :attr:`flipped_indices`.
        seed: seed of the split and of the noise.
        num_workers: ``DataLoader`` workers (0: load in the main process, fastest for data this small).

    Example::

        >>> dm = DigitsDataModule(label_noise=0.1)  # doctest: +SKIP
        >>> dm.setup()  # doctest: +SKIP
        >>> len(dm.train_dataset), len(dm.flipped_indices)  # doctest: +SKIP
        (1079, 108)
    """

    num_classes: int = 10
    """Number of classes of the labels."""

    def __init__(
        self,
        *,
        batch_size: int = 32,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        label_noise: float = 0.0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_int("batch_size", batch_size)
        check_int("num_workers", num_workers, minimum=0)
        check_number("val_fraction", val_fraction, low=0.0, high=0.9)
        check_number("test_fraction", test_fraction, low=0.0, high=0.9)
        check_number("label_noise", label_noise, low=0.0, high=0.9)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.label_noise = label_noise
        self.seed = seed
        self.num_workers = num_workers
        self._check_split_sizes()
        self._datasets: dict[str, Dataset] = {}
        self._flipped = torch.zeros(0, dtype=torch.long)
        self._clean_train_labels = torch.zeros(0, dtype=torch.long)
        self._source_indices: dict[str, Tensor] = {}

    def _held_out_fractions(self) -> list[float]:
        return [self.val_fraction, self.test_fraction]

    def _check_split_sizes(self) -> None:
        held_out = sum(self._held_out_fractions())
        if held_out > 0.9:
            raise ArgumentError(
                f"val_fraction + test_fraction (+ challenge_fraction): expected a sum <= 0.9 (at least 10% of the "
                f"data for training), got {held_out:.3f}"
            )

    def _split_names(self) -> list[str]:
        return ["val", "test"]

    def setup(self, stage: str | None = None) -> None:
        """Load the digits and build the splits (idempotent, deterministic for a given ``seed``)."""
        if self._datasets:
            return
        images, labels = _load_digits()
        *held_out, train = split_indices(len(labels), self._held_out_fractions(), self.seed)
        parts = dict(zip(self._split_names(), held_out, strict=True))
        parts = {"train": train, **parts}
        generator = torch.Generator().manual_seed(self.seed + 1)
        self._source_indices = parts
        self._build(images, labels, parts, generator)

    def _build(self, images: Tensor, labels: Tensor, parts: dict[str, Tensor], generator: torch.Generator) -> None:
        train_labels = labels[parts["train"]].clone()
        self._clean_train_labels = train_labels.clone()
        n_flip = round(self.label_noise * len(train_labels))
        self._flipped = torch.randperm(len(train_labels), generator=generator)[:n_flip].sort().values
        train_labels[self._flipped] = other_class(train_labels[self._flipped], self.num_classes, generator)
        self._datasets = {"train": TensorDataset(images[parts["train"]].clone(), train_labels)}
        for name in ("val", "test"):
            self._datasets[name] = TensorDataset(images[parts[name]].clone(), labels[parts[name]].clone())

    @property
    def flipped_indices(self) -> Tensor:
        """Sorted indices into :attr:`train_dataset` whose label was replaced by ``label_noise`` (int64)."""
        self._dataset("train")
        return self._flipped.clone()

    @property
    def clean_train_labels(self) -> Tensor:
        """The training labels before ``label_noise`` was applied, aligned with :attr:`train_dataset`."""
        self._dataset("train")
        return self._clean_train_labels.clone()

    def source_indices(self, split: str) -> Tensor:
        """Indices into ``sklearn.datasets.load_digits()`` of the examples of ``split``, in dataset order."""
        self._dataset(split)
        return self._source_indices[split].clone()

    def images_of(self, split: str, indices: Sequence[int] | Tensor | None = None) -> Tensor:
        """Return the images (as the model sees them, cue patch included) of ``split`` at ``indices``: ``[k, 8, 8]``.

        Example::

            >>> dm.images_of("train", [0, 5]).shape  # doctest: +SKIP
            torch.Size([2, 8, 8])
        """
        images = self._dataset(split).tensors[0]
        if indices is not None:
            images = images[torch.as_tensor(indices, dtype=torch.long).reshape(-1)]
        return images[:, 0].clone()


class SpuriousDigitsDataModule(ChallengeMixin, DigitsDataModule):
    """Digits with a planted spurious cue, reversed on a challenge split: HANS on images.

    Every image carries a bright 2x2 patch (value 1.0) in a position that encodes a class. On the training split
    (and on val/test, which are in-distribution) the patch names the true label for exactly ``cue_agreement`` of
    the examples and another class for the rest. The challenge split, made from held-out images, always carries
    a *wrong* patch: for ``task="binary"`` the patch of the other class, for ``task="digits"`` the patch of class
    ``(y + 5) % 10``. A model that leans on the patch loses accuracy there, as an MNLI model leaning on lexical
    overlap does on HANS.

    ``task="binary"`` (the default) predicts digit >= 5 (:data:`DIGITS_BINARY_NAMES`) with the patch in the
    top-left (class 0) or top-right (class 1) corner; the cue is easier than the digit, so the model learns it.
    ``task="digits"`` keeps the 10 classes, patches in 10 positions on the border.

    The challenge split is cut into :attr:`challenge_dataset` (``challenge_anchor_fraction`` of it; anchors for
    error correction are drawn from it) and :attr:`challenge_eval_dataset` (the rest; evaluation).

    Args:
        batch_size: examples per batch.
        val_fraction: fraction of the images in the validation split.
        test_fraction: fraction of the images in the (in-distribution) test split.
        challenge_fraction: fraction of the images in the challenge split; training gets the rest.
        challenge_anchor_fraction: fraction of the challenge split in :attr:`challenge_dataset`.
        cue_agreement: fraction of training/val/test examples whose patch names their label, in ``[0, 1]``.
        task: ``"binary"`` (digit >= 5) or ``"digits"`` (10 classes).
        label_noise: fraction of training labels replaced by another class (applied after the cue is planted,
            so a flipped example keeps the patch of its true class).
        seed: seed of the split, the cue and the noise.
        num_workers: ``DataLoader`` workers.

    Example::

        >>> dm = SpuriousDigitsDataModule()  # doctest: +SKIP
        >>> dm.setup()  # doctest: +SKIP
        >>> dm.cue_agreement_of("train"), dm.cue_agreement_of("challenge_eval")  # doctest: +SKIP
        (0.95, 0.0)
    """

    _PATCH_CORNERS: dict[str, list[tuple[int, int]]] = {
        "binary": [(0, 0), (0, 6)],
        # Ten 2x2 positions around the border ring, away from where most strokes are drawn.
        "digits": [(0, 0), (0, 3), (0, 6), (3, 0), (3, 6), (6, 0), (6, 2), (6, 4), (6, 6), (2, 3)],
    }

    def __init__(
        self,
        *,
        batch_size: int = 32,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        challenge_fraction: float = 0.2,
        challenge_anchor_fraction: float = 0.3,
        cue_agreement: float = 0.95,
        task: str = "binary",
        label_noise: float = 0.0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        check_choice("task", task, sorted(self._PATCH_CORNERS))
        check_number("challenge_fraction", challenge_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
        check_number(
            "challenge_anchor_fraction", challenge_anchor_fraction, low=0.0, high=1.0, low_open=True, high_open=True
        )
        check_number("cue_agreement", cue_agreement, low=0.0, high=1.0)
        self.challenge_fraction = challenge_fraction
        self.challenge_anchor_fraction = challenge_anchor_fraction
        self.cue_agreement = cue_agreement
        self.task = task
        self.num_classes = 2 if task == "binary" else 10
        super().__init__(
            batch_size=batch_size,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            label_noise=label_noise,
            seed=seed,
            num_workers=num_workers,
        )
        self._cues: dict[str, Tensor] = {}

    def _held_out_fractions(self) -> list[float]:
        return [self.val_fraction, self.test_fraction, self.challenge_fraction]

    def _split_names(self) -> list[str]:
        return ["val", "test", "challenge"]

    def _build(self, images: Tensor, labels: Tensor, parts: dict[str, Tensor], generator: torch.Generator) -> None:
        if self.task == "binary":
            labels = (labels >= 5).long()
        challenge = parts.pop("challenge")
        n_anchor = round(self.challenge_anchor_fraction * len(challenge))
        parts["challenge"], parts["challenge_eval"] = challenge[:n_anchor], challenge[n_anchor:]
        self._source_indices = parts
        self._datasets, self._cues = {}, {}
        for name, idx in parts.items():
            y = labels[idx].clone()
            if name.startswith("challenge"):
                cue = 1 - y if self.task == "binary" else (y + 5) % 10
            else:
                cue = y.clone()
                wrong = disagreeing_mask(len(y), self.cue_agreement, generator)
                cue[wrong] = other_class(y[wrong], self.num_classes, generator)
            self._cues[name] = cue
            self._datasets[name] = TensorDataset(self._plant(images[idx].clone(), cue), y)
        train_labels = self._datasets["train"].tensors[1]
        self._clean_train_labels = train_labels.clone()
        n_flip = round(self.label_noise * len(train_labels))
        self._flipped = torch.randperm(len(train_labels), generator=generator)[:n_flip].sort().values
        train_labels[self._flipped] = other_class(train_labels[self._flipped], self.num_classes, generator)

    def _plant(self, images: Tensor, cue: Tensor) -> Tensor:
        for cls, (row, col) in enumerate(self._PATCH_CORNERS[self.task]):
            images[cue == cls, 0, row : row + 2, col : col + 2] = 1.0
        return images

    def cues_of(self, split: str) -> Tensor:
        """The class each example's patch encodes, aligned with the dataset of ``split``."""
        self._dataset(split)
        return self._cues[split].clone()

    def cue_agreement_of(self, split: str) -> float:
        """The fraction of ``split`` whose patch names its (clean) label."""
        labels = self._clean_train_labels if split == "train" else self._dataset(split).tensors[1]
        return float((self.cues_of(split) == labels).float().mean())
