"""What every task does first: pick the device, set threads and seeds, tag the run with the device."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict

from hydra.core.hydra_config import HydraConfig

from firstsight.core.files import write_atomically
from firstsight.core.runtime import device_name, device_type

if TYPE_CHECKING:  # the section's type only: config sits above core
    from firstsight.config.schema import HardwareConfig


def seed_everything(seed: int) -> None:
    import numpy as np  # deferred: the preflight (validate, dispatch) stays torch-free
    import torch  # deferred: the preflight (validate, dispatch) stays torch-free

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_job(hardware: HardwareConfig, seed: int, tracker: Any) -> str:
    """Resolve the device, apply `hardware.num_threads` and `seed`, tag the run; return the device."""
    import torch  # deferred: the preflight (validate, dispatch) stays torch-free

    device = device_type(hardware)
    if hardware.num_threads:
        torch.set_num_threads(hardware.num_threads)
    seed_everything(seed)
    tracker.set_tags({"firstsight.device": device, "firstsight.device_name": device_name(device)})
    return device


def job_output_dir() -> Path:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # composed outside @hydra.main (tests using the compose API)
        return Path.cwd()


def write_job_file(name: str, data: Any) -> None:
    """`data` as JSON in the Hydra job's output directory, atomically. Outside a Hydra job (the
    compose API in tests) nothing is written."""
    try:
        out_dir = HydraConfig.get().runtime.output_dir
    except Exception:
        return
    write_atomically(Path(out_dir) / name, json.dumps(data, indent=1))


def write_job_metrics(metrics: Dict[str, float]) -> None:
    """The job's final metrics as metrics.json in its Hydra output directory (beside .hydra/), so
    scripts read results without MLflow."""
    write_job_file("metrics.json", {k: float(v) for k, v in sorted(metrics.items())})
