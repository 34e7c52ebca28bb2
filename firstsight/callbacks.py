"""Hydra callback: one MLflow parent run per sweep, so the UI shows a sweep's jobs together.

`on_multirun_start` creates the parent and leaves its id where jobs find it (an environment
variable for jobs in this process or its children, a file in the sweep directory for jobs on
other machines); `on_multirun_end` closes it as FAILED if any child failed. mlflow is imported
lazily: Hydra instantiates callbacks even for `--help`.
"""

from __future__ import annotations

import atexit
import logging
import os
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class MLflowSweepCallback(Callback):
    def __init__(self) -> None:
        self.client: Optional[Any] = None
        self.parent_run_id: Optional[str] = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # The values every point shares are checked before the sweep starts (swept values are
        # checked by each job): a typo costs seconds and leaves no parent run behind.
        from firstsight.tasks import TASKS, exit_on_user_error
        from firstsight.validate import validate

        with exit_on_user_error():
            validate(config, tasks=TASKS)
        if not config.tracking.enabled:
            return
        from mlflow.tracking import MlflowClient

        from firstsight.tracking import PARENT_RUN_ENV, PARENT_RUN_FILE, get_or_create_experiment, resolve_tracking_uri

        sweep_dir = Path(str(config.hydra.sweep.dir))
        self.client = MlflowClient(tracking_uri=resolve_tracking_uri(config))
        experiment_id = get_or_create_experiment(self.client, config.tracking.experiment_name)
        overrides = " ".join(config.hydra.overrides.task)
        run = self.client.create_run(
            experiment_id,
            run_name=f"sweep {sweep_dir.parent.name}/{sweep_dir.name}: {overrides}",
            tags={
                "firstsight.sweep_id": str(sweep_dir),
                "firstsight.sweep_overrides": overrides,
                "firstsight.task": str(config.task.name),
                "firstsight.role": "sweep",
            },
        )
        self.parent_run_id = run.info.run_id
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_RUN_FILE).write_text(self.parent_run_id)
        os.environ[PARENT_RUN_ENV] = self.parent_run_id
        # Hydra skips on_multirun_end when a job ends the sweep (e.g. exit 2 on a bad value):
        # close the parent as FAILED then, rather than leave it RUNNING forever.
        atexit.register(self._close_if_open, "FAILED")
        log.info("MLflow sweep run %s (experiment %s)", self.parent_run_id, config.tracking.experiment_name)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.client is None or self.parent_run_id is None:
            return
        run = self.client.get_run(self.parent_run_id)
        children = self.client.search_runs(
            [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}'"
        )
        failed = [c for c in children if c.info.status != "FINISHED"]
        self.client.set_tag(self.parent_run_id, "firstsight.jobs", str(len(children)))
        self.client.set_tag(self.parent_run_id, "firstsight.failed_jobs", str(len(failed)))
        self._close_if_open("FAILED" if failed or not children else "FINISHED")

    def _close_if_open(self, status: str) -> None:
        from firstsight.tracking import PARENT_RUN_ENV

        if self.client is None or self.parent_run_id is None:
            return
        self.client.set_terminated(self.parent_run_id, status)
        self.parent_run_id = None
        os.environ.pop(PARENT_RUN_ENV, None)
