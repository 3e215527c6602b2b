"""Every example runs at its smallest setting (CI smoke tests)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(args, cwd, timeout=900):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quickstart(tmp_path):
    out = run([str(EXAMPLES / "quickstart.py"), "--epochs", "1", "--out", str(tmp_path / "q")], tmp_path)
    assert "helpful" in out
    assert "harmful" in out
    assert (tmp_path / "q" / "influence" / "result.safetensors").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_hydra_experiment(tmp_path):
    run(
        [
            str(EXAMPLES / "hydra_experiment.py"),
            "experiment=digits_cg",
            "influence.num_candidates=20",
            "report.max_test_points=2",
            "correction.steps.num_steps=1",
            "report.verify=false",
            f"hydra.run.dir={tmp_path}",
        ],
        tmp_path,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ihvp"].endswith("ConjugateGradient")
    assert (tmp_path / "report" / "report.md").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_correction_demo_small(tmp_path):
    run([str(EXAMPLES / "correction_demo.py"), "--small", "--out", str(tmp_path / "c")], tmp_path)
    summary = json.loads((tmp_path / "c" / "correction_demo.json").read_text())
    assert set(summary) >= {"helpful", "harmful", "random"}
    assert (tmp_path / "c" / "correction_demo.md").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_augmentation_demo_small(tmp_path):
    out = run([str(EXAMPLES / "augmentation_demo.py"), "--small", "--out", str(tmp_path / "a")], tmp_path)
    summary = json.loads((tmp_path / "a" / "augmentation_demo.json").read_text())
    assert set(summary) >= {"helpful", "random", "random_at_helpful_lr", "margin"}
    assert summary["pool_size"] == 270
    # 2 steps of 10 pool examples per selection; influence picks the pool's counter-examples of the cue
    runs = summary["per_seed"][0]["helpful"]["runs"]
    assert len(runs[0]["used_indices"]) == 20
    assert summary["helpful"]["counter_fraction_used"] > summary["random"]["counter_fraction_used"]
    assert "influence-chosen" in out
