"""FeatureSnapshot and CheckpointSnapshot in real (tiny) fits: files, manifest, DDP, resume, errors."""

from __future__ import annotations

import csv
import re
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_fastif.core.factored_grads import FactoredGradients
from lightning_fastif.errors import ArgumentError, SnapshotError, SnapshotNotFoundError
from lightning_fastif.io.atomic import load_tensors, read_manifest, read_tensor_metadata
from lightning_fastif.io.snapshot_store import (
    apply_checkpoint,
    checkpoint_file,
    feature_file,
    last_layer_hessian_file,
    load_checkpoint,
    read_feature_snapshot,
    read_snapshot_manifest,
    resolve_version,
    snapshot_versions,
)
from lightning_fastif.lightning.snapshots import LAST_LAYER_HESSIAN, CheckpointSnapshot, FeatureSnapshot
from lightning_fastif.search.features import extract_features
from lightning_fastif.search.knn import KNNIndex, faiss_available
from tests.helpers.snapshot_models import (
    CrashAtEpoch,
    TinyClassifier,
    TinyClassifierWithFeatures,
    TinyDataModule,
    TinyDataModuleWithVal,
    ValLossClassifier,
    make_dataset,
)


def _trainer(tmp_path, callbacks, **kwargs):
    options = {
        "default_root_dir": tmp_path,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "limit_train_batches": 4,
        "max_epochs": 2,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
    }
    options.update(kwargs)
    return Trainer(callbacks=callbacks, **options)


def _no_tmp_files(path):
    return not [p for p in path.rglob("*") if p.name.endswith(".tmp")]


def test_feature_snapshot_every_epoch_writes_files_and_manifest(tmp_path):
    extra = make_dataset(13, seed=1)
    snapshot = FeatureSnapshot(
        layer="classifier", hook="input", every_n_epochs=1, batch_size=8, datasets={"challenge": extra}
    )
    model, data = TinyClassifier(), TinyDataModule(n=37, batch_size=5)
    trainer = _trainer(tmp_path, [snapshot])
    trainer.fit(model, data)

    root = tmp_path / "fastif_snapshot"
    assert snapshot.snapshot_dir == str(root)
    manifest = read_manifest(root)
    versions = manifest["features"]["versions"]
    # One per epoch; the end-of-fit snapshot is skipped because step 8 is already taken.
    assert list(versions) == ["epoch=0-step=4", "epoch=1-step=8"]
    assert manifest["features"]["latest"] == "epoch=1-step=8"
    entry = versions["epoch=1-step=8"]
    assert (entry["epoch"], entry["global_step"], entry["n"], entry["dim"]) == (1, 8, 37, 5)
    assert (entry["metric"], entry["index"], entry["layer"], entry["hook"]) == ("l2", "auto", "classifier", "input")
    assert entry["seconds"] >= 0
    fingerprint = read_tensor_metadata(root / "features" / "epoch=1-step=8" / "challenge.safetensors")["fingerprint"]
    assert entry["datasets"]["challenge"] == {
        "file": "challenge.safetensors",  # a plain name inside features/<version>/
        "index_file": None,
        "n": 13,
        "dim": 5,
        "fingerprint": fingerprint,  # the id of this write of the file, also in its header
        # 13 examples: "auto" resolves to an exact flat index, whose recall is 1 by construction.
        "index": {"kind": "flat", "nlist": None, "nprobe": 8, "tuning": None},
    }
    assert len(fingerprint) == 32
    assert fingerprint != entry["datasets"]["train"]["fingerprint"]
    for version in versions:
        for name in ("train", "challenge"):
            assert (root / "features" / version / f"{name}.safetensors").is_file()
    assert _no_tmp_files(root)

    # The last snapshot holds the final model's classifier inputs, every index once, in order.
    features, indices, _ = read_feature_snapshot(root)
    assert torch.equal(indices, torch.arange(37))
    expected = extract_features(model, data.train_set, layer="classifier", hook="input")
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
    first, _, _ = read_feature_snapshot(root, version=0)
    assert not torch.allclose(first, features)  # taken before the second epoch changed the weights
    challenge, challenge_idx, _ = read_feature_snapshot(root, "challenge")
    torch.testing.assert_close(challenge, extract_features(model, extra, layer="classifier", hook="input"))

    index = KNNIndex.from_snapshot(root)
    _, ids = index.search(expected[:3], k=1)
    assert ids[:, 0].tolist() == [0, 1, 2]
    assert "fastif/snapshot/seconds" in trainer.callback_metrics


