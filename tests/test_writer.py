"""lightning/writer.py: InfluenceWriter collects, writes, resumes and merges an InfluenceModule's batches."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader

from lightning_fastif import LiSSA
from lightning_fastif.errors import SnapshotError
from lightning_fastif.io.atomic import read_manifest
from lightning_fastif.io.results import BatchInfluence, InfluenceResult
from lightning_fastif.lightning.module import InfluenceModule
from lightning_fastif.lightning.writer import SHARDS_DIR, InfluenceWriter, shard_key, shard_name
from tests.helpers.module_models import TinyMLP, blobs, fit, train_features, write_feature_snapshot


def _trainer(tmp_path) -> Trainer:
    return Trainer(
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )


@pytest.fixture(scope="module")
def trained():
    train, test = blobs(n_train=40, n_test=7)
    model = fit(TinyMLP(), train, steps=100)
    return model, train, test, train_features(model, train)


@pytest.fixture
def make(tmp_path, trained):
    model, train, _, feats = trained
    snapshot = write_feature_snapshot(tmp_path / "snap", feats)

    def build(output_dir=None):
        ihvp = LiSSA(damping=0.05, scale=10.0, recursion_depth=20, num_repeats=2, batch_size=4, seed=3)
        return InfluenceModule(
            model, train_dataset=train, snapshot=snapshot, ihvp=ihvp, num_candidates=6, output_dir=output_dir
        )

    return build


def _counting(module: InfluenceModule) -> list[int]:
    """Count the batches ``module`` computes (its ``_compute`` calls)."""
    calls: list[int] = []
    original = module._compute

    def compute(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    module._compute = compute
    return calls


def test_shard_names_depend_only_on_the_test_points():
    indices = torch.tensor([3, 4, 5])
    digest = hashlib.sha1(np.array([3, 4, 5], dtype=np.int64).tobytes()).hexdigest()[:15]  # noqa: S324
    assert shard_key(indices) == (3, int(digest, 16))
    assert shard_name(*shard_key(indices)) == f"shard-000000003-{digest}.safetensors"


def test_a_present_shard_is_read_not_recomputed(tmp_path, make, trained):
    _, _, test, _ = trained
    loader = DataLoader(test, batch_size=2)  # 4 batches: 2, 2, 2, 1
    out = tmp_path / "out"
    first = make(out)
    assert len(_counting(first)) == 0
    _trainer(tmp_path).predict(first, loader)
    shards = sorted((out / SHARDS_DIR).glob("shard-*.safetensors"))
    assert len(shards) == 4
    assert read_manifest(out)["status"] == "complete"
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}

    again = make(out)
    calls = _counting(again)
    _trainer(tmp_path).predict(again, loader)
    assert calls == []  # every batch read from its shard
    assert (again.skipped_batches, again.computed_batches) == (4, 0)
    assert {p.name: p.stat().st_mtime_ns for p in shards} == stamps  # and none rewritten
    assert again.result.equals(first.result)

    shards[1].unlink()  # one batch lost: only that one is computed again
    partial = make(out)
    calls = _counting(partial)
    _trainer(tmp_path).predict(partial, loader)
    assert len(calls) == 1
    assert (partial.skipped_batches, partial.computed_batches) == (3, 1)
    assert shards[1].exists()
    assert {p.name: p.stat().st_mtime_ns for p in shards if p != shards[1]} == {
        k: v for k, v in stamps.items() if k != shards[1].name
    }
    assert InfluenceResult.load(out).equals(first.result)  # LiSSA seeded per repeat: the same numbers again


def test_a_shard_holding_other_test_points_is_refused(tmp_path, make, trained):
    _, _, test, _ = trained
    loader = DataLoader(test, batch_size=4)
    out = tmp_path / "out"
    _trainer(tmp_path).predict(make(out), loader)
    a, b = sorted((out / SHARDS_DIR).glob("shard-*.safetensors"))
    a.replace(b)  # b's name, a's test points
    with pytest.raises(SnapshotError, match="holds other test points than its name says"):
        _trainer(tmp_path).predict(make(out), loader)


def test_indices_come_from_lightning_and_results_stay_in_memory(tmp_path, make, trained):
    _, _, test, _ = trained
    module = make()
    order = [6, 2, 5, 0, 1, 4, 3]
    trainer = _trainer(tmp_path)
    predictions = trainer.predict(module, DataLoader(test, batch_size=3, sampler=order))
    assert [p.test_indices.tolist() for p in predictions] == [[6, 2, 5], [0, 1, 4], [3]]
    assert [type(c) for c in trainer.callbacks].count(InfluenceWriter) == 1
    result = module.result
    assert torch.equal(result.test_indices, torch.arange(7))
    by_index = {int(t): row for p in predictions for t, row in zip(p.test_indices, p.scores, strict=True)}
    torch.testing.assert_close(result.scores, torch.stack([by_index[t] for t in range(7)]))
    assert [b["first_test_index"] for b in result.manifest["timings"]["per_batch"]] == [0, 3, 6]
    assert not list(tmp_path.rglob("shard-*"))


class _Plain(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1).double()

    def predict_step(self, batch, batch_idx):
        return self.layer(batch[0])


def test_a_reused_trainer_leaves_other_modules_alone(tmp_path, make, trained):
    _, _, test, _ = trained
    module = make(tmp_path / "out")
    trainer = _trainer(tmp_path)
    trainer.predict(module, DataLoader(test, batch_size=4))
    writer = module._writer
    manifest = json.dumps(read_manifest(tmp_path / "out"), sort_keys=True)
    outputs = trainer.predict(_Plain(), DataLoader(test, batch_size=4))  # the writer is still among the callbacks
    assert writer in trainer.callbacks
    assert [o.shape for o in outputs] == [torch.Size([4, 1]), torch.Size([3, 1])]
    assert writer.result is module.result  # untouched by the other run
    assert json.dumps(read_manifest(tmp_path / "out"), sort_keys=True) == manifest
    assert not any(isinstance(o, BatchInfluence) for o in outputs)


def test_subsets_keep_the_users_original_indices(tmp_path, trained):
    """Nested Subsets for both sets: positions stay as given, the original indices are the hand-mapped ones."""
    from torch.utils.data import Subset

    model, train, test, _ = trained
    reversed_train = Subset(train, list(range(39, -1, -1)))  # position p -> 39 - p
    train_subset = Subset(reversed_train, list(range(0, 20, 2)))  # position q -> 39 - 2q
    test_subset = Subset(Subset(test, [6, 5, 4, 3]), [3, 1])  # position 0 -> 3, position 1 -> 5
    ihvp = LiSSA(damping=0.05, scale=10.0, recursion_depth=20, num_repeats=1, batch_size=4, seed=3)
    module = InfluenceModule(
        model, train_dataset=train_subset, ihvp=ihvp, num_candidates=None, output_dir=tmp_path / "out"
    )
    _trainer(tmp_path).predict(module, DataLoader(test_subset, batch_size=2))
    for result in (module.result, InfluenceResult.load(tmp_path / "out")):
        assert result.test_indices.tolist() == [0, 1]
        assert result.original_test_indices.tolist() == [3, 5]
        assert sorted(result.candidate_indices[0].tolist()) == list(range(10))
        expected = [[39 - 2 * q for q in row] for row in result.candidate_indices.tolist()]
        assert result.original_candidate_indices.tolist() == expected
        assert result.manifest["index_space"]["train_chain"] == ["Subset", "Subset", type(train).__name__]
