"""Data augmentation from an unseen pool: CandidatePool over loss-gradient snapshots, exact answers on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_fastif import CandidatePool, ExactInverse
from lightning_fastif.errors import SnapshotNotFoundError
from lightning_fastif.lightning.candidates import embed_pool
from lightning_fastif.lightning.correction import correct_errors
from lightning_fastif.lightning.module import InfluenceModule
from lightning_fastif.lightning.snapshots import FeatureSnapshot
from lightning_fastif.search.knn import KNNIndex
from tests.helpers.module_models import TinyMLP, blobs

K = 4
DAMPING = 0.05


class _LitMLP(TinyMLP, LightningModule):
    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


@pytest.fixture(scope="module")
def pool_snapshot(tmp_path_factory):
    """A float64 TinyMLP fitted with a loss-gradient FeatureSnapshot that also embeds an unseen pool of 30."""
    root = tmp_path_factory.mktemp("pool_snapshot")
    train, rest = blobs(n_train=60, n_test=37)
    x, y = rest.tensors
    pool, test = TensorDataset(x[:30], y[:30]), TensorDataset(x[30:], y[30:])
    model = _LitMLP()
    snap = FeatureSnapshot(dirpath=root / "snap", features="loss_gradient", datasets={"pool": pool})
    trainer = Trainer(
        default_root_dir=root,
        max_epochs=5,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[snap],
    )
    trainer.fit(model, DataLoader(train, batch_size=10))
    return model.eval(), train, pool, test, root / "snap"


def _exact_pool_scores(model, train, pool, test):
    """Influence over the classifier's parameters of every pool example on each test point (num_candidates=None)."""
    every = InfluenceModule(
        model,
        train_dataset=train,
        ihvp=ExactInverse(DAMPING),
        params="classifier.*",
        num_candidates=None,
        candidates_pool=CandidatePool(pool),
    )
    out = every.score_batch(test.tensors)
    assert torch.equal(out.candidates, torch.arange(len(pool)).expand(len(test), len(pool)))
    return out.scores


def test_pool_from_a_loss_gradient_snapshot_is_searched_like_the_training_set(pool_snapshot):
    model, train, pool_data, test, snap = pool_snapshot
    pool = CandidatePool.from_snapshot(pool_data, snap, name="pool")
    assert pool.snapshot == str(snap.absolute())
    assert pool.version is not None
    module = InfluenceModule(
        model,
        train_dataset=train,
        snapshot=snap,
        ihvp=ExactInverse(DAMPING),
        params="classifier.*",
        num_candidates=K,
        candidates_pool=pool,
    )
    # queries as the pool's features were made: preconditioned loss gradients of the classifier, both signs
    assert (module.feature_kind, module.search.feature_layer, module.search.knn_sign) == (
        "loss_gradient",
        "classifier",
        "both",
    )
    assert module.knn_preconditioned
    assert module.settings()["candidates_from"] == "pool:pool"
    assert module.settings()["num_pool"] == 30
    out = module.score_batch(test.tensors)
    assert out.diagnostics["candidates_from"] == "pool:pool"
    # Over the classifier's parameters alone, <(H_last + λI)⁻¹ g_test, g_pool> IS the influence score: the K
    # nearest of q are the K most helpful pool examples, those of -q the K most harmful, exactly.
    exact = _exact_pool_scores(model, train, pool_data, test)
    expected = torch.cat([exact.topk(K, 1).indices, (-exact).topk(K, 1).indices], 1)
    assert torch.equal(out.candidates, expected)
    assert int(out.candidates.max()) < len(pool_data)  # pool indices, not training indices
    torch.testing.assert_close(out.scores, exact.gather(1, expected), rtol=1e-9, atol=1e-12)


def test_a_pool_passed_per_call_uses_its_own_snapshot_entry(pool_snapshot):
    """correct_errors passes the pool to score_batch of a module built over the training set's snapshot."""
    model, train, pool_data, test, snap = pool_snapshot
    pool = CandidatePool.from_snapshot(pool_data, snap, name="pool")
    module = InfluenceModule(
        model, train_dataset=train, snapshot=snap, ihvp=ExactInverse(DAMPING), params="classifier.*", num_candidates=K
    )
    exact = _exact_pool_scores(model, train, pool_data, test)
    out = module.score_batch(test.tensors, candidates_pool=pool)
    expected = torch.cat([exact.topk(K, 1).indices, (-exact).topk(K, 1).indices], 1)
    assert torch.equal(out.candidates, expected)
    assert out.diagnostics["candidates_from"] == "pool:pool"
    # the combined anchor batch (correct_errors' query) ranks the pool by the influence on the mean test loss
    combined = module.score_batch(test.tensors, combine=True, candidates_pool=pool)
    mean = exact.mean(0, keepdim=True)
    assert torch.equal(combined.candidates, torch.cat([mean.topk(K, 1).indices, (-mean).topk(K, 1).indices], 1))


def test_correct_errors_trains_on_the_most_helpful_pool_examples(pool_snapshot):
    model, train, pool_data, test, snap = pool_snapshot
    pool = CandidatePool.from_snapshot(pool_data, snap, name="pool")
    m = TinyMLP()
    m.load_state_dict(model.state_dict())
    module = InfluenceModule(
        m, train_dataset=train, snapshot=snap, ihvp=ExactInverse(DAMPING), params="classifier.*", num_candidates=K
    )
    report = correct_errors(
        m, module, test, pool=pool, num_steps=1, top_m=3, num_anchors=7, lr=0.01, keep="always", seed=0
    )
    exact = _exact_pool_scores(model, train, pool_data, test).mean(0)
    assert report.steps[0].chosen_indices == exact.topk(3).indices.tolist()
    torch.testing.assert_close(
        torch.tensor(report.steps[0].chosen_scores, dtype=torch.float64), exact.topk(3).values, rtol=1e-9, atol=1e-12
    )


