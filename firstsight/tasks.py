"""Task dispatch: validate the composed config, open the job's MLflow run, run the task.

New tasks (profile, evaluate, export, report) register here under their `task.name`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Dict

from omegaconf import DictConfig

from firstsight.errors import FirstSightError

log = logging.getLogger(__name__)


def _distill(cfg: DictConfig, tracker: Any) -> Dict[str, float]:
    from firstsight.distill import distill

    return distill(cfg, tracker)


TASKS: Dict[str, Callable[[DictConfig, Any], Dict[str, float]]] = {
    "distill": _distill,
}


def run_task(cfg: DictConfig) -> Dict[str, float]:
    """Run one job; user errors end it with a one-line message and exit status 2."""
    from firstsight.validate import validate

    try:
        validate(cfg, tasks=TASKS)
    except FirstSightError as err:
        _exit_with(err)
    from firstsight.tracking import job_tracker

    try:
        with job_tracker(cfg) as tracker:
            return TASKS[cfg.task.name](cfg, tracker)
    except FirstSightError as err:
        _exit_with(err)


def _exit_with(err: FirstSightError) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2)
