"""What every task does first: pick the device, set threads and seeds, tag the run with the device."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_job(cfg: DictConfig, tracker: Any) -> str:
    """Resolve the device, apply `hardware.num_threads` and `seed`, tag the run; return the device."""
    import torch

    from firstsight.tracking import device_name
    from firstsight.validate import device_type

    device = device_type(cfg)
    if cfg.hardware.num_threads:
        torch.set_num_threads(cfg.hardware.num_threads)
    seed_everything(cfg.seed)
    tracker.set_tags({"firstsight.device": device, "firstsight.device_name": device_name(device)})
    return device


def job_output_dir() -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # composed outside @hydra.main (tests using the compose API)
        return Path.cwd()
