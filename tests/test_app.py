"""The main job end to end at its smallest setting (CI runs it), in-process and as a 2-process DDP command."""

import json
import subprocess
import sys

import pytest
from hydra import compose, initialize
from hydra.core.global_hydra import GlobalHydra

from lightning_fastif.app.config import register_configs

REPORT_FILES = [
    "report.md",
    "index.html",
    "influence_graph.png",
    "self_influence.png",
    "self_influence_top.png",
    "correction_accuracy.png",
]


def check_run(out):
    summary = json.loads((out / "summary.json").read_text())
    for name in REPORT_FILES:
        assert (out / "report" / name).stat().st_size > 0, name
    assert list((out / "report").glob("explain_test_*.png"))
    assert (out / "influence" / "result.safetensors").exists()
    assert (out / "snapshot" / "manifest.json").exists()
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    # 5% of labels are flipped; self-influence must beat a random pick of 10% by far.
    assert summary["mislabel_top10_fraction"] > 3 * summary["mislabel_random_fraction"]
    report = (out / "report" / "report.md").read_text()
    assert "positive = helpful" in report.replace("\\", "")
    assert "verify" in report
    return summary


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_main_job_smoke_in_process(tmp_path):
    from lightning_fastif.app.main import run

    register_configs()
    GlobalHydra.instance().clear()
    with initialize(version_base=None, config_path=None):
        cfg = compose(config_name="fastif", overrides=["experiment=smoke", f"output_dir={tmp_path}"])
    GlobalHydra.instance().clear()
    summary = run(cfg)
    assert summary["report"].endswith("report.md")
    check_run(tmp_path)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(1200)
def test_main_job_ddp_two_processes_writes_one_report(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "lightning_fastif",
        "experiment=smoke",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        f"output_dir={tmp_path}",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1100, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_run(tmp_path)
    assert len(list(tmp_path.rglob("report.md"))) == 1
    manifest = json.loads((tmp_path / "influence" / "manifest.json").read_text())
    assert manifest["world_size"] == 2


def test_bad_override_fails_before_training(tmp_path):
    cmd = [sys.executable, "-m", "lightning_fastif", "knn.k=-3", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert "knn.k=-3 is invalid" in proc.stderr
    assert not (tmp_path / "snapshot").exists()  # nothing was trained


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_verify_mode_damping_sweep_multirun(tmp_path):
    """``-m influence.ihvp.damping=...`` with ``mode=verify``: one verify.json per damping (issue 10's sweep)."""
    cmd = [
        sys.executable,
        "-m",
        "lightning_fastif",
        "-m",
        "mode=verify",
        "experiment=smoke",
        "influence.ihvp.damping=1.0,3.0",
        "report.verify_num_train=80",
        f"hydra.sweep.dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=850, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(tmp_path.glob("*/verify.json"))
    assert len(runs) == 2
    dampings = sorted(json.loads(p.read_text())["ihvp"]["damping"] for p in runs)
    assert dampings == [1.0, 3.0]
    for p in runs:
        checks = json.loads(p.read_text())["verify"]
        assert -1.0 <= checks["pearson"] <= 1.0
        assert checks["damping"] in (1.0, 3.0)
    assert not list(tmp_path.glob("*/report"))  # verify mode writes no report
    from lightning_fastif.app.sweep import summarize_verify_sweep

    png = summarize_verify_sweep(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["damping"] for r in rows] == [1.0, 3.0]
