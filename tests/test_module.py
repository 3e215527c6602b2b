"""InfluenceModule under trainer.predict: equality with the engine, kNN recall, DDP, resume, checkpoints, errors."""

from __future__ import annotations

import socket
import warnings

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from lightning_fastif import (
    ArgumentError,
    ComputeArguments,
    ExactInverse,
    LiSSA,
    SearchArguments,
    influence_scores,
    inverse_hvp_of_test,
    score_candidates,
)
from lightning_fastif.app.models import LogisticRegression
from lightning_fastif.core.batches import IndexedData
from lightning_fastif.core.grads import FunctionalLoss
from lightning_fastif.errors import SnapshotNotFoundError
from lightning_fastif.io.atomic import load_tensors, save_tensors
from lightning_fastif.io.results import InfluenceResult
from lightning_fastif.io.snapshot_store import load_checkpoint
from lightning_fastif.lightning.module import CandidatePool, InfluenceModule
from lightning_fastif.lightning.snapshots import LAST_LAYER_HESSIAN, CheckpointSnapshot, FeatureSnapshot
from lightning_fastif.search.knn import KNNIndex
from lightning_fastif.search.preconditioner import KNN_DAMPING_FLOOR
from tests.helpers.module_models import (
    CrashAfter,
    DictTexts,
    NotIndexable,
    TinyMLP,
    TinyText,
    blobs,
    crash_after,
    fit,
    train_features,
    write_feature_snapshot,
)


def _trainer(tmp_path, **kwargs):
    options = {
        "default_root_dir": tmp_path,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    }
    options.update(kwargs)
    return Trainer(**options)


@pytest.fixture(scope="module")
def trained():
    """A float64 MLP fitted on blobs (60 train, 7 test points), with its training features."""
    train, test = blobs(n_train=60, n_test=7)
    model = fit(TinyMLP(), train)
    return model, train, test, train_features(model, train)


@pytest.fixture
def snapshot(tmp_path, trained):
    _, _, _, feats = trained
    return write_feature_snapshot(tmp_path / "snap", feats)


def _lissa() -> LiSSA:
    return LiSSA(damping=0.05, scale=10.0, recursion_depth=30, num_repeats=2, batch_size=4, seed=3)


def test_full_mode_equals_influence_scores(tmp_path, trained):
    model, train, test, _ = trained
    module = InfluenceModule(
        model,
        train_dataset=train,
        ihvp=ExactInverse(0.01),
        num_candidates=None,
        compute=ComputeArguments(batch_size=16),
    )
    predictions = _trainer(tmp_path, enable_progress_bar=True).predict(module, DataLoader(test, batch_size=3))
    result = module.result
    expected = influence_scores(model, None, test.tensors, train, ihvp=ExactInverse(0.01))
    assert torch.equal(result.test_indices, torch.arange(7))
    assert torch.equal(result.candidate_indices, torch.arange(60).expand(7, 60))
    torch.testing.assert_close(result.scores, expected, rtol=1e-9, atol=1e-12)
    assert [p.test_indices.tolist() for p in predictions] == [[0, 1, 2], [3, 4, 5], [6]]
    best = result.top_helpful(4, 3)
    assert torch.equal(best.indices, expected[4].topk(3).indices)
    assert torch.equal(result.top_harmful(4, 2).indices, (-expected[4]).topk(2).indices)


def test_knn_mode_equals_influence_scores_over_knn_ids(tmp_path, trained, snapshot):
    model, train, test, feats = trained
    module = InfluenceModule(model, train_dataset=train, snapshot=snapshot, ihvp=ExactInverse(0.01), num_candidates=9)
    _trainer(tmp_path).predict(module, DataLoader(test, batch_size=4))
    result = module.result
    queries = train_features(model, test)
    exact_ids = torch.cdist(queries, feats).topk(9, largest=False).indices
    assert torch.equal(result.candidate_indices, exact_ids)
    expected = influence_scores(model, None, test.tensors, train, ihvp=ExactInverse(0.01), candidates=exact_ids)
    torch.testing.assert_close(result.scores, expected, rtol=1e-9, atol=1e-12)
    # knn_query="mean": the test points of a batch share the neighbours of their mean feature
    shared = InfluenceModule(
        model,
        train_dataset=train,
        snapshot=snapshot,
        ihvp=ExactInverse(0.01),
        num_candidates=9,
        search=SearchArguments(knn_query="mean"),
    )
    _trainer(tmp_path).predict(shared, DataLoader(test, batch_size=4))
    mean_ids = torch.cdist(queries[:4].mean(0, keepdim=True), feats).topk(9, largest=False).indices
    assert torch.equal(shared.result.candidate_indices[:4], mean_ids.expand(4, 9))


