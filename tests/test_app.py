"""The main job end to end: at its smallest on digits (in-process and as a 2-process DDP command), and on a model
and a datamodule of the user's own (defined here, outside the package) selected from a config folder of theirs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader

from lightning_fastif.app.config import CONFIG_MODULE, CONFIG_NAME
from lightning_fastif.errors import ArgumentError

ROOT = Path(__file__).resolve().parents[1]
REPORT_FILES = [
    "report.md",
    "index.html",
    "influence_graph.png",
    "self_influence.png",
    "self_influence_top.png",
    "correction_accuracy.png",
]


def compose_app(overrides=()):
    with initialize_config_module(version_base=None, config_module=CONFIG_MODULE):
        return compose(config_name=CONFIG_NAME, overrides=list(overrides))


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

    summary = run(compose_app(["experiment=smoke", f"output_dir={tmp_path}"]))
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
    cmd = [sys.executable, "-m", "lightning_fastif", "influence.num_candidates=-3", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert "influence.num_candidates: expected an integer >= 1 or None, got -3" in proc.stderr
    assert not (tmp_path / "snapshot").exists()  # nothing was trained


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_verify_mode_damping_sweep_multirun(tmp_path):
    """``-m influence.ihvp.damping=...`` with ``mode=verify``: one verify.json per damping."""
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


# ---------------------------------------------------------------------------------------------------------------
# A user's own model and data: dict items {"x": features, "y": label}, neither images nor texts.
# ---------------------------------------------------------------------------------------------------------------


class BlobsDataModule(LightningDataModule):
    """Two overlapping Gaussian blobs in 4 dimensions; items are dicts whose label key is ``"y"``."""

    def __init__(self, num_examples: int = 96, batch_size: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_dataset"):
            return
        n = self.num_examples
        generator = torch.Generator().manual_seed(self.seed)
        y = torch.arange(n) % 2
        x = torch.randn(n, 4, generator=generator) + 1.0 * y[:, None]
        items = [{"x": x[i], "y": int(y[i])} for i in range(n)]
        self.train_dataset = items[: n // 2]
        self.val_dataset = items[n // 2 : 3 * n // 4]
        self.test_dataset = items[3 * n // 4 :]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.batch_size)


class BlobsClassifier(LightningModule):
    """A two-layer MLP with the one method the app needs beyond Lightning's: ``per_example_loss``."""

    def __init__(self, num_features: int = 4, hidden: int = 6, lr: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hidden = nn.Linear(num_features, hidden)
        self.classifier = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.hidden(x)))

    def per_example_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.per_example_loss(batch).mean()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.per_example_loss(batch).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class MeanLossClassifier(BlobsClassifier):
    """A common mistake: the loss averaged over the batch instead of one loss per example."""

    def per_example_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return super().per_example_loss(batch).mean()


@pytest.fixture
def user_configs(tmp_path):
    """The user's config folder: their own data and model nodes (nothing inherited from the built-in ones)."""
    folder = tmp_path / "my_configs"
    (folder / "data").mkdir(parents=True)
    (folder / "model").mkdir()
    (folder / "data" / "blobs.yaml").write_text(f"_target_: {__name__}.BlobsDataModule\nnum_examples: 96\n")
    (folder / "model" / "mlp.yaml").write_text(f"_target_: {__name__}.BlobsClassifier\nhidden: 6\nlr: 0.5\n")
    return folder


def user_overrides(folder, out, *more, correction=True):
    steps = ["correction.steps.num_anchors=2", "correction.steps.top_m=2", "correction.steps.num_steps=1"]
    return [
        f"hydra.searchpath=[file://{folder}]",
        "data=blobs",
        "model=mlp",
        f"output_dir={out}",
        "trainer.max_epochs=4",
        "trainer.enable_progress_bar=false",
        "influence/ihvp=exact",
        "influence.num_candidates=12",
        *(steps if correction else ["~correction"]),
        "report.max_test_points=3",
        "report.num_explained=2",
        "report.top_n=3",
        "report.verify_num_train=20",
        *more,
    ]


@pytest.mark.timeout(600)
def test_users_model_and_datamodule_end_to_end(tmp_path, user_configs):
    """fit, influence and a table report on dict items labelled under "y", from the user's config folder."""
    from lightning_fastif.app.main import run

    out = tmp_path / "run"
    cfg = compose_app(user_overrides(user_configs, out))
    assert dict(cfg.model) == {"_target_": f"{__name__}.BlobsClassifier", "hidden": 6, "lr": 0.5}  # replaced whole
    summary = run(cfg)

    dm = BlobsDataModule()
    dm.setup()
    test_labels = [item["y"] for item in dm.test_dataset]
    train_labels = [item["y"] for item in dm.train_dataset]
    explained = summary["explained_test_indices"]
    # The misclassified test points, at most report.max_test_points=3 of them (the first 3 when none is wrong).
    assert len(explained) == min(3, summary["num_misclassified"] or 3)
    assert summary["ihvp"] == "lightning_fastif.ExactInverse"
    result = json.loads((out / "influence" / "manifest.json").read_text())
    assert result["status"] == "complete"
    report = (out / "report" / "report.md").read_text().replace("\\", "")
    assert not list((out / "report").glob("explain_test_*.png"))  # no images_of / texts_of: tables instead
    for index in explained[:2]:
        assert f"test example {index}: label {test_labels[index]}, predicted" in report
    assert "| train index | label | influence |" in report.replace("|  |", "|")
    rows = re.findall(r"^\| (helpful|harmful) \| (\d+) \| (\d+) \| (-?[\d.e+-]+) \|$", report, flags=re.MULTILINE)
    assert len(rows) == 2 * 2 * 3  # two examples, three helpful and three harmful each
    assert all(int(label) == train_labels[int(index)] for _, index, label, _ in rows)  # read under "y"
    assert all((float(score) > 0) == (kind == "helpful") for kind, _, _, score in rows)
    assert "self-influence" in report
    assert summary["verify"]["num_train"] == 20


def test_report_disabled_skips_the_report(tmp_path, user_configs):
    from lightning_fastif.app.main import run

    out = tmp_path / "run"
    overrides = user_overrides(user_configs, out, "report.enabled=false", "report.verify=false", correction=False)
    summary = run(compose_app(overrides))
    assert "report" not in summary
    assert not (out / "report").exists()
    assert (out / "summary.json").is_file()
    assert (out / "influence" / "result.safetensors").is_file()


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (
            "splits.explain=holdout",
            r"splits\.explain: expected a split whose dataset .*BlobsDataModule\.holdout_dataset",
        ),
        (f"model._target_={__name__}.MeanLossClassifier", r"model\.per_example_loss: expected a Tensor of shape \[2\]"),
        (f"model._target_={__name__}.nn.Linear", r"model: expected only arguments of .*nn\.Linear.*\['hidden', 'lr'\]"),
    ],
)
def test_users_mistakes_fail_at_start_up(tmp_path, user_configs, override, match):
    from lightning_fastif.app.main import run

    out = tmp_path / "run"
    with pytest.raises(ArgumentError, match=match):
        run(compose_app(user_overrides(user_configs, out, override)))
    assert not (out / "snapshot").exists()  # nothing was trained


def test_installed_app_finds_its_configs_without_a_checkout(tmp_path):
    """``python -m lightning_fastif`` run from an unrelated folder composes the packaged configs."""
    cmd = [
        sys.executable,
        "-m",
        "lightning_fastif",
        "--cfg",
        "job",
        "experiment=correction",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "_target_: lightning_fastif.app.data.SpuriousDigitsDataModule" in proc.stdout
    assert "anchors: challenge" in proc.stdout
