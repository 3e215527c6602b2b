"""A Hydra app of your own on lightning_fastif's packaged configs, with your experiment YAMLs next to it.

    python examples/hydra_experiment.py experiment=digits_cg
    python examples/hydra_experiment.py -m experiment=digits_cg influence.ihvp.damping=0.3,1.0

``examples/configs/hydra_experiment.yaml`` is this app's primary config: it takes the package's (``fastif``, from
``pkg://lightning_fastif.app.configs`` on its ``hydra.searchpath``) and adds this folder, so
``examples/configs/experiment/*.yaml`` are experiments (``# @package _global_`` overrides, as in the
lightning-hydra-template). Your own ``data/<name>.yaml`` and ``model/<name>.yaml`` nodes go in the same folder
(docs/APP.md says what the classes must provide). Without a script of your own::

    python -m lightning_fastif hydra.searchpath=[file://$PWD/examples/configs] experiment=digits_cg
"""

import hydra
from omegaconf import DictConfig

from lightning_fastif.app.main import run


@hydra.main(version_base=None, config_path="configs", config_name="hydra_experiment")
def main(cfg: DictConfig) -> None:
    summary = run(cfg)  # output_dir defaults to Hydra's run directory
    if summary:
        print(f"report: {summary['report']}")


if __name__ == "__main__":
    main()