def test_score_batch_combined_anchor_batch(trained, snapshot):
    """combine=True: gradient of the batch's mean loss, kNN around its mean feature; linear in g, so the mean row."""
    model, train, test, feats = trained
    module = InfluenceModule(model, train_dataset=train, snapshot=snapshot, ihvp=ExactInverse(0.01), num_candidates=8)
    batch = test[:5]
    out = module.score_batch(batch, combine=True)
    ids = torch.cdist(train_features(model, test)[:5].mean(0, keepdim=True), feats).topk(8, largest=False).indices
    assert out.candidates.shape == out.scores.shape == (1, 8)
    assert torch.equal(out.candidates, ids)
    rows = influence_scores(model, None, batch, train, ihvp=ExactInverse(0.01), candidates=ids.expand(5, 8))
    torch.testing.assert_close(out.scores[0], rows.mean(0), rtol=1e-9, atol=1e-12)
    assert out.top_helpful(0, 3).indices.tolist() == ids[0][rows.mean(0).topk(3).indices].tolist()
    assert set(out.diagnostics["seconds"]) == {"features", "knn", "test_gradients", "s_test", "scoring"}
    everything = module.score_batch(batch, num_candidates="all")
    assert everything.scores.shape == (5, 60)


def test_candidates_from_a_pool(tmp_path, trained):
    """FastIF's data augmentation: candidates from unseen examples, Hessian still over the training set."""
    model, train, test, feats = trained
    pool_data, _ = blobs(n_train=25, n_test=0, seed=5)
    write_feature_snapshot(tmp_path / "snap", {"train": feats, "pool": train_features(model, pool_data)})
    pool = CandidatePool.from_snapshot(pool_data, tmp_path / "snap", "pool")
    module = InfluenceModule(
        model, train_dataset=train, ihvp=ExactInverse(0.01), num_candidates=6, candidates_pool=pool
    )
    _trainer(tmp_path).predict(module, DataLoader(test, batch_size=7))
    ids = torch.cdist(train_features(model, test), train_features(model, pool_data)).topk(6, largest=False).indices
    assert torch.equal(module.result.candidate_indices, ids)
    s_test = inverse_hvp_of_test(model, None, test.tensors, train, ihvp=ExactInverse(0.01))
    expected = score_candidates(FunctionalLoss(model), IndexedData(pool_data), s_test, ids)
    torch.testing.assert_close(module.result.scores, expected, rtol=1e-9, atol=1e-12)
    assert module.result.manifest["settings"]["candidates_from"] == "pool:pool"