def test_fit_end_snapshot_features_method_ivf_and_logger(tmp_path):
    snapshot = FeatureSnapshot(dirpath=tmp_path / "snap", index="ivf", nlist=4, metric="cosine")
    model = TinyClassifierWithFeatures()
    logger = CSVLogger(tmp_path, name="logs", version=0)
    trainer = _trainer(tmp_path, [snapshot], logger=logger, max_epochs=1, limit_train_batches=3)
    trainer.fit(model, TinyDataModule())
    [entry] = snapshot_versions(tmp_path / "snap", "features")
    # The end of a one-epoch fit is epoch 0, Lightning's current_epoch during that epoch (not 1, one past it).
    assert (entry["version"], entry["epoch"], entry["global_step"]) == ("epoch=0-step=3", 0, 3)
    assert (entry["layer"], entry["hook"], entry["metric"]) == (None, None, "cosine")
    cache = tmp_path / "snap" / "features" / "epoch=0-step=3" / "train.faiss"
    # The IVF index is not built during fit: at the first search, then cached next to the features.
    assert not cache.exists()
    assert entry["datasets"]["train"]["index_file"] is None
    index = KNNIndex.from_snapshot(tmp_path / "snap")
    assert (index.metric, index.kind, index.ntotal) == ("cosine", "ivf", 37)
    first = index.search(torch.randn(2, 5), k=3)
    assert cache.exists() == faiss_available()
    [entry] = snapshot_versions(tmp_path / "snap", "features")
    record = entry["datasets"]["train"]
    assert record["index_file"] == ("train.faiss" if faiss_available() else None)
    if faiss_available():
        assert record["index"]["features_fingerprint"] == record["fingerprint"]
        assert record["index"]["nlist"] == 4
        again = KNNIndex.from_snapshot(tmp_path / "snap")
        assert again._index is not None  # the cached index was adopted, not rebuilt
        queries = torch.randn(2, 5)
        assert torch.equal(again.search(queries, k=3)[1], index.search(queries, k=3)[1])
    assert first[1].shape == (2, 3)
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("fastif/snapshot/seconds")]
    assert len(rows) == 1
    assert float(rows[0]["fastif/snapshot/seconds"]) > 0


def test_checkpoint_snapshot_schedule_metadata_and_weights(tmp_path):
    selected = CheckpointSnapshot(
        dirpath=tmp_path / "sel", params="classifier.*", epochs=[0], every_n_train_steps=3, monitor="val_loss"
    )
    whole = CheckpointSnapshot(dirpath=tmp_path / "all", every_n_epochs=2, on_fit_end=False)
    model = ValLossClassifier()
    trainer = _trainer(
        tmp_path, [selected, whole], limit_val_batches=2, num_sanity_val_steps=0, max_epochs=2, limit_train_batches=4
    )
    with pytest.warns(UserWarning, match="monitor 'val_loss' is not in trainer.callback_metrics"):
        trainer.fit(model, TinyDataModuleWithVal())

    entries = snapshot_versions(tmp_path / "sel", "checkpoints")
    # Steps 3 and 6 (every 3 steps), the end of epoch 0 (step 4), the end of fit (step 8, still epoch 1): each once.
    assert [(e["epoch"], e["global_step"]) for e in entries] == [(0, 3), (0, 4), (1, 6), (1, 8)]
    assert [e["version"] for e in entries] == ["epoch=0-step=3", "epoch=0-step=4", "epoch=1-step=6", "epoch=1-step=8"]
    assert [e["file"] for e in entries] == [f"{e['version']}.safetensors" for e in entries]
    assert entries[0]["monitor_value"] is None  # no validation has run yet at step 3
    assert entries[1]["monitor"] == "val_loss"
    assert isinstance(entries[1]["monitor_value"], float)
    assert entries[-1]["params"] == ["classifier.*"]
    last_weights, last_entry = load_checkpoint(tmp_path / "sel")[0]
    assert last_entry["version"] == "epoch=1-step=8"
    assert read_tensor_metadata(checkpoint_file(tmp_path / "sel", "epoch=1-step=8"))["epoch"] == "1"
    assert set(last_weights) == {"classifier.weight", "classifier.bias"}
    assert torch.equal(last_weights["classifier.weight"], model.classifier.weight.detach())

    [full] = snapshot_versions(tmp_path / "all", "checkpoints")
    assert (full["epoch"], full["global_step"], full["monitor"]) == (1, 8, None)
    weights, _ = load_checkpoint(tmp_path / "all", "all")[0]
    assert set(weights) == set(model.state_dict())
    fresh = apply_checkpoint(ValLossClassifier(seed=5), weights)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value)
    assert _no_tmp_files(tmp_path)


