"""A Hydra app of your own on lightning_fastif's configs: the package's ConfigStore plus your experiment YAMLs.

    python examples/hydra_experiment.py experiment=digits_cg
    python examples/hydra_experiment.py experiment=digits_cg knn.k=20 -m influence.ihvp.damping=0.3,1.0

Everything in ``lightning_fastif/config.py`` is composable here; ``examples/configs/experiment/*.yaml`` adds
experiments (``# @package _global_`` overrides, as in the lightning-hydra-template).
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from lightning_fastif.app.config import register_configs
from lightning_fastif.app.main import run

register_configs()


@hydra.main(version_base=None, config_path=str(Path(__file__).parent / "configs"), config_name="fastif")
def main(cfg: DictConfig) -> None:
    if cfg.output_dir is None:
        with open_dict(cfg):
            cfg.output_dir = HydraConfig.get().runtime.output_dir
    summary = run(cfg)
    if summary:
        print(f"report: {summary['report']}")


if __name__ == "__main__":
    main()