def test_knn_recall_of_full_influence_top10(tmp_path):
    """Top-10 helpful training points of full influence (exact inverse, classifier layer) found among k = 10% kNN
    candidates (60 of 600 digits), averaged over 40 test points: measured 0.91 (random candidates: 0.10).
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0), torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train = TensorDataset(x[perm[:600]], y[perm[:600]])
    test = TensorDataset(x[perm[600:640]], y[perm[600:640]])
    model = fit(TinyMLP(dim=64, hidden=16, classes=10), train, steps=300, lr=0.02, l2=1e-2)
    common = {"train_dataset": train, "ihvp": ExactInverse(0.01), "params": "classifier.*"}
    full = InfluenceModule(model, num_candidates=None, **common).score_batch(test.tensors)
    snapshot = write_feature_snapshot(tmp_path / "snap", train_features(model, train))
    knn = InfluenceModule(model, snapshot=snapshot, num_candidates=60, **common).score_batch(test.tensors)
    recall = [
        len(set(full.top_helpful(t, 10).indices.tolist()) & set(knn.candidates[t].tolist())) / 10 for t in range(40)
    ]
    assert sum(recall) / len(recall) >= 0.85
    # the same pairs score the same in both modes
    same = full.scores.gather(1, knn.candidates)
    torch.testing.assert_close(knn.scores, same, rtol=1e-8, atol=1e-12)


def test_resume_skips_finished_shards_and_ends_identical(tmp_path, trained, snapshot):
    model, train, test, _ = trained
    loader = DataLoader(test, batch_size=2)  # 4 batches: 2, 2, 2, 1

    def make(output_dir):
        return InfluenceModule(
            model, train_dataset=train, snapshot=snapshot, ihvp=_lissa(), num_candidates=7, output_dir=output_dir
        )

    reference = make(tmp_path / "one-go")
    _trainer(tmp_path).predict(reference, loader)

    crashing = crash_after(make(tmp_path / "resumed"), batches=2)
    with pytest.raises(CrashAfter):
        _trainer(tmp_path).predict(crashing, loader)
    assert len(list((tmp_path / "resumed" / "shards").glob("shard-*.safetensors"))) == 2
    with pytest.raises(Exception, match="did not complete"):
        InfluenceResult.load(tmp_path / "resumed")

    resumed = make(tmp_path / "resumed")
    _trainer(tmp_path).predict(resumed, loader)
    assert (resumed.skipped_batches, resumed.computed_batches) == (2, 2)
    loaded = InfluenceResult.load(tmp_path / "resumed")
    assert loaded.equals(reference.result)
    assert loaded.equals(resumed.result)
    assert loaded.equals(InfluenceResult.load(tmp_path / "one-go"))
    # other settings must not reuse these shards
    other = InfluenceModule(model, train_dataset=train, snapshot=snapshot, ihvp=_lissa(), num_candidates=5,
                            output_dir=tmp_path / "resumed")  # fmt: skip
    with pytest.raises(ValueError, match=r"output_dir: .*depend on other inputs .*settings\.num_candidates"):
        _trainer(tmp_path).predict(other, loader)


def test_dict_batches_tiny_transformer_with_classifier_params(tmp_path):
    train, test = DictTexts(40, seed=0), DictTexts(5, seed=1)
    model = TinyText().eval()
    write_feature_snapshot(tmp_path / "snap", train_features(model, train))
    module = InfluenceModule(
        model,
        train_dataset=train,
        snapshot=tmp_path / "snap",
        ihvp=ExactInverse(0.01),
        params="classifier.*",
        num_candidates=6,
    )
    _trainer(tmp_path).predict(module, DataLoader(test, batch_size=3))
    batch = next(iter(DataLoader(test, batch_size=5)))
    ids = torch.cdist(model.features(batch).detach().float(), train_features(model, train)).topk(6, largest=False)
    assert torch.equal(module.result.candidate_indices, ids.indices)
    expected = influence_scores(
        model, None, batch, train, ihvp=ExactInverse(0.01), params="classifier.*", candidates=ids.indices
    )
    torch.testing.assert_close(module.result.scores, expected, rtol=1e-9, atol=1e-12)


def test_tracin_sum_over_two_checkpoint_snapshots(tmp_path):
    """A LightningModule fitted with the snapshot callbacks; checkpoints='all' sums the two single-version runs."""
    train32, test32 = (TensorDataset(d.tensors[0].float(), d.tensors[1]) for d in blobs(n_train=48, n_test=5))
    model = LogisticRegression(in_features=4, num_classes=3, lr=0.1)
    callbacks = [CheckpointSnapshot(every_n_epochs=1, on_fit_end=False), FeatureSnapshot(every_n_epochs=1)]
    _trainer(tmp_path, max_epochs=2, callbacks=callbacks).fit(model, DataLoader(train32, batch_size=16))
    snapshot = tmp_path / "fastif_snapshot"
    versions = [entry["version"] for _, entry in load_checkpoint(snapshot, "all")]
    assert len(versions) == 2
    live = {k: v.clone() for k, v in model.state_dict().items()}

    def run(which):
        module = InfluenceModule(
            model,
            train_dataset=train32,
            snapshot=snapshot,
            ihvp=ExactInverse(0.1),
            num_candidates=10,
            checkpoints=which,
        )
        _trainer(tmp_path).predict(module, DataLoader(test32, batch_size=5))
        return module.result

    both, first, second = run("all"), run([versions[0]]), run(versions[1])
    assert torch.equal(both.candidate_indices, first.candidate_indices)
    torch.testing.assert_close(both.scores, first.scores + second.scores, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(first.scores, second.scores)
    assert [d["checkpoint"] for d in both.manifest["ihvp"][0]["diagnostics"]] == versions
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in live.items())  # live weights restored


class _MemoryLogger(Logger):
    def __init__(self):
        super().__init__()
        self.metrics = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))


def test_timings_and_diagnostics_logged_and_in_manifest(tmp_path, trained, snapshot):
    model, train, test, _ = trained
    logger = _MemoryLogger()
    module = InfluenceModule(
        model, train_dataset=train, snapshot=snapshot, ihvp=_lissa(), num_candidates=5, output_dir=tmp_path / "out"
    )
    _trainer(tmp_path, logger=logger).predict(module, DataLoader(test, batch_size=4))
    assert len(logger.metrics) == 2
    keys = [f"{stage}/seconds" for stage in ("features", "knn", "test_gradients", "s_test", "scoring")]
    keys += ["ihvp/residual", "ihvp/scale", "ihvp/iterations", "s_test/peak_bytes", "scoring/peak_bytes"]
    for key in keys:
        assert all(isinstance(m.get(f"fastif/{key}"), float) for m in logger.metrics), key
    assert [m["fastif/ihvp/iterations"] for m in logger.metrics] == [30.0, 30.0]  # recursion_depth, both repeats
    assert not any(key.startswith("fastif/time_") or "_peak_bytes_" in key for m in logger.metrics for key in m)
    manifest = InfluenceResult.load(tmp_path / "out").manifest
    assert set(manifest["timings"]["total_seconds"]) == {"features", "knn", "test_gradients", "s_test", "scoring"}
    memory = manifest["timings"]["per_batch"][0]["memory"]  # peak memory per stage travels with the result
    assert set(memory) == {"features", "knn", "test_gradients", "s_test", "scoring"}
    assert all(record["cpu_peak_bytes"] > 0 for record in memory.values())
    [first, second] = manifest["ihvp"]
    assert first["first_test_index"] == 0
    assert second["first_test_index"] == 4
    assert first["diagnostics"][0]["iterations"] == [30, 30]
    assert first["diagnostics"][0]["residual"] >= 0
    assert manifest["settings"]["ihvp"]["recursion_depth"] == 30
    assert manifest["num_test"] == 7


def test_bad_inputs(tmp_path, trained, snapshot):
    model, train, test, feats = trained
    ok = {"train_dataset": train, "snapshot": snapshot, "ihvp": ExactInverse(0.01), "num_candidates": 5}
    with pytest.raises(TypeError, match="train_dataset: expected a map-style Dataset"):
        InfluenceModule(model, **{**ok, "train_dataset": NotIndexable()})
    with pytest.raises(SnapshotNotFoundError, match="snapshot: directory .*missing-dir.* does not exist"):
        InfluenceModule(model, **{**ok, "snapshot": tmp_path / "missing-dir"})
    small = TensorDataset(*(t[:50] for t in train.tensors))
    with pytest.raises(ValueError, match="built for a training set of 60 examples, but train_dataset has 50"):
        InfluenceModule(model, **{**ok, "train_dataset": small})
    too_many = r"num_candidates: expected None \(all of the training set\) or an integer in 1..60 .*, got 61"
    with pytest.raises(ArgumentError, match=too_many):
        InfluenceModule(model, **{**ok, "num_candidates": 61})
    with pytest.raises(ArgumentError, match="num_candidates: expected None .* or an integer in 1..60 .*, got 0"):
        InfluenceModule(model, **{**ok, "num_candidates": 0})
    with pytest.raises(ArgumentError, match="snapshot: expected the dirpath of a FeatureSnapshot.*, got None"):
        InfluenceModule(model, train_dataset=train, num_candidates=5)
    with pytest.raises(ArgumentError, match=r"parallel: expected one of \['test', 'repeats'\], got 'ranks'"):
        InfluenceModule(model, **ok, compute={"parallel": "ranks"})
    with pytest.raises(ArgumentError, match="knn_query: expected one of"):
        InfluenceModule(model, **ok, search={"knn_query": "median"})
    with pytest.raises(ArgumentError, match="ihvp: expected an InverseHVP estimator"):
        InfluenceModule(model, **{**ok, "ihvp": "lissa"})
    with pytest.raises(ArgumentError, match="top_k: expected an integer >= 1, got 0"):
        InfluenceModule(model, **ok, top_k=0)
    with pytest.raises(ArgumentError, match="output_dir: expected a directory path or None, got 3"):
        InfluenceModule(model, **ok, output_dir=3)
    with pytest.raises(ValueError, match="feature_layer: 'nope' is not a submodule|layer: 'nope'"):
        InfluenceModule(model, **ok, search=SearchArguments(feature_layer="nope"))
    with pytest.raises(ArgumentError, match="checkpoints: 'latest' needs the snapshot directory"):
        InfluenceModule(model, train_dataset=train, num_candidates=None, checkpoints="latest")
    with pytest.raises(ArgumentError, match=r"checkpoints: expected None, 'latest', .*, got \[\]"):
        InfluenceModule(model, **ok, checkpoints=[])
    with pytest.raises(SnapshotNotFoundError, match="no checkpoints snapshot"):
        InfluenceModule(model, **ok, checkpoints="latest")
    with pytest.raises(ValueError, match="params: the pattern 'encoder.*' matches no parameter"):
        InfluenceModule(model, **ok, params="encoder.*")
    # a test batch the loss cannot take: inputs without labels
    module = InfluenceModule(model, **ok)
    with pytest.raises(ValueError, match=r"batch: the loss function cannot take this test batch \[Tensor\[4, 4\]\]"):
        _trainer(tmp_path).predict(module, DataLoader(TensorDataset(test.tensors[0]), batch_size=4))
    # one test set per predict call, checked before anything is written
    two = InfluenceModule(model, **ok, output_dir=tmp_path / "two-loaders")
    with pytest.raises(ArgumentError, match="dataloaders: expected one test set per trainer.predict call.*got 2"):
        _trainer(tmp_path).predict(two, [DataLoader(test, batch_size=4), DataLoader(test, batch_size=4)])
    assert not (tmp_path / "two-loaders").exists()


def test_model_in_train_mode_with_dropout_warns_and_switches_to_eval(trained):
    _, train, _, _ = trained
    model = TinyMLP(dropout=0.5).train()
    with pytest.warns(UserWarning, match=r"model: TinyMLP is in train mode with \['Dropout'\].*eval mode"):
        InfluenceModule(model, train_dataset=train, ihvp=ExactInverse(0.01), num_candidates=None)
    assert not model.training


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ddp_env(monkeypatch):
    """A free MASTER_PORT of its own for each DDP test, and one thread per spawned rank.

    Lightning's spawn launcher writes the port it chose into ``os.environ`` and leaves it there, so without this the
    next DDP test of the session reuses a port that another process (another pytest run on the machine) may hold by
    now. Two ranks with one thread each keep a loaded two-core machine from being oversubscribed.
    """
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return monkeypatch


def _predict_ddp(tmp_path, make_module, loader, env, attempts: int = 3):
    """``trainer.predict`` under ``ddp_spawn`` on 2 CPU processes; a port taken between choosing and binding it
    (a race with other processes on the machine) is retried on a fresh port, any other failure is raised."""
    for attempt in range(attempts):
        try:
            trainer = _trainer(tmp_path, strategy="ddp_spawn", accelerator="cpu", devices=2)
            return trainer.predict(make_module(), loader)
        except Exception as err:
            text = str(err).lower()
            if attempt + 1 == attempts or not ("address already in use" in text or "eaddrinuse" in text):
                raise
            env.setenv("MASTER_PORT", str(_free_port()))
    return None


@pytest.mark.ddp
@pytest.mark.timeout(600)
@pytest.mark.parametrize("parallel", ["test", "repeats"])
def test_ddp_equals_single_process(tmp_path, trained, snapshot, parallel, ddp_env):
    """2 CPU processes (gloo): test points split across ranks, or LiSSA repeats and candidates split across ranks."""
    model, train, test, _ = trained
    loader = DataLoader(test, batch_size=3)

    def make(name):
        return InfluenceModule(
            model,
            train_dataset=train,
            snapshot=snapshot,
            ihvp=_lissa(),
            num_candidates=11,
            output_dir=tmp_path / name,
            compute=ComputeArguments(parallel=parallel, batch_size=4),
        )

    _trainer(tmp_path).predict(make("one"), loader)
    _predict_ddp(tmp_path, lambda: make("two"), loader, ddp_env)
    one, two = InfluenceResult.load(tmp_path / "one"), InfluenceResult.load(tmp_path / "two")
    assert two.manifest["world_size"] == 2
    assert two.manifest["parallel"] == parallel
    assert torch.equal(two.test_indices, torch.arange(7))  # each test point once (InfluenceResult checks pairs)
    assert torch.equal(one.candidate_indices, two.candidate_indices)
    torch.testing.assert_close(two.scores, one.scores, rtol=1e-6, atol=1e-6 * float(one.scores.abs().max()))
    if parallel == "repeats":
        diagnostics = two.manifest["ihvp"][0]["diagnostics"][0]
        assert diagnostics["repeats"] == [0]
        assert diagnostics["world_size"] == 2


def test_knn_index_is_not_pickled(trained, snapshot):
    import pickle

    model, train, _, _ = trained
    module = InfluenceModule(model, train_dataset=train, snapshot=snapshot, ihvp=ExactInverse(0.01), num_candidates=3)
    assert isinstance(module.knn_index, KNNIndex)
    clone = pickle.loads(pickle.dumps(module))
    assert clone.queries._index is None
    assert clone.knn_index.ntotal == 60


class _LitMLP(TinyMLP, LightningModule):
    """TinyMLP trained by a Trainer, so a real FeatureSnapshot writes its loss-gradient features."""

    def training_step(self, batch, batch_idx):
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


CLASSIFIER_PARAMS = 3 * (6 + 1)  # TinyMLP's classifier: Linear(6, 3)


def test_loss_gradient_snapshot_round_trip_finds_both_signs(tmp_path):
    train, test = blobs(n_train=60, n_test=7)
    model = _LitMLP()
    # No room for the last layer's Hessian: the queries are the raw test gradients.
    snap = FeatureSnapshot(
        dirpath=tmp_path / "snap",
        features="loss_gradient",
        max_hessian_params=CLASSIFIER_PARAMS - 1,
        query_curvature="hessian",
    )
    _trainer(tmp_path, max_epochs=5, callbacks=[snap]).fit(model, DataLoader(train, batch_size=10))
    model.eval()
    module = InfluenceModule(model, train_dataset=train, snapshot=tmp_path / "snap", ihvp=ExactInverse(0.01),
                             num_candidates=5)  # fmt: skip
    assert (module.feature_kind, module.search.feature_layer, module.search.knn_sign) == (
        "loss_gradient",
        "classifier",
        "both",
    )
    assert not module.knn_preconditioned
    assert module.settings()["knn_preconditioner"] is None
    # the queries are the test points' loss gradients of the classifier's parameters, exactly (autograd)
    g_train = FunctionalLoss(model, None, "classifier.*").per_example_gradients(train.tensors).float()
    g_test = FunctionalLoss(model, None, "classifier.*").per_example_gradients(test.tensors).float()
    sims = g_test @ g_train.T
    expected_ids = torch.cat([sims.topk(5, 1).indices, (-sims).topk(5, 1).indices], 1)
    _trainer(tmp_path).predict(module, DataLoader(test, batch_size=4))
    assert torch.equal(module.result.candidate_indices, expected_ids)
    expected = influence_scores(model, None, test.tensors, train, ihvp=ExactInverse(0.01), candidates=expected_ids)
    torch.testing.assert_close(module.result.scores, expected, rtol=1e-9, atol=1e-12)
    assert module.settings()["feature_kind"] == "loss_gradient"
    # one direction only
    helpful = InfluenceModule(
        model,
        train_dataset=train,
        snapshot=tmp_path / "snap",
        num_candidates=5,
        search={"knn_sign": "helpful"},
        ihvp=ExactInverse(0.01),
    ).score_batch(test.tensors)
    assert torch.equal(helpful.candidates, expected_ids[:, :5])
    # the true most helpful and most harmful points (all parameters, exact inverse) are mostly among the 5 + 5
    full = influence_scores(model, None, test.tensors, train, ihvp=ExactInverse(0.01))
    hits = [int(full[t].argmax()) in expected_ids[t, :5] for t in range(7)]
    hits += [int(full[t].argmin()) in expected_ids[t, 5:] for t in range(7)]
    assert sum(hits) >= 10  # measured 11 of 14 (random candidates: about 1)
    with pytest.raises(ArgumentError, match="feature_layer: expected None .*loss gradients.*, got 'hidden'"):
        InfluenceModule(
            model, train_dataset=train, snapshot=tmp_path / "snap", num_candidates=5, search={"feature_layer": "hidden"}
        )


def test_knn_sign_needs_a_loss_gradient_snapshot(trained, snapshot):
    model, train, _, _ = trained
    common = {"train_dataset": train, "snapshot": snapshot, "num_candidates": 5}
    with pytest.raises(ArgumentError, match="knn_sign: expected None for activation features .*, got 'helpful'"):
        InfluenceModule(model, **common, search=SearchArguments(knn_sign="helpful"))
    with pytest.raises(ArgumentError, match=r"knn_sign: expected one of \['both', 'helpful', 'harmful'\], got 'up'"):
        InfluenceModule(model, **common, search={"knn_sign": "up"})


def _explicit_classifier_hessian(model, data):
    """The Hessian of the mean cross-entropy over TinyMLP's classifier (weight, bias), by double backward."""
    x, y = data.tensors
    with torch.no_grad():
        h = model.embed(x)
    w, b = model.classifier.weight.detach(), model.classifier.bias.detach()

    def mean_loss(flat):
        weight, bias = flat[: w.numel()].view_as(w), flat[w.numel() :]
        return torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, weight, bias), y)

    return torch.autograd.functional.hessian(mean_loss, torch.cat([w.reshape(-1), b]))