def test_default_dirpath_of_both_callbacks(tmp_path):
    features = FeatureSnapshot(layer="classifier", hook="input")
    weights = CheckpointSnapshot(epochs=[0])
    assert (features.snapshot_dir, weights.snapshot_dir) == (None, None)  # resolved in setup
    root = tmp_path / "root"
    _trainer(root, [features, weights], max_epochs=2).fit(TinyClassifier(), TinyDataModule())

    expected = root / "fastif_snapshot"
    assert features.snapshot_dir == weights.snapshot_dir == str(expected)
    with pytest.raises(AttributeError):
        features.snapshot_dir = "elsewhere"  # read-only
    assert sorted(p.name for p in expected.iterdir()) == ["checkpoints", "features", "manifest.json"]
    assert [e["version"] for e in snapshot_versions(expected, "features")] == ["epoch=1-step=8"]
    assert (expected / "features" / "epoch=1-step=8" / "train.safetensors").is_file()
    # Epoch 0 (step 4) by epochs=[0], the end of fit (epoch 1, step 8) by on_fit_end.
    assert [e["version"] for e in snapshot_versions(expected, "checkpoints")] == ["epoch=0-step=4", "epoch=1-step=8"]
    assert (expected / "checkpoints" / "epoch=0-step=4.safetensors").is_file()


def test_fit_end_numbers_the_epoch_that_ran_also_when_max_steps_stops_it(tmp_path):
    # 4 batches per epoch, stopped at step 6: two thirds into epoch 1, which is the epoch the weights come from.
    saver = CheckpointSnapshot(dirpath=tmp_path / "s", epochs=[0])  # step 6 is saved by on_fit_end alone
    _trainer(tmp_path, [saver], max_epochs=5, max_steps=6).fit(TinyClassifier(), TinyDataModule())
    entries = snapshot_versions(tmp_path / "s", "checkpoints")
    assert [(e["version"], e["epoch"]) for e in entries] == [("epoch=0-step=4", 0), ("epoch=1-step=6", 1)]


def _run_fit(root, lr, epochs, ckpt_path=None, crash=None):
    callbacks = [
        FeatureSnapshot(dirpath=root / "snap", layer="classifier", hook="input", every_n_epochs=1),
        CheckpointSnapshot(dirpath=root / "snap", every_n_epochs=1),
        ModelCheckpoint(dirpath=root / f"ckpt_{lr}", save_last=True),
    ]
    if crash is not None:
        callbacks.append(CrashAtEpoch(crash))
    model = TinyClassifier(lr=lr)
    trainer = _trainer(root, callbacks, max_epochs=epochs, enable_checkpointing=True)
    trainer.fit(model, TinyDataModule(), ckpt_path=ckpt_path, weights_only=True)
    return model, callbacks


def test_second_fit_into_one_directory_starts_a_new_run(tmp_path):
    snap = tmp_path / "snap"
    _run_fit(tmp_path, lr=0.1, epochs=3)
    first = load_checkpoint(snap, "all")
    assert [e["version"] for _, e in first] == ["epoch=0-step=4", "epoch=1-step=8", "epoch=2-step=12"]

    model, (feat_cb, ckpt_cb, _) = _run_fit(tmp_path, lr=0.5, epochs=2)
    assert (feat_cb.run_index, ckpt_cb.run_index) == (1, 1)
    # "all" and "latest" see the second run only: its two epochs, its final weights.
    second = load_checkpoint(snap, "all")
    assert [(e["version"], e["epoch"]) for _, e in second] == [("epoch=0-step=4-run=1", 0), ("epoch=1-step=8-run=1", 1)]
    assert len({e["run_id"] for _, e in second} | {e["run_id"] for _, e in first}) == 2
    [(latest, entry)] = load_checkpoint(snap)
    assert entry["version"] == "epoch=1-step=8-run=1"
    assert torch.equal(latest["classifier.weight"], model.classifier.weight.detach())
    assert resolve_version(snap, "checkpoints", 0)["version"] == "epoch=0-step=4-run=1"
    features, _, feature_entry = read_feature_snapshot(snap)
    assert feature_entry["version"] == "epoch=1-step=8-run=1"
    expected = extract_features(model, make_dataset(37, seed=0), layer="classifier", hook="input")
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
    # The first run is kept apart, not overwritten: its files and entries are there, reachable by name.
    old_weights, old_entry = load_checkpoint(snap, "epoch=1-step=8")[0]
    assert torch.equal(old_weights["classifier.weight"], first[1][0]["classifier.weight"])
    assert old_entry["run_id"] == first[0][1]["run_id"]
    every = [e["version"] for e in snapshot_versions(snap, "checkpoints", all_runs=True)]
    assert sorted(every) == sorted([e["version"] for _, e in first] + [e["version"] for _, e in second])


def test_a_resumed_fit_continues_its_run_after_another_run(tmp_path):
    snap = tmp_path / "snap"
    with pytest.raises(RuntimeError, match="planned crash"):
        _run_fit(tmp_path, lr=0.1, epochs=3, crash=2)  # run 0 writes epochs 0 and 1
    _run_fit(tmp_path, lr=0.5, epochs=1)  # run 1 writes epoch 0
    assert [e["version"] for e in snapshot_versions(snap, "checkpoints")] == ["epoch=0-step=4-run=1"]
    _run_fit(tmp_path, lr=0.1, epochs=3, ckpt_path=tmp_path / "ckpt_0.1" / "last.ckpt")  # run 0 goes on
    assert [e["version"] for e in snapshot_versions(snap, "checkpoints")] == [
        "epoch=0-step=4",
        "epoch=1-step=8",
        "epoch=2-step=12",
    ]
    assert resolve_version(snap, "features")["version"] == "epoch=2-step=12"


