"""InfluenceResult and BatchInfluence: ordering, rankings, safe save/load, long table, merging, errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lightning_fastif.errors import SnapshotError, SnapshotNotFoundError
from lightning_fastif.io.atomic import write_manifest
from lightning_fastif.io.results import BatchInfluence, InfluenceResult, jsonable


@pytest.fixture
def result():
    # test points given out of order: 7, 2; scores in float64 to check the dtype survives a round trip
    return InfluenceResult(
        torch.tensor([7, 2]),
        torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]]),
        torch.tensor([[0.5, -1.0, 2.0, 0.0], [-0.1, -0.3, 0.2, 0.2]], dtype=torch.float64),
        {"top_k": 2, "settings": {"num_candidates": 4}, "timings": {"total_seconds": {"s_test": 1.5}}},
    )


def test_rows_sorted_by_test_index_and_rankings(result):
    assert result.test_indices.tolist() == [2, 7]
    assert result.candidate_indices[0].tolist() == [20, 21, 22, 23]
    assert (result.num_test, result.num_candidates, len(result)) == (2, 4, 2)
    helpful = result.top_helpful(7)  # n defaults to the run's top_k (2)
    assert helpful.indices.tolist() == [12, 10]
    assert helpful.scores.tolist() == [2.0, 0.5]
    assert result.top_harmful(7, 3).indices.tolist() == [11, 13, 10]
    # ties keep candidate order (nearest neighbour first)
    assert result.top_helpful(2, 2).indices.tolist() == [22, 23]
    with pytest.raises(KeyError, match="t: test index 5 is not in this result"):
        result.top_helpful(5)
    with pytest.raises(ValueError, match="n: expected a positive integer"):
        result.top_helpful(2, 0)


def test_save_load_round_trip_is_safetensors_and_json(tmp_path, result):
    result.save(tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["manifest.json", "result.safetensors"]
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["num_test"] == 2
    assert manifest["timings"]["total_seconds"]["s_test"] == 1.5
    loaded = InfluenceResult.load(tmp_path / "r")
    assert loaded.equals(result)
    assert loaded.scores.dtype == torch.float64
    assert loaded.top_helpful(7).indices.tolist() == [12, 10]


def test_load_errors(tmp_path, result):
    with pytest.raises(SnapshotNotFoundError):
        InfluenceResult.load(tmp_path / "nothing")
    write_manifest(tmp_path / "other", {"format": "something else"})
    with pytest.raises(SnapshotError, match="not an influence result"):
        InfluenceResult.load(tmp_path / "other")
    write_manifest(tmp_path / "running", {"format": "lightning_fastif.influence", "status": "running"})
    with pytest.raises(SnapshotError, match="did not complete .*same output_dir"):
        InfluenceResult.load(tmp_path / "running")


@pytest.mark.parametrize(
    "name",
    ["../other_run/result.safetensors", "/tmp/result.safetensors", "sub/result.safetensors", "..\\result.safetensors"],
)
def test_load_refuses_a_manifest_file_outside_its_directory(tmp_path, result, name):
    # A complete result next door, which a manifest pointing outside its directory would otherwise load.
    result.save(tmp_path / "other_run")
    (tmp_path / "sub").mkdir()
    result.save(tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    manifest["file"] = name
    write_manifest(tmp_path / "run", manifest)
    message = f"manifest {tmp_path / 'run' / 'manifest.json'}: field 'file' must be a plain file name"
    with pytest.raises(SnapshotError, match=re.escape(message)):
        InfluenceResult.load(tmp_path / "run")


def test_to_pandas_long_table(result):
    table = result.to_pandas()
    assert list(table.columns) == ["test_index", "rank", "train_index", "score"]
    assert len(table) == 8
    first = table[table.test_index == 7]
    assert first["rank"].tolist() == [1, 2, 3, 4]
    assert first["train_index"].tolist() == [12, 10, 13, 11]
    assert first["score"].tolist() == [2.0, 0.5, 0.0, -1.0]
    assert table["test_index"].tolist()[:4] == [2, 2, 2, 2]


def test_validation_of_pairs_and_shapes():
    with pytest.raises(ValueError, match=r"test_indices: \[3\] appear more than once"):
        InfluenceResult(torch.tensor([3, 3]), torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"candidate_indices: test points \[1\] list a candidate more than once"):
        InfluenceResult(torch.tensor([0, 1]), torch.tensor([[0, 1], [4, 4]]), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="same shape"):
        InfluenceResult(torch.tensor([0]), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="test_indices: 2 test points, but candidate_indices has 1 rows"):
        InfluenceResult(torch.tensor([0, 1]), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2))


def test_merge_sorts_and_refuses_duplicates(result):
    other = InfluenceResult(torch.tensor([4]), torch.tensor([[1, 2, 3, 4]]), torch.ones(1, 4, dtype=torch.float64))
    merged = InfluenceResult.merge([result, other])
    assert merged.test_indices.tolist() == [2, 4, 7]
    with pytest.raises(ValueError, match="appear more than once"):
        InfluenceResult.merge([result, result])
    narrow = InfluenceResult(torch.tensor([9]), torch.tensor([[1]]), torch.ones(1, 1))
    with pytest.raises(ValueError, match="different numbers of candidates"):
        InfluenceResult.merge([result, narrow])
    with pytest.raises(ValueError, match="nothing to merge"):
        InfluenceResult.merge([])


def test_batch_influence_and_jsonable():
    batch = BatchInfluence(torch.tensor([[4, 7, 9]]), torch.tensor([[0.5, -2.0, 1.0]]))
    assert batch.top_helpful(0, 2).indices.tolist() == [9, 4]
    assert batch.top_harmful(0, None).scores.tolist() == [-2.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="same shape"):
        BatchInfluence(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 3))
    assert jsonable({"t": torch.tensor([1.0, 2.0]), "inf": float("inf"), 3: (None, True)}) == {
        "t": [1.0, 2.0],
        "inf": "inf",
        "3": [None, True],
    }
    assert "InfluenceResult(num_test=1, num_candidates=3)" in InfluenceResult(
        torch.tensor([0]), batch.candidates, batch.scores
    ).summary(n=1)


def test_summary_labels_helpful_and_harmful_by_sign():
    all_positive = InfluenceResult(torch.tensor([0]), torch.tensor([[4, 7, 9]]), torch.tensor([[0.5, 2.0, 1.0]]))
    line = all_positive.summary(n=2).splitlines()[1]
    assert line == "  test 0: helpful 7(+2), 9(+1) | harmful none"
    mixed = InfluenceResult(torch.tensor([3]), torch.tensor([[4, 7, 9]]), torch.tensor([[0.5, -2.0, -1.0]]))
    assert mixed.summary(n=5).splitlines()[1] == "  test 3: helpful 4(+0.5) | harmful 7(-2), 9(-1)"


# -- index spaces: Subsets give back the indices the user knows ------------------------------------------------------
def _nested_subsets():
    from torch.utils.data import Subset, TensorDataset

    base = TensorDataset(torch.arange(20).float())
    inner = Subset(base, [19, 17, 15, 13, 11, 9, 7, 5])  # positions 0..7 -> 19, 17, ..., 5
    outer = Subset(inner, [6, 0, 3, 5])  # positions 0..3 -> inner 6, 0, 3, 5 -> base 7, 19, 13, 9
    return base, inner, outer


def test_original_index_map_unwraps_nested_subsets_exactly():
    from lightning_fastif.io.results import original_index_map

    base, inner, outer = _nested_subsets()
    assert original_index_map(base) is None
    index_map, chain = original_index_map(outer)
    assert index_map.tolist() == [7, 19, 13, 9]
    assert chain == ["Subset", "Subset", "TensorDataset"]
    assert original_index_map(inner)[0].tolist() == [19, 17, 15, 13, 11, 9, 7, 5]


def test_with_original_indices_maps_train_and_test_and_round_trips(tmp_path):
    from torch.utils.data import Subset

    base, inner, outer = _nested_subsets()
    test_set = Subset(base, [4, 2, 0])  # positions 0..2 -> base 4, 2, 0
    r = InfluenceResult(
        torch.tensor([2, 0]),
        torch.tensor([[3, 1], [0, 2]]),
        torch.tensor([[0.5, -1.0], [2.0, 0.25]]),
        {"top_k": 2},
    ).with_original_indices(outer, test_set)
    assert r.test_indices.tolist() == [0, 2]  # still positions in the given test set
    assert r.candidate_indices.tolist() == [[0, 2], [3, 1]]
    assert r.original_test_indices.tolist() == [4, 0]
    assert r.original_candidate_indices.tolist() == [[7, 13], [9, 19]]
    assert r.has_original_indices
    assert r.manifest["index_space"] == {
        "test_indices": "given",
        "candidate_indices": "given",
        "original_test_indices": "original",
        "test_chain": ["Subset", "TensorDataset"],
        "original_candidate_indices": "original",
        "train_chain": ["Subset", "Subset", "TensorDataset"],
    }
    r.save(tmp_path)
    back = InfluenceResult.load(tmp_path)
    assert back.original_test_indices.tolist() == [4, 0]
    assert back.original_candidate_indices.tolist() == [[7, 13], [9, 19]]
    merged = InfluenceResult.merge([back])
    assert merged.original_candidate_indices.tolist() == [[7, 13], [9, 19]]
    text = r.summary(n=2)
    assert "indices: original" in text
    assert "test 4: helpful 7(+2), 13(+0.25) | harmful none" in text
    assert "test 0: helpful 9(+0.5) | harmful 19(-1)" in text


def test_without_subsets_original_indices_are_the_given_ones():
    r = InfluenceResult(torch.tensor([1]), torch.tensor([[5, 3]]), torch.tensor([[1.0, -1.0]]))
    same = r.with_original_indices(torch.utils.data.TensorDataset(torch.zeros(6)), None)
    assert same is r
    assert not r.has_original_indices
    assert r.original_candidate_indices.tolist() == [[5, 3]]
    assert "original" not in r.summary()
    assert "index_space" not in r.manifest


def test_to_pandas_adds_original_columns_for_subsets():
    pytest.importorskip("pandas")
    _, _, outer = _nested_subsets()
    r = InfluenceResult(torch.tensor([0]), torch.tensor([[1, 2]]), torch.tensor([[-1.0, 3.0]]))
    table = r.with_original_indices(outer).to_pandas()
    assert table.columns.tolist() == [
        "test_index",
        "rank",
        "train_index",
        "score",
        "original_test_index",
        "original_train_index",
    ]
    assert table["train_index"].tolist() == [2, 1]
    assert table["original_train_index"].tolist() == [13, 19]
    assert table["original_test_index"].tolist() == [0, 0]
    with pytest.raises(ValueError, match="original_candidate_indices"):
        InfluenceResult(torch.tensor([0]), torch.tensor([[1, 2]]), torch.ones(1, 2), original_candidate_indices=[1])