@pytest.fixture(scope="module")
def gradient_snapshot(tmp_path_factory):
    """A float64 TinyMLP fitted by a Trainer with a loss-gradient FeatureSnapshot (and its last-layer Hessian)."""
    root = tmp_path_factory.mktemp("gradient_snapshot")
    train, test = blobs(n_train=60, n_test=7)
    model = _LitMLP()
    snap = FeatureSnapshot(dirpath=root / "snap", features="loss_gradient", query_curvature="hessian")
    _trainer(root, max_epochs=5, callbacks=[snap]).fit(model, DataLoader(train, batch_size=10))
    return model.eval(), train, test, root / "snap"


def test_loss_gradient_query_is_preconditioned_by_the_last_layer_hessian(tmp_path, gradient_snapshot):
    model, train, test, snap = gradient_snapshot
    h = _explicit_classifier_hessian(model, train)
    eye = torch.eye(CLASSIFIER_PARAMS, dtype=torch.float64)
    module = InfluenceModule(model, train_dataset=train, snapshot=snap, ihvp=ExactInverse(0.05), num_candidates=5)
    assert module.knn_preconditioned
    assert module.settings()["knn_preconditioner"] == {"hessian_params": CLASSIFIER_PARAMS, "damping": 0.05}
    function = FunctionalLoss(model, None, "classifier.*")
    g_test, g_train = function.per_example_gradients(test.tensors), function.per_example_gradients(train.tensors)
    # q = (H_last + λI)⁻¹ g_test with λ = the estimator's damping, H_last from an explicit double backward
    expected_q = torch.linalg.solve(h + 0.05 * eye, g_test.T).T
    torch.testing.assert_close(module.precondition_query(g_test), expected_q.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.precondition_query(g_test[0]), expected_q[0].float(), rtol=1e-5, atol=1e-6)
    # the candidates are the signed inner-product neighbours of those queries, through trainer.predict
    sims = expected_q @ g_train.T
    expected_ids = torch.cat([sims.topk(5, 1).indices, (-sims).topk(5, 1).indices], 1)
    _trainer(tmp_path).predict(module, DataLoader(test, batch_size=4))
    assert torch.equal(module.result.candidate_indices, expected_ids)
    expected = influence_scores(model, None, test.tensors, train, ihvp=ExactInverse(0.05), candidates=expected_ids)
    torch.testing.assert_close(module.result.scores, expected, rtol=1e-9, atol=1e-12)
    # knn_damping overrides the estimator's λ; the factorisation is cached per module and not pickled
    other = InfluenceModule(model, train_dataset=train, snapshot=snap, ihvp=ExactInverse(0.05), num_candidates=5,
                            search=SearchArguments(knn_damping=0.5))  # fmt: skip
    torch.testing.assert_close(
        other.precondition_query(g_test), torch.linalg.solve(h + 0.5 * eye, g_test.T).T.float(), rtol=1e-5, atol=1e-6
    )
    assert other.queries.preconditioner.factorisation.damping == 0.5
    import pickle

    assert pickle.loads(pickle.dumps(other)).queries.preconditioner.factorisation is None