def test_features_are_streamed_to_disk_in_rounds(tmp_path, monkeypatch):
    from lightning_fastif.io.atomic import TensorFileWriter
    from lightning_fastif.lightning.snapshots import features as features_module

    # One batch of 4 per round: 37 examples are embedded and written in 10 pieces, never held all at once.
    monkeypatch.setattr(features_module, "_ROUND_BATCHES", 1)
    sizes = []
    real_extract = features_module.extract_features

    def recording_extract(*args, **kwargs):
        sizes.append(len(kwargs["indices"]))
        return real_extract(*args, **kwargs)

    monkeypatch.setattr(features_module, "extract_features", recording_extract)
    snapshot = FeatureSnapshot(dirpath=tmp_path / "s", layer="body", batch_size=4)
    model = TinyClassifier()
    data = TinyDataModule()
    _trainer(tmp_path, [snapshot], max_epochs=1).fit(model, data)
    assert sizes == [4] * 9 + [1]
    # The streamed file equals the features embedded in memory in one go.
    features, indices, _ = read_feature_snapshot(tmp_path / "s")
    assert indices.tolist() == list(range(37))
    assert torch.equal(features, real_extract(model, data.train_set, layer="body", batch_size=4))
    assert _no_tmp_files(tmp_path / "s")

    # Rows gathered rank by rank (as under DDP) go to their dataset index, run by run, without reordering.
    path = tmp_path / "w" / "train.safetensors"
    with TensorFileWriter(path, {"indices": (torch.int64, (6,)), "features": (torch.float32, (6, 2))}) as writer:
        snapshot._write_rows(writer, "train", torch.arange(12.0).view(6, 2), torch.tensor([3, 4, 5, 0, 1, 2]))
    stored = load_tensors(path)
    assert stored["indices"].tolist() == [0, 1, 2, 3, 4, 5]
    assert stored["features"][:, 0].tolist() == [6.0, 8.0, 10.0, 0.0, 2.0, 4.0]
    with (
        pytest.raises(SnapshotError, match="not each of 0..N-1 exactly once"),
        TensorFileWriter(
            tmp_path / "w" / "d.safetensors", {"indices": (torch.int64, (3,)), "features": (torch.float32, (3, 2))}
        ) as writer,
    ):
        snapshot._write_rows(writer, "train", torch.zeros(3, 2), torch.tensor([0, 1, 1]))
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["train.safetensors"]


def test_interrupted_feature_writes_leave_nothing(tmp_path, monkeypatch):
    from lightning_fastif.io.atomic import TensorFileWriter
    from lightning_fastif.lightning.snapshots import features as features_module

    monkeypatch.setattr(features_module, "_ROUND_BATCHES", 1)
    calls = []
    real_extract = features_module.extract_features

    def failing_extract(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the third round: two rounds already on disk, in the temporary file
            raise RuntimeError("embedding broke")
        return real_extract(*args, **kwargs)

    monkeypatch.setattr(features_module, "extract_features", failing_extract)
    snapshot = FeatureSnapshot(dirpath=tmp_path / "s", layer="body", batch_size=4)
    with pytest.raises(RuntimeError, match="embedding broke"):
        _trainer(tmp_path, [snapshot], max_epochs=1).fit(TinyClassifier(), TinyDataModule())
    assert not list((tmp_path / "s").rglob("*.safetensors"))
    assert _no_tmp_files(tmp_path / "s")

    # A failing write (a full disk): reported as a SnapshotError, no file, no version in the manifest.
    monkeypatch.setattr(features_module, "extract_features", real_extract)

    def full_disk(self, name, rows, row=0):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TensorFileWriter, "write", full_disk)
    snapshot = FeatureSnapshot(dirpath=tmp_path / "t", layer="body", batch_size=4)
    with pytest.raises(SnapshotError, match="No space left on device"):
        _trainer(tmp_path, [snapshot], max_epochs=1).fit(TinyClassifier(), TinyDataModule())
    assert not list((tmp_path / "t").rglob("*.safetensors"))
    assert _no_tmp_files(tmp_path / "t")
    assert read_snapshot_manifest(tmp_path / "t", missing_ok=True)["features"]["versions"] == {}


