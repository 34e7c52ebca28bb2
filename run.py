"""FirstSight entry point: compose the config with Hydra, hand it to the package."""

import hydra
from omegaconf import DictConfig

from firstsight.config import register_configs

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    from firstsight.tasks import run_task

    return run_task(cfg)


if __name__ == "__main__":
    main()
