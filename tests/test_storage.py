"""atomic.py (atomic safetensors + manifest), snapshot_store.py (the snapshot layout, runs, hostile manifests) and
distributed.py (collectives under gloo)."""

from __future__ import annotations

import json
import os
import re
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_fastif.errors import SnapshotError, SnapshotNotFoundError
from lightning_fastif.io.atomic import (
    atomic_write_bytes,
    is_plain_name,
    load_tensors,
    read_manifest,
    read_tensor_metadata,
    save_tensors,
    write_manifest,
)
from lightning_fastif.io.snapshot_store import (
    apply_checkpoint,
    checkpoint_file,
    empty_snapshot_manifest,
    feature_file,
    last_layer_hessian_file,
    load_checkpoint,
    read_feature_snapshot,
    read_snapshot_manifest,
    record_version,
    resolve_version,
    snapshot_versions,
    start_run,
    version_name,
)
from lightning_fastif.lightning.distributed import (
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_object,
    gather_uneven,
    rank,
    world_size,
)
from lightning_fastif.search.knn import KNNIndex


def _leftovers(path):
    return [p.name for p in path.rglob("*") if p.name.endswith(".tmp")]


def test_save_load_round_trip_keeps_values_dtypes_and_metadata(tmp_path):
    tensors = {
        "features": torch.randn(7, 3),
        "indices": torch.arange(7),
        "half": torch.randn(4).half(),
        "flags": torch.tensor([True, False]),
    }
    path = save_tensors(tmp_path / "sub" / "t.safetensors", tensors, {"epoch": "2"})
    loaded = load_tensors(path)
    assert set(loaded) == set(tensors)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype
        assert torch.equal(loaded[name], value)
    assert read_tensor_metadata(path) == {"epoch": "2"}
    assert _leftovers(tmp_path) == []


def test_save_tensors_copies_shared_and_strided_tensors(tmp_path):
    base = torch.randn(4, 4)
    tied = {"a": base, "b": base, "col": base[:, 1], "view": base[:2]}
    loaded = load_tensors(save_tensors(tmp_path / "tied.safetensors", tied))
    assert torch.equal(loaded["b"], base)
    assert torch.equal(loaded["col"], base[:, 1])
    assert torch.equal(loaded["view"], base[:2])


def test_atomic_write_leaves_old_file_and_no_tmp_on_failure(tmp_path):
    target = tmp_path / "t.safetensors"
    save_tensors(target, {"x": torch.ones(2)})
    with pytest.raises(TypeError, match="tensors\\['y'\\]"):
        save_tensors(target, {"x": torch.zeros(2), "y": [1, 2]})
    assert torch.equal(load_tensors(target)["x"], torch.ones(2))
    assert _leftovers(tmp_path) == []
    atomic_write_bytes(tmp_path / "b.bin", b"abc")
    assert (tmp_path / "b.bin").read_bytes() == b"abc"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "t.safetensors"]


def test_load_tensors_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_tensors(missing)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00\x01garbage")
    with pytest.raises(SnapshotError, match="corrupted.*broken.safetensors"):
        load_tensors(broken)
    good = save_tensors(tmp_path / "good.safetensors", {"x": torch.randn(100)})
    good.write_bytes(good.read_bytes()[:-50])  # truncated
    with pytest.raises(SnapshotError, match="good.safetensors"):
        load_tensors(good)


def test_manifest_round_trip_and_errors(tmp_path):
    write_manifest(tmp_path, {"latest": "v1", "versions": {"v1": {"n": 3}}})
    assert read_manifest(tmp_path) == {"latest": "v1", "versions": {"v1": {"n": 3}}}
    assert _leftovers(tmp_path) == []
    with pytest.raises(SnapshotNotFoundError, match="snapshot directory not found"):
        read_manifest(tmp_path / "absent")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(SnapshotError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps([1, 2]))
    with pytest.raises(SnapshotError, match="expected an object"):
        read_manifest(tmp_path)