def test_constructor_validation():
    cases = [
        (lambda: FeatureSnapshot(every_n_epochs=0), "every_n_epochs: expected an integer >= 1 or None, got 0"),
        (lambda: FeatureSnapshot(hook="middle"), "hook: expected one of ['input', 'output'], got 'middle'"),
        (lambda: FeatureSnapshot(metric="dot"), "metric: expected one of ['l2', 'cosine', 'ip'], got 'dot'"),
        (lambda: FeatureSnapshot(index="hnsw"), "index: expected one of ['auto', 'flat', 'ivf'], got 'hnsw'"),
        (lambda: FeatureSnapshot(batch_size=-1), "batch_size: expected an integer >= 1, got -1"),
        (lambda: FeatureSnapshot(batch_size=None), "batch_size: expected an integer >= 1, got None"),
        (lambda: FeatureSnapshot(nprobe=2.0), "nprobe: expected an integer >= 1, got 2.0"),
        (lambda: FeatureSnapshot(on_fit_end=False), "on_fit_end: expected True when every_n_epochs is None"),
        (lambda: FeatureSnapshot(include_train=False), "include_train: expected True when no datasets are given"),
        (lambda: FeatureSnapshot(include_train=1), "include_train: expected True or False, got 1"),
        (lambda: FeatureSnapshot(datasets={"a/b": make_dataset(3)}), "datasets: expected names of letters"),
        (lambda: FeatureSnapshot(datasets={"..": make_dataset(3)}), "datasets: expected names of .* got '..'"),
        (lambda: FeatureSnapshot(datasets={"train": make_dataset(3)}), "datasets: expected names other than 'train'"),
        (
            lambda: FeatureSnapshot(datasets={LAST_LAYER_HESSIAN: make_dataset(3)}),
            "datasets: expected names other than 'last_layer_hessian'",
        ),
        (lambda: FeatureSnapshot(max_hessian_params=0), "max_hessian_params: expected an integer >= 1, got 0"),
        (lambda: FeatureSnapshot(datasets={"x": iter([1])}), "datasets\\['x'\\]: expected a map-style Dataset"),
        (lambda: FeatureSnapshot(dirpath=3), "dirpath: expected a directory path or None, got 3"),
        (lambda: CheckpointSnapshot(params=[]), "params: expected None, a name pattern"),
        (lambda: CheckpointSnapshot(epochs=[-1]), "epochs: expected an integer >= 0, got -1"),
        (lambda: CheckpointSnapshot(every_n_train_steps=0), "every_n_train_steps: expected an integer >= 1 or None"),
        (lambda: CheckpointSnapshot(on_fit_end=False), "on_fit_end: expected True when every_n_epochs, "),
        (lambda: CheckpointSnapshot(on_fit_end="yes"), "on_fit_end: expected True or False, got 'yes'"),
        (lambda: CheckpointSnapshot(monitor=""), "monitor: expected None or a metric name, got ''"),
    ]
    for build, message in cases:
        pattern = message if "\\" in message or ".*" in message else re.escape(message)
        with pytest.raises(ArgumentError, match=pattern):
            build()
    # Distinct configurations can coexist in one Trainer.
    assert FeatureSnapshot(layer="a").state_key != FeatureSnapshot(layer="b").state_key
    assert CheckpointSnapshot(params="a").state_key != CheckpointSnapshot(params="b").state_key


def test_setup_errors(tmp_path):
    trainer = _trainer(tmp_path, [FeatureSnapshot(layer="clasifier")])
    with pytest.raises(ArgumentError, match="layer: 'clasifier' is not a submodule.*'body.0'.*'classifier'"):
        trainer.fit(TinyClassifier(), TinyDataModule())
    trainer = _trainer(tmp_path, [FeatureSnapshot()])
    with pytest.raises(ArgumentError, match="layer: expected one of the submodules .* no features\\(batch\\) method"):
        trainer.fit(TinyClassifier(), TinyDataModule())
    trainer = _trainer(tmp_path, [CheckpointSnapshot(params="head.*")])
    with pytest.raises(ArgumentError, match="params: expected patterns .*'classifier.weight'.* got \\['head.\\*'\\]"):
        trainer.fit(TinyClassifier(), TinyDataModule())
    fake = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(MisconfigurationException, match="FSDPStrategy shards the model"):
        FeatureSnapshot(layer="body").setup(fake, TinyClassifier(), "fit")


