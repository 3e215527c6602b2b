"""Nothing stale is reused: a result directory is resumed only by the run that wrote it.

Each case writes a complete run, changes one input the scores depend on, and reruns into the same ``output_dir``:
the rerun must refuse with an error naming the changed fingerprint component, or, with ``overwrite=True``, start
fresh and equal a run into an empty directory.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_fastif import InfluenceModule, LiSSA
from lightning_fastif.errors import SnapshotError
from lightning_fastif.io.atomic import read_manifest
from lightning_fastif.io.results import InfluenceResult
from tests.helpers.module_models import CrashAfter, TinyMLP, blobs, crash_after, fit


def _trainer(tmp_path):
    return Trainer(
        default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False, devices=1
    )


def _ce(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _ce_smoothed(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none", label_smoothing=0.1)


@pytest.fixture(scope="module")
def trained():
    train, test = blobs(n_train=40, n_test=6)
    return fit(TinyMLP(), train), train, test


def _module(model, train, out, **kwargs):
    options = {"loss_fn": _ce, "ihvp": LiSSA(damping=0.05, scale=10.0, recursion_depth=20, batch_size=4, seed=3)}
    return InfluenceModule(model, train_dataset=train, num_candidates=None, output_dir=out, **{**options, **kwargs})


def _run(tmp_path, module, test):
    _trainer(tmp_path).predict(module, DataLoader(test, batch_size=3))
    return module


def test_the_manifest_records_every_component(tmp_path, trained):
    model, train, test = trained
    _run(tmp_path, _module(model, train, tmp_path / "out"), test)
    fingerprint = read_manifest(tmp_path / "out")["fingerprint"]
    assert set(fingerprint) == {"weights", "params", "estimator", "train_data", "loss_fn", "test_data"}
    assert all(isinstance(v, str) and len(v) == 64 for v in fingerprint.values())


@pytest.mark.parametrize(
    ("change", "component"),
    [
        ("relabel", "train_data"),
        ("loss", "loss_fn"),
        ("weights", "weights"),
        ("damping", "estimator"),
        ("params", "params"),
    ],
)
def test_a_rerun_with_other_inputs_names_what_changed(tmp_path, trained, change, component):
    model, train, test = trained
    out = tmp_path / "out"
    _run(tmp_path, _module(model, train, out), test)
    kwargs = {}
    if change == "relabel":
        labels = train.tensors[1].clone()
        labels[5] = (labels[5] + 1) % 3
        train = TensorDataset(train.tensors[0], labels)  # same size, one label flipped
    elif change == "loss":
        kwargs["loss_fn"] = _ce_smoothed
    elif change == "weights":
        model = fit(TinyMLP(), train, steps=5)
    elif change == "damping":
        kwargs["ihvp"] = LiSSA(damping=0.5, scale=10.0, recursion_depth=20, batch_size=4, seed=3)
    elif change == "params":
        kwargs["params"] = ["classifier.*"]
    with pytest.raises(ValueError, match=rf"output_dir: .*changed: \[.*'{component}'.*overwrite=True"):
        _run(tmp_path, _module(model, train, out, **kwargs), test)
    # The earlier result is still readable: nothing was computed or half-written.
    assert InfluenceResult.load(out).num_test == len(test)


def test_other_test_data_at_the_same_indices_is_refused(tmp_path, trained):
    model, train, test = trained
    out = tmp_path / "out"
    _run(tmp_path, _module(model, train, out), test)
    x, y = test.tensors
    moved = TensorDataset(x + 0.5, y)  # the same size and indices, other examples
    with pytest.raises(SnapshotError, match=r"other test data .*'test_data'.*overwrite=True"):
        _run(tmp_path, _module(model, train, out), moved)


def test_overwrite_starts_fresh_and_equals_an_empty_directory(tmp_path, trained):
    model, train, test = trained
    x, y = test.tensors
    moved = TensorDataset(x + 0.5, y)
    _run(tmp_path, _module(model, train, tmp_path / "out"), test)
    again = _run(tmp_path, _module(model, train, tmp_path / "out", overwrite=True), moved)
    assert again.skipped_batches == 0
    fresh = _run(tmp_path, _module(model, train, tmp_path / "fresh"), moved)
    assert InfluenceResult.load(tmp_path / "out").equals(fresh.result)


def test_a_matching_rerun_reuses_every_shard(tmp_path, trained):
    model, train, test = trained
    first = _run(tmp_path, _module(model, train, tmp_path / "out"), test)
    second = _run(tmp_path, _module(model, train, tmp_path / "out"), test)
    assert (second.skipped_batches, second.computed_batches) == (2, 0)
    assert second.result.equals(first.result)


def test_a_rerun_that_fails_leaves_no_complete_result(tmp_path, trained):
    model, train, test = trained
    out = tmp_path / "out"
    _run(tmp_path, _module(model, train, out), test)
    bigger = TensorDataset(torch.cat([test.tensors[0], test.tensors[0] + 1]), torch.cat([test.tensors[1]] * 2))
    crashing = crash_after(_module(model, train, out), batches=1)
    with pytest.raises(CrashAfter):
        _run(tmp_path, crashing, bigger)
    with pytest.raises(SnapshotError, match="did not complete"):
        InfluenceResult.load(out)


def test_an_empty_test_set_raises_instead_of_giving_no_result(tmp_path, trained):
    from lightning_fastif.errors import ArgumentError

    model, train, test = trained
    empty = TensorDataset(test.tensors[0][:0], test.tensors[1][:0])
    with pytest.raises(ArgumentError, match="test data: expected at least one test example, got an empty predict"):
        _run(tmp_path, _module(model, train, tmp_path / "out"), empty)
    assert not (tmp_path / "out").exists()


def test_an_empty_extra_snapshot_dataset_is_refused_at_construction():
    from lightning_fastif import FeatureSnapshot
    from lightning_fastif.errors import ArgumentError

    empty = TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ArgumentError, match=r"datasets\['val'\]: expected a non-empty Dataset, got one with 0"):
        FeatureSnapshot(datasets={"val": empty})
    with pytest.raises(ArgumentError, match=r"datasets\['val'\]: expected a map-style Dataset, got int"):
        FeatureSnapshot(datasets={"val": 3})