def test_zero_knn_damping_on_a_singular_hessian_uses_the_floor(gradient_snapshot):
    model, train, test, snap = gradient_snapshot
    h = _explicit_classifier_hessian(model, train)
    # cross-entropy: adding one vector to every class's row of (W, b) leaves the loss unchanged, so H is singular
    assert int(torch.linalg.matrix_rank(h)) <= CLASSIFIER_PARAMS - (6 + 1)
    module = InfluenceModule(model, train_dataset=train, snapshot=snap, ihvp=ExactInverse(0.0), num_candidates=5)
    g_test = FunctionalLoss(model, None, "classifier.*").per_example_gradients(test.tensors)
    floor = KNN_DAMPING_FLOOR * float(h.diagonal().abs().mean())
    expected = torch.linalg.solve(h + floor * torch.eye(CLASSIFIER_PARAMS, dtype=torch.float64), g_test.T).T
    q = module.precondition_query(g_test)
    assert bool(torch.isfinite(q).all())
    torch.testing.assert_close(q, expected.float(), rtol=1e-4, atol=1e-6)
    # The full Hessian (not only the query preconditioner) is singular too: an undamped exact solve is refused,
    # naming damping and a value that works, where it used to return LU's arbitrary answer.
    with pytest.raises(ArgumentError, match=r"damping.*would work"):
        module.score_batch(test.tensors)


