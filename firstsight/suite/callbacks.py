"""Hydra callback: one MLflow parent run per sweep, so the UI shows a sweep's jobs together.

`on_multirun_start` creates the parent and leaves its id where jobs find it (an environment
variable for jobs in this process or its children, a file in the sweep directory for jobs on
other machines); `on_multirun_end` closes it as FAILED if any child failed. Before it closes the
parent, the sweep's comparison goes on it (firstsight.tasks.report.sweep: the swept params with
their values, and the report of the finished job runs, tables and plots, as artifacts under
report/), and the sweep prints where to look: the `mlflow ui` command for its store and the
addresses of the compare page of its runs, of its runs in the list and of the comparison. When the SLURM
launcher (firstsight.suite.launcher) reports failed points, the sweep ends before `on_multirun_end`:
the parent is then closed at exit, tagged with the failed points, and the runs of jobs that were
killed (they could not close their own) are marked KILLED with the reason.

The parent's store calls go through firstsight.tracking.tracker.StoreClient, as a job's do: a store that is
busy or down is retried with back-off; if it stays down when the sweep starts, the sweep stops
(`error: the MLflow tracking store <uri> is unavailable ...`, exit status 2) before any job runs;
if it is down when the sweep ends, the parent is left as it is and the error is logged.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from firstsight.config.composition import check_first_point
from firstsight.suite.dispatch import TASKS, exit_on_user_error
from firstsight.suite.launcher import FAILED_JOBS_FILE
from firstsight.suite.validate import validate
from firstsight.tracking.ui import artifacts_url, children_url, compare_runs_url, ui_base, ui_command, view_url

log = logging.getLogger(__name__)


def launches_on_slurm(config: DictConfig) -> bool:
    """The sweep's launcher submits to SLURM (hardware=slurm*, or hydra/launcher=submitit_slurm)."""
    return "Slurm" in str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")


# The comparison's file the printed address opens (the first one the report drew), in the parent's artifacts
FIRST_SHOWN = ("throughput_vs_memory.png", "accuracy_vs_memory.png", "kd_loss_curves.png", "report.md")


def where_to_look(
    uri: str, experiment_id: str, parent: str, run_ids: Sequence[str], view: Optional[str], shown: Optional[str]
) -> str:
    """What a sweep prints at its end: how to open its store in MLflow's UI, and the addresses of
    the compare page of its runs, of its runs in the list (the saved `view`, if any) and of its
    comparison (the parent's artifacts, opened on the file `shown`; None: no comparison)."""
    base = ui_base(uri)
    command = ui_command(uri)
    listed = view_url(base, experiment_id, view) if view else children_url(base, experiment_id, parent)
    lines = [f"MLflow: the sweep's {len(run_ids)} finished runs, under parent run {parent}"]
    lines.append(f"  open the UI:       {command}" if command else f"  the UI:            {base}")
    lines.append(f"  compare the runs:  {compare_runs_url(base, experiment_id, run_ids)}")
    lines.append(f"  the runs, listed:  {listed}")
    if shown:
        lines.append(f"  the comparison:    {artifacts_url(base, experiment_id, parent, shown)}")
    return "\n".join(lines)


