"""FirstSight entry point: compose the config with Hydra, hand it to the package."""

import hydra
from omegaconf import DictConfig

from firstsight.config import composition
from firstsight.config.schema import register_configs

register_configs()
composition.install()  # an unknown key in an override: one line and exit status 2, not Hydra's report


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    from firstsight.suite.dispatch import run_task  # deferred: --help and --cfg job stay torch-free

    return run_task(cfg)


if __name__ == "__main__":
    main()