def test_missing_and_corrupted_snapshot_directory(tmp_path):
    with pytest.raises(SnapshotNotFoundError, match="snapshot directory not found"):
        KNNIndex.from_snapshot(tmp_path / "absent")
    FeatureSnapshot(layer="body", dirpath=tmp_path / "s")  # nothing written before a fit
    trainer = _trainer(tmp_path, [FeatureSnapshot(layer="body", dirpath=tmp_path / "s")], max_epochs=1)
    trainer.fit(TinyClassifier(), TinyDataModule())
    with pytest.raises(SnapshotNotFoundError, match="dataset: 'val' not in features version"):
        KNNIndex.from_snapshot(tmp_path / "s", dataset="val")
    with pytest.raises(SnapshotNotFoundError, match="no checkpoints snapshot"):
        load_checkpoint(tmp_path / "s")
    [file] = (tmp_path / "s" / "features").rglob("train.safetensors")
    file.write_bytes(file.read_bytes()[:40])
    with pytest.raises(SnapshotError, match="corrupted.*train.safetensors"):
        KNNIndex.from_snapshot(tmp_path / "s")
    file.unlink()
    with pytest.raises(FileNotFoundError, match="train.safetensors"):
        read_feature_snapshot(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text("{")
    with pytest.raises(SnapshotError, match="manifest is corrupted"):
        KNNIndex.from_snapshot(tmp_path / "s")


def _resumable_fit(root, *, crash=None, ckpt_path=None):
    callbacks = [
        FeatureSnapshot(layer="classifier", hook="input", every_n_epochs=1, batch_size=16),
        FeatureSnapshot(dirpath=root / "fit_end_only", layer="body"),
        CheckpointSnapshot(params="classifier.*", every_n_epochs=1),
        ModelCheckpoint(dirpath=root / "ckpt", save_last=True),
    ]
    if crash is not None:
        callbacks.append(CrashAtEpoch(*crash))
    trainer = _trainer(root, callbacks, max_epochs=3, enable_checkpointing=True)
    trainer.fit(TinyClassifier(), TinyDataModule(), ckpt_path=ckpt_path, weights_only=True)


def _versions(dirpath, kind="features"):
    return {e["version"]: e for e in snapshot_versions(dirpath, kind)}


@pytest.mark.parametrize(
    ("crash", "redone"),
    [
        # Crash after epoch 1 was snapshotted and checkpointed: the resumed fit continues at epoch 2.
        ((2, "start"), set()),
        # Crash after epoch 1 was snapshotted but before its checkpoint: epoch 1 is re-run and re-snapshotted.
        ((1, "end"), {"epoch=1-step=8"}),
    ],
)
def test_resumed_fit_leaves_the_same_snapshots_as_one_run(tmp_path, crash, redone):
    one, two = tmp_path / "one", tmp_path / "two"
    _resumable_fit(one)
    with pytest.raises(RuntimeError, match="planned crash"):
        _resumable_fit(two, crash=crash)
    before = _versions(two / "fastif_snapshot")
    assert list(before) == ["epoch=0-step=4", "epoch=1-step=8"]
    assert not (two / "fit_end_only").exists()
    _resumable_fit(two, ckpt_path=two / "ckpt" / "last.ckpt")

    for sub, kind in (
        ("fastif_snapshot", "features"),
        ("fastif_snapshot", "checkpoints"),
        ("fit_end_only", "features"),
    ):
        assert list(_versions(one / sub, kind)) == list(_versions(two / sub, kind))
    after = _versions(two / "fastif_snapshot")
    assert list(after) == ["epoch=0-step=4", "epoch=1-step=8", "epoch=2-step=12"]
    # Taken once, when the resumed fit ended; named with the last epoch that ran (0-based), like the epoch snapshots.
    assert list(_versions(two / "fit_end_only")) == ["epoch=2-step=12"]
    assert {v for v in before if after[v]["created"] != before[v]["created"]} == redone
    assert len({e["run_id"] for e in after.values()}) == 1  # one run, continued (no "-run=1" names above)
    assert list(_versions(two / "fastif_snapshot", "checkpoints")) == list(after)
    # Versions written after the resume say so (the step the resumed fit started from); the others do not.
    resumed_at = 8 if crash == (2, "start") else 4
    assert {v: e["resumed_from_step"] for v, e in after.items()} == {
        v: (resumed_at if v == "epoch=2-step=12" or v in redone else None) for v in after
    }
    for version in after:
        a, _, _ = read_feature_snapshot(one / "fastif_snapshot", version=version)
        b, _, _ = read_feature_snapshot(two / "fastif_snapshot", version=version)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        [(wa, _)] = load_checkpoint(one / "fastif_snapshot", version)
        [(wb, _)] = load_checkpoint(two / "fastif_snapshot", version)
        torch.testing.assert_close(wa, wb, rtol=0, atol=1e-6)
    a, _, _ = read_feature_snapshot(one / "fit_end_only")
    b, _, _ = read_feature_snapshot(two / "fit_end_only")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    # Resuming a finished fit takes nothing again.
    _resumable_fit(two, ckpt_path=two / "ckpt" / "last.ckpt")
    again = _versions(two / "fastif_snapshot")
    assert {v: e["created"] for v, e in again.items()} == {v: e["created"] for v, e in after.items()}


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ddp_snapshot_equals_single_process_snapshot(tmp_path):
    # 37 examples, snapshot batches of 8 (5 batches: ranks get 3 and 2) and a 13-example extra set: nothing divides.
    extra = {"val": make_dataset(13, seed=1)}
    data = TinyDataModule(n=37, batch_size=5)

    def callbacks(name):
        return [
            FeatureSnapshot(dirpath=tmp_path / name, layer="classifier", hook="input", batch_size=8, datasets=extra),
            FeatureSnapshot(
                dirpath=tmp_path / f"{name}_grad",
                features="loss_gradient",
                loss_fn=_ce,
                batch_size=8,
                query_curvature="hessian",
            ),
            CheckpointSnapshot(dirpath=tmp_path / name),
        ]

    ddp = _trainer(
        tmp_path,
        callbacks("ddp"),
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_epochs=1,
        limit_train_batches=3,
    )
    ddp.fit(TinyClassifier(lr=0.5), data)

    # One process, with the weights the DDP run ended at (lr=0 keeps them there).
    [(weights, entry)] = load_checkpoint(tmp_path / "ddp")
    assert entry["global_step"] == 3
    single_model = apply_checkpoint(TinyClassifier(lr=0.0, seed=7), weights)
    _trainer(tmp_path, callbacks("single"), max_epochs=1, limit_train_batches=1).fit(single_model, data)

    [ddp_entry] = snapshot_versions(tmp_path / "ddp", "features")
    assert ddp_entry["world_size"] == 2
    for name, n in (("train", 37), ("val", 13)):
        f_ddp, i_ddp, _ = read_feature_snapshot(tmp_path / "ddp", name)
        f_one, i_one, _ = read_feature_snapshot(tmp_path / "single", name)
        assert torch.equal(i_ddp, torch.arange(n))  # each index exactly once, sorted
        assert torch.equal(i_ddp, i_one)
        torch.testing.assert_close(f_ddp, f_one, rtol=0, atol=1e-6)
    # Loss-gradient features and the last layer's Hessian (rank 0, whole training set) match one process too.
    f_ddp, _, _ = read_feature_snapshot(tmp_path / "ddp_grad")
    f_one, _, _ = read_feature_snapshot(tmp_path / "single_grad")
    torch.testing.assert_close(f_ddp, f_one, rtol=0, atol=1e-6)
    h_ddp, h_one = _stored_hessian(tmp_path / "ddp_grad"), _stored_hessian(tmp_path / "single_grad")
    assert h_ddp.shape == (CLASSIFIER_PARAMS, CLASSIFIER_PARAMS)
    torch.testing.assert_close(h_ddp, h_one, rtol=0, atol=1e-6)
    assert _no_tmp_files(tmp_path)


CLASSIFIER_PARAMS = 3 * (5 + 1)  # TinyClassifier's classifier: Linear(HIDDEN=5, CLASSES=3)


def _stored_hessian(dirpath):
    [entry] = snapshot_versions(dirpath, "features")
    return load_tensors(last_layer_hessian_file(dirpath, entry))[LAST_LAYER_HESSIAN]


def _explicit_classifier_hessian(model, data):
    """The Hessian of the mean cross-entropy over the classifier's (weight, bias), by double backward."""
    x, y = data.tensors
    with torch.no_grad():
        h = model.body(x)
    w, b = model.classifier.weight.detach(), model.classifier.bias.detach()

    def mean_loss(flat):
        weight, bias = flat[: w.numel()].view_as(w), flat[w.numel() :]
        return torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, weight, bias), y)

    return torch.autograd.functional.hessian(mean_loss, torch.cat([w.reshape(-1), b]))