def _fake_snapshot(tmp_path):
    """A manifest of format version 1: file fields hold the path relative to the snapshot directory."""
    manifest = empty_snapshot_manifest()
    for step, name in [(4, "epoch=0-step=4"), (8, "epoch=1-step=8")]:
        save_tensors(tmp_path / "checkpoints" / f"{name}.safetensors", {"bias": torch.tensor([float(step)])})
        manifest["checkpoints"]["versions"][name] = {
            "file": f"checkpoints/{name}.safetensors",
            "global_step": step,
            "epoch": step // 4 - 1,
        }
    manifest["checkpoints"]["latest"] = "epoch=1-step=8"
    save_tensors(
        tmp_path / "features" / "v" / "train.safetensors", {"features": torch.randn(5, 2), "indices": torch.arange(5)}
    )
    manifest["features"]["versions"]["v"] = {
        "global_step": 8,
        "datasets": {"train": {"file": "features/v/train.safetensors", "n": 5, "dim": 2}},
    }
    manifest["features"]["latest"] = "v"
    write_manifest(tmp_path, manifest)


def test_snapshot_layout_readers(tmp_path):
    _fake_snapshot(tmp_path)
    assert resolve_version(tmp_path, "checkpoints")["version"] == "epoch=1-step=8"
    assert resolve_version(tmp_path, "checkpoints", 0)["version"] == "epoch=0-step=4"
    loaded = load_checkpoint(tmp_path, "all")
    assert [float(w["bias"]) for w, _ in loaded] == [4.0, 8.0]
    assert [e["version"] for _, e in load_checkpoint(tmp_path, ["epoch=0-step=4", -1])] == [
        "epoch=0-step=4",
        "epoch=1-step=8",
    ]
    net = torch.nn.Linear(2, 1)
    apply_checkpoint(net, loaded[0][0])
    assert net.bias.item() == 4.0
    with pytest.raises(KeyError, match="not found in Linear"):
        apply_checkpoint(net, {"nope": torch.zeros(1)})
    features, indices, entry = read_feature_snapshot(tmp_path)
    assert features.shape == (5, 2)
    assert indices.tolist() == [0, 1, 2, 3, 4]
    assert entry["version"] == "v"
    with pytest.raises(SnapshotNotFoundError, match="available: \\['train'\\]"):
        read_feature_snapshot(tmp_path, dataset="val")
    with pytest.raises(SnapshotNotFoundError, match="'missing' not found.*epoch=0-step=4"):
        load_checkpoint(tmp_path, "missing")
    with pytest.raises(SnapshotNotFoundError, match="position 5 out of range"):
        load_checkpoint(tmp_path, 5)
    (tmp_path / "features" / "v" / "train.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="train.safetensors"):
        read_feature_snapshot(tmp_path)


def _weights(value):
    return {"bias": torch.tensor([float(value)])}


def _write_checkpoint(dirpath, epoch, step, run, run_index=0):
    version = version_name(epoch, step, run_index)
    path = save_tensors(checkpoint_file(dirpath, version), _weights(step))
    record_version(
        dirpath, "checkpoints", version, {"file": path.name, "epoch": epoch, "global_step": step, "run_id": run}
    )
    return version


def test_runs_are_kept_apart(tmp_path):
    assert start_run(tmp_path, "checkpoints", "a") == 0  # nothing there yet: no manifest written
    assert not (tmp_path / "manifest.json").exists()
    for epoch in range(3):
        _write_checkpoint(tmp_path, epoch, 4 * (epoch + 1), "a")
    assert start_run(tmp_path, "checkpoints", "b") == 1
    # From the start of run b, "latest" and "all" see run b only (none yet), while run a stays readable by name.
    with pytest.raises(SnapshotNotFoundError, match="no version of the current run"):
        load_checkpoint(tmp_path, "all")
    assert float(load_checkpoint(tmp_path, "epoch=2-step=12")[0][0]["bias"]) == 12.0
    for epoch in range(2):
        _write_checkpoint(tmp_path, epoch, 4 * (epoch + 1), "b", run_index=1)
    loaded = load_checkpoint(tmp_path, "all")
    assert [e["version"] for _, e in loaded] == ["epoch=0-step=4-run=1", "epoch=1-step=8-run=1"]
    assert resolve_version(tmp_path, "checkpoints")["version"] == "epoch=1-step=8-run=1"
    assert resolve_version(tmp_path, "checkpoints", 0)["version"] == "epoch=0-step=4-run=1"
    assert len(snapshot_versions(tmp_path, "checkpoints", all_runs=True)) == 5
    # Run a resumed: its own versions again, and its position kept.
    assert start_run(tmp_path, "checkpoints", "a") == 0
    assert [e["version"] for _, e in load_checkpoint(tmp_path, "all")] == [
        "epoch=0-step=4",
        "epoch=1-step=8",
        "epoch=2-step=12",
    ]
    manifest = read_snapshot_manifest(tmp_path)
    assert (manifest["format_version"], manifest["checkpoints"]["runs"], manifest["checkpoints"]["run"]) == (
        2,
        ["a", "b"],
        "a",
    )
    assert manifest["features"]["runs"] == []  # runs are counted per kind


def test_format_1_sections_count_their_runs(tmp_path):
    _fake_snapshot(tmp_path)  # format 1: no runs recorded, entries without run_id
    assert start_run(tmp_path, "checkpoints", "new") == 1
    assert start_run(tmp_path, "features", "new") == 1
    with pytest.raises(SnapshotNotFoundError):
        load_checkpoint(tmp_path)
    assert resolve_version(tmp_path, "features", "v")["version"] == "v"  # by name, still readable


def _hostile(tmp_path, where, value):
    """A valid snapshot whose manifest then gets ``value`` at ``where``; a real tensor file lies outside it."""
    snap = tmp_path / "snap"
    save_tensors(tmp_path / "other_run" / "x.safetensors", {"features": torch.ones(5, 2), "indices": torch.arange(5)})
    save_tensors(checkpoint_file(snap, "v"), _weights(1))
    record_version(snap, "checkpoints", "v", {"file": "v.safetensors", "global_step": 1})
    KNNIndex(torch.zeros(5, 2), backend="torch").save(feature_file(snap, "v", "train").parent, "train")
    save_tensors(feature_file(snap, "v", "last_layer_hessian"), {"last_layer_hessian": torch.eye(2)})
    features = {
        "global_step": 1,
        "datasets": {"train": {"file": "train.safetensors", "index_file": None, "n": 5, "dim": 2}},
        "last_layer_hessian": {"file": "last_layer_hessian.safetensors"},
    }
    record_version(snap, "features", "v", features)
    manifest = read_manifest(snap)
    if where == "version":
        manifest["checkpoints"]["versions"][value] = manifest["checkpoints"]["versions"].pop("v")
    elif where == "checkpoint":
        manifest["checkpoints"]["versions"]["v"]["file"] = value
    elif where == "dataset":
        manifest["features"]["versions"]["v"]["datasets"]["train"]["file"] = value
    elif where == "index_file":
        manifest["features"]["versions"]["v"]["datasets"]["train"]["index_file"] = value
    else:
        manifest["features"]["versions"]["v"]["last_layer_hessian"]["file"] = value
    write_manifest(snap, manifest)
    return snap


HOSTILE = [
    "../other_run/x.safetensors",
    str(os.path.abspath("/tmp/x.safetensors")),
    "sub/x.safetensors",
    "..",
    "..\\x.safetensors",
    "features/v/../../other_run/x.safetensors",  # a format-1 path that leaves its place
    3,
]
FIELDS = {
    "checkpoint": "checkpoints.versions['v'].file",
    "dataset": "features.versions['v'].datasets['train'].file",
    "index_file": "features.versions['v'].datasets['train'].index_file",
    "hessian": "features.versions['v'].last_layer_hessian.file",
}


@pytest.mark.parametrize("value", HOSTILE, ids=str)
@pytest.mark.parametrize("where", sorted(FIELDS))
def test_hostile_manifests_name_the_manifest_and_the_field(tmp_path, where, value):
    snap = _hostile(tmp_path, where, value)
    message = re.escape(f"manifest {snap / 'manifest.json'}: field {FIELDS[where]!r} must be a plain file name")
    # Every reader checks the whole manifest before it opens anything (the file outside would load fine).
    for read in (
        lambda: load_checkpoint(snap),
        lambda: read_feature_snapshot(snap),
        lambda: KNNIndex.from_snapshot(snap),
        lambda: resolve_version(snap, "features"),
    ):
        with pytest.raises(SnapshotError, match=message):
            read()
    if where == "hessian":  # the entry as a reader holds it, checked again where the path is made
        with pytest.raises(SnapshotError, match=message):
            last_layer_hessian_file(snap, {"version": "v", "last_layer_hessian": {"file": value}})
    # Writers refuse it as well: no new version is recorded into such a manifest.
    with pytest.raises(SnapshotError, match=message):
        record_version(snap, "checkpoints", "w", {"file": "w.safetensors", "global_step": 2})


@pytest.mark.parametrize("value", ["../v", "/abs", "a/b", ".."])
def test_hostile_version_names(tmp_path, value):
    snap = _hostile(tmp_path, "version", value)
    message = f"field 'checkpoints.versions' holds the version name {value!r}"
    with pytest.raises(SnapshotError, match=re.escape(message)):
        snapshot_versions(snap, "checkpoints")
    with pytest.raises(ValueError, match="version: expected a plain file name"):
        checkpoint_file(snap, value)
    with pytest.raises(ValueError, match="dataset: expected a plain file name"):
        feature_file(snap, "v", value)
    with pytest.raises(SnapshotError, match=re.escape(f"field 'features.versions' holds the version name {value!r}")):
        record_version(tmp_path / "fresh", "features", value, {"datasets": {}})
    assert not (tmp_path / "fresh").exists()


def test_plain_names():
    good = ["a.safetensors", "epoch=0-step=4", "train", "x..y"]
    bad = ["", ".", "..", "../a", "a/b", "/a", "a\\b", "C:\\a", "a\x00b", None, 3]
    assert [is_plain_name(v) for v in good] == [True] * len(good)
    assert [is_plain_name(v) for v in bad] == [False] * len(bad)
    # Format-1 file fields hold exactly the layout's path: still accepted, and read from the same place.
    assert empty_snapshot_manifest()["format_version"] == 2


def test_collectives_are_identities_without_a_process_group():
    t = torch.tensor([[1.0, 2.0]])
    assert world_size() == 1
    assert rank() == 0
    barrier()
    assert torch.equal(gather_uneven(t), t)
    assert torch.equal(all_reduce_sum(t), t)
    assert all_reduce_mean(torch.tensor([3])).tolist() == [3.0]
    assert broadcast_object("x") == "x"
    with pytest.raises(ValueError, match="at least one dimension"):
        gather_uneven(torch.tensor(1.0))


def _collectives_worker(proc: int, world: int, init_file: str, out_dir: str) -> None:
    """Run the collectives of ``lightning_fastif.lightning.distributed`` under gloo and save each rank's results."""
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=proc, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        # Rank r holds rows [10r, 10r + 3r + 1): sizes 1 and 4, each row tagged with its global position.
        rows = 3 * proc + 1
        local = torch.arange(rows * 2, dtype=torch.float32).view(rows, 2) + 100 * proc
        gathered = gather_uneven(local)
        empty_ok = gather_uneven(torch.arange(3) if proc == 0 else torch.empty(0))
        try:
            gather_uneven(torch.zeros(2, 3 + proc))
            mismatch = "no error"
        except ValueError as err:
            mismatch = str(err)
        results = {
            "gathered": gathered,
            "empty_ok": empty_ok,
            "sum": all_reduce_sum(torch.tensor([float(proc + 1)])),
            "mean": all_reduce_mean(torch.tensor([proc + 1])),
            "broadcast": broadcast_object({"who": f"rank{proc}"}),
            "mismatch": mismatch,
        }
        torch.save(results, os.path.join(out_dir, f"rank{proc}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_collectives_under_two_gloo_processes(tmp_path):
    mp.spawn(_collectives_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    expected = torch.cat([torch.arange(2, dtype=torch.float32).view(1, 2), torch.arange(8.0).view(4, 2) + 100])
    for res in results:
        assert torch.equal(res["gathered"], expected)  # sizes 1 and 4, rank order, padding trimmed
        assert res["empty_ok"].tolist() == [0, 1, 2]  # an empty rank with another shape and dtype
        assert res["sum"].tolist() == [3.0]
        assert res["mean"].tolist() == [1.5]
        assert res["broadcast"] == {"who": "rank0"}
        assert "same trailing shape" in res["mismatch"]  # raised on both ranks, so neither hangs