def test_indefinite_stored_hessian_is_solved_by_lu(tmp_path, gradient_snapshot):
    import shutil

    model, train, test, snap = gradient_snapshot
    copy = tmp_path / "snap"
    shutil.copytree(snap, copy)
    [path] = copy.rglob(f"{LAST_LAYER_HESSIAN}.safetensors")
    h = load_tensors(path)[LAST_LAYER_HESSIAN]
    indefinite = h - 0.3 * torch.eye(CLASSIFIER_PARAMS, dtype=h.dtype)  # eigenvalues below -0.1 remain
    save_tensors(path, {LAST_LAYER_HESSIAN: indefinite})
    module = InfluenceModule(model, train_dataset=train, snapshot=copy, num_candidates=5, search={"knn_damping": 0.1})
    g_test = FunctionalLoss(model, None, "classifier.*").per_example_gradients(test.tensors)
    expected = torch.linalg.solve(indefinite + 0.1 * torch.eye(CLASSIFIER_PARAMS, dtype=h.dtype), g_test.T).T
    torch.testing.assert_close(module.precondition_query(g_test), expected.float(), rtol=1e-5, atol=1e-6)
    assert module.queries.preconditioner.factorisation.kind == "lu"


def test_knn_damping_and_query_validation(gradient_snapshot):
    model, train, test, snap = gradient_snapshot
    for bad in (-1.0, float("nan"), "0.1", True):
        with pytest.raises(ArgumentError, match="knn_damping: expected a finite number >= 0 or None"):
            InfluenceModule(model, train_dataset=train, snapshot=snap, num_candidates=5, search={"knn_damping": bad})
    module = InfluenceModule(model, train_dataset=train, snapshot=snap, num_candidates=5)
    with pytest.raises(ArgumentError, match=f"queries: expected \\[Q, {CLASSIFIER_PARAMS}\\] loss gradients"):
        module.precondition_query(torch.zeros(2, 5))