def test_a_pool_embedded_under_the_current_weights_matches_the_snapshot(pool_snapshot):
    """ErrorCorrection(pool=...) and the app embed a pool no snapshot holds as the snapshot's features were made."""
    model, train, pool_data, test, snap = pool_snapshot
    module = InfluenceModule(model, train_dataset=train, snapshot=snap, ihvp=ExactInverse(DAMPING), num_candidates=K)
    pool = embed_pool(module, pool_data)
    stored = KNNIndex.from_snapshot(snap, dataset="pool")
    assert (pool.index.metric, pool.index.dim) == ("ip", stored.dim)
    torch.testing.assert_close(pool.index.features[:], stored.features[:], rtol=1e-5, atol=1e-6)
    expected = module.score_batch(test.tensors, candidates_pool=CandidatePool.from_snapshot(pool_data, snap))
    assert torch.equal(module.score_batch(test.tensors, candidates_pool=pool).candidates, expected.candidates)


def test_error_correction_pool_mode_under_a_loss_gradient_snapshot(tmp_path):
    """ErrorCorrection(pool=...) during fit: its pool is embedded as loss gradients and searched like the index."""
    from lightning_fastif import ErrorCorrection

    train, rest = blobs(n_train=60, n_test=37)
    x, y = rest.tensors
    pool, anchors = TensorDataset(x[:30], y[:30]), TensorDataset(x[30:], y[30:])
    correction = ErrorCorrection(
        anchors=anchors,
        pool=pool,
        keep="always",
        num_candidates=10,
        ihvp=ExactInverse(DAMPING),
        params="classifier.*",
        steps={"num_steps": 2, "top_m": 3, "num_anchors": 7, "lr": 0.01},
    )
    snap = FeatureSnapshot(dirpath=tmp_path / "snap", features="loss_gradient")
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[snap, correction],
    )
    trainer.fit(_LitMLP(), DataLoader(train, batch_size=10))
    (record,) = correction.history
    assert [len(step["chosen_indices"]) for step in record["steps"]] == [3, 3]
    assert all(0 <= i < len(pool) for step in record["steps"] for i in step["chosen_indices"])  # pool indices
    # the most helpful pool examples come first: the chosen scores are sorted and the first is helpful
    scores = record["steps"][0]["chosen_scores"]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] > 0


def test_a_pool_the_snapshot_did_not_embed_is_refused_naming_the_argument(pool_snapshot):
    model, train, pool_data, test, snap = pool_snapshot
    with pytest.raises(
        SnapshotNotFoundError, match=r"name: expected a dataset .* one of \['pool', 'train'\], got 'extra'"
    ):
        CandidatePool.from_snapshot(pool_data, snap, name="extra")
    with pytest.raises(ValueError, match="candidates_pool: the snapshot's features of 'pool' hold 30 examples"):
        CandidatePool.from_snapshot(TensorDataset(*[t[:10] for t in pool_data.tensors]), snap, name="pool")


# -- the app's preset ----------------------------------------------------------------------------------------------
def _compose(overrides):
    from hydra import compose, initialize_config_module

    from lightning_fastif.app.config import CONFIG_MODULE, CONFIG_NAME

    with initialize_config_module(version_base=None, config_module=CONFIG_MODULE):
        return compose(config_name=CONFIG_NAME, overrides=list(overrides))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_augmentation_preset_compares_influence_chosen_and_random_pool_examples(tmp_path):
    from lightning_fastif.app.main import run

    cfg = _compose(
        [
            "experiment=augmentation",
            "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false",
            "influence.num_candidates=40",
            "augmentation.seeds=[0]",
            "augmentation.steps.num_steps=2",
            "report.max_test_points=2",
            "report.num_explained=1",
            "report.verify=false",
            f"output_dir={tmp_path}",
        ]
    )
    assert cfg.correction is None  # the comparison starts from the trained weights
    summary = run(cfg)
    aug = summary["augmentation"]
    assert (aug["pool_split"], aug["pool_size"], aug["anchors"], aug["eval"]) == (
        "val",
        270,
        "challenge",
        "challenge_eval",
    )
    assert set(aug["selections"]) == {"helpful", "random"}
    for row in aug["selections"].values():
        (used,), (stopped,) = row["used_indices"], row["stopped"]
        # 2 steps of 10 pool examples, or 1 when the certified LiSSA refused the weights after the first step
        assert len(used) == (10 if stopped else 20)
        assert 0 <= min(used) <= max(used) < 270
    assert aug["selections"]["random"]["stopped"] == [None]  # random points need no influence
    helpful, random = aug["selections"]["helpful"], aug["selections"]["random"]
    assert helpful["before"] == random["before"]  # both from the same trained weights
    assert aug["margin"] == pytest.approx(helpful["gain_mean"] - random["gain_mean"])
    assert json.loads((tmp_path / "augmentation.json").read_text())["pool_size"] == 270
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Data augmentation from an unseen pool" in report
    assert f"Influence-chosen - random: {100 * aug['margin']:+.1f} points" in report


def test_a_split_the_datamodule_lacks_is_refused_naming_the_key():
    from lightning_fastif.app.augmentation import _split
    from lightning_fastif.app.data import SpuriousDigitsDataModule
    from lightning_fastif.errors import ArgumentError

    dm = SpuriousDigitsDataModule(seed=0)
    dm.setup("fit")
    assert len(_split(dm, "val", "augmentation.pool")) == 270
    with pytest.raises(ArgumentError, match=r"augmentation\.pool: expected a split .* got 'nope'"):
        _split(dm, "nope", "augmentation.pool")
