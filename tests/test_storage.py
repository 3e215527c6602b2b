"""storage.py (atomic safetensors + manifest, snapshot layout) and distributed.py (collectives under gloo)."""

from __future__ import annotations

import json
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_fastif.errors import SnapshotError, SnapshotNotFoundError
from lightning_fastif.io.atomic import (
    atomic_write_bytes,
    load_tensors,
    read_manifest,
    read_tensor_metadata,
    save_tensors,
    write_manifest,
)
from lightning_fastif.io.snapshot_store import apply_checkpoint, load_checkpoint, read_feature_snapshot, resolve_version
from lightning_fastif.lightning.distributed import (
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_object,
    gather_uneven,
    rank,
    world_size,
)


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
    from lightning_fastif.io.snapshot_store import empty_snapshot_manifest

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
