"""Every config composes and instantiates, its keys are the constructors' arguments, and bad overrides fail early."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from lightning_fastif.app.config import (
    EXPERIMENTS,
    GROUPS,
    CallbacksConfig,
    TrainerConfig,
    instantiate,
    register_configs,
    target_arguments,
    validate_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def target_nodes(node, path=""):
    """Yield (path, node) for every mapping with a _target_ in a config tree."""
    if OmegaConf.is_dict(node):
        if "_target_" in node:
            yield path, node
        for key, value in node.items_ex(resolve=False):
            yield from target_nodes(value, f"{path}.{key}" if path else str(key))


@pytest.fixture
def hydra_store():
    register_configs()
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def compose_store(overrides=()):
    from hydra import initialize

    with initialize(version_base=None, config_path=None):
        return compose(config_name="fastif", overrides=list(overrides))


def test_every_registered_node_matches_its_signature_and_instantiates():
    nodes = [node for options in GROUPS.values() for node in options.values()]
    nodes += [
        TrainerConfig,
        CallbacksConfig().feature_snapshot.__class__,
        CallbacksConfig().checkpoint_snapshot.__class__,
    ]
    for node in nodes:
        cfg = OmegaConf.structured(node)
        keys = {k for k in cfg if k != "_target_"}
        accepted = target_arguments(cfg._target_)
        assert keys <= accepted, (node.__name__, keys - accepted)
        if not cfg._target_.startswith("lightning_fastif.app.models.Text") and "interpolation" not in str(cfg):
            resolved = {k: v for k, v in OmegaConf.to_container(cfg).items() if not (isinstance(v, str) and "${" in v)}
            instantiate(resolved)


@pytest.mark.parametrize("experiment", [None, *EXPERIMENTS])
def test_store_composes_with_every_experiment(hydra_store, experiment):
    cfg = compose_store([] if experiment is None else [f"experiment={experiment}"])
    validate_config(cfg)
    OmegaConf.resolve(cfg)
    for path, node in target_nodes(cfg):
        assert set(node) - {"_target_"} <= target_arguments(node._target_), path


@pytest.mark.parametrize("ihvp", sorted(GROUPS["influence/ihvp"]))
def test_estimator_overrides_instantiate(hydra_store, ihvp):
    cfg = compose_store([f"influence/ihvp={ihvp}", "knn.k=50"])
    assert cfg.knn.k == 50
    est = instantiate(cfg.influence.ihvp)
    assert type(est).__name__ == cfg.influence.ihvp._target_.rsplit(".", 1)[1]


def test_yaml_files_mirror_the_store(hydra_store):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base=None, config_dir=str(CONFIGS)):
        from_yaml = compose(config_name="job", overrides=["experiment=smoke"])
    GlobalHydra.instance().clear()
    from_store = compose_store(["experiment=smoke"])
    a, b = OmegaConf.to_container(from_yaml), OmegaConf.to_container(from_store)
    a.pop("defaults", None), b.pop("defaults", None)
    assert a == b
    for path in CONFIGS.rglob("*.yaml"):
        for key, node in target_nodes(OmegaConf.load(path)):
            assert set(node) - {"_target_"} <= target_arguments(node._target_), (path, key)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("knn.kk=3", "Could not override 'knn.kk'"),
        ("knn.k=many", "Error merging override knn.k=many"),
        ("trainer.max_epochs=two", "Error merging override trainer.max_epochs=two"),
        ("influence/ihvp=newton", "Could not find 'influence/ihvp/newton'"),
    ],
)
def test_wrong_override_fails_in_hydra(hydra_store, override, match):
    with pytest.raises(Exception, match=match):
        compose_store([override])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("knn.k=-5", r"knn.k=-5 is invalid; accepted: a positive integer or null"),
        ("correction.selection=best", "correction.selection='best' is invalid"),
        ("knn.metric=manhattan", "knn.metric='manhattan' is invalid"),
    ],
)
def test_out_of_range_fails_before_training(hydra_store, override, match):
    cfg = compose_store([override])
    with pytest.raises(ValueError, match=match):
        validate_config(cfg)


def test_bad_estimator_value_fails_at_instantiation(hydra_store):
    cfg = compose_store(["influence.ihvp.damping=-1"])
    with pytest.raises(Exception, match="damping: must be a finite number >= 0"):
        instantiate(cfg.influence.ihvp)


def test_plain_python_needs_no_hydra():
    import subprocess
    import sys

    code = "import sys, lightning_fastif; assert 'hydra' not in sys.modules and 'faiss' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