def _ce(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def test_loss_gradient_snapshot_matches_extract_features(tmp_path):
    snapshot = FeatureSnapshot(
        dirpath=tmp_path / "snap", features="loss_gradient", loss_fn=_ce, query_curvature="hessian"
    )
    model = TinyClassifier()
    _trainer(tmp_path, [snapshot], max_epochs=1).fit(model, TinyDataModule())
    [entry] = snapshot_versions(tmp_path / "snap", "features")
    assert (entry["features"], entry["layer"], entry["hook"], entry["metric"]) == (
        "loss_gradient",
        "classifier",
        None,
        "ip",
    )
    index = KNNIndex.from_snapshot(tmp_path / "snap")
    expected = extract_features(model, make_dataset(37, seed=0), kind="loss_gradient", loss_fn=_ce)
    assert index.metric == "ip"
    assert index.dim == model.classifier.weight.numel() + model.classifier.bias.numel()
    # A Linear classifier's gradients are stored as their factors (10 + 16 numbers a row, not 10·17) ...
    assert isinstance(index.features, FactoredGradients)
    assert (index.features.num_outputs, index.features.num_inputs, index.features.bias) == (
        model.classifier.out_features,
        model.classifier.in_features,
        True,
    )
    # ... whose dense rows are the per-example gradients autodiff gives.
    torch.testing.assert_close(index.features[:], expected, rtol=1e-6, atol=1e-7)
    # The last layer's Hessian of the mean training loss (all 37 examples), as double backward computes it.
    record = entry[LAST_LAYER_HESSIAN]
    assert (record["layer"], record["num_params"], record["num_train"]) == ("classifier", CLASSIFIER_PARAMS, 37)
    assert record["params"] == ["classifier.weight", "classifier.bias"]
    assert record["file"] == f"{LAST_LAYER_HESSIAN}.safetensors"  # inside features/<version>/
    assert last_layer_hessian_file(tmp_path / "snap", entry) == feature_file(
        tmp_path / "snap", entry["version"], LAST_LAYER_HESSIAN
    )
    hessian = _stored_hessian(tmp_path / "snap")
    torch.testing.assert_close(
        hessian, _explicit_classifier_hessian(model, make_dataset(37, seed=0)), rtol=1e-5, atol=1e-6
    )
    # activations stay the default, recorded as such
    assert FeatureSnapshot().features == "activations"
    assert FeatureSnapshot().metric == "l2"


def test_last_layer_hessian_over_a_sample_of_training_examples(tmp_path):
    snapshot = FeatureSnapshot(
        dirpath=tmp_path / "snap", features="loss_gradient", loss_fn=_ce, hessian_examples=10, query_curvature="hessian"
    )
    model = TinyClassifier()
    _trainer(tmp_path, [snapshot], max_epochs=1).fit(model, TinyDataModule())
    [entry] = snapshot_versions(tmp_path / "snap", "features")
    record = entry[LAST_LAYER_HESSIAN]
    assert (record["num_train"], record["hessian_examples"]) == (37, 10)
    # The seeded sample the snapshot documents: the Hessian over exactly those 10 examples, not over all 37.
    sample = torch.randperm(37, generator=torch.Generator().manual_seed(0))[:10].sort().values
    data = make_dataset(37, seed=0)
    subset = torch.utils.data.TensorDataset(*(t[sample] for t in data.tensors))
    hessian = _stored_hessian(tmp_path / "snap")
    torch.testing.assert_close(hessian, _explicit_classifier_hessian(model, subset), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(hessian, _explicit_classifier_hessian(model, data), rtol=1e-3, atol=1e-4)
    with pytest.raises(ArgumentError, match="hessian_examples: expected an integer >= 1 or None, got 0"):
        FeatureSnapshot(hessian_examples=0)


def test_loss_gradient_snapshot_validation(tmp_path):
    with pytest.raises(ArgumentError, match="metric: expected 'ip' .* with features='loss_gradient' .* got 'l2'"):
        FeatureSnapshot(features="loss_gradient", metric="l2")
    with pytest.raises(ArgumentError, match="features: expected one of \\['activations', 'loss_gradient'\\]"):
        FeatureSnapshot(features="gradients")
    with pytest.raises(ArgumentError, match="loss_fn: expected None or a callable"):
        FeatureSnapshot(features="loss_gradient", loss_fn="ce")
    no_loss = FeatureSnapshot(dirpath=tmp_path / "a", features="loss_gradient")
    with pytest.raises(ArgumentError, match="loss_fn: expected a callable .* defines no per_example_loss"):
        _trainer(tmp_path, [no_loss]).fit(TinyClassifier(), TinyDataModule())
    no_params = FeatureSnapshot(dirpath=tmp_path / "b", features="loss_gradient", layer="body.1", loss_fn=_ce)
    with pytest.raises(ArgumentError, match="layer: 'body.1' holds no parameters"):
        _trainer(tmp_path, [no_params]).fit(TinyClassifier(), TinyDataModule())


def test_loss_gradient_snapshot_skips_a_hessian_over_max_hessian_params(tmp_path):
    snapshot = FeatureSnapshot(
        dirpath=tmp_path / "snap",
        features="loss_gradient",
        loss_fn=_ce,
        max_hessian_params=CLASSIFIER_PARAMS - 1,
        query_curvature="hessian",
    )
    _trainer(tmp_path, [snapshot], max_epochs=1).fit(TinyClassifier(), TinyDataModule())
    [entry] = snapshot_versions(tmp_path / "snap", "features")
    record = entry[LAST_LAYER_HESSIAN]
    assert (record["file"], record["num_params"], record["layer"]) == (None, CLASSIFIER_PARAMS, "classifier")
    assert "more than max_hessian_params=17" in record["note"]
    assert not list((tmp_path / "snap").rglob(f"{LAST_LAYER_HESSIAN}*"))
    # Activation snapshots store no Hessian at all.
    plain = FeatureSnapshot(dirpath=tmp_path / "plain", layer="classifier", hook="input")
    _trainer(tmp_path, [plain], max_epochs=1).fit(TinyClassifier(), TinyDataModule())
    assert LAST_LAYER_HESSIAN not in snapshot_versions(tmp_path / "plain", "features")[0]