def test_memory_budget_same_scores_and_too_small_raises(tmp_path, trained, snapshot):
    from lightning_fastif.core.memory import MemoryBudgetError

    model, train, test, _ = trained
    batch = next(iter(DataLoader(test, batch_size=4)))
    plain = InfluenceModule(model, train_dataset=train, snapshot=snapshot, ihvp=_lissa(), num_candidates=20)
    budget = InfluenceModule(
        model, train_dataset=train, snapshot=snapshot, ihvp=_lissa(), num_candidates=20, max_memory="64MB"
    )
    a, b = plain.score_batch(batch), budget.score_batch(batch)
    torch.testing.assert_close(b.scores, a.scores, rtol=1e-6, atol=1e-8)
    assert torch.equal(a.candidates, b.candidates)
    assert b.diagnostics["memory"]["plan"]["max_memory"] == 64_000_000
    tiny = InfluenceModule(
        model, train_dataset=train, snapshot=snapshot, ihvp=_lissa(), num_candidates=20, max_memory="1KB"
    )
    with pytest.raises(MemoryBudgetError, match="max_memory"):
        tiny.score_batch(batch)
    with pytest.raises(ValueError, match="max_memory"):
        InfluenceModule(model, train_dataset=train, snapshot=snapshot, num_candidates=20, max_memory="lots")