class MLflowSweepCallback(Callback):
    def __init__(self) -> None:
        self.client: Optional[Any] = None
        self.parent_run_id: Optional[str] = None
        self.sweep_dir: Optional[Path] = None
        self.tracking: Dict[str, Any] = {}  # the sweep's tracking section, for its comparison report

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if launches_on_slurm(config):
            log.warning(
                "hardware=%s selects the SLURM launcher, which only sweeps use: this job runs on this "
                "machine. Add -m to submit it (python run.py -m ...).",
                config.hardware.name,
            )

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # The values every point shares are checked before the sweep starts (swept values are
        # checked by each job): a typo costs seconds and leaves no parent run behind. Jobs that
        # run on SLURM nodes check the GPUs there, not on this machine.
        check_first_point(config)  # an unknown swept key: one line and exit 2 (firstsight.config.composition), no sweep
        on_slurm = launches_on_slurm(config)
        with exit_on_user_error():
            validate(config, tasks=TASKS, local_device=not on_slurm)
        if not config.tracking.enabled:
            return
        # deferred: a bad config fails in one line before torch, transformers and mlflow load
        from mlflow.tracking import MlflowClient

        # deferred: a bad config fails in one line before torch, transformers and mlflow load
        from firstsight.tracking.tracker import (
            PARENT_RUN_ENV,
            PARENT_RUN_FILE,
            StoreClient,
            absolute_tracking_uri,
            get_or_create_experiment,
            resolve_tracking_uri,
        )

        sweep_dir = Path(str(config.hydra.sweep.dir))
        self.sweep_dir = sweep_dir
        uri = resolve_tracking_uri(config.tracking)
        if on_slurm and absolute_tracking_uri(uri).startswith("sqlite:"):
            log.warning(
                "SLURM jobs will all write the SQLite file %s: many at once collide ('database is "
                "locked'). Log through a tracking server instead: python -m firstsight.tracking.server, then "
                "export MLFLOW_TRACKING_URI=http://<host>:<port> (docs/sweeps-and-slurm.md).",
                absolute_tracking_uri(uri),
            )
        client = StoreClient(MlflowClient(tracking_uri=uri), absolute_tracking_uri(uri))  # retried; names the store
        overrides = " ".join(config.hydra.overrides.task)
        with exit_on_user_error():  # a store that stays down: one line, exit status 2, no job started
            experiment_id = get_or_create_experiment(client, config.tracking.experiment_name)
            run = client.create_run(
                experiment_id,
                run_name=f"sweep {sweep_dir.parent.name}/{sweep_dir.name}: {overrides}",
                tags={
                    "firstsight.sweep_id": str(sweep_dir),
                    "firstsight.sweep_overrides": overrides,
                    "firstsight.task": str(config.task.name),
                    "firstsight.role": "sweep",
                },
            )
        self.client = client
        self.parent_run_id = run.info.run_id
        self.tracking = dict(OmegaConf.to_container(config.tracking, resolve=True))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_RUN_FILE).write_text(self.parent_run_id)
        os.environ[PARENT_RUN_ENV] = self.parent_run_id
        # Hydra skips on_multirun_end when a job ends the sweep (e.g. exit 2 on a bad value):
        # close the parent as FAILED then, rather than leave it RUNNING forever.
        atexit.register(self._finish, True)
        log.info("MLflow sweep run %s (experiment %s)", self.parent_run_id, config.tracking.experiment_name)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._finish(False)

    def _failed_points(self) -> Dict[str, Dict[str, Any]]:
        """The launcher's report of failed points (firstsight.suite.launcher), by job number."""
        path = self.sweep_dir / FAILED_JOBS_FILE if self.sweep_dir else None
        if path is None or not path.is_file():
            return {}
        try:
            return {str(f["job_num"]): f for f in json.loads(path.read_text())}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def _finish(self, ended_early: bool) -> None:
        """Close the parent run: FAILED when the sweep ended early, a child failed or a point
        failed without a run; tag it with the counts and the failed points. A store that stays
        down (after StoreClient's retries) leaves the parent RUNNING, with the error logged."""
        # deferred: a bad config fails in one line before torch, transformers and mlflow load
        from firstsight.tracking.tracker import PARENT_RUN_ENV, TrackingStoreError

        if self.client is None or self.parent_run_id is None:
            return
        parent = self.parent_run_id
        try:
            self._close_parent(ended_early)
        except TrackingStoreError as err:
            earlier = err.__context__
            while earlier is not None:  # report the first failure, not the last try to close the run
                err = earlier if isinstance(earlier, TrackingStoreError) else err
                earlier = earlier.__context__
            log.error(
                "the sweep's MLflow run %s could not be closed (it stays RUNNING; its jobs' runs are "
                "closed by the jobs themselves): %s",
                parent,
                err,
            )
            self.parent_run_id = None
            os.environ.pop(PARENT_RUN_ENV, None)

    def _close_parent(self, ended_early: bool) -> None:
        client, parent = self.client, self.parent_run_id
        try:
            run = client.get_run(parent)
            children = client.search_runs(
                [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
            )
            points = self._failed_points()
            failed, jobs = set(points), set(points)
            for child in children:
                num = child.data.tags.get("firstsight.job_num") or child.info.run_id
                jobs.add(num)
                point = points.get(num)
                if point is not None and child.info.status == "RUNNING":  # a killed job could not close its run
                    client.set_tag(child.info.run_id, "firstsight.error", str(point["reason"])[:4000])
                    client.set_terminated(child.info.run_id, "KILLED" if point.get("state") else "FAILED")
                elif child.info.status != "FINISHED":
                    failed.add(num)
            client.set_tag(parent, "firstsight.jobs", str(len(jobs)))
            client.set_tag(parent, "firstsight.failed_jobs", str(len(failed)))
            if points:
                text = "\n".join(f"#{n} {p['overrides']}: {p['reason']}" for n, p in sorted(points.items()))
                client.set_tag(parent, "firstsight.failed_points", text[:5000])
            finished = [c for c in children if c.info.status == "FINISHED"]
            if finished:
                self._compare(run.info.experiment_id, finished)
            self._close_if_open("FAILED" if ended_early or failed or not children else "FINISHED")
        finally:
            self._close_if_open("FAILED")

    def _compare(self, experiment_id: str, finished: List[Any]) -> None:
        """The sweep's comparison on its parent run, then where to look. A comparison that fails is
        logged and left out: the sweep's outcome is its jobs'."""
        # deferred: a bad config fails in one line before torch, transformers and mlflow load
        from firstsight.tasks.report.sweep import save_sweep_view, sweep_comparison
        from firstsight.tracking.tracker import TrackingStoreError

        parent = self.parent_run_id

        def attempt(what: str, make: Callable[[], Any]) -> Any:
            try:
                return make()
            except TrackingStoreError:  # the store is down: _finish reports it
                raise
            except Exception as err:  # noqa: BLE001 - what cannot be made does not fail the sweep
                log.warning("the sweep's %s could not be saved (parent run %s): %s", what, parent, err)
                return None

        view = attempt("view of its runs", lambda: save_sweep_view(self.client, experiment_id, parent, finished))
        compared = attempt(
            "comparison report",
            lambda: sweep_comparison(self.tracking, self.client, parent, finished, self.sweep_dir / "report"),
        )
        run_ids = [c.info.run_id for c in finished]
        shown = next((f"report/{f}" for f in FIRST_SHOWN if (self.sweep_dir / "report" / f).is_file()), None)
        print(
            where_to_look(self.client.uri, experiment_id, parent, run_ids, view, shown if compared else None),
            flush=True,
        )

    def _close_if_open(self, status: str) -> None:
        # deferred: a bad config fails in one line before torch, transformers and mlflow load
        from firstsight.tracking.tracker import PARENT_RUN_ENV

        if self.client is None or self.parent_run_id is None:
            return
        self.client.set_terminated(self.parent_run_id, status)
        self.parent_run_id = None
        os.environ.pop(PARENT_RUN_ENV, None)
