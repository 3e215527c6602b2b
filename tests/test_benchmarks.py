"""The benchmark suite at tiny settings: every module runs, returns the contract's keys, and its metrics are right."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types

import pytest
import torch

from benchmarks import bench_engine, bench_peers, bench_quality, run_all
from benchmarks.common import (
    HEADLINE_KEYS,
    PEER_KEYS,
    fmt,
    goal,
    interleaved,
    jsonable,
    markdown_table,
    pearson,
    spearman,
    write_atomic,
)


# -- common ---------------------------------------------------------------------------------------------------------
def test_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, generator=g, dtype=torch.float64)
    b = a + 0.5 * torch.randn(50, generator=g, dtype=torch.float64)
    ties = torch.tensor([1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    other = torch.tensor([3.0, 1.0, 2.0, 4.0, 6.0, 5.0, 7.0])
    assert pearson(a, b) == pytest.approx(stats.pearsonr(a.numpy(), b.numpy())[0], abs=1e-10)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a.numpy(), b.numpy())[0], abs=1e-10)
    assert spearman(ties, other) == pytest.approx(stats.spearmanr(ties.numpy(), other.numpy())[0], abs=1e-10)
    assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"b: expected the shape of a \(2,\), got \(3,\)"):
        pearson([1.0, 2.0], [1.0, 2.0, 3.0])


def test_tables_verdicts_and_files(tmp_path):
    assert markdown_table(["a", "b"], [[1, None], ["x|y", float("nan")]]).splitlines()[2:] == [
        "| 1 | — |",
        "| x\\|y | — |",
    ]
    with pytest.raises(ValueError, match="rows: a row has 1 cells, the table has 2 columns"):
        markdown_table(["a", "b"], [[1]])
    assert fmt(0.5) == "0.5"
    assert fmt(123456.0) == "1.23e+05"
    assert fmt(True) == "yes"
    assert goal(0.6, 0.5) == "met"
    assert goal(0.4, 0.5) == "NOT met"
    assert goal(None, 0.5) == "not measured"
    assert goal(3.0, 4.0, at_least=False) == "met"
    assert goal(5.0, 4.0, at_least=False) == "NOT met"
    assert jsonable({"x": torch.tensor([1.0, float("nan")]), "y": float("inf")}) == {"x": [1.0, None], "y": None}
    path = write_atomic(tmp_path / "sub" / "out.txt", "hello")
    assert path.read_text() == "hello"
    assert [p.name for p in path.parent.iterdir()] == ["out.txt"]
    timings = interleaved({"a": lambda: None, "b": lambda: sum(range(100))}, repeats=3, warmup=1)
    assert [len(t.times) for t in timings.values()] == [3, 3]


# -- quality metrics on known answers ---------------------------------------------------------------------------------
def test_quality_metrics_on_known_answers():
    task = bench_quality.loo_task(True)
    n = len(task.train)
    perfect = task.truth["loo_delta"] * n
    assert bench_quality.loo_correlation(task, perfect)["loo_pearson"] == pytest.approx(1.0)
    assert bench_quality.loo_correlation(task, -perfect)["loo_pearson"] == pytest.approx(-1.0)

    mis = bench_quality.mislabel_task(True)
    flags = torch.zeros(len(mis.train), dtype=torch.float64)
    flags[mis.truth["flipped"]] = 1.0
    assert bench_quality.mislabel_fraction(mis, flags)["mislabel_top10_fraction"] == 1.0
    assert bench_quality.mislabel_fraction(mis, -flags)["mislabel_top10_fraction"] == 0.0

    lds = bench_quality.lds_task(True)
    masks = lds.truth["masks"].to(torch.float64)
    # Known answer: outputs that are exactly linear in the subset masks (random weights, so no ties among the few
    # subsets of the smoke setting; retrained outputs can tie there and make the ranks ambiguous). The task is cached
    # (lru_cache): work on a copy so later tests see the real outputs.
    exact = torch.randn(lds.truth["outputs"].shape[1], masks.shape[1], dtype=torch.float64)
    lds = dataclasses.replace(lds, truth={**lds.truth, "outputs": masks @ exact.T})
    assert bench_quality.linear_datamodeling_score(lds, exact)["lds"] == pytest.approx(1.0)
    assert bench_quality.linear_datamodeling_score(lds, -exact)["lds"] == pytest.approx(-1.0)


# -- each module at its smoke setting -------------------------------------------------------------------------------
def _check_contract(out: dict) -> None:
    assert set(out) >= {"name", "title", "headline", "markdown", "details"}
    assert out["markdown"].lstrip().startswith(("|", "Ground", "Candidate", "The same"))
    assert "| --- |" in out["markdown"]
    json.dumps(jsonable(out["details"]))  # details are JSON-serialisable


def test_engine_smoke():
    out = bench_engine.run(smoke=True, threads=1)
    _check_contract(out)
    assert set(out["headline"]) == {"grad_throughput_ratio", "stest_64_vs_1"}
    assert out["headline"]["grad_throughput_ratio"] > 0
    rows = out["details"]["throughput"]
    assert [r["params"] for r in rows][:2] == [84060, 20490]
    for r in rows:
        assert r["train_per_s"] > 0
        assert r["jvp_per_s"] > 0
        assert r["vmap_per_s"] > 0
    assert all(r["ratio"][1] == 1.0 and r["seconds"][4] > 0 for r in out["details"]["stest"])


def test_quality_smoke_ranks_methods_correctly():
    out = bench_quality.run(smoke=True, threads=1)
    _check_contract(out)
    assert set(out["headline"]) == set(bench_quality.QUALITY_KEYS)
    by_name = {m["name"]: m for m in out["details"]["methods"]}
    assert all(not m["errors"] for m in by_name.values()), {n: m["errors"] for n, m in by_name.items()}
    exact, lissa = by_name["ours: exact inverse"], by_name["ours: LiSSA (FastIF)"]
    random = by_name["random"]
    # Numbers that would be wrong if a sign, a metric or the engine were wrong.
    assert exact["loo_pearson"] > 0.9
    assert lissa["loo_pearson"] > 0.8
    assert abs(random["loo_pearson"]) < 0.5
    assert exact["lds"] > random["lds"] + 0.2
    assert exact["mislabel_top10_fraction"] >= 0.5 > random["mislabel_top10_fraction"] + 0.2
    assert out["headline"]["loo_pearson"] == lissa["loo_pearson"]


@pytest.mark.slow
def test_peers_smoke():
    out = bench_peers.run(smoke=True, threads=1)
    _check_contract(out)
    peers = out["headline"]["peers"]
    assert set(peers) == {p.name for p in bench_peers.PEERS}
    for name, figures in peers.items():
        assert set(figures) == set(PEER_KEYS), name
    methods = {m["name"]: m for m in out["details"]["methods"]}
    for peer in bench_peers.PEERS:
        m = methods[peer.name]
        # Either a peer ran and its LOO correlation is positive, or the table says why it did not.
        assert (m["loo_pearson"] is not None and m["loo_pearson"] > 0) or m["errors"].get("loo"), m
    if all(not methods[p.name]["errors"] for p in bench_peers.PEERS):
        assert all(f["seconds_ratio"] is not None and f["seconds_ratio"] > 0 for f in peers.values())


@pytest.mark.slow
def test_bench_augmentation_smoke():
    from benchmarks import bench_augmentation

    out = bench_augmentation.run(smoke=True, threads=1)
    _check_contract(out)
    assert set(out["headline"]) == {"digits_margin", "tabular_margin"}
    assert out["markdown"].count("| influence-chosen |") == 2
    summary = out["details"]["summary"]
    for task, pool_size in (("digits", 270), ("tabular", 200)):
        rows = summary[task]
        assert [rows[s]["runs"] for s in bench_augmentation.SELECTIONS] == [1, 1, 1]
        # influence finds the pool's counter-examples of the cue; random points hold about the pool's share
        assert rows["helpful"]["counter_fraction_used"] >= 0.5 > rows["random"]["counter_fraction_used"]
        per_seed = out["details"][task]["per_seed"] if task == "digits" else out["details"][task]
        used = [i for s in per_seed for run in s["helpful"]["runs"] for i in run["used_indices"]]
        assert len(used) == 20
        assert 0 <= min(used) <= max(used) < pool_size  # pool indices


@pytest.mark.slow
def test_bench_scale_smoke():
    pytest.importorskip("kronfluence")
    from benchmarks import bench_scale

    out = bench_scale.run(smoke=True, threads=1)
    assert set(out) >= {"name", "title", "headline", "markdown", "details"}
    assert out["name"] == "scale"
    assert out["headline"] == {}
    assert "| --- |" in out["markdown"]
    json.dumps(out["details"])
    details = out["details"]
    assert set(details) >= {"machine", "sizes", "settings", "fit", "fastif", "self_influence"}
    assert "million" not in details  # only when asked for
    for part in ("fit", "fastif", "self_influence"):
        assert details[part]["notes"] == [], details[part]["notes"]  # no worker failed

    def finite(*values):
        assert all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values), values

    (n,) = details["sizes"]
    fit = details["fit"]["raw"][str(n)]
    finite(fit["plain"]["seconds"], fit["snapshot"]["seconds"], fit["time_ratio"], fit["peak_bound_mb"])
    finite(fit["time_ratio_in_run"])
    assert fit["time_ratio_in_run"] > 1.0  # the snapshot's own seconds are part of its fit
    finite(fit["plain"]["peak_rss_mb"], fit["snapshot"]["peak_rss_mb"])
    # 1290-d loss gradients (net.4: 128 x 10 + 10) stored as their factors: 10 + 128 float32 and an int64 index per
    # training point, plus the file's header.
    assert fit["snapshot"]["features_dim"] == 1290
    assert n * (138 * 4 + 8) < fit["snapshot"]["features_bytes"] < n * (138 * 4 + 8) + 2**16

    fastif = details["fastif"]["raw"][str(n)]
    finite(fastif["speedup"], fastif["fastif"]["seconds_per_point"], fastif["all"]["seconds_per_point"])
    k = details["settings"]["num_candidates"]
    assert fastif["fastif"]["candidates_per_point"] == 2 * k  # k likely helpful + k likely harmful
    assert fastif["all"]["candidates_per_point"] == n
    # Both runs use the same seeded LiSSA, so FastIF's scores are the all-N scores of its candidates.
    assert min(fastif["score_pearson_on_candidates"]) > 0.999
    assert 0 <= fastif["recall10"] <= 1
    assert len(fastif["per_point_recall10"]) == 4

    self_inf = details["self_influence"]["raw"]
    finite(self_inf["ours"]["seconds"], self_inf["kronfluence"]["seconds"], self_inf["time_ratio"])
    assert self_inf["reference"]["residual"] <= 10 * bench_scale.REFERENCE_TOL
    for key in ("ours", "kronfluence", "kronfluence_empirical"):
        # Every EK-FAC is a fair approximation of the damped Hessian's self-influence on this small model.
        assert 0.8 < self_inf["pearson"][key] <= 1.0, key


def test_missing_peer_is_a_row_not_a_crash(monkeypatch):
    monkeypatch.setattr(bench_peers.importlib.util, "find_spec", lambda name: None)
    result = bench_quality.evaluate(bench_peers.KronfluenceEKFAC(), smoke=True, tasks=("loo",))
    assert result["loo_pearson"] is None
    assert "kronfluence not installed" in result["errors"]["loo"]
    assert "install-bench" in result["errors"]["loo"]


# -- run_all --------------------------------------------------------------------------------------------------------
def _fake_module(monkeypatch, name: str, run) -> str:
    module = types.ModuleType(name)
    module.run = run
    monkeypatch.setitem(sys.modules, name, module)
    return name


def test_run_all_merges_modules_and_survives_failures(monkeypatch, tmp_path):
    def good(*, smoke=False):  # accepts no `threads`: run_all passes only what a module takes
        assert smoke is True
        return {
            "name": "fake",
            "title": "Fake",
            "headline": {"fastif_speedup": 120.0, "lds": 0.3, "peers": {"P": {"lds": 0.1, "seconds_ratio": 2.0}}},
            "markdown": "| a |\n| --- |\n| 1 |\n",
            "details": {"x": torch.tensor([1.0])},
        }

    def other_api(smoke=False, threads=1):  # another engineer's layout: "results" and "rows"
        return {"results": {"ddp2_speedup": 1.8, "lds": 0.9}, "rows": ["| b |", "| --- |", "| 2 |"]}

    def broken(**kwargs):
        raise RuntimeError("no GPU here")

    names = [
        _fake_module(monkeypatch, "fake_good", good),
        _fake_module(monkeypatch, "fake_other", other_api),
        _fake_module(monkeypatch, "fake_broken", broken),
    ]
    sections = [run_all.run_module(n, smoke=True, threads=1) for n in names]
    assert sections[2]["error"] == "RuntimeError: no GPU here"
    result = run_all.write_results(
        sections, tmp_path, command="python -m benchmarks.run_all --smoke", threads=1, smoke=True
    )
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == result
    assert set(HEADLINE_KEYS) <= set(on_disk)
    assert "peers" in on_disk
    assert on_disk["fastif_speedup"] == 120.0
    assert on_disk["ddp2_speedup"] == 1.8
    assert on_disk["lds"] == 0.3
    assert any("lds" in n for n in on_disk["notes"])
    assert on_disk["grad_throughput_ratio"] is None  # not measured: null
    assert on_disk["peers"] == {
        "P": {"loo_pearson": None, "lds": 0.1, "mislabel_top10_fraction": None, "seconds_ratio": 2.0}
    }
    text = (tmp_path / "RESULTS.md").read_text()
    assert "python -m benchmarks.run_all --smoke" in text
    assert "SMOKE RUN" in text
    assert "**Failed**: `RuntimeError: no GPU here`" in text
    assert "| b |" in text
    assert "| 1 |" in text
    assert "| `fastif_speedup` |" in text
    assert "| met |" in text
    assert "not measured" in text


def test_run_all_discovers_bench_modules():
    found = run_all.discover()
    assert {"benchmarks.bench_engine", "benchmarks.bench_quality", "benchmarks.bench_peers"} <= set(found)
    assert run_all.discover(only=["engine"]) == ["benchmarks.bench_engine"]
    assert "benchmarks.bench_peers" not in run_all.discover(skip=["peers"])
    with pytest.raises(ValueError, match="--only: unknown benchmark"):
        run_all.discover(only=["nope"])


def test_run_all_main_never_overwrites_full_results_with_a_smoke_run(monkeypatch, tmp_path):
    name = _fake_module(monkeypatch, "fake_main", lambda smoke=False: {"headline": {"lds": 0.5}, "markdown": "x"})
    monkeypatch.setattr(run_all, "discover", lambda only=None, skip=None: [name])
    written = []
    monkeypatch.setattr(run_all, "write_atomic", lambda path, text: written.append(path))
    result = run_all.main(["--smoke"])
    assert result["lds"] == 0.5
    assert written == []  # a smoke run without --out-dir writes nothing
    run_all.main(["--smoke", "--out-dir", str(tmp_path)])
    assert sorted(p.name for p in written) == ["RESULTS.md", "results.json"]
    assert {p.parent for p in written} == {tmp_path}


# -- the MiniLM rows and the GPU script -----------------------------------------------------------------------------
@pytest.mark.slow
def test_bench_correction_text_task_smoke():
    """The third task at its CI size (a random 2-layer BERT, one seed, 2 steps): its rows, one run per selection,
    and the guard never kept a correction that lowered the held-out accuracy."""
    pytest.importorskip("transformers")
    from benchmarks import bench_correction
    from lightning_fastif.errors import ArgumentError

    with pytest.raises(ArgumentError, match="tasks: expected one of"):
        bench_correction.run(smoke=True, tasks=("text", "speech"))
    out = bench_correction.run(smoke=True, threads=1, tasks=("text",))
    summary = out["details"]["summary"]
    assert set(summary) == {"text"}
    assert [line.split("|")[1].strip() for line in out["markdown"].splitlines()[2:6]] == ["text"] * 4
    for selection in bench_correction.SELECTIONS:
        assert summary["text"][selection]["runs"] == 1
        assert summary["text"][selection]["kept_lowering_holdout"] == 0
    (seed,) = out["details"]["text"]
    info = seed["text_info"]
    assert info["encoder"] == "tiny"
    assert info["sizes"]["train"] == bench_correction.TEXT_SMOKE["max_train"]
    assert info["influence_layers"] == 1
    assert set(out["headline"]) == {"text"}


@pytest.mark.slow
def test_bench_scale_minilm_part_smoke():
    """The ``minilm`` part at its CI size (a random 2-layer BERT): one worker, default settings, 4 test points, the
    stage breakdown adds up to at most the predict wall time."""
    pytest.importorskip("transformers")
    from benchmarks import bench_scale

    out = bench_scale.run(smoke=True, threads=1, parts=["minilm"])
    part = out["details"]["minilm"]
    assert part["notes"] == []
    raw = part["raw"]
    assert raw["encoder"] == "tiny"
    assert raw["num_test"] == bench_scale.SMOKE_MINILM_TEST
    assert raw["device"] == "cpu"
    stages = raw["stage_seconds"]
    assert set(bench_scale.STAGES) <= set(stages)
    assert 0 < sum(stages.values()) <= raw["seconds"]
    assert raw["seconds_per_point"] == pytest.approx(raw["seconds"] / raw["num_test"])
    assert 0 < raw["candidates_per_point"] <= bench_scale.SMOKE_MINILM_N
    assert "MiniLM (top layer + head) with the default settings" in out["markdown"]


def test_gpu_check_script_parses_and_prints_its_plan_in_a_dry_run(tmp_path):
    """``benchmarks/gpu_check.sh`` is valid bash; ``--dry-run`` prints every step and runs none; a bad argument
    fails with status 2."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    out_dir = tmp_path / "gpu"
    done = subprocess.run(
        ["bash", str(script), "--dry-run"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "OUT": str(out_dir)},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].endswith(f"results in {out_dir}")
    names = [line.split()[1] for line in lines[1:-2]]
    assert names == [
        "nvidia_smi",
        "gpu_tests",
        "engine_cuda",
        "faiss_gpu",
        "bench_scale_smoke",
        "bench_scale_minilm_smoke",
        "bench_scale_10k",
    ]
    total = sum(int(line.split("at most")[1].split()[0]) for line in lines[1:-2])
    assert lines[-2] == f"  at most {total} s in all"
    assert total <= 8 * 60
    assert "--device cuda" in done.stdout
    assert "-m gpu" in done.stdout
    assert lines[-1] == "dry run: nothing was run"
    assert not out_dir.exists()
    bad = subprocess.run(["bash", str(script), "--gpu"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "unknown argument: --gpu" in bad.stderr