def test_legacy_flat_arguments_warn_and_give_the_groups_settings(trained, snapshot):
    model, train, _, _ = trained
    common = {"train_dataset": train, "snapshot": snapshot, "ihvp": ExactInverse(0.01), "num_candidates": 5}
    flat = {"knn_query": "mean", "feature_hook": "input", "feature_layer": "classifier"}
    flat_compute = {"parallel": "repeats", "batch_size": 7, "hessian_batch_size": 9, "score_method": "grads"}
    with pytest.warns(DeprecationWarning, match="flat arguments will be removed") as record:
        old = InfluenceModule(model, **common, **flat, **flat_compute, progress=False)
    messages = " | ".join(str(w.message) for w in record if issubclass(w.category, DeprecationWarning))
    assert "compute=ComputeArguments(parallel=..., batch_size=..., hessian_batch_size=..., score_method=..." in messages
    assert "search=SearchArguments(knn_query=..., feature_hook=..., feature_layer=...)" in messages
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the groups themselves warn about nothing
        new = InfluenceModule(
            model,
            **common,
            search=SearchArguments(feature_layer="classifier", feature_hook="input", knn_query="mean"),
            compute={**flat_compute, "progress": False},
        )
    assert new.compute == ComputeArguments("repeats", 7, 9, "grads", False)
    assert (old.search, old.compute) == (new.search, new.compute)
    assert old.settings() == new.settings()
    assert new.settings()["feature_version"] == "epoch=0-step=0"  # resolved against the snapshot
    # a flat argument is folded on top of its group as given
    with pytest.warns(DeprecationWarning, match=r"InfluenceModule\(progress=\.\.\.\)"):
        mixed = InfluenceModule(model, **common, compute={"batch_size": 3}, progress=False)
    assert (mixed.compute.batch_size, mixed.compute.progress) == (3, False)


def test_bad_group_fields_raise_argument_error_naming_them(trained, snapshot):
    model, train, _, _ = trained
    common = {"train_dataset": train, "snapshot": snapshot, "num_candidates": 5}
    with pytest.raises(ArgumentError, match=r"compute: ComputeArguments has no field\(s\) \['batchsize'\]"):
        InfluenceModule(model, **common, compute={"batchsize": 3})
    with pytest.raises(ArgumentError, match="batch_size: expected an integer >= 1, got 0"):
        InfluenceModule(model, **common, compute={"batch_size": 0})
    with pytest.raises(ArgumentError, match="hessian_batch_size: expected an integer >= 1, got -1"):
        InfluenceModule(model, **common, hessian_batch_size=-1)
    with pytest.raises(ArgumentError, match="search: expected None, a SearchArguments or a mapping of its fields"):
        InfluenceModule(model, **common, search="mean")
    with pytest.raises(ArgumentError, match="progress: expected True or False, got 1"):
        InfluenceModule(model, **common, compute={"progress": 1})
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['nprobe'\]"):
        InfluenceModule(model, **common, nprobe=4)
